"""Benchmark 1: webhooks per second acknowledged *and stored* by one `serve --no-worker` process.

Targets (--targets), each a real process loaded by wrk (another process) in the same run:
  bare       bench/bare_server.py: aiohttp reading the body and answering 200 (the baseline)
  floor      bench/bare_server.py REDIS_URL: the bare handler plus what storing cannot avoid on
             this stack (orjson parse, one batched two-command script call through the
             service's client); the service's rate cannot exceed it
  service    `buffer-service serve --no-worker` as checked out (appends batched per loop turn)
  unbatched  the same code with ScriptBatcher replaced by one awaited EVALSHA per call: the
             before/after of batching, everything else equal
  no-limits  the service with RATE_LIMIT_PER_CONVERSATION=0 (what the limiter's call costs)
  signed     the service with CHATWOOT_WEBHOOK_SECRET, every request signed as Chatwoot signs
  TARGET@LOOP  TARGET on event loop LOOP (EVENT_LOOP: asyncio or uvloop), its ratios against
             bare@LOOP; TARGET@LOOP+NAME=VALUE also sets the service setting NAME
  before     `--before-ref` (default: the commit before batching) as it was then
Each run gets a fresh redis-server (repo redis.conf, AOF on). Per run: a warm-up, then wrk at
full speed (64 connections) for the maximum rate, then wrk paced to half of that target's own
maximum for the acknowledgement latency. "Stored" is checked by counting the de-duplication
markers the append script writes, one per stored message. CPU seconds per message come from
/proc/<pid>/stat of the service and of redis-server.

--cpu measures what the rate on a shared machine cannot: CPU time of the server process (utime +
stime, /proc/<pid>/stat) per acknowledged webhook while wrk (another process, 64 connections)
keeps it saturated, without the latency runs. Ratios are taken per round (each target against
`floor` and against `before` of the same round), then the median over rounds; the load average
is printed per round. The targets of a round run one after the other, or with --together all at
once (each with its own Redis and wrk), so that other tenants, caches and the clock of a shared
machine weigh on every side of a ratio alike instead of on whichever ran at the worse moment.

    python bench/ingest.py [--quick] [--repeat N] [--targets bare,service,unbatched]
    python bench/ingest.py --cpu --together --targets floor@uvloop,before@uvloop,service@uvloop \
        --before-ref main
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import math
import os
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
from common import (
    BENCH,
    ROOT,
    checkout,
    cpu_seconds,
    median,
    parser,
    profiled,
    repeats,
    save,
    service_env,
    table,
    workdir,
    wrk,
)
from redis.asyncio import Redis

from devtools.net import free_port, wait_port
from devtools.payloads import message_payload
from devtools.processes import spawn_service, stop
from devtools.redis_server import running_redis

# Realistic Brazilian WhatsApp text (the product's users), about 100 characters.
TEXT = "Oi, boa tarde! Fiz o pedido 48213 na semana passada e ainda não chegou. Vocês conseguem ver o status?"
_MID, _CID = 987654321, 123454321
_SECRET = "bench-webhook-secret"
# The code of the "unbatched" target: ScriptBatcher's interface, one round trip per call.
_UNBATCHED = '''
import asyncio


class ScriptBatcher:
    def __init__(self, redis, script, max_batch=256, *, replicas=0):
        self._script = script

    async def __call__(self, keys, args, deadline=None):
        async with asyncio.timeout_at(deadline):
            return await self._script(keys=keys, args=args)
'''


def write_template(path: Path) -> int:
    payload = message_payload(message_id=_MID, conversation_id=_CID, content=TEXT,
                              created_at=datetime(2026, 11, 25, 12, 0, tzinfo=UTC))
    body = orjson.dumps(payload).decode()
    assert body.count(str(_MID)) >= 2 and body.count(str(_CID)) >= 2
    path.write_text(body.replace(str(_MID), "@MID@").replace(str(_CID), "@CID@"))
    return len(body.encode())


def sign(tmp: Path, id_base: int, conversations: int, n: int = 150_000) -> Path:
    """The file of X-Chatwoot-Timestamp and signatures that webhook.lua sends with requests
    1..n of one wrk run (WRK_SIGNATURES), as Chatwoot signs (auth.py)."""
    template = (tmp / "template.json").read_text()
    timestamp = str(int(time.time()))
    key = _SECRET.encode()
    lines = [timestamp]
    for i in range(1, n + 1):
        body = template.replace("@MID@", str(id_base + i)).replace("@CID@", str(i * 7919 % conversations + 1))
        lines.append("sha256=" + hmac.new(key, f"{timestamp}.{body}".encode(), hashlib.sha256).hexdigest())
    path = tmp / f"signatures-{id_base}.txt"
    path.write_text("\n".join(lines) + "\n")
    return path


async def _count_stored(url: str) -> int:
    redis = Redis.from_url(url)
    try:
        n = 0
        async for _ in redis.scan_iter(match="bs:*:seen:*", count=10_000):
            n += 1
        return n
    finally:
        await redis.aclose()


def stored(url: str) -> int:
    return asyncio.run(_count_stored(url))


def unbatched_copy(dest: Path) -> Path:
    shutil.copytree(ROOT / "buffer_service", dest / "buffer_service",
                    ignore=shutil.ignore_patterns("__pycache__"))
    (dest / "buffer_service" / "batcher.py").write_text(_UNBATCHED)
    return dest


_STARTING = threading.Lock()


def run_once(kind: str, code_dir: Path, tmp: Path, args: Any, run_no: int,
             start: threading.Barrier | None = None) -> dict[str, Any]:
    """One target's run; `start`: the measured load waits for the other targets of the round."""
    warm, seconds = (1, 4) if args.quick else (2, 10)
    # free_port() hands out a port nobody listens on yet: targets starting at once (--together)
    # could be handed the same one, and wrk would post to another target's Redis. Held until
    # this target listens (a target that fails to start ends the benchmark, and the others'
    # wait with it).
    if not _STARTING.acquire(timeout=120):
        raise RuntimeError("another target did not start")
    starting = True
    port = free_port()
    base, event_loop, settings = _parts(kind)
    base_kind_signed = base == "signed"
    env = {"WRK_TEMPLATE": str(tmp / "template.json"), "WRK_CONVERSATIONS": str(args.conversations)}
    url = f"http://127.0.0.1:{port}/webhooks/chatwoot"
    with running_redis(tmp) as redis:
        log = tmp / f"{kind}-{run_no}.log"
        loop_env = {"EVENT_LOOP": event_loop or "auto"}
        if base in ("bare", "floor"):
            proc = subprocess.Popen([sys.executable, str(BENCH / "bare_server.py"), str(port)]
                                    + ([redis.url] if base == "floor" else []),
                                    env=dict(os.environ, PYTHONPATH=str(ROOT), **loop_env),
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        else:
            extra = dict(loop_env, **({"RATE_LIMIT_PER_CONVERSATION": "0"} if base == "no-limits" else {}),
                         **({"CHATWOOT_WEBHOOK_SECRET": _SECRET} if base == "signed" else {}), **settings)
            proc = spawn_service(["serve", "--no-worker"], service_env(redis.url, port, **extra), log,
                                 code_dir)
        try:
            wait_port(port, proc)
            _STARTING.release()
            starting = False
            id_base = 1_000_000_000 * (run_no + 1)

            signatures: dict[int, Path] = {}

            def load(base: int, seconds: float, connections: int, delay_ms: int = 0) -> Any:
                if base_kind_signed and base not in signatures:
                    signatures[base] = sign(tmp, base, args.conversations)
                signed = {"WRK_SIGNATURES": str(signatures[base])} if base_kind_signed else {}
                return wrk(url, seconds=seconds, connections=connections,
                           env=dict(env, WRK_ID_BASE=str(base), WRK_DELAY_MS=str(delay_ms), **signed))

            load(id_base, warm, 64)
            before = stored(redis.url) if base != "bare" else 0
            if start is not None:
                # Signing takes seconds (wrk's Lua has no HMAC): done first, so that the
                # measured runs of the targets that share a round start together.
                if base_kind_signed:
                    signatures[id_base + 200_000_000] = sign(tmp, id_base + 200_000_000, args.conversations)
                start.wait()
            cpu0 = cpu_seconds(proc.pid)
            rcpu0 = cpu_seconds(redis.proc.pid) if redis.proc else 0.0
            full = load(id_base + 200_000_000, seconds, 64)
            cpu = cpu_seconds(proc.pid) - cpu0
            rcpu = (cpu_seconds(redis.proc.pid) if redis.proc else 0.0) - rcpu0
            kept = stored(redis.url) - before if base != "bare" else full.requests
            acked = full.requests - full.errors
            result = {"kind": kind, "rps": full.rps, "errors": full.errors, "acked": acked, "stored": kept,
                      "cpu_us_per_msg": cpu / max(1, full.requests) * 1e6,
                      "cpu_us_per_ack": cpu / max(1, acked) * 1e6,
                      "redis_cpu_us_per_msg": rcpu / max(1, full.requests) * 1e6 if base != "bare" else 0.0,
                      "full_p50_ms": full.p50_ms, "full_p99_ms": full.p99_ms}
            if not args.cpu:
                # Paced: each connection waits `delay` ms before each request, so the rate is about
                # connections * 1000 / (delay + latency + wrk's timer slack); a short calibration
                # run measures that, then the measured run aims at half of this target's maximum.
                delay = 10
                target = full.rps / 2
                connections = max(1, round(target * delay / 1000))
                probe = load(id_base + 300_000_000, 2, connections, delay)
                connections = max(1, min(2000, round(connections * target / max(1.0, probe.rps))))
                paced = load(id_base + 400_000_000, seconds, connections, delay)
                result.update(paced_rps=paced.rps, paced_p50_ms=paced.p50_ms, paced_p99_ms=paced.p99_ms,
                              paced_max_ms=paced.max_ms, paced_errors=paced.errors)
            if args.profile and kind == args.profile:
                with profiled(proc.pid, f"ingest-{kind}", seconds - 1):
                    load(id_base + 500_000_000, seconds, 64)
        finally:
            if starting:
                _STARTING.release()
            stop(proc)
    return result


def _parts(kind: str) -> tuple[str, str, dict[str, str]]:
    """TARGET[@LOOP][+NAME=VALUE...]: the target, its event loop, the service settings it adds."""
    head, *settings = kind.split("+")
    base, _, event_loop = head.partition("@")
    return base, event_loop, dict(setting.split("=", 1) for setting in settings)


def _loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def _same_loop(name: str, kind: str) -> str:
    """Target `name` on the event loop of `kind`."""
    event_loop = _parts(kind)[1]
    return f"{name}@{event_loop}" if event_loop else name


def cpu_only(kinds: dict[str, Path], tmp: Path, args: Any, size: int) -> dict[str, Any]:
    """--cpu: CPU per acknowledged webhook of each target; ratios per round, then the median."""
    runs: list[dict[str, Any]] = []
    for i in range(repeats(args)):
        load_before = _loadavg()
        numbers = {kind: len(runs) + n for n, kind in enumerate(kinds)}
        if args.together:
            # Every target of the round at once, each with its own Redis and wrk: they share the
            # machine's state (other tenants, caches, clock) instead of following each other.
            start = threading.Barrier(len(kinds), timeout=300)
            with ThreadPoolExecutor(len(kinds)) as pool:
                done = list(pool.map(run_once, kinds, kinds.values(), [tmp] * len(kinds),
                                     [args] * len(kinds), numbers.values(), [start] * len(kinds)))
        else:
            done = []
            for kind, code_dir in kinds.items():
                done.append(run_once(kind, code_dir, tmp, args, numbers[kind]))
                time.sleep(0.5)
        for r in done:
            runs.append(dict(r, round=i, loadavg=_loadavg()))
            print(f"round {i + 1} {r['kind']:16s} {r['rps']:8.0f} req/s | stored {r['stored']} of "
                  f"{r['acked']} acked | {r['cpu_us_per_ack']:.0f} us CPU/ack", flush=True)
        print(f"round {i + 1}: load average {load_before} -> {_loadavg()}", flush=True)
    by = {(r["kind"], r["round"]): r for r in runs}
    rounds = range(repeats(args))

    def ratio(kind: str, other: str) -> float:
        # against a baseline only: floor and bare are the stack's, before the code before a change
        if other not in kinds or _parts(kind)[0] in ("bare", "floor", "before"):
            return float("nan")
        return median([by[kind, i]["cpu_us_per_ack"] / by[other, i]["cpu_us_per_ack"] for i in rounds])

    summary: dict[str, dict[str, float]] = {}
    for kind in kinds:
        mine = [by[kind, i] for i in rounds]
        summary[kind] = {"cpu_us_per_ack": median([r["cpu_us_per_ack"] for r in mine]),
                         "rps": median([r["rps"] for r in mine]),
                         "x_floor": ratio(kind, _same_loop("floor", kind)),
                         "x_before": ratio(kind, _same_loop("before", kind)),
                         "all_stored": float(all(r["stored"] >= r["acked"] for r in mine))}
    print()
    print(table(["target", "CPU us/ack (median)", "x floor", "x before", "req/s", "all acked stored"],
                [[kind, f"{s['cpu_us_per_ack']:.0f}", f"{s['x_floor']:.2f}", f"{s['x_before']:.2f}",
                  round(s["rps"]), "yes" if s["all_stored"] else "NO"] for kind, s in summary.items()]))
    return save("ingest-cpu", args, {"payload_bytes": size, "conversations": args.conversations,
                                     "runs": runs, "summary": summary})


def _baseline(kind: str) -> str:
    """The bare handler a target's ratios are taken against: the one on the same event loop."""
    return _same_loop("bare", kind)


def main() -> dict[str, Any]:
    p = parser(__doc__.split("\n\n")[0])
    p.add_argument("--conversations", type=int, default=0, help="default 20000 (quick 10000)")
    p.add_argument("--targets", default="bare,service,unbatched",
                   help="comma list of bare, floor, service, unbatched, no-limits, signed, before, "
                        "git:REF (the service as of git REF); each may go on with @asyncio or "
                        "@uvloop, then +NAME=VALUE settings of the service")
    p.add_argument("--profile", metavar="TARGET", default="",
                   help="after its measured runs, record a py-spy flame graph of TARGET under full load")
    p.add_argument("--before-ref", default="9cf19f8",
                   help="git ref for the `before` target (default: the commit before batching)")
    p.add_argument("--cpu", action="store_true",
                   help="only the server's CPU per acknowledged webhook at full load, against floor "
                        "and before of the same round (no latency runs)")
    p.add_argument("--together", action="store_true",
                   help="with --cpu: the targets of a round run at the same time, not one after the other")
    args = p.parse_args()
    # Enough conversations that none passes the default per-conversation rate limit (120/min).
    args.conversations = args.conversations or (10_000 if args.quick else 20_000)
    runs: list[dict[str, Any]] = []
    with workdir("ingest") as tmp:
        size = write_template(tmp / "template.json")
        print(f"payload {size} bytes, {args.conversations} conversations")
        kinds: dict[str, Path] = {}
        for kind in args.targets.split(","):
            base, event_loop, _ = _parts(kind)
            if event_loop not in ("", "auto", "uvloop", "asyncio"):
                raise SystemExit(f"unknown event loop in {kind!r}")
            if base in ("bare", "floor", "service", "no-limits", "signed"):
                kinds[kind] = ROOT
            elif base == "unbatched":
                kinds[kind] = unbatched_copy(tmp / "unbatched")
            elif base == "before" or base.startswith("git:"):
                ref = args.before_ref if base == "before" else base.removeprefix("git:")
                code = checkout(ref, tmp / base.replace(":", "-"))
                if code is None:
                    raise SystemExit(f"git ref {ref!r} is not available")
                kinds[kind] = code
            else:
                raise SystemExit(f"unknown target {kind!r}")
        if args.cpu:
            return cpu_only(kinds, tmp, args, size)
        if any(_baseline(kind) not in kinds for kind in kinds):
            raise SystemExit("each target's bare handler (bare, or bare@LOOP for a target on LOOP) "
                             "is the baseline of its ratio: list it too")
        for i in range(repeats(args)):
            for kind, code_dir in kinds.items():
                r = run_once(kind, code_dir, tmp, args, i * len(kinds) + len(runs))
                runs.append(r)
                print(f"run {i + 1} {kind:8s} {r['rps']:8.0f} req/s  p99 {r['full_p99_ms']:.1f} ms"
                      f" | paced {r['paced_rps']:6.0f} req/s p50 {r['paced_p50_ms']:.2f} ms"
                      f" p99 {r['paced_p99_ms']:.2f} ms | stored {r['stored']} of {r['acked']} acked"
                      f" | {r['cpu_us_per_msg']:.0f} us CPU/msg", flush=True)
                time.sleep(0.5)
    summary: dict[str, dict[str, float]] = {}
    for kind in kinds:
        mine = [r for r in runs if r["kind"] == kind]
        summary[kind] = {k: median([r[k] for r in mine]) for k in mine[0] if k != "kind"}
        # Every acknowledged webhook must have been stored (runs that overlap the end of wrk's
        # window may store a few more than wrk counted).
        summary[kind]["all_stored"] = float(all(r["stored"] >= r["acked"] for r in mine))
    # Ratios per run pair, then the median: both sides of a ratio saw the same machine state.
    for kind in kinds:
        if _parts(kind)[0] != "bare":
            pairs = list(zip([r for r in runs if r["kind"] == kind],
                             [r for r in runs if r["kind"] == _baseline(kind)], strict=True))
            summary[kind]["ratio_to_bare"] = median([s["rps"] / b["rps"] for s, b in pairs])
            summary[kind]["p99_ratio_to_bare"] = median([s["paced_p99_ms"] / b["paced_p99_ms"]
                                                         for s, b in pairs])
    rows = []
    for kind, s in summary.items():
        rows.append([kind, round(s["rps"]), f"{s.get('ratio_to_bare', 1.0):.2f}",
                     round(s["paced_rps"]), f"{s['paced_p50_ms']:.2f}", f"{s['paced_p99_ms']:.2f}",
                     f"{s.get('p99_ratio_to_bare', 1.0):.2f}",
                     f"{s['cpu_us_per_msg']:.0f}", f"{s['redis_cpu_us_per_msg']:.0f}",
                     "yes" if s["all_stored"] else "NO"])
    print()
    print(table(["target", "max req/s", "x bare", "half-rate req/s", "p50 ms", "p99 ms", "p99 x bare",
                 "service CPU us/msg", "redis CPU us/msg", "all acked stored"], rows))
    main_kind = next((k for k in summary if _parts(k)[0] == "service"),
                     next(k for k in summary if _parts(k)[0] != "bare"))
    ok = (summary[main_kind]["ratio_to_bare"] >= 0.5
          and summary[main_kind]["p99_ratio_to_bare"] <= 1.2)
    print(f"\n{main_kind}: target >= 0.5 x bare, and p99 <= 1.2 x bare's at half of each one's rate: "
          f"{'met' if ok else 'NOT met'}")
    if "unbatched" in summary and "service" in summary:
        print(f"batching: {summary['service']['rps'] / summary['unbatched']['rps']:.2f} x the "
              f"unbatched rate, CPU per message {summary['unbatched']['cpu_us_per_msg']:.0f} -> "
              f"{summary['service']['cpu_us_per_msg']:.0f} us")
    if not math.isfinite(summary[main_kind]["rps"]):
        raise SystemExit(1)
    return save("ingest", args, {"payload_bytes": size, "conversations": args.conversations,
                                 "runs": runs, "summary": summary, "target_met": ok})


if __name__ == "__main__":
    main()
