"""Benchmark 7: one Redis server against a Redis Cluster of three primaries, with 1, 2 and 4
service processes.

  ingest  P `serve --no-worker` processes, each loaded by its own wrk (64 / P connections) at
          full speed: webhooks acknowledged per second, all processes together, and the p99 of
          the slowest process.
  flush   N conversations (default 600) due over --spread seconds, claimed by P `worker`
          processes (LLM and Chatwoot stand-ins answer at once): deadline-to-claim lateness from
          the compact job records (claimed - deadline), every burst answered once.

Every redis-server, cluster node and service process runs on this machine, so the cluster does
not add CPU: it shows what the routing, the per-node pipelines and the subscriptions cost, not
what more machines would give.

    python bench/cluster.py [--quick] [--processes 1,2,4]
"""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import ingest
import orjson
from common import parser, percentile, save, service_env, table, workdir, wrk
from flush import open_conversations

from buffer_service.config import Settings
from buffer_service.keys import Keys
from buffer_service.redis_client import connect
from devtools.chatwoot_standin import ChatwootStandIn
from devtools.llm_standin import LLMStandIn
from devtools.net import free_port, wait_port
from devtools.processes import spawn_service, stop
from devtools.redis_server import RedisClusterServers, RedisServer

CONNECTIONS = 64


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
        proc = spawn_service(["serve", "--no-worker"], service_env(url, port, RATE_LIMIT_PER_CONVERSATION=0),
                             tmp / f"serve-{port}.log")
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
    env = {"WRK_TEMPLATE": str(tmp / "template.json"), "WRK_CONVERSATIONS": "10000"}

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
                                                   timer_keys=False)
        env = {"OPENAI_API_KEY": llm.api_key, "OPENAI_BASE_URL": f"{llm.base_url}/v1",
               "OPENAI_MODEL": "stand-in-model", "CHATWOOT_BASE_URL": chatwoot.base_url,
               "CHATWOOT_API_TOKEN": chatwoot.token, "WORKER_CONCURRENCY": "200"}
        procs = [spawn_service(["worker"], service_env(url, free_port(), **env), tmp / f"worker-{i}.log")
                 for i in range(processes)]
        end = time.monotonic() + lead_ms / 1000 + spread_s + 30
        while len(chatwoot.posts) < n and time.monotonic() < end:
            await asyncio.sleep(0.2)
        late = await lateness(redis, settings)
    finally:
        for proc in procs:
            await asyncio.to_thread(stop, proc)
        await redis.aclose()
        await llm.stop()
        await chatwoot.stop()
    posts = {p.conversation_id for p in chatwoot.posts}
    return {"answered": len(posts), "posts": len(chatwoot.posts), "open": len(deadlines),
            "claim_p50_ms": percentile(late, 50), "claim_p99_ms": percentile(late, 99),
            "claim_max_ms": max(late) if late else float("nan")}


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


def main() -> dict[str, Any]:
    p = parser(__doc__.split("\n\n")[0])
    p.add_argument("--processes", default="1,2,4")
    p.add_argument("--conversations", type=int, default=0, help="default 600 (quick 300)")
    p.add_argument("--spread", type=float, default=0, help="seconds; default 10 (quick 5)")
    args = p.parse_args()
    counts = [int(c) for c in args.processes.split(",")]
    n = args.conversations or (300 if args.quick else 600)
    spread = args.spread or (5.0 if args.quick else 10.0)
    seconds = 4 if args.quick else 10
    rows = []
    for kind in ("standalone", "cluster"):
        for run, processes in enumerate(counts):
            with workdir("cluster") as tmp:
                ingest.write_template(tmp / "template.json")
                with redis_of(kind, tmp) as url:
                    row = {"redis": kind, "processes": processes,
                           **{f"ingest_{k}": v for k, v in ingest_with(url, processes, seconds, tmp,
                                                                        run).items()}}
                with redis_of(kind, tmp / "flush") as url:
                    row.update(asyncio.run(flush_with(url, processes, n, spread, tmp)))
            rows.append(row)
            print(row, flush=True)
    print()
    print(table(["Redis", "processes", "webhooks/s", "errors", "p99 ms (slowest process)",
                 "answered / open", "claim p50 ms", "p99 ms", "max ms"],
                [[r["redis"], r["processes"], r["ingest_rps"], r["ingest_errors"], r["ingest_p99_ms"],
                  f"{r['answered']} / {r['open']}", r["claim_p50_ms"], r["claim_p99_ms"],
                  r["claim_max_ms"]] for r in rows]))
    return save("cluster", args, {"rows": rows, "conversations": n, "spread_s": spread,
                                  "ingest_seconds": seconds})


if __name__ == "__main__":
    main()
