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
from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from . import admin
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


def make_redis(settings: Settings, *, blocking: bool = False) -> Redis:
    """A client that retries a command a few times across a reconnect, with backoff.

    `blocking` is for the pub/sub connection, which waits for messages without a read timeout.
    """
    # A blocking pool: a burst of concurrent webhooks waits briefly for a connection instead
    # of failing with "Too many connections".
    pool = BlockingConnectionPool.from_url(
        settings.redis_url,
        max_connections=64,
        timeout=5,
        socket_connect_timeout=2,
        socket_timeout=None if blocking else 5,
        retry=Retry(ExponentialBackoff(cap=0.5, base=0.05), 3),
        retry_on_error=[RedisConnectionError, RedisTimeoutError],
        health_check_interval=0 if blocking else 30,
    )
    return Redis(connection_pool=pool)


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

    redis = make_redis(settings)
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
    pubsub_redis: Redis | None = None
    if worker:
        session = aiohttp.ClientSession()
        llm = LLMClient(settings)
        pubsub_redis = make_redis(settings, blocking=True)
        chatwoot = ChatwootClient(settings, session)
        processor = Processor(settings, store, llm, chatwoot, flags,
                              Presence(settings, chatwoot, session))
        worker_task = asyncio.create_task(Worker(store, processor, pubsub_redis).run(stop))

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
        if pubsub_redis is not None:
            await pubsub_redis.aclose()
        await redis.aclose()
        log.info("stopped")
