"""Adversarial review of the changes after review5: the late batch put into the history in order
(d556d0d, e152dfd: lib.lua add_in_order) and the wake-up listener that ends on a closing event
(580c5c1), with the errors the listener lets through. Each test shows one finding against the
real service code and fails until it is fixed."""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import replace
from typing import Any

import pytest
from helpers import claim_one, eventually, jobs, wait_for
from prometheus_client import REGISTRY
from redis.asyncio import Redis, RedisCluster
from redis.asyncio.client import PubSub
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisClusterException

from buffer_service import redis_client, service, worker
from buffer_service.chatwoot import ChatMessage
from buffer_service.keys import Keys
from buffer_service.store import BufferStore
from devtools.payloads import message_payload


def _said(history: list[dict]) -> list[tuple[str, str]]:
    return [(e.get("role", "user"), e["text"]) for e in history]


# -- 1. add_in_order: a reply whose Chatwoot id is unknown (0) hides every newer exchange ----------
@pytest.mark.parametrize("buffer_format", ["compact", "json"])
async def test_a_late_batch_goes_before_a_newer_exchange_whose_reply_id_is_unknown(
        settings, redis, buffer_format):
    """Finding: a batch (the customer's message 1) fails; the customer writes again (message 2),
    that burst is answered, and Chatwoot answers the post 2xx without a readable id
    (chatwoot.post_reply returns 0: the message exists, its id is unknown), so its history entry
    is "a0:…" ({"id":0,…} in json). The failed batch is then retried by an operator and
    answered. add_in_order reads the list only when its LAST entry's id is newer than the late
    burst: 0 is not, so the late question and answer are appended after the newer exchange, the
    very disorder d556d0d/e152dfd were meant to end.
    Expected: the late burst and its reply go before the first newer customer message,
    whatever the last entry's id: [1, its reply, 2, "a0" reply]."""
    s = replace(settings, buffer_format=buffer_format)
    store = BufferStore(redis, s)

    def msg(mid: int, text: str) -> ChatMessage:
        return ChatMessage(1, 601, mid, text, inbox_id=1)

    await store.append(msg(1, "where is my order?"), buffered=False)
    late = await claim_one(store)
    assert await store.fail(late, "Chatwoot 500", retry_in_ms=0, permanent=True) == "failed"
    await store.append(msg(2, "hello?"), buffered=False)
    newer = await claim_one(store)
    assert newer.id != late.id
    assert await store.finish(newer, "completed", reply="Hi! How can I help?", reply_id=0)
    assert await store.requeue(late.id)
    again = await claim_one(store)
    assert again.id == late.id
    assert await store.finish(again, "completed", reply="It left today.", reply_id=7)
    said = _said(await store.history("1:601", 50))
    assert said == [("user", "where is my order?"), ("assistant", "It left today."),
                    ("user", "hello?"), ("assistant", "Hi! How can I help?")], said


# -- 2. the wake-up listener: a slot map that does not cover every slot ends it for good ----------
_UNCOVERED = ("All slots are not covered after query all startup_nodes. 15000 of 16384 covered...")


def _uncovered_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """redis_client.primary_names as on a cluster during a failover: the first slot-map refresh
    raises what redis-py raises while a dead primary's slots have no owner yet
    (RedisClusterException, which is not a RedisError), later ones answer."""
    real = redis_client.primary_names
    calls = 0

    async def primary_names(client: Any) -> frozenset[str]:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RedisClusterException(_UNCOVERED)
        return await real(client)

    monkeypatch.setattr(redis_client, "primary_names", primary_names)


async def test_the_wakeup_listener_subscribes_again_after_a_slot_map_without_full_coverage(
        settings, redis, monkeypatch):
    """Finding: `_listen` retries after RedisError, OSError and _TopologyChanged only. During a
    failover redis-py's slot-map refresh (nodes_manager.initialize, called by subscription_nodes
    and primary_names, also every TOPOLOGY_CHECK_S by _watch_topology) raises
    RedisClusterException ("All slots are not covered", or "cannot be connected" while no seed
    answers), which is none of those: the listener task ends with it and never subscribes again.
    From then on no wake-up or expiry event reaches the worker: every burst waits for the
    interval sweep (BUFFER_PROCESSING_INTERVAL_MS) instead of its deadline, for the rest of the
    process's life.
    Expected: the listener logs the lost subscription and subscribes again after its backoff."""
    _uncovered_once(monkeypatch)
    stop = asyncio.Event()
    running = asyncio.create_task(service.run(settings, http=False, stop=stop))
    wake = Keys(settings).wake

    async def subscribed() -> bool:
        return any(n for _, n in await redis.pubsub_numsub(wake))

    try:
        await eventually(subscribed, timeout=10)
    finally:
        stop.set()
        await asyncio.wait({running}, timeout=20)
    assert running.done() and running.exception() is None, running


