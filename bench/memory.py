"""Benchmark 3: Redis memory per open conversation, per history, per job record, per webhook.

Everything is written by the service's own code paths into a redis-server of our own (repo
redis.conf): BufferStore.append for open conversations, BufferStore.claim + finish for job
records and history, and a real `serve --no-worker` process over HTTP for what the webhook
path adds (rate-limit counters, the webhook log stream).

Method: INFO memory `used_memory` before and after loading N items. Open conversations: the
total minus what the same de-duplication markers cost alone (written the same way into the
emptied server). Other kinds: each is deleted on its own (SCAN + UNLINK, waiting for lazy
frees) and the drop is its share; deleting leaves Redis's hash tables at their size, so those
figures exclude the 8-16 bytes per key of table slots.

    python bench/memory.py [--quick] [--conversations N]
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import aiohttp
import orjson
from common import median, parser, repeats, save, service_env, table, workdir
from redis.asyncio import Redis

from buffer_service.chatwoot import ChatMessage, Handoff
from buffer_service.config import Settings
from buffer_service.redis_client import connect
from buffer_service.store import BufferStore
from devtools.net import free_port, wait_port
from devtools.payloads import message_payload
from devtools.processes import spawn_service, stop
from devtools.redis_server import running_redis

# ~100 characters of text, like a WhatsApp message (the target's "3 messages of ~100 chars").
TEXT = "Oi! Comprei um tênis na sexta e veio o tamanho errado, 41 em vez de 42. Como faço a troca, por favor?"
REPLY = ("Olá! Sinto muito pelo engano. Você pode trocar pelo site em Meus Pedidos > Trocas; "
         "a coleta é grátis e o novo par sai em até 2 dias úteis.")


async def used(redis: Redis) -> int:
    """used_memory once lazy frees are done and the number has settled."""
    last = -1
    for _ in range(50):
        info = await redis.info("memory")
        if info.get("lazyfree_pending_objects", 0) == 0 and info["used_memory"] == last:
            return last
        last = info["used_memory"]
        await asyncio.sleep(0.1)
    return last


async def drop(redis: Redis, pattern: str) -> tuple[int, int]:
    """Delete every key matching `pattern`; returns (keys deleted, bytes freed)."""
    before = await used(redis)
    n = 0
    batch: list[bytes] = []
    async for key in redis.scan_iter(match=pattern, count=10_000):
        batch.append(key)
        if len(batch) >= 5000:
            n += await redis.unlink(*batch)
            batch = []
    if batch:
        n += await redis.unlink(*batch)
    return n, before - await used(redis)


def conv_msg(i: int, j: int, per: int, round_: int = 0) -> ChatMessage:
    return ChatMessage(1, 100_000 + i, 10_000_000 + (round_ * 1_000_000) + i * per + j, TEXT,
                       inbox_id=1)


async def open_conversations(redis: Redis, settings: Settings, n: int, per: int,
                             round_: int = 0, versioned: bool = False) -> None:
    store = BufferStore(redis, settings)
    for start in range(0, n, 2000):
        await asyncio.gather(*(store.append(conv_msg(i, j, per, round_), snapshot=Handoff(
            1, 100_000 + i, "", 1_764_000_000.123456 + j) if versioned else None)
            for i in range(start, min(n, start + 2000)) for j in range(per)))


async def part_conversations(url: str, n: int, buffer_format: str = "compact",
                             versioned: bool = False) -> dict[str, Any]:
    """Open conversations as the service stores them, in one BUFFER_FORMAT. `versioned`: each
    message comes with a conversation snapshot that has an `updated_at`, as Chatwoot's webhooks
    do, so the conversation also gets its handoff record (lib.lua take_charge)."""
    settings = Settings(redis_url=url, buffer_duration_ms=3_600_000, max_buffer_age_ms=7_200_000,
                        buffer_format=buffer_format)
    redis = await connect(settings)
    try:
        await redis.flushall()
        base = await used(redis)
        await open_conversations(redis, settings, n, 3, versioned=versioned)
        total = await used(redis) - base
        out: dict[str, Any] = {"conversations": n, "total_bytes_per_conv_with_markers": total / n}
        sample = [f"1:{100_000 + i}" for i in range(0, n, max(1, n // 500))]
        store = BufferStore(redis, settings)
        sizes = [await redis.memory_usage(store.keys.buffer(c), samples=0)
                 for c in sample]
        out["part:buffer list (MEMORY USAGE)"] = sum(sizes) / len(sizes)
        out["keys_per_conv"] = (await redis.dbsize() - 3 * n) / n
        await redis.flushall()
        # The markers alone, written as append.lua writes them, table slots included.
        base = await used(redis)
        for start in range(0, 3 * n, 10_000):
            async with redis.pipeline(transaction=False) as pipe:
                for i in range(start, min(3 * n, start + 10_000)):
                    msg = conv_msg(i // 3, i % 3, 3)
                    pipe.set(store.keys.seen(msg.conv, msg.message_id), "1",
                             nx=True, px=settings.dedup_ttl_s * 1000)
                await pipe.execute()
        markers = await used(redis) - base
        out["marker_bytes"] = markers / (3 * n)
        out["bytes_per_conv"] = (total - markers) / n
        out["part:the rest (index entry, TTL key, table slots; json: first-message entry)"] = (
            out["bytes_per_conv"] - out["part:buffer list (MEMORY USAGE)"])
    finally:
        await redis.aclose()
    return out


async def part_layouts(url: str, n: int) -> dict[str, Any]:
    """What-if: the same open conversations in other layouts, written with plain commands (not
    the service's code), to show what the <= 700 B target takes. Same messages, same keys, the
    TTL key included, no de-duplication markers."""
    settings = Settings(redis_url=url)
    redis = Redis.from_url(url)
    store = BufferStore(redis, settings)
    first_ms = 1_764_000_000_000
    variants = {
        "json: JSON object per message, first-message hash (BUFFER_FORMAT=json)": "json",
        "compact: head + JSON array per message (BUFFER_FORMAT=compact)": "compact",
        "compact, key names b:/t: for buf:/ttl: (2 bytes shorter; not done)": "compact-short",
        "compact, messages as <id>:<text> instead of [id, text] (not done)": "compact-text",
        "compact entries in one string value instead of a list (not done)": "string",
    }
    out: dict[str, Any] = {}
    try:
        for name, layout in variants.items():
            await redis.flushall()
            base = await used(redis)
            for start in range(0, n, 5000):
                async with redis.pipeline(transaction=False) as pipe:
                    for i in range(start, min(n, start + 5000)):
                        msgs = [conv_msg(i, j, 3) for j in range(3)]
                        conv, shard = msgs[0].conv, store.keys.shard_of(msgs[0].conv)
                        head = f"{first_ms + i}".encode() + msgs[0].burst_head()
                        entries = [m.to_entry() for m in msgs]
                        buffer, ttl = store.keys.buffer(conv), store.keys.ttl(conv)
                        if layout == "compact-short":
                            buffer, ttl = buffer.replace(":buf:", ":b:"), ttl.replace(":ttl:", ":t:")
                        if layout == "json":
                            pipe.rpush(buffer, *[m.to_json() for m in msgs])
                            pipe.hset(store.keys.first(shard), conv, first_ms + i)
                        elif layout == "compact-text":
                            pipe.rpush(buffer, head, *[f"{m.message_id}:{m.text}" for m in msgs])
                        elif layout.startswith("compact"):
                            pipe.rpush(buffer, head, *entries)
                        else:
                            pipe.set(buffer, b"\n".join([head, *entries]))
                        pipe.zadd(store.keys.due(shard), {conv: first_ms + i})
                        pipe.set(ttl, 1, px=3_600_000)
                    await pipe.execute()
            out[f"layout:{name}"] = (await used(redis) - base) / n
    finally:
        await redis.aclose()
    return out


async def part_history_layouts(url: str, n: int, rounds: int) -> dict[str, Any]:
    """What-if: the history part_jobs_and_history leaves (`rounds` x 3 messages + a reply per
    conversation), written with plain commands in other entry layouts: bytes per text byte."""
    redis = Redis.from_url(url)
    store = BufferStore(redis, Settings(redis_url=url))
    reply = {"id": 50_000_000, "text": REPLY, "role": "assistant"}
    whatsapp = {"inbox": 1, "name": "Maria Aparecida", "ph": "5511987654321"}

    def kept(e: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in e.items() if k in ("id", "text", "att", "role")}

    layouts = {
        "JSON object with the burst's inbox (before lib.lua for_history)": orjson.dumps,
        "  the same, WhatsApp message with contact name and phone": lambda e: orjson.dumps(
            e if "role" in e else {**e, **whatsapp}),
        "JSON object of id, text, role (BUFFER_FORMAT=json)": lambda e: orjson.dumps(kept(e)),
        "JSON arrays [id, text] / [id, text, role]": lambda e: orjson.dumps(list(kept(e).values())),
        "text only, role as a one-byte prefix": lambda e: (e.get("role", "u")[:1] + e["text"]).encode(),
        "<id>:<text>, a<id>:<text> for a reply (BUFFER_FORMAT=compact)": lambda e: ChatMessage(
            1, 1, e["id"], e["text"], role=e.get("role", "user")).to_history(),
    }
    text = rounds * (3 * len(TEXT.encode()) + len(REPLY.encode()))
    out: dict[str, Any] = {}
    try:
        for name, encode in layouts.items():
            await redis.flushall()
            base = await used(redis)
            for start in range(0, n, 2000):
                async with redis.pipeline(transaction=False) as pipe:
                    for i in range(start, min(n, start + 2000)):
                        burst = ({"id": 10_000_000 + i, "text": TEXT, "inbox": 1},) * 3
                        entries = [encode(e) for _ in range(rounds) for e in (*burst, reply)]
                        key = store.keys.history(f"1:{100_000 + i}")
                        pipe.rpush(key, *entries)
                        pipe.pexpire(key, 604_800_000)
                    await pipe.execute()
            out[f"hlayout:{name}"] = (await used(redis) - base) / (n * text)
    finally:
        await redis.aclose()
    return out


async def part_jobs_and_history(url: str, n: int, rounds: int) -> dict[str, Any]:
    """`rounds` bursts of 3 messages per conversation, each claimed and finished with a reply,
    as the worker does: job records and history as they stand after real use."""
    settings = Settings(redis_url=url, buffer_duration_ms=1, max_buffer_age_ms=1000)
    redis = await connect(settings)
    store = BufferStore(redis, settings)
    text_bytes = 0
    finished = 0
    try:
        base = await used(redis)
        for r in range(rounds):
            await open_conversations(redis, settings, n, 3, round_=r)
            await asyncio.sleep(0.05)
            for shard in range(settings.shards):
                while True:
                    _, _, batches = await store.claim(shard, 500)
                    if not batches:
                        break
                    oks = await asyncio.gather(*(store.finish(
                        b, "completed", reply=REPLY, reply_id=50_000_000 + r * 1_000_000 + i)
                        for i, b in enumerate(batches, start=finished)))
                    finished += sum(oks)
            text_bytes += n * (3 * len(TEXT.encode()) + len(REPLY.encode()))
        total = await used(redis) - base
        p = settings.key_prefix
        out: dict[str, Any] = {"jobs": finished, "history_conversations": n, "rounds": rounds,
                               "total_bytes": total}
        _k_hist, b_hist = await drop(redis, f"{p}:*:hist:*")
        out["history_bytes_per_conv"] = b_hist / n
        out["history_text_bytes_per_conv"] = text_bytes / n
        out["history_ratio"] = b_hist / text_bytes
        # A completed job's record: a whole hash as before, else its compact entry in a bucket.
        _, b_jobs = await drop(redis, f"{p}:*:batch:*")
        _, b_done = await drop(redis, f"{p}:*:done*")
        out["job_record_bytes"] = (b_jobs + b_done) / max(1, finished)
        _, b_index = await drop(redis, f"{p}:*:jobs:*")
        out["job_index_bytes"] = b_index / max(1, finished)
        k_seen, b_seen = await drop(redis, f"{p}:*:seen:*")
        out["marker_bytes"] = b_seen / max(1, k_seen)
        rest = await used(redis) - base
        out["other_bytes_total"] = rest  # per-shard counters, stats hashes, own-reply memory ...
    finally:
        await redis.aclose()
    return out


async def part_webhooks(url: str, tmp: Path, conversations: int, per: int) -> dict[str, Any]:
    """What the HTTP path adds per webhook, through a real `serve --no-worker` process."""
    port = free_port()
    proc = spawn_service(["serve", "--no-worker"], service_env(url, port, LOG_LEVEL="warning"),
                         tmp / "serve.log")
    redis = Redis.from_url(url)
    try:
        wait_port(port, proc)
        base = await used(redis)
        sem = asyncio.Semaphore(32)
        async with aiohttp.ClientSession() as session:
            async def send(i: int, j: int) -> None:
                async with sem, session.post(
                        f"http://127.0.0.1:{port}/webhooks/chatwoot",
                        json=message_payload(message_id=90_000_000 + i * per + j,
                                             conversation_id=500_000 + i, content=TEXT)) as resp:
                    assert resp.status == 200, await resp.text()
            await asyncio.gather(*(send(i, j) for i in range(conversations) for j in range(per)))
        await asyncio.sleep(0.5)  # the webhook log is written a few ms after the answers
        total = await used(redis) - base
        webhooks = conversations * per
        out: dict[str, Any] = {"webhooks": webhooks, "bytes_per_webhook_all": total / webhooks}
        log_key = "bs:log:webhooks"
        entries = await redis.xlen(log_key)
        _, b = await drop(redis, log_key)
        out["log_entries"] = entries
        out["log_bytes_per_entry"] = b / max(1, entries)
        k, b = await drop(redis, "bs:*:rl:*")
        out["ratelimit_keys"] = k
        out["ratelimit_bytes_per_conv"] = b / max(1, k)
    finally:
        stop(proc)
        await redis.aclose()
    return out


def steady_state(settings: Settings, r: dict[str, Any], loads: tuple[int, ...],
                 messages_per_burst: int = 1) -> list[list[Any]]:
    """What stays in Redis at a steady load of answered bursts, at the retention settings: each
    kind of key costs (bytes per burst) x (bursts a day) x (days it lives). One-message bursts, as
    the issue measured them: a burst leaves its message and its reply in the history and a
    de-duplication marker for each."""
    hist_entry = r["history_bytes_per_conv"] / (r["rounds"] * 4)
    rows = [
        ("job record of a completed burst", f"JOB_RETENTION_DAYS={settings.job_retention_days}",
         r["job_record_bytes"] + r["job_index_bytes"], settings.job_retention_days),
        ("history (message + reply)", f"HISTORY_TTL_S={settings.history_ttl_s}",
         (messages_per_burst + 1) * hist_entry, settings.history_ttl_s / 86_400),
        ("de-duplication markers (message + reply)", f"DEDUP_TTL_S={settings.dedup_ttl_s}",
         (messages_per_burst + 1) * r["marker_bytes"], settings.dedup_ttl_s / 86_400),
    ]
    out = [[kind, setting, round(per_burst), *[per_burst * n * days / 2**20 for n in loads]]
           for kind, setting, per_burst, days in rows]
    out.append(["total", "", "", *[sum(row[3 + i] for row in out) for i in range(len(loads))]])
    return out


def main() -> dict[str, Any]:
    p = parser(__doc__.split("\n\n")[0])
    p.add_argument("--conversations", type=int, default=0, help="default 100000 (quick 20000)")
    args = p.parse_args()
    n = args.conversations or (20_000 if args.quick else 100_000)
    hist_n = n // 5
    runs: list[dict[str, Any]] = []
    for i in range(repeats(args)):
        r: dict[str, Any] = {}
        with workdir("memory") as tmp:
            with running_redis(tmp) as server:
                r.update(asyncio.run(part_conversations(server.url, n)))
                for variant, kwargs in (("json", {"buffer_format": "json"}),
                                        ("versioned", {"versioned": True})):
                    other = asyncio.run(part_conversations(server.url, n, **kwargs))
                    r[f"{variant}:bytes_per_conv"] = other["bytes_per_conv"]
                    r[f"{variant}:buffer_list"] = other["part:buffer list (MEMORY USAGE)"]
            with running_redis(tmp) as server:
                jobs = asyncio.run(part_jobs_and_history(server.url, hist_n, 5))
                r.update({k: v for k, v in jobs.items() if k != "marker_bytes"})
            with running_redis(tmp) as server:
                r.update(asyncio.run(part_layouts(server.url, n)))
                r.update(asyncio.run(part_history_layouts(server.url, hist_n, 5)))
            with running_redis(tmp) as server:
                r.update(asyncio.run(part_webhooks(server.url, tmp, 300 if args.quick else 2000, 3)))
        runs.append(r)
        print(f"run {i + 1}: {r['bytes_per_conv']:.0f} B per open conversation, history "
              f"{r['history_ratio']:.2f} x text, job record {r['job_record_bytes']:.0f} B, "
              f"marker {r['marker_bytes']:.0f} B", flush=True)
        time.sleep(0.2)
    s = {k: median([r[k] for r in runs]) for k in runs[0] if isinstance(runs[0][k], int | float)}
    parts = [k for k in s if k.startswith("part:")]
    print()
    print(table(["what", "bytes", "target"], [
        ["open conversation, 3 messages of ~100 chars (buffer list, index entry, TTL key),"
         " all table slots charged", round(s["bytes_per_conv"]), "<= 700"],
        *[[f"  of which {k[5:]}", round(s[k]), ""] for k in parts],
        ["  the same in BUFFER_FORMAT=json (as before), same run", round(s["json:bytes_per_conv"]),
         f"ratio {s['bytes_per_conv'] / s['json:bytes_per_conv']:.2f}"],
        ["  its buffer list in json (MEMORY USAGE)", round(s["json:buffer_list"]), ""],
        ["  the same with a versioned snapshot per message (Chatwoot's webhooks): handoff record too",
         round(s["versioned:bytes_per_conv"]), ""],
        ["  ... plus per message: de-duplication marker (excluded above)", round(s["marker_bytes"]), ""],
        ["history per conversation (5 bursts of 3 + 5 replies)",
         f"{s['history_bytes_per_conv']:.0f} for {s['history_text_bytes_per_conv']:.0f} of text"
         f" = {s['history_ratio']:.2f} x", "<= 1.3 x"],
        ["job record (batch hash after finish)", round(s["job_record_bytes"]), ""],
        ["job index entry (jobs:<state> zset)", round(s["job_index_bytes"]), ""],
        ["webhook log entry (bs:log:webhooks stream)", round(s["log_bytes_per_entry"]), ""],
        ["rate-limit counter per conversation", round(s["ratelimit_bytes_per_conv"]), ""],
    ]))
    print("\nlayout options for an open conversation (plain commands, same messages, no markers):")
    print(table(["layout", "bytes"], [[k[7:], round(v)] for k, v in s.items() if k.startswith("layout:")]))
    print("\nlayout options for the history (plain commands, same entries, one RPUSH per conversation):")
    print(table(["layout", "bytes per byte of text"],
                [[k[8:], f"{v:.2f}"] for k, v in s.items() if k.startswith("hlayout:")]))
    loads = (10_000, 100_000)
    print("\nsteady state at the default retentions, one-message bursts, each answered:")
    print(table(["kind of key", "setting", "B per burst", *[f"MiB at {n:,} bursts/day" for n in loads]],
                steady_state(Settings(), {**s, "rounds": 5}, loads)))
    ok = s["bytes_per_conv"] <= 700 and s["history_ratio"] <= 1.3
    print(f"\ntargets (<= 700 B per open conversation, history <= 1.3 x text): "
          f"{'met' if ok else 'NOT met'}")
    return save("memory", args, {"conversations": n, "runs": runs, "summary": s, "target_met": ok})


if __name__ == "__main__":
    main()
