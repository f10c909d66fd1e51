"""Regression checks behind the benchmarks (bench/, BENCHMARKS.md) that do not depend on speed:
how many Redis commands and round trips a webhook costs, how many LLM calls a fixed,
seeded trace makes, and how many bytes a completed burst leaves in Redis. A change that adds a
round trip per webhook, splits or merges bursts, or makes what a burst leaves behind bigger fails
here long before anyone runs a benchmark."""

from __future__ import annotations

import asyncio
import os
import sys
import time
import types
from dataclasses import replace
from pathlib import Path

import orjson
import pytest
from helpers import wait_for
from redis.asyncio.connection import Connection
from redis.exceptions import DataError

from buffer_service import app as app_module
from buffer_service import batcher as batcher_module
from buffer_service import redis_client, scripts
from buffer_service.attachments import Attachment
from buffer_service.chatwoot import ChatMessage, Decision, from_history
from buffer_service.store import BufferStore
from devtools.payloads import message_payload

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
import chat_trace  # bench/ is not a package
import memory


async def _stats(redis) -> tuple[int, dict[str, int]]:
    info = await redis.info("stats")
    commands = await redis.info("commandstats")
    return info["total_reads_processed"], {k: v["calls"] for k, v in commands.items()}


async def test_a_webhook_costs_one_script_call_and_concurrent_ones_share_round_trips(
        settings, make_service, redis, monkeypatch):
    svc = await make_service(settings, worker=False)
    await svc.webhook(message_payload(message_id=1, conversation_id=1, content="warm up"))
    await asyncio.sleep(0.1)  # the webhook log is written a moment after the answer
    called: dict[str, int] = {}
    call = scripts.Script.__call__

    async def counted(self: scripts.Script, **kwargs: object) -> object:
        called[self.name] = called.get(self.name, 0) + 1
        return await call(self, **kwargs)

    monkeypatch.setattr(scripts.Script, "__call__", counted)

    await redis.config_resetstat()
    for i in range(20):
        body = await svc.webhook(message_payload(message_id=100 + i, conversation_id=2 + i % 5,
                                                 content=f"one at a time {i}"))
        assert body["status"] == "buffered"
    await asyncio.sleep(0.1)
    _, calls = await _stats(redis)
    # Per buffered webhook one EVALSHA: the append script de-duplicates, checks the
    # conversation's rate limit and appends; the script cache holds it, so no SCRIPT LOAD/EXISTS.
    # The other EVALSHAs are the webhook log's, one per batch of entries (weblog.lua).
    assert called["append"] == 20 and set(called) == {"append", "weblog"}, called
    assert calls.get("cmdstat_evalsha") == 20 + called["weblog"], (calls, called)
    assert "cmdstat_script|exists" not in calls and "cmdstat_script|load" not in calls, calls

    await redis.config_resetstat()
    called.clear()
    reads0, _ = await _stats(redis)
    bodies = await asyncio.gather(*(svc.webhook(message_payload(
        message_id=1000 + i, conversation_id=100 + i, content=f"all at once {i}")) for i in range(200)))
    assert all(b["status"] == "buffered" for b in bodies)
    await asyncio.sleep(0.1)
    reads1, calls = await _stats(redis)
    assert called["append"] == 200 and called["weblog"] <= 3, called
    assert calls.get("cmdstat_evalsha") == 200 + called["weblog"], (calls, called)
    # Unbatched, every script call would be a request of its own: 200 reads and more. Batched,
    # concurrent calls arrive together (the INFO calls above and the webhook log add a few).
    assert reads1 - reads0 < 200, reads1 - reads0