async def test_a_stopping_worker_releases_its_batch_after_its_listener_failed(
        settings, redis, store, llm, chatwoot, monkeypatch):
    """Finding: Worker.run's `finally` awaits the listener with only CancelledError suppressed,
    then drains. A listener that ended with an error (the slot-map refresh above) re-raises it
    there, so `_drain` never runs: on SIGTERM the batch in flight is neither given
    SHUTDOWN_GRACE_S nor cancelled and released (release.lua: any worker takes it at once, the
    attempt not counted). service.run's teardown then closes the LLM client under it, and the
    batch's attempt fails with a connection error: counted against MAX_ATTEMPTS (with
    MAX_ATTEMPTS=1 the customer's burst fails for good), and re-tried only after a backoff.
    (service.run hides the worker's error: _start_worker gathers it with return_exceptions.)
    Expected, as when the listener is healthy: the batch still with the LLM at the end of the
    grace period is released, attempts 0."""
    _uncovered_once(monkeypatch)
    settings = replace(settings, shutdown_grace_s=1)
    llm.delay = 8.0  # far past the grace period: the batch must be handed back
    await store.append(ChatMessage(1, 602, 1, "where is my order?", inbox_id=1), buffered=False)
    stop = asyncio.Event()
    running = asyncio.create_task(service.run(settings, http=False, stop=stop))
    await wait_for(lambda: len(llm.calls) == 1, timeout=10)  # the batch is with the LLM
    stop.set()
    await asyncio.wait({running}, timeout=20)
    assert running.done()
    [job] = await jobs(redis, "1:602")
    assert (job["state"], job["attempts"]) == ("released", "0"), job


# -- 3. 580c5c1: a cancellation swallowed inside the task group still hangs the stop ---------------
async def test_a_worker_stops_when_the_topology_check_swallows_its_cancellation(
        settings, redis, monkeypatch):
    """Finding: 580c5c1 makes `_listen` end on `closing` because redis-py's cluster client can
    swallow a CancelledError that arrives while it refreshes the slot map. But the refresh also
    runs inside the task group: _watch_topology calls primary_names (nodes_manager.initialize)
    every TOPOLOGY_CHECK_S. When the stop's cancellation lands there and is swallowed,
    _watch_topology carries on with its `while True` (it never looks at `closing`), the task
    group waits for it forever, and so do Worker.run and service.run: the hang 580c5c1 fixed,
    moved one call further in (on a cluster, every worker that stops while a topology check is
    in flight).
    Expected: the worker stops (a bound for a hang, not a timing assertion: it stops at once)."""
    primaries = frozenset({"127.0.0.1:7000"})  # a cluster's primaries, so the check loops
    refreshing, cleanup = asyncio.Event(), asyncio.Event()
    calls = 0

    async def primary_names(client: Any) -> frozenset[str]:
        nonlocal calls
        calls += 1
        if calls > 1:  # a topology check: the refresh swallows a cancellation
            refreshing.set()
            with contextlib.suppress(asyncio.CancelledError):
                await cleanup.wait()
            if cleanup.is_set():  # only for the test's own cleanup: end a hung listener
                raise RedisConnectionError("test cleanup")
        return primaries

    monkeypatch.setattr(redis_client, "primary_names", primary_names)
    monkeypatch.setattr(worker, "TOPOLOGY_CHECK_S", 0.01)
    stop = asyncio.Event()
    running = asyncio.create_task(service.run(settings, http=False, stop=stop))
    await asyncio.wait_for(refreshing.wait(), timeout=10)
    stop.set()
    await asyncio.wait({running}, timeout=10)
    stopped = running.done()
    cleanup.set()
    await asyncio.wait({running}, timeout=10)
    assert stopped, "the worker did not stop: its topology check swallowed the cancellation"


# -- 4. 580c5c1: a subscription that ends without an error is never made again --------------------
async def test_the_wakeup_listener_subscribes_again_after_its_subscription_ends_cleanly(
        settings, redis, monkeypatch):
    """Finding: redis-py's PubSub.listen() returns, without an error, once the pubsub is no
    longer subscribed to anything. Before 580c5c1 the task group then ended and `_listen`
    subscribed again; since, `_raise_when(closing)` keeps the group alive, so the listener sits
    there with no subscription: no wake-up or expiry event reaches the worker any more.
    Expected: a subscription that ends is lost like one that fails, and is made again.
    (The listener reads with get_message since 457109c; the first subscription is ended by an
    unsubscribe, whatever reads it, instead of a stand-in for listen().)"""
    real = PubSub.subscribe
    subscribes = 0

    async def subscribe(self: PubSub, *args: Any, **kwargs: Any) -> None:
        nonlocal subscribes
        subscribes += 1
        await real(self, *args, **kwargs)
        if subscribes == 1:  # the first subscription ends at once
            await self.unsubscribe()

    monkeypatch.setattr(PubSub, "subscribe", subscribe)
    stop = asyncio.Event()
    running = asyncio.create_task(service.run(settings, http=False, stop=stop))
    try:
        await wait_for(lambda: subscribes >= 2, timeout=10)
    finally:
        stop.set()
        await asyncio.wait({running}, timeout=20)
    assert running.done() and running.exception() is None, running


