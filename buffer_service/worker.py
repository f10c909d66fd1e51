"""The worker loop: sleep until the next deadline (or a wake-up), claim due work, process it.

Why not just react to keyspace-expiry events, as the first design had it? Redis publishes
`expired` when it happens to delete the key, which is hundreds of ms to many seconds late under
load, and an event published while no subscriber is connected is gone (see
docs/redis-timing.md). So the deadline index decides: every claim returns the next
deadline of its shard and the loop sleeps exactly until the earliest one. Two kinds of message
only shorten a sleep: the append script's own wake-up (a new burst, whose deadline the loop
cannot know yet) and the expiry event of a conversation's TTL key. A periodic sweep
(`BUFFER_PROCESSING_INTERVAL_MS`) bounds the damage if both are missed.

A sweep claims only from the shards that have work by now: those whose last claim said so
(its next deadline has come, or it had more due than there were free slots), those a wake-up
message or an expiry event named, and every shard after a wake-up that names none (an older
version's, a flag change, a reconnect) and at each periodic sweep. Claiming from all shards
on every wake-up and every finished batch cost a round trip each (16 by default): 63 claim
calls for one burst on an idle worker, 1-2 now (BENCHMARKS.md §8).

The loop itself never waits on Redis but for the flags (at most flags.RELOAD_WAIT_S): a sweep
starts the claims, one task per node holding due shards (claims.py), and their ends wake the
loop; a cluster node that hangs then delays only its own shards.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import math
from collections.abc import AsyncIterator
from typing import Any

import structlog
from redis.asyncio import Redis
from redis.asyncio.client import PubSub
from redis.exceptions import RedisError

from . import metrics, redis_client
from .claims import Claims
from .flags import FLAGS_CHANGED, MAX_AGE_S, Flags
from .journal import SweepLog
from .processor import Processor
from .schedule import ClaimSchedule
from .store import Batch, BufferStore

log = structlog.get_logger("buffer_service.worker")

# How often a cluster's primaries are looked at for one the subscriptions do not cover yet (a
# failed node is noticed at once, by its broken subscription).
TOPOLOGY_CHECK_S = 5.0
# A subscription quiet this long is sent a PING; one whose PING is not answered within as long
# again (counted from the PING sent) is taken for lost (a NAT or load balancer that dropped the
# idle flow without a reset leaves the read waiting forever) and made again, which also looks at
# every shard.
HEARTBEAT_S = 3.0
# Outcomes (Processor.process) whose scripts publish a wake-up for whatever they make due (a
# superseded batch's new deadline, a batch queued behind this one): lib.lua close_batch.
# tests/test_ended.py runs each outcome's script and keeps this set equal to those.
_ENDED = frozenset({"completed", "skipped", "superseded", "failed"})


class Worker:
    def __init__(self, store: BufferStore, processor: Processor, *, flags: Flags,
                 sweep_log: SweepLog) -> None:
        self.store = store
        self.processor = processor
        self.flags = flags
        self.sweep_log = sweep_log
        self.settings = store.settings
        self._wake = asyncio.Event()
        self._tasks: set[asyncio.Task[str]] = set()
        self._next_shard = 0
        self._schedule = ClaimSchedule(self.settings.shards,
                                       self.settings.processing_interval_ms / 1000)
        self._claims = Claims(store, self._schedule, start=self._start, ended=self._wake.set,
                             free=self._free)
        self._backoff = 0.2  # before subscribing again after a lost subscription
        self.claimed = 0

    def wake(self) -> None:
        self._look()

    def _due_at(self, shard: int | None, at_ms: str) -> None:
        """A wake-up message's "<ms> <key>": `shard` has work at Redis time `at_ms`."""
        try:
            at = float(at_ms)
        except ValueError:
            at = math.nan
        self._schedule.due_at(shard, at)
        self._wake.set()

    def _look(self, shard: int | None = None) -> None:
        """Claim from `shard` (None: from every shard) at the next sweep, which starts now."""
        self._schedule.look(shard)
        self._wake.set()

    def _free(self) -> int:
        """Slots neither running a batch nor held by a claim under way."""
        return self.settings.worker_concurrency - len(self._tasks) - self._claims.reserved

    async def run(self, stop: asyncio.Event) -> None:
        closing = asyncio.Event()
        listener = asyncio.create_task(self._listen(closing))
        try:
            # While the subscriptions connect; before any lease starts running.
            await self.processor.warm()
            log.info("worker_started", shards=self.settings.shards,
                     concurrency=self.settings.worker_concurrency)
            while not stop.is_set():
                paused = not await self.flags.processing()
                if paused:  # the processing switch: claim nothing, look at it again soon
                    self._wake.clear()
                    delay = MAX_AGE_S
                else:
                    delay = self._sweep()
                self.sweep_log.swept(paused=paused)
                await self._sleep(delay, stop)
        finally:
            closing.set()
            listener.cancel()
            try:
                # Before the drain: a claim under way would otherwise start batches meanwhile,
                # and one sent to a node that hangs takes 20 s (claims.py).
                await self._claims.cancel()
                # Not `await listener`: a listener that died of an error would raise it here,
                # and the batches in flight would be neither drained nor released.
                await asyncio.wait({listener})
            finally:
                await self._drain()
            if not listener.cancelled() and (error := listener.exception()) is not None:
                raise error

    def _sweep(self) -> float:
        """Start claiming as much due work as there are free slots, each node's shards beside
        the others' (claims.py); returns seconds until the next sweep. The end of a claim, a
        wake-up and a finished batch wake the loop earlier."""
        self._wake.clear()
        s, schedule = self.settings, self._schedule
        clock = asyncio.get_running_loop().time
        schedule.start_sweep(clock())
        free = self._free()
        # Start at a different shard each time so one busy shard cannot starve the others.
        start = self._next_shard
        self._next_shard = (start + 1) % s.shards
        order = [(start + i) % s.shards for i in range(s.shards)]
        if free <= 0 or self._claims.start(order, free, clock()) <= 0:
            return schedule.until_full_sweep(clock())  # a finishing claim or task wakes the loop
        return schedule.until_next(clock(), waiting=self._claims.waiting(order))

    def _start(self, batch: Batch) -> None:
        self.claimed += 1
        metrics.claimed(batch)
        self.sweep_log.claimed(batch)
        task = asyncio.create_task(self.processor.process(batch), name=f"batch-{batch.id}")
        self._tasks.add(task)
        task.add_done_callback(functools.partial(self._done, batch.shard))

    def _done(self, shard: int, task: asyncio.Task[str]) -> None:
        self._tasks.discard(task)
        metrics.batch_outcome(task)
        # A batch that did not end (retrying, lost, interrupted, shut down) left work in its
        # shard that its last claim could not know of, and for most of these no wake-up says so
        # (a lease that will lapse); fail.lua publishes a retry time, but a claim now costs one
        # call and learns it even if that message is lost. An ended one's scripts wake for what
        # they make due.
        if task.cancelled() or task.exception() is not None or task.result() not in _ENDED:
            self._schedule.look(shard)
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

    @staticmethod
    async def _enable_expiry_events(node: Redis) -> None:
        """Turn on expired-key events on one node if it allows it; the index works without them.
        Asked on every (re)subscription: a promoted replica or a restarted server may lack them."""
        try:
            # redis-py decodes CONFIG GET's names and values to str whatever the client's settings.
            current = (await node.config_get("notify-keyspace-events")).get("notify-keyspace-events") or ""
            has_expired = "x" in current or "A" in current
            if not (has_expired and "E" in current):
                await node.config_set("notify-keyspace-events", "".join(sorted(set(current + "Ex"))))
        except RedisError as exc:  # CONFIG refused (managed Redis), or Redis not up yet
            log.warning("expiry_events_unavailable", error=str(exc),
                        note="deadlines still flush from the index")

    def _reconnected(self, connection: object) -> None:
        self._look()

    async def _listen(self, closing: asyncio.Event) -> None:
        """Turn wake-up messages and TTL-key expiry events into an early sweep: on the one
        server, or on every primary of a cluster (an expiry event stays on its node), the set of
        primaries looked at again when a subscription fails or every TOPOLOGY_CHECK_S.

        Ends when `closing` is set, not only on cancellation: redis-py's cluster client can
        swallow a CancelledError that arrives while it refreshes the slot map, and the task
        group entered next would then wait for its subscriptions forever."""
        while not closing.is_set():
            nodes: list[Redis] = []
            failed = False
            try:
                nodes = await redis_client.subscription_nodes(self.store.redis, self.settings)
                primaries = await redis_client.primary_names(self.store.redis)
                subscribed = [asyncio.Event() for _ in nodes]
                async with asyncio.TaskGroup() as group:
                    for node, done in zip(nodes, subscribed, strict=True):
                        group.create_task(self._listen_on(node, done))
                    group.create_task(self._reset_backoff(subscribed))
                    group.create_task(self._watch_topology(primaries, closing))
                    group.create_task(_raise_when(closing))
            except* _Closing:
                pass
            except* _LOST as lost:
                log.warning("wakeup_subscription_lost", error=str(lost.exceptions[0]),
                            retry_in_s=self._backoff)
                failed = True
            except* Exception as broken:
                # Unforeseen (a bug, a message nobody expected): the worker goes on, so it must
                # not go on without wake-ups; subscribing again also looks at every shard.
                log.error("wakeup_listener_failed", retry_in_s=self._backoff,
                          exc_info=broken.exceptions[0])
                failed = True
            finally:
                for node in nodes:
                    with contextlib.suppress(Exception):
                        await node.aclose()
            if failed:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(closing.wait(), self._backoff)
                self._backoff = min(self._backoff * 2, 5.0)

    async def _watch_topology(self, primaries: frozenset[str], closing: asyncio.Event) -> None:
        """Ends the subscriptions when the cluster's primaries change (failover, resharding).
        Ends on `closing` too: the slot-map refresh can swallow the stop's cancellation (see
        `_listen`), and the task group would wait for this loop forever."""
        if primaries == frozenset({""}):
            return  # standalone: its subscription reconnects by itself
        while not closing.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(closing.wait(), TOPOLOGY_CHECK_S)
                return
            now = await redis_client.primary_names(self.store.redis)
            if now != primaries and not closing.is_set():
                raise _TopologyChanged("the cluster's primaries changed")

    async def _reset_backoff(self, subscribed: list[asyncio.Event]) -> None:
        """The backoff starts again from its least once every primary's subscription is made
        and has lived a heartbeat: not at one primary's, while another's keeps failing (the
        backoff would never grow), nor at once, for an error that recurs soon after."""
        await asyncio.gather(*(event.wait() for event in subscribed))
        await asyncio.sleep(HEARTBEAT_S)
        self._backoff = 0.2

    async def _listen_on(self, node: Redis, subscribed: asyncio.Event) -> None:
        db = node.connection_pool.connection_kwargs.get("db", 0)
        expired = f"__keyevent@{db}__:expired"
        await self._enable_expiry_events(node)
        pubsub = node.pubsub()
        try:
            await pubsub.subscribe(self.store.keys.wake, expired)
            # Events published while we were not subscribed are gone: look now, and after
            # every reconnect, including those the client makes on its own and re-subscribes.
            self._look()
            subscribed.set()
            if pubsub.connection is not None:
                pubsub.connection.register_connect_callback(self._reconnected)
            async for message in _heard(pubsub):
                if message["type"] != "message":
                    continue
                channel = message["channel"]
                if isinstance(channel, bytes):
                    channel = channel.decode()
                data = message["data"]
                # The expired channel names every key of the database, another application's
                # binary ones too: such a name only has to fail is_deadline, not the listener.
                data = data.decode(errors="replace") if isinstance(data, bytes) else str(data)
                if channel == expired:
                    if not self.store.keys.is_deadline(data):
                        continue
                    self._look(self._shard_named(data))
                elif data == FLAGS_CHANGED:
                    self.flags.invalidate()
                    self._look()
                else:  # "<ms> <a key of its shard>" (lib.lua wake_up); older versions: "<ms>"
                    at_ms, _, key = data.partition(" ")
                    self._due_at(self._shard_named(key), at_ms)
            # _heard ends once nothing is subscribed any more. The task group outlives
            # this (_raise_when waits for `closing`), so only an error makes it subscribe again.
            raise _SubscriptionEnded("the subscription ended")
        finally:
            with contextlib.suppress(Exception):
                # redis-py leaves PubSub.aclose unannotated; it returns None.
                await pubsub.aclose()  # type: ignore[no-untyped-call]

    def _shard_named(self, key: str) -> int | None:
        try:
            return self.store.keys.shard_of_key(key)
        except ValueError:
            return None


