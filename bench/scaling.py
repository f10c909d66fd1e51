"""Benchmark 5: how ingest and flush cost grow with the number of open conversations.

For each size N (default 1k, 10k, 100k; quick 1k, 10k), in a fresh redis-server:
  ingest  N conversations are opened first (BufferStore.append), then wrk sends webhooks to a
          `serve --no-worker` process spread over those same N conversations. Reported: the rate
          and CPU time per message of the service process and of redis-server (/proc/<pid>/stat
          and INFO cpu). The per-conversation rate limit is off here, so that 1k conversations
          can take the whole load.
  flush   N conversations due over --spread seconds, claimed by the real Worker (as in
          bench/flush.py, without unrelated keys): lateness, and CPU time per claimed burst of
          the worker loop and of redis-server.

    python bench/scaling.py [--quick] [--sizes 1000,10000,100000]
"""

from __future__ import annotations

import asyncio
from typing import Any

import flush
import ingest
from common import cpu_seconds, median, parser, repeats, save, service_env, table, workdir, wrk
from redis.asyncio import Redis

from buffer_service.chatwoot import ChatMessage
from buffer_service.config import Settings
from buffer_service.service import make_redis
from buffer_service.store import BufferStore
from devtools.net import free_port, wait_port
from devtools.processes import spawn_service, stop
from devtools.redis_server import running_redis


async def preopen(url: str, n: int) -> None:
    settings = Settings(redis_url=url, buffer_duration_ms=3_600_000, max_buffer_age_ms=7_200_000)
    redis = make_redis(settings)
    store = BufferStore(redis, settings)
    try:
        for start in range(1, n + 1, 2000):
            await asyncio.gather(*(store.append(ChatMessage(1, i, 2_000_000_000 + i, "oi", inbox_id=1))
                                   for i in range(start, min(n + 1, start + 2000))))
    finally:
        await redis.aclose()


async def redis_cpu(url: str) -> float:
    redis = Redis.from_url(url)
    try:
        info = await redis.info("cpu")
        return info["used_cpu_user"] + info["used_cpu_sys"]
    finally:
        await redis.aclose()


def ingest_at(n: int, seconds: float, tmp: Any) -> dict[str, float]:
    ingest.write_template(tmp / "template.json")
    with running_redis(tmp) as server:
        asyncio.run(preopen(server.url, n))
        port = free_port()
        proc = spawn_service(["serve", "--no-worker"],
                             service_env(server.url, port, RATE_LIMIT_PER_CONVERSATION=0),
                             tmp / f"serve-{n}.log")
        try:
            wait_port(port, proc)
            env = {"WRK_TEMPLATE": str(tmp / "template.json"), "WRK_CONVERSATIONS": str(n),
                   "WRK_DELAY_MS": "0"}
            url = f"http://127.0.0.1:{port}/webhooks/chatwoot"
            wrk(url, seconds=1, connections=64, env=dict(env, WRK_ID_BASE="1000000000"))
            cpu0, rcpu0 = cpu_seconds(proc.pid), asyncio.run(redis_cpu(server.url))
            r = wrk(url, seconds=seconds, connections=64, env=dict(env, WRK_ID_BASE="1200000000"))
            cpu, rcpu = cpu_seconds(proc.pid) - cpu0, asyncio.run(redis_cpu(server.url)) - rcpu0
        finally:
            stop(proc)
    return {"ingest_rps": r.rps, "ingest_errors": r.errors,
            "service_cpu_us_per_msg": cpu / max(1, r.requests) * 1e6,
            "redis_cpu_us_per_msg": rcpu / max(1, r.requests) * 1e6}


def main() -> dict[str, Any]:
    p = parser(__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="", help="default 1000,10000,100000 (quick 1000,10000)")
    p.add_argument("--spread", type=float, default=10.0, help="flush deadlines spread, seconds")
    args = p.parse_args()
    sizes = [int(x) for x in (args.sizes or ("1000,10000" if args.quick else "1000,10000,100000"))
             .split(",")]
    seconds = 4 if args.quick else 8
    runs: list[dict[str, Any]] = []
    for i in range(repeats(args)):
        for n in sizes:
            with workdir("scaling") as tmp:
                r: dict[str, Any] = {"conversations": n, **ingest_at(n, seconds, tmp)}
                with running_redis(tmp) as server:
                    f = asyncio.run(flush.run_once(server.url, tmp, n, 0, args.spread,
                                                   expiry_events=False))
                r.update({k: f[k] for k in ("claimed", "claim_p50_ms", "claim_p99_ms", "claim_max_ms",
                                            "worker_cpu_us_per_batch", "redis_cpu_us_per_batch")})
            runs.append(r)
            print(f"run {i + 1} N={n}: ingest {r['ingest_rps']:.0f} req/s, service "
                  f"{r['service_cpu_us_per_msg']:.0f} us/msg, redis {r['redis_cpu_us_per_msg']:.0f}"
                  f" us/msg | flush p99 {r['claim_p99_ms']} ms, worker "
                  f"{r['worker_cpu_us_per_batch']:.0f} us/burst, redis "
                  f"{r['redis_cpu_us_per_batch']:.0f} us/burst", flush=True)
    rows = []
    summary: dict[int, dict[str, float]] = {}
    for n in sizes:
        mine = [r for r in runs if r["conversations"] == n]
        s = {k: median([r[k] for r in mine]) for k in mine[0]}
        summary[n] = s
        rows.append([f"{n:,}", round(s["ingest_rps"]), round(s["service_cpu_us_per_msg"]),
                     round(s["redis_cpu_us_per_msg"]), f"{s['claimed']:.0f}", s["claim_p50_ms"],
                     s["claim_p99_ms"], round(s["worker_cpu_us_per_batch"]),
                     round(s["redis_cpu_us_per_batch"])])
    print()
    print(table(["open conversations", "ingest req/s", "service CPU us/msg", "redis CPU us/msg",
                 "bursts flushed", "flush p50 ms", "flush p99 ms", "worker CPU us/burst",
                 "redis CPU us/burst"], rows))
    base = summary[sizes[0]]
    last = summary[sizes[-1]]
    print(f"\nfrom {sizes[0]:,} to {sizes[-1]:,} open conversations: service CPU per message x"
          f"{last['service_cpu_us_per_msg'] / base['service_cpu_us_per_msg']:.2f}, redis CPU per "
          f"message x{last['redis_cpu_us_per_msg'] / base['redis_cpu_us_per_msg']:.2f}, redis CPU "
          f"per flushed burst x{last['redis_cpu_us_per_batch'] / base['redis_cpu_us_per_batch']:.2f}")
    return save("scaling", args, {"sizes": sizes, "runs": runs,
                                  "summary": {str(k): v for k, v in summary.items()}})


if __name__ == "__main__":
    main()