async def test_buffered_webhooks_share_the_timer_of_their_round_trip(settings, make_service, monkeypatch):
    """A buffered webhook opens no timeout scope of its own: no body timer when the body came
    with the headers, and its Redis budget is a deadline its append carries. The round trip that
    the appends of one loop turn share has one timer, at the earliest of their deadlines."""
    svc = await make_service(settings, worker=False)
    in_app: list[float | None] = []
    per_trip: list[float | None] = []

    def counting(into: list[float | None], scope):  # scope: asyncio.timeout or timeout_at
        def counted(when: float | None) -> asyncio.Timeout:
            into.append(when)
            return scope(when)
        return counted

    # Only these modules' view of asyncio: redis-py and aiohttp keep theirs.
    app_view, batcher_view = types.ModuleType("asyncio"), types.ModuleType("asyncio")
    app_view.__dict__.update(vars(asyncio), timeout=counting(in_app, asyncio.timeout),
                             timeout_at=counting(in_app, asyncio.timeout_at))
    batcher_view.__dict__.update(vars(asyncio), timeout_at=counting(per_trip, asyncio.timeout_at))
    monkeypatch.setattr(app_module, "asyncio", app_view)
    monkeypatch.setattr(batcher_module, "asyncio", batcher_view)
    loop = asyncio.get_running_loop()
    for i in range(5):
        sent = loop.time()
        body = await svc.webhook(message_payload(message_id=500 + i, conversation_id=9, content=f"m {i}"))
        assert body["status"] == "buffered"
        assert per_trip[-1] is not None
        assert sent + app_module._REDIS_BUDGET_S <= per_trip[-1] <= loop.time() + app_module._REDIS_BUDGET_S
    assert in_app == [] and len(per_trip) == 5

    per_trip.clear()
    bodies = await asyncio.gather(*(svc.webhook(message_payload(
        message_id=600 + i, conversation_id=200 + i, content=f"together {i}")) for i in range(200)))
    assert all(b["status"] == "buffered" for b in bodies)
    assert in_app == [] and 1 <= len(per_trip) < 200, len(per_trip)


async def test_the_webhook_log_of_concurrent_webhooks_is_one_script_call(settings, make_service, redis):
    """The entries gathered while webhooks are answered go to the log stream in one call of
    lua/weblog.lua (an XADD each inside it), not one pipelined XADD each; every field as before,
    ids past 2^53 unchanged (the entries travel as strings, not as cjson's floats)."""
    svc = await make_service(settings, worker=False)
    await svc.webhook(message_payload(message_id=1, conversation_id=1, content="warm up"))
    await asyncio.sleep(0.1)
    await redis.config_resetstat()
    big = 2**60 + 7
    bodies = await asyncio.gather(*(svc.webhook(message_payload(
        message_id=big + i, conversation_id=300 + i, content=f"logged {i}")) for i in range(100)))
    assert all(b["status"] == "buffered" for b in bodies)
    await asyncio.sleep(0.2)
    _, calls = await _stats(redis)
    assert calls.get("cmdstat_xadd") == 100, calls  # counted inside the script too
    assert 100 < calls["cmdstat_evalsha"] <= 100 + 3, calls  # the appends, and the log's few calls
    logged = {int(fields[b"message"]): fields for _, fields in await redis.xrange("bs:log:webhooks")
              if fields[b"outcome"] == b"buffered"}
    assert set(logged) >= {big + i for i in range(100)}
    one = logged[big + 5]
    assert {k.decode(): v.decode() for k, v in one.items() if k != b"t"} == {
        "outcome": "buffered", "status": "200", "path": "/webhooks/chatwoot", "conversation": "305",
        "message": str(big + 5), "buffered": "1", "flush_in_ms": str(settings.buffer_duration_ms)}
    assert abs(int(one[b"t"]) - time.time() * 1000) < 60_000


