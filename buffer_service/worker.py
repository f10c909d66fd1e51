"""The worker loop: sleep until the next deadline (or a wake-up), claim due work, process it.

Why not just react to keyspace-expiry events, as the first design had it? Redis publishes
`expired` when it happens to delete the key, which is hundreds of ms to many seconds late under
load, and an event published while no subscriber is connected is gone (see
docs/redis-timing.md). So the deadline index decides: every claim returns the next
deadline of its shard and the loop sleeps exactly until the earliest one. Two kinds of message
only shorten a sleep: the append script's own wake-up (a new burst, whose deadline the loop
cannot know yet) and the expiry event of a conversation's TTL key. A periodic sweep
(`BUFFER_PROCESSING_INTERVAL_MS`) bounds the damage if both are missed.
"""

from __future__ import annotations

import asyncio
import contextlib

import structlog
from redis.asyncio import Redis
from redis.exceptions import RedisError

from . import metrics
from .flags import FLAGS_CHANGED, MAX_AGE_S, Flags
from .journal import SweepLog
from .processor import Processor
from .store import Batch, BufferStore

log = structlog.get_logger("buffer_service.worker")


class Worker:
    def __init__(self, store: BufferStore, processor: Processor, *, flags: Flags, sweep_log: SweepLog,
                 pubsub_redis: Redis) -> None:
        self.store = store
        self.processor = processor
        self.flags = flags
        self.sweep_log = sweep_log
        self.settings = store.settings
        self._pubsub_redis = pubsub_redis
        self._wake = asyncio.Event()
        self._tasks: set[asyncio.Task[str]] = set()
        self._next_shard = 0
        self.claimed = 0

    def wake(self) -> None:
        self._wake.set()

    async def run(self, stop: asyncio.Event) -> None:
        await self._enable_expiry_events()
        listener = asyncio.create_task(self._listen())
        log.info("worker_started", shards=self.settings.shards,
                 concurrency=self.settings.worker_concurrency)
        try:
            while not stop.is_set():
                paused = not await self.flags.processing()
                if paused:  # the processing switch: claim nothing, look at it again soon
                    self._wake.clear()
                    delay = MAX_AGE_S
                else:
                    delay = await self._sweep()
                await self.sweep_log.swept(paused=paused)
                await self._sleep(delay, stop)
        finally:
            listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await listener
            await self._drain()

    async def _sweep(self) -> float:
        """Claim as much due work as there are free slots; returns seconds until the next."""
        self._wake.clear()
        s = self.settings
        delay = s.processing_interval_ms / 1000
        free = s.worker_concurrency - len(self._tasks)
        if free <= 0:
            return delay  # a finishing task wakes the loop
        # Start at a different shard each time so one busy shard cannot starve the others.
        start = self._next_shard
        self._next_shard = (start + 1) % s.shards
        for i in range(s.shards):
            shard = (start + i) % s.shards
            try:
                now, next_ms, batches = await self.store.claim(shard, free)
            except RedisError as exc:
                # One shard's failure must not keep the others from being served.
                log.warning("claim_failed", shard=shard, error=str(exc))
                delay = min(delay, 1.0)
                continue
            for batch in batches:
                self._start(batch)
            free -= len(batches)
            if next_ms >= 0:
                delay = min(delay, max(0.0, (next_ms - now) / 1000))
            if free <= 0:
                return delay
        return delay

    def _start(self, batch: Batch) -> None:
        self.claimed += 1
        metrics.claimed(batch)
        self.sweep_log.claimed(batch)
        task = asyncio.create_task(self.processor.process(batch), name=f"batch-{batch.id}")
        self._tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[str]) -> None:
        self._tasks.discard(task)
        metrics.batch_outcome(task)
        self._wake.set()  # a slot is free again

    async def _sleep(self, delay: float, stop: asyncio.Event) -> None:
        if delay <= 0 or self._wake.is_set():
            return
        waiters = [asyncio.ensure_future(self._wake.wait()), asyncio.ensure_future(stop.wait())]
        try:
            await asyncio.wait(waiters, timeout=delay, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waiters:
                w.cancel()

    async def _drain(self) -> None:
        """On shutdown, let in-flight batches finish within the grace period; the processor
        hands back the rest (a cancelled batch is released for any worker to take at once)."""
        if not self._tasks:
            return
        log.info("worker_draining", in_flight=len(self._tasks))
        _, pending = await asyncio.wait(self._tasks, timeout=self.settings.shutdown_grace_s)
        if pending:
            log.warning("worker_releasing_batches", count=len(pending))
            for task in pending:
                task.cancel()
            # Releasing is one Redis call each; past this, their leases lapse and nothing is lost.
            await asyncio.wait(pending, timeout=2)

    async def _enable_expiry_events(self) -> None:
        """Turn on expired-key events if the server allows it; the index works without them."""
        redis = self.store.redis
        try:
            # redis-py decodes CONFIG GET's names and values to str whatever the client's settings.
            current = (await redis.config_get("notify-keyspace-events")).get("notify-keyspace-events") or ""
            has_expired = "x" in current or "A" in current
            if not (has_expired and "E" in current):
                await redis.config_set("notify-keyspace-events", "".join(sorted(set(current + "Ex"))))
        except RedisError as exc:  # CONFIG refused (managed Redis), or Redis not up yet
            log.warning("expiry_events_unavailable", error=str(exc),
                        note="deadlines still flush from the index")

    def _reconnected(self, connection: object) -> None:
        self._wake.set()

    async def _listen(self) -> None:
        """Turn wake-up messages and TTL-key expiry events into an early sweep."""
        db = self._pubsub_redis.connection_pool.connection_kwargs.get("db", 0)
        expired = f"__keyevent@{db}__:expired"
        backoff = 0.2
        while True:
            pubsub = self._pubsub_redis.pubsub()
            try:
                await pubsub.subscribe(self.store.keys.wake, expired)
                # Events published while we were not subscribed are gone: look now, and after
                # every reconnect, including those the client makes on its own and re-subscribes.
                self._wake.set()
                if pubsub.connection is not None:
                    pubsub.connection.register_connect_callback(self._reconnected)
                backoff = 0.2
                async for message in pubsub.listen():
                    if message["type"] != "message":
                        continue
                    channel = message["channel"]
                    if isinstance(channel, bytes):
                        channel = channel.decode()
                    data = message["data"]
                    data = data.decode() if isinstance(data, bytes) else str(data)
                    if channel == expired:
                        if not self.store.keys.is_deadline(data):
                            continue
                    elif data == FLAGS_CHANGED:
                        self.flags.invalidate()
                    self._wake.set()
            except (RedisError, OSError) as exc:
                log.warning("wakeup_subscription_lost", error=str(exc), retry_in_s=backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
            finally:
                with contextlib.suppress(Exception):
                    # redis-py leaves PubSub.aclose unannotated; it returns None.
                    await pubsub.aclose()  # type: ignore[no-untyped-call]
