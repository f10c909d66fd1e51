"""Process wiring: Redis clients, the HTTP server and the worker, started and stopped in order.

Shutdown order matters for "no lost message": stop accepting webhooks first, then let the
worker finish what it holds within SHUTDOWN_GRACE_S and hand back the rest (released for any
worker to take at once), then close the clients.
"""

from __future__ import annotations

import asyncio
import signal

import aiohttp
import structlog
from aiohttp import web

from . import admin, redis_client
from .app import create_app
from .chatwoot import ChatwootClient
from .config import Settings
from .flags import Flags
from .llm import LLMClient
from .presence import Presence
from .processor import Processor
from .scheduler import Worker
from .store import BufferStore

log = structlog.get_logger("buffer_service.service")


async def run(settings: Settings, *, http: bool = True, worker: bool = True,
              stop: asyncio.Event | None = None) -> None:
    if worker:
        settings.require_worker()
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            loop.add_signal_handler(sig, stop.set)
        except (NotImplementedError, RuntimeError):  # not the main thread (tests)
            pass

    redis = await redis_client.connect(settings)
    store = BufferStore(redis, settings)
    flags = Flags(redis, settings)
    log.info("starting", http=http, worker=worker, settings=settings.redacted())

    runner: web.AppRunner | None = None
    if http:
        runner = web.AppRunner(create_app(settings, store, flags), access_log=None)
        await runner.setup()
        await web.TCPSite(runner, settings.host, settings.port).start()
        log.info("listening", host=settings.host, port=settings.port)
    elif worker and settings.metrics_port:
        # A worker-only process has no HTTP server; it serves its own /metrics (metrics.py).
        runner = web.AppRunner(admin.metrics_app(store, flags), access_log=None)
        await runner.setup()
        await web.TCPSite(runner, settings.host, settings.metrics_port).start()

    worker_task: asyncio.Task[None] | None = None
    session: aiohttp.ClientSession | None = None
    llm: LLMClient | None = None
    if worker:
        session = aiohttp.ClientSession()
        llm = LLMClient(settings)
        chatwoot = ChatwootClient(settings, session)
        processor = Processor(settings, store, llm, chatwoot, flags,
                              Presence(settings, chatwoot, session))
        worker_task = asyncio.create_task(Worker(store, processor).run(stop))

    try:
        if worker_task is not None:
            # A crashed worker loop must end the process (and let the orchestrator restart it)
            # rather than leave a server that buffers forever and answers nothing.
            done, _ = await asyncio.wait([worker_task, asyncio.ensure_future(stop.wait())],
                                         return_when=asyncio.FIRST_COMPLETED)
            if worker_task in done:
                worker_task.result()
        else:
            await stop.wait()
    finally:
        log.info("stopping")
        stop.set()
        if runner is not None:
            await runner.cleanup()
        if worker_task is not None:
            await asyncio.gather(worker_task, return_exceptions=True)
        if session is not None:
            await processor.presence.close()
            await session.close()
        if llm is not None:
            await llm.close()
            await processor.media.close()
        await redis.aclose()
        log.info("stopped")