class _TopologyChanged(Exception):
    pass


class _SubscriptionEnded(Exception):
    pass


class _Closing(Exception):
    pass


# A subscription to make again: Redis away or in a failover (redis_client.REDIS_ERRORS), the
# connection gone, the cluster's primaries changed, or the subscription ended or fell silent.
_LOST: tuple[type[Exception], ...] = (*redis_client.REDIS_ERRORS, OSError, _TopologyChanged,
                                      _SubscriptionEnded)


async def _heard(pubsub: PubSub) -> AsyncIterator[dict[str, Any]]:
    """PubSub.listen() with a heartbeat: a PING when nothing came for HEARTBEAT_S, and
    _SubscriptionEnded when nothing, not even its answer, came for HEARTBEAT_S after the PING
    went out. Counted from the PING sent, not from the last message: an event loop held up (a
    GC pause, a slow synchronous call) finds the read's timeout past without any PING sent."""
    clock = asyncio.get_running_loop().time
    pinged: float | None = None  # when the PING not answered yet went out
    while pubsub.subscribed:
        message = await pubsub.get_message(timeout=HEARTBEAT_S)
        if message is not None:
            pinged = None
            yield message
        elif pinged is None:
            await pubsub.ping()
            pinged = clock()
        elif clock() - pinged >= HEARTBEAT_S:
            raise _SubscriptionEnded(f"no answer to a PING within {HEARTBEAT_S} s")


async def _raise_when(closing: asyncio.Event) -> None:
    await closing.wait()
    raise _Closing
