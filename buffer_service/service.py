"""Process wiring: every long-lived object (Redis clients, the store, limits, flags, operations,
the webhook and sweep logs, the LLM, Chatwoot and Evolution clients, typing indicators, the
downloader and voice-note transcripts) is built once here and passed to what uses it; the HTTP
server and the worker are started and stopped in order.

Shutdown order matters for "no lost message": stop accepting webhooks first, then let the
worker finish what it holds within SHUTDOWN_GRACE_S and hand back the rest (released for any
worker to take at once), then close the clients.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal

import aiohttp
import structlog
from aiohttp import web

from . import redis_client
from .app import create_app, metrics_app
from .chatwoot import ChatwootClient
from .config import Settings
from .downloads import Downloader
from .flags import Flags
from .handoff import Handover
from .journal import SweepLog, WebhookLog
from .limits import Limits
from .llm import LLMClient
from .media import Media
from .ops import Operations
from .presence import EvolutionClient, Presence
from .processor import Processor
from .store import BufferStore
from .transcripts import Transcripts
from .worker import Worker

log = structlog.get_logger("buffer_service.service")


async def run(settings: Settings, *, http: bool = True, worker: bool = True,
              stop: asyncio.Event | None = None) -> None:
    """Build every long-lived object once, here, and hand it to what uses it; each one's close is
    registered right after it is built, so that teardown closes in the reverse order whatever
    step fails: the HTTP server first, then the worker, then the clients they used."""
    if worker:
        settings.require_worker()
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            loop.add_signal_handler(sig, stop.set)
        except (NotImplementedError, RuntimeError):  # not the main thread (tests)
            pass
    log.info("starting", http=http, worker=worker, settings=settings.redacted())

    async with contextlib.AsyncExitStack() as stack:
        stack.callback(log.info, "stopped")
        redis = await redis_client.connect(settings)
        stack.push_async_callback(redis.aclose)
        store = BufferStore(redis, settings)
        flags = Flags(redis, settings)
        limits = Limits(store)
        operations = Operations(store, flags)
        # One downloader and one transcript keeper per process: the webhook side starts voice
        # notes' transcriptions and the worker side awaits them.
        downloader = Downloader(settings)
        stack.push_async_callback(downloader.close)
        transcripts = Transcripts(settings, store, limits, downloader)
        stack.push_async_callback(transcripts.close)

        worker_task: asyncio.Task[None] | None = None
        if worker:
            worker_task = _start_worker(settings, stack, stop, store=store, flags=flags, limits=limits,
                                        downloader=downloader, transcripts=transcripts)
        if http:
            webhook_log = WebhookLog(redis, settings)
            stack.push_async_callback(webhook_log.aclose)
            await _serve(stack, create_app(settings, store, flags=flags, operations=operations,
                                           webhook_log=webhook_log, transcripts=transcripts),
                         settings.host, settings.port)
            log.info("listening", host=settings.host, port=settings.port)
        elif worker and settings.metrics_port:
            # A worker-only process has no HTTP server; it serves its own /metrics (metrics.py).
            await _serve(stack, metrics_app(operations), settings.host, settings.metrics_port)

        try:
            await _until_stopped(stop, worker_task)
        finally:
            log.info("stopping")
            stop.set()


def _start_worker(settings: Settings, stack: contextlib.AsyncExitStack, stop: asyncio.Event, *,
                  store: BufferStore, flags: Flags, limits: Limits, downloader: Downloader,
                  transcripts: Transcripts) -> asyncio.Task[None]:
    """The worker's clients and parts, and its loop started; `stop` ends the loop."""
    session = aiohttp.ClientSession()
    stack.push_async_callback(session.close)
    llm = LLMClient(settings)
    stack.push_async_callback(llm.close)
    chatwoot = ChatwootClient(settings, session)
    evolution = EvolutionClient(settings, session) if settings.evolution_api_url else None
    presence = Presence(settings, chatwoot, evolution)
    # Before the session closes: the last typing indicators' `off` calls go out through it.
    stack.push_async_callback(presence.close)
    processor = Processor(settings, store, flags=flags, limits=limits, llm=llm, chatwoot=chatwoot,
                          media=Media(settings, store, downloader, transcripts), presence=presence,
                          handover=Handover(settings, store, chatwoot))
    sweep_log = SweepLog(store.redis, settings)
    stack.push_async_callback(sweep_log.aclose)
    loop = Worker(store, processor, flags=flags, sweep_log=sweep_log)
    task = asyncio.create_task(loop.run(stop))

    async def finish() -> None:
        # The loop hands back what it could not finish within SHUTDOWN_GRACE_S (worker.py).
        stop.set()
        await asyncio.gather(task, return_exceptions=True)

    stack.push_async_callback(finish)
    return task


async def _serve(stack: contextlib.AsyncExitStack, app: web.Application, host: str, port: int) -> None:
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    stack.push_async_callback(runner.cleanup)
    await web.TCPSite(runner, host, port).start()


async def _until_stopped(stop: asyncio.Event, worker_task: asyncio.Task[None] | None) -> None:
    if worker_task is None:
        await stop.wait()
        return
    # A crashed worker loop must end the process (and let the orchestrator restart it) rather
    # than leave a server that buffers forever and answers nothing.
    stopped = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait([worker_task, stopped], return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopped.cancel()
    if worker_task.done():
        worker_task.result()
