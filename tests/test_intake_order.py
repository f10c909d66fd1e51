"""Who is in charge when webhooks overtake each other, what a refused message leaves behind,
and order and bounds of bursts (issue 9, points 1, 4, 5, 6 and 8)."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest
from helpers import HUMAN, buffered_in, claim_one, conversation_event, eventually, job_in, wait_for
from redis.asyncio import Redis

from buffer_service import redis_client
from buffer_service.chatwoot import ChatMessage, buffered
from buffer_service.config import ConfigError, Settings
from buffer_service.flags import Flags
from buffer_service.journal import SweepLog
from buffer_service.ops import Operations
from buffer_service.store import BufferStore
from buffer_service.worker import Worker
from devtools.payloads import message_payload

T0 = datetime(2026, 11, 29, 12, 0, tzinfo=UTC)


async def _history(redis: Redis, settings: Settings, conv: str) -> list[str]:
    return [m["text"] for m in await BufferStore(redis, settings).history(conv, 50)]


# -- point 1: an older snapshot never outranks a newer one ----------------------------------------
async def test_a_message_with_an_older_snapshot_does_not_undo_a_takeover(settings, make_service, llm,
                                                                          chatwoot, redis):
    svc = await make_service(replace(settings, buffer_duration_ms=300))
    # A human is assigned at T0 + 5 s; the customer's message, written at T0, arrives after it.
    await svc.webhook(conversation_event("conversation_updated", 300, assignee=HUMAN,
                                         at=T0 + timedelta(seconds=5)))
    body = await svc.webhook(message_payload(message_id=30, conversation_id=300, content="hello?",
                                             created_at=T0))
    assert body == {"status": "ignored", "reason": "human_assignee"}
    await asyncio.sleep(1.0)
    assert llm.calls == [] and chatwoot.posts == []
    assert await _history(redis, settings, "1:300") == ["hello?"]
    # Equal versions: the human view wins.
    body = await svc.webhook(message_payload(message_id=31, conversation_id=300, content="anyone?",
                                             created_at=T0 + timedelta(seconds=5)))
    assert body["reason"] == "human_assignee"
    # Handed back to the bot by a newer snapshot: the bot answers, and has seen what was said.
    body = await svc.webhook(message_payload(message_id=32, conversation_id=300, content="still there?",
                                             created_at=T0 + timedelta(seconds=9)))
    assert body["status"] == "buffered"
    await wait_for(lambda: len(chatwoot.posts) == 1, timeout=10)
    prompt = [m["content"] for m in llm.calls[0].messages[1:]]
    assert prompt == ["hello?", "anyone?", "still there?"]


async def test_an_older_human_view_delivered_late_does_not_silence_the_bot(settings, make_service, llm,
                                                                           chatwoot, redis):
    svc = await make_service(replace(settings, buffer_duration_ms=300))
    body = await svc.webhook(message_payload(message_id=33, conversation_id=301, content="hi",
                                             created_at=T0 + timedelta(seconds=9)))
    assert body["status"] == "buffered"
    # The assignment that was undone before this message was written arrives late.
    await svc.webhook(conversation_event("conversation_updated", 301, assignee=HUMAN, at=T0))
    await wait_for(lambda: len(chatwoot.posts) == 1, timeout=10)
    assert (await eventually(job_in("completed", redis, "1:301")))["state"] == "completed"


# -- point 8: de-duplicate before the rate limit; refused messages are kept -----------------------------
async def test_redeliveries_do_not_use_up_the_rate_limit_and_refused_messages_are_kept(
        settings, make_service, store, redis):
    svc = await make_service(replace(settings, rate_limit_per_conversation=3, rate_limit_window_s=3600,
                                     buffer_duration_ms=60_000))
    first, second = (message_payload(message_id=i, conversation_id=302, content=f"m{i}") for i in (1, 2))
    for payload in (first, second, first, second, first, second):
        assert (await svc.webhook(payload))["status"] in ("buffered", "duplicate")
    assert (await svc.webhook(message_payload(message_id=3, conversation_id=302, content="m3")))[
        "status"] == "buffered"
    refused = message_payload(message_id=4, conversation_id=302, content="m4")
    assert await svc.webhook(refused) == {"status": "ignored", "reason": "rate_limited",
                                          "limit": "conversation"}
    assert (await svc.webhook(refused))["status"] == "duplicate"
    # Not buffered, but in the history the next prompt reads, and counted for operators.
    assert len(await buffered_in(redis, store.keys.buffer("1:302"))) == 3
    assert await _history(redis, settings, "1:302") == ["m4"]
    stats = await Operations(store, Flags(redis, settings)).stats(hours=1)
    assert stats["totals"]["refused_messages"] == {"rate_limited": 1}


async def test_a_full_buffer_keeps_the_refused_message_in_the_history(settings, make_service, store, redis):
    svc = await make_service(replace(settings, max_buffer_bytes=600, buffer_duration_ms=60_000))
    answers = [await svc.webhook(message_payload(message_id=i, conversation_id=303, content="x" * 200))
               for i in range(1, 6)]
    assert answers[-1] == {"status": "ignored", "reason": "buffer_full"}
    kept = await _history(redis, settings, "1:303")
    assert kept and len(kept) + len(await buffered_in(redis, store.keys.buffer("1:303"))) == 5


# -- point 4: a size split keeps the leftovers' age ----------------------------------------------------
async def test_messages_left_by_a_size_split_keep_their_arrival_time(redis, settings):
    store = BufferStore(redis, replace(settings, max_buffer_size=2, buffer_duration_ms=60_000,
                                       max_buffer_age_ms=3000))
    results = [await store.append(ChatMessage(1, 304, 40 + i, f"m{i}")) for i in range(3)]
    await asyncio.sleep(1.0)  # the split happens a second after the third message arrived
    batch = await claim_one(store)
    assert [m["text"] for m in batch.messages] == ["m0", "m1"]
    shard = store.keys.shard_of("1:304")
    arrived = results[2].now_ms
    assert buffered(await redis.lrange(store.keys.buffer("1:304"), 0, -1))[0] == arrived
    assert int(await redis.zscore(store.keys.due(shard), "1:304")) == arrived + 3000


# -- point 5: bounds ---------------------------------------------------------------------------------------
def test_a_buffer_size_beyond_what_a_script_can_move_stops_start_up():
    with pytest.raises(ConfigError, match="MAX_BUFFER_SIZE: must be at most 1000, got 8000"):
        Settings.from_env({"MAX_BUFFER_SIZE": "8000"})


async def test_a_failing_shard_does_not_keep_the_others_from_being_served(redis, settings, llm, chatwoot):
    s = replace(settings, buffer_duration_ms=1)
    store = BufferStore(redis, s)
    conv_shard = store.keys.shard_of("1:305")
    broken = (conv_shard - 1) % s.shards
    await redis.set(store.keys.due(broken), "not a sorted set")  # every claim there fails
    await store.append(ChatMessage(1, 305, 50, "hi"))
    await asyncio.sleep(0.05)
    worker = Worker(store, _Holder(), flags=Flags(redis, s),  # type: ignore[arg-type]
                    sweep_log=SweepLog(redis, s))
    worker._next_shard = broken
    worker._sweep()  # claims run beside the loop (claims.py): the broken shard's first here
    await wait_for(lambda: worker.claimed == 1, timeout=5)
    await asyncio.sleep(0.2)
    assert worker.claimed == 1
    for task in list(worker._tasks):
        task.cancel()


class _Holder:
    """A processor that holds every batch it is given."""

    async def process(self, batch: object) -> str:
        await asyncio.sleep(10)
        return "held"


# -- point 6: an operator's retry goes before bursts that came after it ---------------------------------
async def test_a_requeued_batch_goes_right_after_the_current_one(redis, settings):
    store = BufferStore(redis, replace(settings, buffer_duration_ms=1))
    await store.append(ChatMessage(1, 306, 60, "old question"))
    old = await claim_one(store)
    assert await store.fail(old, "Chatwoot said 422", retry_in_ms=0, permanent=True) == "failed"
    await store.append(ChatMessage(1, 306, 61, "new question"))
    current = await claim_one(store)
    assert await store.requeue(old.id)
    assert await store.before_post(current, "answer") == ("post", "")
    await store.append(ChatMessage(1, 306, 62, "newer question"))
    await asyncio.sleep(0.05)
    _, _, nothing = await store.claim(current.shard, 10)  # one batch per conversation at a time
    assert nothing == []
    assert await store.finish(current, "completed", reply="answer", reply_id=700)
    after = await claim_one(store)
    assert (after.id, [m["text"] for m in after.messages]) == (old.id, ["old question"])
    assert await store.finish(after, "skipped", reason="test")
    last = await claim_one(store)
    assert [m["text"] for m in last.messages] == ["newer question"]


async def test_a_superseded_batch_wakes_the_workers_for_the_batch_queued_behind_it(redis, settings):
    """The batch an operator queued behind the current one is due when the current one is
    superseded; the wake-up must say so, not the new burst's later deadline (a worker that knows
    its shard's next time sleeps until the time a wake-up names)."""
    store = BufferStore(redis, replace(settings, buffer_duration_ms=30_000, max_buffer_age_ms=60_000))
    await store.append(ChatMessage(1, 307, 70, "old question"), buffered=False)
    old = await claim_one(store)
    assert await store.fail(old, "Chatwoot said 422", retry_in_ms=0, permanent=True) == "failed"
    await store.append(ChatMessage(1, 307, 71, "new question"), buffered=False)
    current = await claim_one(store)
    assert await store.requeue(old.id)
    await store.append(ChatMessage(1, 307, 72, "newer question"))  # due in 30 s
    nodes = await redis_client.subscription_nodes(redis, settings)  # a PUBLISH reaches them all
    node = nodes[0]
    pubsub = node.pubsub()
    try:
        await pubsub.subscribe(store.keys.wake)
        await pubsub.get_message(timeout=1)  # the subscription's confirmation
        assert await store.before_post(current, "stale answer") == ("superseded", "2")
        message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=2)
        seconds, micros = await node.time()
    finally:
        await pubsub.aclose()
        for each in nodes:
            await each.aclose()
    assert message is not None
    assert int(message["data"].split(b" ")[0]) <= seconds * 1000 + micros // 1000
    taken = await claim_one(store)
    assert taken.id == old.id
