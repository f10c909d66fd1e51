"""Buffer formats across a rolling upgrade (BUFFER_FORMAT, lib.lua "buffer formats", README
"Upgrading"): buffers and histories an older version wrote in json are claimed, answered and read
by this one; a buffer stays in the format it was started in; with BUFFER_FORMAT=json this
version writes what older versions read."""

from __future__ import annotations

import time
from dataclasses import replace

import orjson
from helpers import buffered_in, claim_one, eventually, job_in, wait_for

from buffer_service.chatwoot import ChatMessage, Decision, buffered
from buffer_service.store import BufferStore


def _old(msg: ChatMessage, arrived: int) -> bytes:
    """A message as versions before compact buffers buffered it: the json object with its
    arrival time appended (append.lua of those versions)."""
    return msg.to_json()[:-1] + b',"t":' + str(arrived).encode() + b"}"


async def _write_old_burst(redis, store: BufferStore, msgs: list[ChatMessage], due_in_ms: int) -> int:
    """What an older version's append.lua left for a pending burst, written with plain commands."""
    conv, k = msgs[0].conv, store.keys
    shard = k.shard_of(conv)
    now = int(time.time() * 1000)
    await redis.rpush(k.buffer(conv), *[_old(m, now + i) for i, m in enumerate(msgs)])
    await redis.hset(k.first(shard), conv, now)
    await redis.zadd(k.due(shard), {conv: now + due_in_ms})
    await redis.set(k.ttl(conv), "", px=max(1, due_in_ms))
    return now


async def test_a_burst_an_older_version_buffered_is_claimed_and_answered_whole(
        settings, make_service, llm, chatwoot, redis, store):
    msgs = [ChatMessage(1, 401, 4010 + i, f"old {i}", inbox_id=1, sender_name="Ana", phone="5511900000000")
            for i in range(3)]
    first = await _write_old_burst(redis, store, msgs, due_in_ms=300)
    await make_service(settings)
    await wait_for(lambda: len(chatwoot.posts) == 1, timeout=10)
    assert [m["content"] for m in llm.calls[0].messages[1:]] == ["old 0", "old 1", "old 2"]
    job = await eventually(job_in("completed", redis, "1:401"))
    assert (job["count"], job["inbox"], job["first_ms"]) == ("3", "1", str(first))
    # The old burst goes to the history as json, which every version reads.
    kept = await redis.lrange(store.keys.history("1:401"), 0, -1)
    assert [orjson.loads(e) for e in kept[:3]] == [{"id": 4010 + i, "text": f"old {i}"} for i in range(3)]
    assert [e["text"] for e in await store.history("1:401", 10)][:3] == ["old 0", "old 1", "old 2"]


async def test_a_compact_writer_appends_to_an_old_buffer_in_its_format(settings, redis):
    store = BufferStore(redis, replace(settings, buffer_duration_ms=60_000))
    first = await _write_old_burst(redis, store, [ChatMessage(1, 402, 1, "a", inbox_id=7)], 60_000)
    for i in (2, 3):
        await store.append(ChatMessage(1, 402, i, f"m{i}", inbox_id=7, sender_name="Bia"))
    raw = await redis.lrange(store.keys.buffer("1:402"), 0, -1)
    assert [e[:1] for e in raw] == [b"{"] * 3
    await store.redis.zadd(store.keys.due(store.keys.shard_of("1:402")), {"1:402": 0})
    batch = await claim_one(store)
    assert [m["text"] for m in batch.messages] == ["a", "m2", "m3"]
    assert (batch.first_ms, batch.inbox_id, batch.messages[-1]["name"]) == (first, 7, "Bia")


async def test_with_buffer_format_json_this_version_writes_what_older_ones_read(settings, redis):
    store = BufferStore(redis, replace(settings, buffer_format="json", buffer_duration_ms=1))
    msg = ChatMessage(1, 403, 31, "hi", inbox_id=2, sender_name="Caio")
    result = await store.append(msg)
    shard = store.keys.shard_of(msg.conv)
    [entry] = await redis.lrange(store.keys.buffer(msg.conv), 0, -1)
    assert entry == _old(msg, result.now_ms)
    assert int(await redis.hget(store.keys.first(shard), msg.conv)) == result.now_ms
    batch = await claim_one(store)
    assert await store.finish(batch, "completed", reply="hello", reply_id=32)
    await store.note(Decision("note", "human", ChatMessage(1, 403, 33, "an agent", inbox_id=2)))
    kept = [orjson.loads(e) for e in await redis.lrange(store.keys.history(msg.conv), 0, -1)]
    assert kept == [{"id": 31, "text": "hi"}, {"id": 32, "text": "hello", "role": "assistant"},
                    {"id": 33, "text": "an agent"}]