def test_the_service_packs_commands_with_hiredis_into_the_same_bytes():
    """redis-py's asyncio connection packs every argument in Python (~50 us for a webhook's
    EVALSHA); the service's connections pack in C and must put the same bytes on the wire."""
    client = redis_client.standalone("redis://127.0.0.1:1/0")
    fast = client.connection_pool.connection_class
    assert issubclass(fast, Connection) and fast.pack_command is not Connection.pack_command
    commands = [("EVALSHA", "a" * 40, 2, b"bs:{s1}:due", "bs:{s1}:buf:1:2", "1:2", '{"text":"olá"}', 5000,
                 -1, 2.5, 0.1, 1e20, -3e-7, memoryview(b"yz")),
                ("CONFIG GET", "maxmemory"), (b"SCRIPT LOAD", "return 1"), ("SET", "k", "v" * 100_000)]
    for command in commands:
        assert b"".join(fast().pack_command(*command)) == b"".join(Connection().pack_command(*command))
    assert b"".join(fast().pack_commands(commands)) == b"".join(Connection().pack_commands(commands))
    for bad in (None, True, bytearray(b"x"), object()):
        with pytest.raises(DataError):
            fast().pack_command("SET", "k", bad)


async def test_a_seeded_trace_gets_one_llm_call_per_burst(settings, make_service, llm, chatwoot):
    # 30 s window and 1-20 s gaps inside a burst, 2.5-4 minutes between bursts, 100 x faster.
    scale = 100
    window_s = 0.6
    trace = chat_trace.generate(12, seed=7, span_s=60, bursts_per_conversation=((1, 1), (2, 1)),
                                between_gap_s=(150, 240))
    bursts = chat_trace.bursts(trace)
    svc = await make_service(replace(settings, buffer_duration_ms=int(window_s * 1000),
                                     max_buffer_age_ms=10_000))
    sent_at: dict[int, float] = {}
    t0 = time.monotonic()

    async def conversation(conv: int) -> None:
        for m in (m for m in trace if m.conversation_id == conv):
            await asyncio.sleep(max(0.0, t0 + m.at_s / scale - time.monotonic()))
            sent_at[m.message_id] = time.monotonic() - t0
            body = await svc.webhook(message_payload(message_id=m.message_id,
                                                     conversation_id=m.conversation_id, content=m.text))
            assert body["status"] == "buffered"

    await asyncio.gather(*(conversation(c) for c in {m.conversation_id for m in trace}))
    deadline = time.monotonic() + 15
    while len(chatwoot.posts) < len(bursts) and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    await asyncio.sleep(2 * window_s)  # nothing more may come

    verdict = chat_trace.check(trace, [p.body["content"] for p in chatwoot.posts], len(llm.calls),
                               sent_at, window_s)
    # The seeded trace is fixed: these numbers change only if the generator or the seed does.
    assert (verdict.messages, verdict.bursts) == (len(trace), len(bursts))
    assert verdict.answered_once == verdict.messages, verdict
    assert verdict.split_bursts == verdict.merged == 0, verdict
    assert verdict.llm_calls == verdict.bursts == verdict.whole_bursts, verdict
    assert verdict.calls_per_message < 0.5, verdict


