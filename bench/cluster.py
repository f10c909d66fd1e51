"""Benchmark 7: one Redis server against a Redis Cluster of three primaries, with 1, 2 and 4
service processes, each with 100,000 open conversations in Redis; and the Redis CPU one
append costs (append.lua), from which what one core per node could take.

  open    --open conversations (default 100,000; quick 10,000) buffered through BufferStore.append
          with deadlines an hour away: the index, the keys and the memory of a busy Redis, which
          neither phase below flushes.
  ingest  P `serve --no-worker` processes (windows of an hour: nothing becomes due), each loaded
          by its own wrk (64 / P connections) at full speed over 100,000 more conversations:
          webhooks acknowledged per second, all processes together, and the p99 of the slowest.
  flush   --due conversations (default 1,000) due over --spread seconds, claimed by P `worker`
          processes (LLM and Chatwoot stand-ins answer at once): deadline-to-claim lateness from
          the compact job records (claimed - deadline), every burst answered once.
  ceiling pipelined appends (one message, one new conversation each) against a fresh standalone
          server and a fresh cluster: Redis CPU (INFO cpu, all nodes) per append.

Every row is also given as a ratio to the standalone 1-process row of the same run (median of
--repeat runs, default 3). Every redis-server, cluster node and service process runs on this
machine, so the cluster does not add CPU: it shows what the routing, the per-node pipelines and
the subscriptions cost, not what more machines would give; the ceiling says what they would.

    python bench/cluster.py [--quick] [--repeat N] [--processes 1,2,4] [--open N] [--due N]
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import ingest
import orjson
from common import median, parser, percentile, repeats, save, service_env, table, workdir, wrk
from flush import open_conversations
from redis.asyncio.cluster import RedisCluster

from buffer_service.chatwoot import ChatMessage
from buffer_service.config import Settings
from buffer_service.keys import Keys
from buffer_service.redis_client import AnyRedis, connect
from buffer_service.store import BufferStore
from devtools.chatwoot_standin import ChatwootStandIn
from devtools.llm_standin import LLMStandIn
from devtools.net import free_port, wait_port
from devtools.processes import spawn_service, stop
from devtools.redis_server import RedisClusterServers, RedisServer

CONNECTIONS = 64
HOUR_MS = 3_600_000
# Display ids of the conversations of each phase, apart (wrk uses 1..INGESTED).
INGESTED, OPEN_FIRST, DUE_FIRST = 100_000, 1_000_000, 5_000_000


@contextlib.contextmanager
def redis_of(kind: str, tmp: Path) -> Iterator[str]:
    """REDIS_URL of a fresh standalone server or 3-primary cluster."""
    servers: RedisServer | RedisClusterServers = (
        RedisServer(tmp / "redis") if kind == "standalone" else RedisClusterServers(tmp / "cluster"))
    servers.start()
    try:
        yield servers.url
    finally:
        servers.stop()


def serve(url: str, tmp: Path) -> tuple[int, subprocess.Popen[bytes]]:
    """A `serve --no-worker` process listening. A free port can be taken meanwhile (the cluster
    nodes' own connections use the same port range): then it tries another, three times."""
    tries = 3
    while True:
        port = free_port()
        # Windows of an hour and no size cap: the ingested bursts stay open, none is flushed.
        proc = spawn_service(["serve", "--no-worker"], service_env(
            url, port, RATE_LIMIT_PER_CONVERSATION=0, MESSAGE_BUFFER_DURATION_MS=HOUR_MS,
            MAX_BUFFER_AGE_MS=HOUR_MS, MAX_BUFFER_SIZE=1000), tmp / f"serve-{port}.log")
        try:
            wait_port(port, proc)
            return port, proc
        except RuntimeError:
            stop(proc)
            tries -= 1
            if not tries:
                raise


def ingest_with(url: str, processes: int, seconds: float, tmp: Path, run: int) -> dict[str, Any]:
    started = [serve(url, tmp) for _ in range(processes)]
    ports, procs = [p for p, _ in started], [proc for _, proc in started]
    env = {"WRK_TEMPLATE": str(tmp / "template.json"), "WRK_CONVERSATIONS": str(INGESTED)}

    async def load(base: int, secs: float) -> list[Any]:
        return await asyncio.gather(*(asyncio.to_thread(
            wrk, f"http://127.0.0.1:{port}/webhooks/chatwoot", seconds=secs,
            connections=max(1, CONNECTIONS // processes),
            env=dict(env, WRK_ID_BASE=str(base + i * 50_000_000), WRK_DELAY_MS="0"))
            for i, port in enumerate(ports)))

    try:
        base = 1_000_000_000 * (run + 1)
        asyncio.run(load(base, 1))
        results = asyncio.run(load(base + 500_000_000, seconds))
    finally:
        for proc in procs:
            stop(proc)
    return {"rps": sum(r.rps for r in results), "errors": sum(r.errors for r in results),
            "p99_ms": max(r.p99_ms for r in results)}


async def open_for_an_hour(url: str, n: int) -> float:
    """n open conversations whose deadlines are an hour away; seconds the load took."""
    settings = Settings(redis_url=url, max_buffer_size=50)
    redis = await connect(settings)
    try:
        # One window for all: one store, so the appends share pipelines.
        _, _, took = await open_conversations(settings, redis, n, HOUR_MS, 1, timer_keys=False,
                                              first=OPEN_FIRST)
    finally:
        await redis.aclose()
    return took


async def flush_with(url: str, processes: int, n: int, spread_s: float, tmp: Path) -> dict[str, Any]:
    llm, chatwoot = LLMStandIn(), ChatwootStandIn()
    await llm.start()
    await chatwoot.start()
    settings = Settings(redis_url=url, max_buffer_size=50)
    redis = await connect(settings)
    procs = []
    try:
        lead_ms = 6000 + 1000 * processes  # the processes start before the first deadline
        deadlines, _, _ = await open_conversations(settings, redis, n, lead_ms, int(spread_s * 1000),
                                                   timer_keys=False, first=DUE_FIRST)
        env = {"OPENAI_API_KEY": llm.api_key, "OPENAI_BASE_URL": f"{llm.base_url}/v1",
               "OPENAI_MODEL": "stand-in-model", "CHATWOOT_BASE_URL": chatwoot.base_url,
               "CHATWOOT_API_TOKEN": chatwoot.token, "WORKER_CONCURRENCY": "200"}
        procs = [spawn_service(["worker"], service_env(url, free_port(), **env), tmp / f"worker-{i}.log")
                 for i in range(processes)]
        end = time.monotonic() + lead_ms / 1000 + spread_s + 30
        while len(chatwoot.posts) < n and time.monotonic() < end:
            await asyncio.sleep(0.2)
        late = await lateness(redis, settings)
        memory = await used_memory(redis)
    finally:
        for proc in procs:
            await asyncio.to_thread(stop, proc)
        await redis.aclose()
        await llm.stop()
        await chatwoot.stop()
    posts = {p.conversation_id for p in chatwoot.posts}
    return {"answered": len(posts), "posts": len(chatwoot.posts), "due": len(deadlines),
            "claim_p50_ms": percentile(late, 50), "claim_p99_ms": percentile(late, 99),
            "claim_max_ms": max(late) if late else float("nan"), "used_memory_mb": memory}


async def per_node(redis: AnyRedis, section: str) -> dict[str, dict[str, Any]]:
    """INFO `section` of every primary, by node name ("" for one server)."""
    if isinstance(redis, RedisCluster):
        return await redis.info(section, target_nodes=RedisCluster.PRIMARIES)  # type: ignore[no-any-return]
    return {"": await redis.info(section)}


async def used_memory(redis: AnyRedis) -> int:
    """MB of every primary together."""
    return round(sum(node["used_memory"] for node in (await per_node(redis, "memory")).values()) / 2**20)


def cpu_of(info: dict[str, dict[str, Any]]) -> dict[str, float]:
    return {name: node["used_cpu_user"] + node["used_cpu_sys"] for name, node in info.items()}


async def append_ceiling(url: str, n: int) -> dict[str, Any]:
    """n appends (a new conversation each, pipelined 2,000 at a time through the service's own
    batcher): Redis CPU per append on each primary, from INFO cpu before and after."""
    settings = Settings(redis_url=url)
    redis = await connect(settings)
    store, keys = BufferStore(redis, settings), Keys(settings)
    try:
        counts: dict[str, int] = {}
        node_of_shard = {}
        for shard in range(settings.shards):
            node = redis.get_node_from_key(keys.due(shard)) if isinstance(redis, RedisCluster) else None
            node_of_shard[shard] = node.name if node else ""
        before = cpu_of(await per_node(redis, "cpu"))
        started = time.monotonic()
        for start in range(0, n, 2000):
            msgs = [ChatMessage(1, DUE_FIRST + i, i, "quero saber do meu pedido, por favor")
                    for i in range(start, min(n, start + 2000))]
            for msg in msgs:
                name = node_of_shard[keys.shard_of(msg.conv)]
                counts[name] = counts.get(name, 0) + 1
            await asyncio.gather(*(store.append(m) for m in msgs))
        wall = time.monotonic() - started
        after = cpu_of(await per_node(redis, "cpu"))
    finally:
        await redis.aclose()
    us = {name: (after[name] - before[name]) / counts[name] * 1e6 for name in counts}
    # The node with the most shards is the one that saturates first: the cluster takes what it
    # does divided by its share of the appends (shards hash to slots; slots are split evenly).
    busiest = max(counts.values()) / n
    per_core = 1e6 / median(list(us.values()))
    return {"appends": n, "wall_s": round(wall, 2), "appends_per_s_seen": round(n / wall),
            "redis_us_per_append": round(median(list(us.values())), 1),
            "busiest_node_share": round(busiest, 3), "per_core_appends_per_s": round(per_core),
            "one_core_per_node_appends_per_s": round(per_core / busiest)}


async def completed(redis: Any, settings: Settings) -> list[list[Any]]:
    """The compact record of every completed job (lib.lua compact: the conversation 1st, the
    first message's unix ms 6th, then times in ms after it: the deadline 7th, the claim 8th, the
    start of posting 9th)."""
    keys = Keys(settings)
    records = []
    for shard in range(settings.shards):
        for bucket in await redis.zrange(keys.done(shard), 0, -1):
            for raw in (await redis.hgetall(keys.done_bucket(shard, int(bucket)))).values():
                records.append(orjson.loads(raw))
    return records


async def lateness(redis: Any, settings: Settings) -> list[int]:
    """claimed - deadline of every completed job, from its compact record."""
    return [record[7] - record[6] for record in await completed(redis, settings)]


def one_row(kind: str, processes: int, args: Any, run: int) -> dict[str, Any]:
    with workdir("cluster") as tmp:
        ingest.write_template(tmp / "template.json")
        with redis_of(kind, tmp) as url:
            load_s = asyncio.run(open_for_an_hour(url, args.open))
            row = {"redis": kind, "processes": processes, "run": run, "open": args.open,
                   "open_load_s": round(load_s, 1),
                   **{f"ingest_{k}": v for k, v in ingest_with(url, processes, args.seconds, tmp,
                                                                run).items()}}
            row.update(asyncio.run(flush_with(url, processes, args.due, args.spread, tmp)))
    row["load_avg_1m"] = round(os.getloadavg()[0], 2)
    return row


def with_ratios(rows: list[dict[str, Any]]) -> None:
    """Each row against the standalone 1-process row of its run: webhooks/s (higher is better),
    claim p50 and p99 (lower is better)."""
    for row in rows:
        base = next(r for r in rows if r["run"] == row["run"] and r["redis"] == "standalone"
                    and r["processes"] == min(x["processes"] for x in rows))
        row["rps_ratio"] = row["ingest_rps"] / base["ingest_rps"]
        for q in ("p50", "p99"):
            row[f"claim_{q}_ratio"] = row[f"claim_{q}_ms"] / max(1, base[f"claim_{q}_ms"])


def main() -> dict[str, Any]:
    p = parser(__doc__.split("\n\n")[0])
    p.add_argument("--processes", default="1,2,4")
    p.add_argument("--open", type=int, default=0, help="default 100000 (quick 10000)")
    p.add_argument("--due", type=int, default=0, help="default 1000 (quick 300)")
    p.add_argument("--spread", type=float, default=0, help="seconds; default 10 (quick 5)")
    p.add_argument("--appends", type=int, default=-1,
                   help="ceiling: default 200000 (quick 20000); 0 skips it")
    args = p.parse_args()
    counts = [int(c) for c in args.processes.split(",")]
    args.open = args.open or (10_000 if args.quick else 100_000)
    args.due = args.due or (300 if args.quick else 1000)
    args.spread = args.spread or (5.0 if args.quick else 10.0)
    if args.appends < 0:
        args.appends = 20_000 if args.quick else 200_000
    args.seconds = 4 if args.quick else 10
    ceilings = {}
    for kind in ("standalone", "cluster") if args.appends else ():
        with workdir("ceiling") as tmp, redis_of(kind, tmp) as url:
            ceilings[kind] = asyncio.run(append_ceiling(url, args.appends))
        print(kind, ceilings[kind], flush=True)
    rows = []
    for run in range(repeats(args)):
        for kind in ("standalone", "cluster"):
            for processes in counts:
                rows.append(one_row(kind, processes, args, run))
                print(rows[-1], flush=True)
    with_ratios(rows)

    def med(kind: str, processes: int, field: str) -> float:
        return median([r[field] for r in rows if r["redis"] == kind and r["processes"] == processes])

    print()
    print(table(["Redis", "processes", "webhooks/s", "x standalone 1", "errors",
                 "p99 ms (slowest process)", "answered / due", "claim p50 ms", "x", "claim p99 ms",
                 "x", "max ms"],
                [[kind, n, med(kind, n, "ingest_rps"), med(kind, n, "rps_ratio"),
                  med(kind, n, "ingest_errors"), med(kind, n, "ingest_p99_ms"),
                  f"{med(kind, n, 'answered'):.0f} / {args.due}", med(kind, n, "claim_p50_ms"),
                  med(kind, n, "claim_p50_ratio"), med(kind, n, "claim_p99_ms"),
                  med(kind, n, "claim_p99_ratio"), med(kind, n, "claim_max_ms")]
                 for kind in ("standalone", "cluster") for n in counts]))
    print()
    print(table(["Redis", "appends", "Redis CPU us/append (median node)", "busiest node's share",
                 "appends/s one core", "appends/s one core per node"],
                [[kind, c["appends"], c["redis_us_per_append"], c["busiest_node_share"],
                  c["per_core_appends_per_s"], c["one_core_per_node_appends_per_s"]]
                 for kind, c in ceilings.items()]))
    return save("cluster", args, {"rows": rows, "ceiling": ceilings, "open": args.open,
                                  "due": args.due, "spread_s": args.spread,
                                  "ingest_seconds": args.seconds})


if __name__ == "__main__":
    main()