async def test_a_json_writer_appending_to_a_compact_buffer_keeps_one_burst(settings, redis):
    """The moment BUFFER_FORMAT changes, processes of either setting append to one buffer."""
    compact = BufferStore(redis, replace(settings, buffer_duration_ms=60_000))
    legacy = BufferStore(redis, replace(settings, buffer_format="json", buffer_duration_ms=60_000))
    first = (await compact.append(ChatMessage(1, 404, 1, "one", inbox_id=3, phone="5511"))).now_ms
    assert (await legacy.append(ChatMessage(1, 404, 2, "two", inbox_id=3, phone="5511"))).count == 2
    assert (await compact.append(ChatMessage(1, 404, 3, "three", inbox_id=3, phone="5511"))).count == 3
    head, msgs = buffered(await redis.lrange(compact.keys.buffer("1:404"), 0, -1))
    assert head == first and [m["text"] for m in msgs] == ["one", "two", "three"]
    await redis.zadd(compact.keys.due(compact.keys.shard_of("1:404")), {"1:404": 0})
    batch = await claim_one(compact)
    assert [m["text"] for m in batch.messages] == ["one", "two", "three"]
    assert (batch.first_ms, batch.inbox_id, [m["ph"] for m in batch.messages]) == (first, 3, ["5511"] * 3)


async def test_a_superseded_old_burst_goes_back_in_front_of_a_compact_one(settings, redis):
    store = BufferStore(redis, replace(settings, buffer_duration_ms=60_000, supersede_stale_replies=True))
    first = await _write_old_burst(redis, store, [ChatMessage(1, 405, 1, "old", inbox_id=4)], 0)
    batch = await claim_one(store)
    await store.append(ChatMessage(1, 405, 2, "new", inbox_id=4, sender_name="Dora"))
    verdict, waiting = await store.before_post(batch, "a stale reply")
    assert (verdict, waiting) == ("superseded", "2")
    head, msgs = buffered(await redis.lrange(store.keys.buffer("1:405"), 0, -1))
    assert head == first and [m["text"] for m in msgs] == ["old", "new"]
    await redis.zadd(store.keys.due(store.keys.shard_of("1:405")), {"1:405": 0})
    again = await claim_one(store)
    assert [m["text"] for m in again.messages] == ["old", "new"] and again.first_ms == first
    assert again.messages[-1]["name"] == "Dora"


async def test_a_superseded_compact_burst_keeps_its_first_message_time(settings, redis):
    store = BufferStore(redis, replace(settings, buffer_duration_ms=1, supersede_stale_replies=True))
    first = (await store.append(ChatMessage(1, 406, 1, "a", inbox_id=5))).now_ms
    batch = await claim_one(store)
    await store.append(ChatMessage(1, 406, 2, "b", inbox_id=5))
    assert (await store.before_post(batch, "stale"))[0] == "superseded"
    assert buffered(await redis.lrange(store.keys.buffer("1:406"), 0, -1))[0] == first
    assert [m["text"] for m in await buffered_in(redis, store.keys.buffer("1:406"))] == ["a", "b"]
    again = await claim_one(store)
    assert again.first_ms == first and [m["text"] for m in again.messages] == ["a", "b"]


async def test_a_batch_finished_after_newer_exchanges_goes_into_the_history_in_order(settings, redis):
    """A late batch (re-queued after it failed, or completed by its echo: lib.lua add_in_order)
    goes after the last entry not newer than its burst, among entries of both formats and
    entries without an id; the cap still keeps the newest."""
    store = BufferStore(redis, replace(settings, buffer_duration_ms=1, history_messages=2, max_buffer_size=3))
    conv = "1:407"
    await store.append(ChatMessage(1, 407, 20, "late question", inbox_id=6))
    batch = await claim_one(store)
    hist = store.keys.history(conv)
    await redis.rpush(hist, b"10:older", b'{"id":11,"text":"older json"}', b"no id",
                      b'{"id":21,"text":"newer json"}', b"a30:newer answer")
    assert await store.finish(batch, "completed", reply="late answer", reply_id=40)
    assert await redis.lrange(hist, 0, -1) == [  # the cap: 2 + a burst of 3
        b"no id", b"20:late question", b"a40:late answer", b'{"id":21,"text":"newer json"}',
        b"a30:newer answer"]
    # Every entry newer: the late batch goes first.
    await store.append(ChatMessage(1, 408, 5, "oldest", inbox_id=6))
    batch = await claim_one(store)
    await redis.rpush(store.keys.history("1:408"), b"6:newer")
    assert await store.finish(batch, "completed", reply="reply", reply_id=7)
    assert await redis.lrange(store.keys.history("1:408"), 0, -1) == [b"5:oldest", b"a7:reply", b"6:newer"]
    assert await redis.pttl(store.keys.history("1:408")) > 0