async def test_what_a_completed_burst_leaves_in_redis_for_a_fixed_payload(settings, redis):
    """BENCHMARKS.md §3: a completed job keeps only a compact record (no key, expiry or index
    entry of its own) in a listpack bucket; history entries carry the text and a few bytes."""
    store = BufferStore(redis, replace(settings, buffer_duration_ms=1))
    n = 100
    for i in range(n):
        for j in range(3):
            await store.append(ChatMessage(1, 1000 + i, 10_000_000 + 3 * i + j, memory.TEXT, inbox_id=1))
    # An open conversation (BENCHMARKS.md §3): its buffer, a compact head "<first ms>[1]" and
    # [10000000,"..."] per message, and its sliding TTL key holding a shared integer: no
    # first-message hash entry, no handoff record (the snapshot has no version). Measured on
    # Redis 7.0: 536 B for the list (its listpack in the 384 B class), 72 B for the TTL key.
    text = len(memory.TEXT.encode())
    conv = "1:999"
    waiting = BufferStore(redis, replace(settings, buffer_duration_ms=60_000))
    for j in range(3):
        await waiting.append(ChatMessage(1, 999, 20_000_000 + j, memory.TEXT, inbox_id=1))
    buffered = store.keys.buffer(conv)
    raw = await redis.lrange(buffered, 0, -1)
    assert [len(m) for m in raw] == [16] + [text + 13] * 3, raw
    # The rate-limit key lives half a second per message (bench/memory.py counts it while it does).
    assert sorted([k.decode() async for k in redis.scan_iter(match=f"*:{conv}")]) == sorted(
        [buffered, store.keys.ttl(conv), store.keys.rate(conv)])
    assert await redis.hlen(store.keys.first(store.keys.shard_of(conv))) == 0
    assert await redis.object("encoding", store.keys.ttl(conv)) == b"int"
    assert await redis.memory_usage(buffered, samples=0) <= 536
    assert await redis.memory_usage(store.keys.ttl(conv), samples=0) <= 72
    await asyncio.sleep(0.05)
    finished = 0
    for shard in range(settings.shards):
        _, _, batches = await store.claim(shard, n)
        for b in batches:
            finished += await store.finish(b, "completed", reply=memory.REPLY, reply_id=50_000_000 + finished)
    assert finished == n

    assert [k async for k in redis.scan_iter(match="bs:*:batch:*")] == []
    assert [k async for k in redis.scan_iter(match="bs:*:jobs:*")] == []
    buckets = [k async for k in redis.scan_iter(match="bs:*:done:*")]
    assert {await redis.object("encoding", k) for k in buckets} == {b"listpack"}
    records = [len(v) for k in buckets for v in await redis.hvals(k)]
    assert len(records) == n and max(records) <= 85, max(records)
    bucket_bytes = sum([await redis.memory_usage(k, samples=0) for k in buckets])
    # Measured 97 B per completed job with 128 records a bucket (bench/memory.py); a few
    # records a bucket here carry the bucket key's own cost too.
    assert bucket_bytes / n <= 130, bucket_bytes / n

    hist = store.keys.history("1:1000")
    entries = [len(e) for e in await redis.lrange(hist, 0, -1)]
    assert entries[:3] == [text + 9] * 3  # 10000000:...
    assert entries[3] == len(memory.REPLY.encode()) + 10  # a50000000:...
    # One burst's history, key and list included: 664 B measured for 453 B of text (Redis 7.0;
    # 760 B as json objects).
    assert await redis.memory_usage(hist, samples=0) <= 664


async def test_the_history_keeps_id_text_attachments_and_role_and_reads_older_entries(settings, redis):
    """The history drops what only the burst is read for (inbox, contact name, phone, typed text),
    whichever way a message gets there; entries an earlier version wrote stay readable."""
    store = BufferStore(redis, replace(settings, buffer_duration_ms=1))
    att = (Attachment("file", url="https://x/f.pdf", title="t", name="n.pdf"),)
    msg = ChatMessage(1, 5, 11, 'say "hi", "inbox":2', attachments=att, inbox_id=3, sender_name="Ana",
                      phone="5511999990000", content='"typed"')
    hist = store.keys.history(msg.conv)
    await redis.rpush(hist, orjson.dumps({"id": 9, "text": "old", "inbox": 3, "name": "Ana"}))
    await store.append(msg)
    await asyncio.sleep(0.05)
    [batch] = (await store.claim(store.keys.shard_of(msg.conv), 10))[2]
    assert batch.messages[0]["name"] == "Ana" and batch.messages[0]["ph"] == "5511999990000"
    assert await store.finish(batch, "completed", reply="ok", reply_id=12)
    agent = ChatMessage(1, 5, 13, "an agent", inbox_id=3, sender_name="Bia")
    assert await store.note(Decision("note", "human", agent)) in ("recorded", "paused")

    kept = [from_history(e) for e in await redis.lrange(hist, 0, -1)]
    assert kept == [{"id": 9, "text": "old", "inbox": 3, "name": "Ana"},
                    {"id": 11, "text": 'say "hi", "inbox":2', "att": [a.to_dict() for a in att]},
                    {"id": 12, "text": "ok", "role": "assistant"},
                    {"id": 13, "text": "an agent"}]
    assert [e["text"] for e in await store.history(msg.conv, 10)] == [e["text"] for e in kept]


