"""worker._ENDED against the scripts: the outcomes after which the worker does not look at the
batch's shard again, because the outcome's script closed the batch (lib.lua close_batch) and
published a wake-up for what that made due. Run against a real Redis, each outcome as the
processor reaches it through the store."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import replace

from helpers import eventually
from redis.asyncio import Redis, RedisCluster

from buffer_service import redis_client
from buffer_service.chatwoot import ChatMessage
from buffer_service.config import Settings
from buffer_service.store import Batch, BufferStore
from buffer_service.worker import _ENDED

# Published by the test after the outcome's step: whatever the step's script published reaches
# the subscriber before it, so no wait for silence decides that nothing was published.
_SENTINEL = b"test_ended: nothing after this"


async def _superseded(store: BufferStore, batch: Batch) -> object:
    await store.append(ChatMessage(1, batch.conversation_id, 3, "newer question"))
    return await store.before_post(batch, "a reply the new message made stale")


# What the processor does to the store for each outcome of Processor.process (its docstring
# lists them).
OUTCOMES: dict[str, Callable[[BufferStore, Batch], Awaitable[object]]] = {
    "completed": lambda store, batch: store.finish(batch, "completed", reply="hi", reply_id=900),
    "skipped": lambda store, batch: store.finish(batch, "skipped", reason="test"),
    "superseded": _superseded,
    "failed": lambda store, batch: store.fail(batch, "422", retry_in_ms=0, permanent=True),
    "retrying": lambda store, batch: store.fail(batch, "503", retry_in_ms=60_000, permanent=False),
    # Another worker took the batch after the lease lapsed: every script refuses the old token.
    "lost": lambda store, batch: store.finish(replace(batch, token="stale"), "completed"),
    # Redis was away: nothing ran.
    "interrupted": lambda store, batch: asyncio.sleep(0),
}


async def _shard_node(redis: redis_client.AnyRedis, settings: Settings, key: str) -> Redis:
    """A client of the node that holds `key`: the script's wake-up reaches that node's
    subscribers before a later PUBLISH sent there (another node's copy comes over the bus)."""
    nodes = await redis_client.subscription_nodes(redis, settings)
    if isinstance(redis, RedisCluster):
        port = redis.get_node_from_key(key).port
        node = next(n for n in nodes if n.connection_pool.connection_kwargs["port"] == port)
    else:
        node = nodes[0]
    for other in nodes:
        if other is not node:
            await other.aclose()
    return node


async def _claim(store: BufferStore, shard: int) -> Batch:
    async def claim() -> Batch | None:
        _, _, batches = await store.claim(shard, 1)
        return batches[0] if batches else None
    return await eventually(claim, timeout=5)


async def _run(redis: redis_client.AnyRedis, store: BufferStore, outcome: str,
               conv_id: int) -> tuple[bool, bool, bool]:
    """One conversation whose batch ends in `outcome` while an operator's retry waits behind
    it. Returns (closed: close_batch took the batch out of the inflight set for good; due: the
    retry is claimable now; woken: a wake-up naming the shard at a time already come was
    published)."""
    keys = store.keys
    shard = keys.shard_of(f"1:{conv_id}")
    await store.append(ChatMessage(1, conv_id, 1, "old question"), buffered=False)
    old = await _claim(store, shard)
    assert await store.fail(old, "422", retry_in_ms=0, permanent=True) == "failed"
    await store.append(ChatMessage(1, conv_id, 2, "new question"), buffered=False)
    current = await _claim(store, shard)
    assert await store.requeue(old.id)  # queued behind `current`

    node = await _shard_node(redis, store.settings, keys.batch(current.id))
    pubsub = node.pubsub()
    try:
        await pubsub.subscribe(keys.wake)
        await pubsub.get_message(timeout=5)  # the subscription's confirmation
        await OUTCOMES[outcome](store, current)
        seconds, micros = await node.time()
        await node.publish(keys.wake, _SENTINEL)
        heard: list[bytes] = []
        while (message := await pubsub.get_message(ignore_subscribe_messages=True, timeout=5)) \
                and message["data"] != _SENTINEL:
            heard.append(message["data"])
        assert message is not None, "the sentinel never came back"
    finally:
        await pubsub.aclose()
        await node.aclose()
    now_ms = seconds * 1000 + micros // 1000
    woken = False
    for data in heard:
        at_ms, _, key = data.decode().partition(" ")
        woken |= keys.shard_of_key(key) == shard and int(at_ms) <= now_ms
    closed = await redis.zscore(keys.inflight(shard), current.id) is None
    _, _, batches = await store.claim(shard, 10)
    due = old.id in [b.id for b in batches]
    return closed, due, woken


async def test_the_outcomes_the_worker_takes_for_ended_are_those_whose_scripts_wake_the_workers(
        redis, settings):
    store = BufferStore(redis, replace(settings, buffer_duration_ms=30_000, max_buffer_age_ms=60_000,
                                       supersede_stale_replies=True))
    # One shard each: what one outcome leaves behind (a lease that lapses) is not claimed in
    # another's place.
    convs = {store.keys.shard_of(f"1:{conv_id}"): conv_id for conv_id in range(499, 399, -1)}
    assert len(convs) >= len(OUTCOMES)
    found = {outcome: await _run(redis, store, outcome, conv_id)
             for outcome, conv_id in zip(OUTCOMES, convs.values(), strict=False)}
    for outcome, (closed, due, woken) in found.items():
        if closed:  # lib.lua's side: the conversation handed on, and the workers told at once
            assert (due, woken) == (True, True), outcome
    assert {outcome for outcome, (closed, _, _) in found.items() if closed} == _ENDED
