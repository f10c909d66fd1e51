"""claims.Claims against a real Redis: how a claim under way holds and gives back slots."""

from __future__ import annotations

import asyncio

import pytest

from buffer_service import claims, redis_client
from buffer_service.chatwoot import ChatMessage
from buffer_service.claims import Claims
from buffer_service.config import Settings
from buffer_service.schedule import ClaimSchedule
from buffer_service.store import Batch, BufferStore


async def test_a_late_claim_answer_starts_no_more_batches_than_there_are_free_slots(
        redis: redis_client.AnyRedis, settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    """A claim not answered within _HOLD_S gives its slot back (a node that hangs must not keep
    a worker's only free slot from the other nodes), and the worker may fill that slot
    meanwhile. When the answer comes, its batch must not start beyond WORKER_CONCURRENCY: it is
    handed back, claimable at once by any worker, its attempt not counted."""
    monkeypatch.setattr(claims, "_HOLD_S", 0.05)
    store = BufferStore(redis, settings)
    await store.append(ChatMessage(1, 7, 1, "question"), buffered=False)
    shard = store.keys.shard_of("1:7")
    answer = asyncio.Event()
    claim = store.claim

    async def late_claim(shard: int, limit: int) -> tuple[int, int, list[Batch]]:
        await answer.wait()
        return await claim(shard, limit)

    monkeypatch.setattr(store, "claim", late_claim)
    started: list[Batch] = []
    filled = [0]  # slots the worker filled with other batches meanwhile
    ended = asyncio.Event()
    schedule = ClaimSchedule(settings.shards, settings.processing_interval_ms / 1000)
    under_way = Claims(store, schedule, start=started.append, ended=ended.set,
                       free=lambda: 1 - len(started) - filled[0] - under_way.reserved)
    loop = asyncio.get_running_loop()
    assert under_way.start([shard], 1, loop.time()) == 0
    assert under_way.reserved == 1
    await asyncio.wait_for(ended.wait(), 5)  # not answered: the slot is back in the pool
    assert under_way.reserved == 0 and under_way.waiting([shard]) == {shard}
    filled[0] = 1
    answer.set()
    for _ in range(100):
        if not under_way.waiting([shard]):
            break
        await asyncio.sleep(0.02)
    assert started == []
    _, _, again = await claim(shard, 10)
    assert [(b.conv, b.attempts) for b in again] == [("1:7", 1)]


async def test_a_stop_during_a_claim_leaves_no_task_behind(
        redis: redis_client.AnyRedis, settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    """`cancel` (the worker's stop) returns once the claim under way has ended too, not only its
    chain: a process that stops must not leave a claim running behind it (CI caught one left
    `cancelling` by test_guarantees' test of a port that cannot be taken)."""
    store = BufferStore(redis, settings)
    never = asyncio.Event()

    async def hung_claim(shard: int, limit: int) -> tuple[int, int, list[Batch]]:
        try:
            await never.wait()
        finally:  # as redis-py does on a cancel: closes its connection, which takes a turn or two
            await asyncio.sleep(0.01)
        raise AssertionError("unreachable")

    monkeypatch.setattr(store, "claim", hung_claim)
    before = asyncio.all_tasks()
    schedule = ClaimSchedule(settings.shards, settings.processing_interval_ms / 1000)
    under_way = Claims(store, schedule, start=lambda batch: None, ended=lambda: None,
                       free=lambda: 1)
    under_way.start([0], 1, asyncio.get_running_loop().time())
    await asyncio.sleep(0.01)  # the claim is sent
    await under_way.cancel()
    assert {t for t in asyncio.all_tasks() - before if not t.done()} == set()