async def test_a_burst_costs_one_claim_and_a_fixed_number_of_script_calls(settings, make_service, redis,
                                                                          chatwoot, monkeypatch):
    """BENCHMARKS.md §8: what a burst costs in Redis, from its message to its reply posted. The
    claim, before_post, part and finish are the guarantee steps; the sweep claims only from a
    shard that has work (before: from every one of the 16 shards, a round trip each, on each
    wake-up and each finished batch: 63 claims for this burst)."""
    calls: list[str] = []
    real_call = scripts.Script.__call__

    async def counted(self, **kwargs):
        calls.append(self.name)
        return await real_call(self, **kwargs)

    monkeypatch.setattr(scripts.Script, "__call__", counted)
    s = replace(settings, buffer_duration_ms=300, processing_interval_ms=60_000)
    await make_service(s, http=False)
    store = BufferStore(redis, s)
    for n, conv in enumerate((1, 2), start=1):  # the first warms everything up
        await asyncio.sleep(0.3)  # the worker settles (wake-ups of the start, the last burst)
        calls.clear()
        await redis.config_resetstat()
        reads0 = (await redis.info("stats"))["total_reads_processed"]
        await store.append(ChatMessage(1, conv, 10 * conv, "hello there"))
        await wait_for(lambda n=n: len(chatwoot.posts) == n, timeout=5)
        await asyncio.sleep(0.3)  # the finish's wake-up and what it sets off
        reads = (await redis.info("stats"))["total_reads_processed"] - reads0
    # One claim takes the burst at its deadline; the TTL key's expiry event, which comes
    # about then, is one more look at that shard unless it arrives before the claim.
    assert [c for c in calls if c != "claim"] == ["append", "before_post", "part", "finish"], calls
    assert 1 <= calls.count("claim") <= 2, calls
    # The script calls, the history read and the INFO call above; the flags' refresh, the sweep
    # log's entry and a new pool connection's handshake when they come (before: 60 and more).
    assert reads <= 16, reads


async def test_the_log_lines_of_one_loop_turn_take_one_write(monkeypatch):
    """JSON log lines (logs.py) wait for the end of the event loop's turn and go out together,
    in order; a line logged outside a running loop is written at once, after any that wait."""
    import io

    import structlog

    from buffer_service import logs

    class Counted(io.BytesIO):
        writes = 0

        def write(self, data: bytes) -> int:  # type: ignore[override]
            Counted.writes += 1
            return super().write(data)

    out = Counted()
    monkeypatch.setattr(sys, "stderr", types.SimpleNamespace(buffer=out, flush=lambda: None,
                                                             isatty=lambda: False))
    try:
        logs.configure("json", "info")
        log = structlog.get_logger("bench").bind()
        for i in range(30):
            log.info("webhook", n=i)
        assert Counted.writes == 0  # not before the turn ends
        await asyncio.sleep(0)
        assert Counted.writes == 1
        lines = out.getvalue().splitlines()
        assert [orjson.loads(line)["n"] for line in lines] == list(range(30))
        assert all(orjson.loads(line)["event"] == "webhook" for line in lines)
        log.info("second turn")
        await asyncio.to_thread(lambda: log.info("from a thread, no loop"))
        assert Counted.writes == 2  # the thread's write took the waiting line with it
        assert [orjson.loads(line)["event"] for line in out.getvalue().splitlines()[30:]] == [
            "second turn", "from a thread, no loop"]
    finally:
        monkeypatch.undo()  # the real stderr again, then the logging of conftest.py
        logs.configure("console", os.environ.get("TEST_LOG_LEVEL", "warning"))