# -- the same exception outside the listener: a claim, a webhook's append ------------------------
async def test_a_claim_that_meets_a_slot_map_without_full_coverage_does_not_end_the_worker(
        settings, store, llm, chatwoot, monkeypatch):
    """Found while fixing 2: redis-py's cluster client refreshes its slot map before a command's
    attempt, outside its own error handling, so RedisClusterException reaches any caller. The
    worker's sweep retried a claim after a RedisError only: one failover ended the worker loop,
    and with it the process. Expected: the claim is retried and the burst answered."""
    real = BufferStore.claim
    calls = 0

    async def claim(self: BufferStore, shard: int, limit: int) -> Any:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RedisClusterException(_UNCOVERED)
        return await real(self, shard, limit)

    monkeypatch.setattr(BufferStore, "claim", claim)
    await store.append(ChatMessage(1, 603, 1, "where is my order?", inbox_id=1), buffered=False)
    stop = asyncio.Event()
    running = asyncio.create_task(service.run(settings, http=False, stop=stop))
    try:
        await wait_for(lambda: bool(chatwoot.posts_for(603)) or running.done(), timeout=15)
    finally:
        stop.set()
        await asyncio.wait({running}, timeout=20)
    assert [p.body["content"] for p in chatwoot.posts_for(603)] == ["Reply to: where is my order?"]


async def test_a_webhook_whose_append_meets_a_slot_map_without_full_coverage_answers_500(
        settings, make_service, monkeypatch):
    """The webhook caught RedisError only: the same exception was an unhandled error, aiohttp's
    plain-text 500 with a traceback in the log, not the service's answer for a message it could
    not store (500 with Retry-After and {"status": "unavailable"}, which Chatwoot retries)."""
    async def append(self: BufferStore, *args: Any, **kwargs: Any) -> Any:
        raise RedisClusterException(_UNCOVERED)

    monkeypatch.setattr(BufferStore, "append", append)
    svc = await make_service(settings, worker=False)
    async with svc.session.post(svc.url + "/webhooks/chatwoot", json=message_payload(
            message_id=1, conversation_id=604)) as resp:
        assert resp.status == 500 and resp.headers.get("Retry-After") == "1", await resp.text()
        assert (await resp.json())["status"] == "unavailable"


async def test_a_batch_step_that_meets_a_slot_map_without_full_coverage_is_interrupted(
        settings, store, llm, chatwoot, monkeypatch):
    """Found while fixing the above: the processor's steps caught RedisError only, so a batch whose
    step met a failover's slot map ended its task with an unhandled exception: not counted, not
    logged as interrupted. Expected: the batch is interrupted like any Redis outage (its lease
    lapses and a worker takes it again), and counted as such."""
    real = BufferStore.before_post
    calls = 0

    async def before_post(self: BufferStore, *args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RedisClusterException(_UNCOVERED)
        return await real(self, *args, **kwargs)

    def interrupted() -> float:
        return REGISTRY.get_sample_value("buffer_service_batches_total",
                                         {"outcome": "interrupted"}) or 0.0

    before = interrupted()
    monkeypatch.setattr(BufferStore, "before_post", before_post)
    await store.append(ChatMessage(1, 605, 1, "is it open today?", inbox_id=1), buffered=False)
    stop = asyncio.Event()
    running = asyncio.create_task(service.run(settings, http=False, stop=stop))
    try:
        await wait_for(lambda: interrupted() > before or running.done(), timeout=15)
    finally:
        stop.set()
        await asyncio.wait({running}, timeout=20)
    assert interrupted() == before + 1


async def test_readiness_during_a_slot_map_without_full_coverage_answers_503(
        settings, make_service, monkeypatch):
    """/readyz caught RedisError and OSError only: during a failover's slot-map refresh it
    answered aiohttp's plain 500 (a traceback in the log) instead of its own 503 that tells a
    load balancer to stop routing here for now."""
    async def ping(self: Any, *args: Any, **kwargs: Any) -> Any:
        raise RedisClusterException(_UNCOVERED)

    monkeypatch.setattr(Redis, "ping", ping)
    monkeypatch.setattr(RedisCluster, "ping", ping)
    svc = await make_service(settings, worker=False)
    async with svc.session.get(svc.url + "/readyz") as resp:
        assert resp.status == 503, await resp.text()
        assert (await resp.json())["status"] == "unavailable"
