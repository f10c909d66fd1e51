"""Benchmark 8: deadline -> reply posted, the LLM and Chatwoot stand-ins answering at once.

N conversations (default 10,000; quick 3,000) get one message each through the service's own
BufferStore.append, with deadlines spread uniformly over --spread seconds (default 10; quick 3),
so that --rate = N / spread bursts fall due per second (1,000 by default). One real
`buffer-service worker` process (settings as an operator leaves them: typing indicator on,
WORKER_CONCURRENCY 32 unless --concurrency) claims them, asks the LLM stand-in and posts to
the Chatwoot stand-in.
Each stand-in runs in a process of its own, so that neither competes with this script's event
loop, and notes when each request arrived. Per burst, with every clock this machine's:

  claim   deadline -> claimed (compact job record: claimed - deadline, both Redis TIME)
  llm     claimed -> the chat-completions request reaches the LLM stand-in (the claim's
          reply, the history read, the prompt, the openai client's request)
  answer  LLM request -> posting starts (record's posting time: the stand-in's answer, the
          openai client's parsing, the before-post script)
  post    posting starts -> the reply's POST reaches the Chatwoot stand-in
  total   deadline -> reply posted

Targets are listed with --targets: `worker` (this checkout's code) or a git ref (that commit's
`buffer_service`, for a before/after in the same run), each optionally `@asyncio` / `@uvloop`
for the event loop (EVENT_LOOP), each with a fresh Redis; every one is run --repeat times,
medians reported; `+NAME=value` after a target sets a setting of its worker
(`worker@uvloop+TYPING_INDICATOR=off`). Besides the worker's CPU per burst, Redis's and the two
stand-ins' (their processes' CPU over the measured bursts, divided by the bursts answered): what a burst costs
the machine, and so what a rate needs.

    python bench/reply_latency.py [--quick] [--repeat N] [--rate R] [--concurrency C]
                                  [--targets worker@asyncio,worker,580c5c1@uvloop] [--profile worker]
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import re
import time
from dataclasses import replace
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from cluster import completed, lateness
from common import (
    ROOT,
    checkout,
    cpu_seconds,
    median,
    parser,
    percentile,
    profiled,
    repeats,
    save,
    service_env,
    table,
    workdir,
)
from flush import open_conversations

from buffer_service.chatwoot import ChatMessage
from buffer_service.config import Settings
from buffer_service.redis_client import connect
from buffer_service.store import BufferStore
from devtools.chatwoot_standin import ChatwootStandIn
from devtools.llm_standin import LLMStandIn, text_of
from devtools.net import free_port
from devtools.processes import spawn_service, stop
from devtools.redis_server import running_redis

# flush.open_conversations' messages name their conversation: "message 0 of conversation 17: ..."
_CONVERSATION = re.compile(r"of conversation (\d+):")
_WARM_UP = 50
_WARM_UP_CONV = "1:9000"  # conversations 900000.. (`_warm_up`)


def _standin(kind: str, conn: Connection) -> None:
    """A stand-in in this (child) process: sends its settings, serves until told to stop, then
    sends (arrival unix time, conversation) of every request the benchmark times."""

    async def serve() -> None:
        server = LLMStandIn() if kind == "llm" else ChatwootStandIn()
        await server.start()
        if isinstance(server, LLMStandIn):
            conn.send({"OPENAI_API_KEY": server.api_key, "OPENAI_BASE_URL": f"{server.base_url}/v1",
                       "OPENAI_MODEL": "stand-in-model"})
        else:
            conn.send({"CHATWOOT_BASE_URL": server.base_url, "CHATWOOT_API_TOKEN": server.token})
        await asyncio.to_thread(conn.recv)
        await server.stop()
        if isinstance(server, LLMStandIn):
            seen = []
            for call in server.calls:
                m = _CONVERSATION.search(" ".join(text_of(x.get("content")) for x in call.messages))
                if m:
                    seen.append((call.at, f"1:{100_000 + int(m.group(1))}"))
            conn.send(seen)
        else:
            conn.send([(p.at, f"{p.account_id}:{p.conversation_id}") for p in server.posts])

    asyncio.run(serve())


class StandIn:
    def __init__(self, kind: str) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_standin, args=(kind, child), daemon=True)
        self.proc.start()
        self.env: dict[str, str] = self.conn.recv()

    def records(self) -> list[tuple[float, str]]:
        self.conn.send("stop")
        got: list[tuple[float, str]] = self.conn.recv()
        self.proc.join(10)
        return got


async def run_once(kind: str, tmp: Path, n: int, spread_s: float, run_no: int, concurrency: int,
                   profile: bool) -> dict[str, Any]:
    target, *assignments = kind.split("+")
    overrides = dict(a.split("=", 1) for a in assignments)
    code, _, event_loop = target.partition("@")
    code_dir = ROOT
    if code != "worker":
        got = checkout(code, tmp / f"code-{code}")
        if got is None:
            raise SystemExit(f"git ref {code!r} is not available")
        code_dir = got
    llm, chatwoot = StandIn("llm"), StandIn("chatwoot")
    proc = None
    with running_redis(tmp / f"redis-{run_no}") as server:
        settings = Settings(redis_url=server.url)
        redis = await connect(settings)
        try:
            env = service_env(server.url, free_port(), EVENT_LOOP=event_loop or "auto",
                              **llm.env, **chatwoot.env,
                              **({"WORKER_CONCURRENCY": str(concurrency)} if concurrency else {}),
                              **overrides)
            # Started first and idle meanwhile: nothing falls due before the lead has passed.
            log = tmp / f"{kind}-{run_no}.log"
            spawned = time.monotonic()
            proc = spawn_service(["worker"], env, log, code_dir)
            ready = time.monotonic() + 60
            while b'"worker_started"' not in log.read_bytes():
                if time.monotonic() > ready or proc.poll() is not None:
                    raise SystemExit(f"the worker did not start; see {log}")
                await asyncio.sleep(0.1)
            started_s = time.monotonic() - spawned
            # A worker that did not build the openai client at start (before LLMClient.warm)
            # builds it on its first LLM call (seconds on a busy machine): the measured bursts
            # find a warm worker either way, and these first ones show what a fresh one costs.
            await _warm_up(settings, redis)
            lead_ms = 3000 + 2 * n  # loading takes 0.5-1.5 ms a conversation on this machine
            t0 = time.monotonic()
            deadlines, _, _ = await open_conversations(settings, redis, n, lead_ms,
                                                       int(spread_s * 1000), timer_keys=False)
            if time.monotonic() - t0 > lead_ms / 1000 - 1:
                raise SystemExit("loading took longer than the lead; run with a lower --rate or --spread")
            others = {"redis": server.proc.pid if server.proc else 0, "llm": llm.proc.pid or 0,
                      "chatwoot": chatwoot.proc.pid or 0}
            await redis.config_resetstat()
            cpu0 = cpu_seconds(proc.pid)
            others0 = {name: cpu_seconds(pid) for name, pid in others.items()}
            await asyncio.sleep(max(0.0, t0 + lead_ms / 1000 - time.monotonic()))
            # Sampled while the bursts fall due (the lead before them is idle).
            with (profiled(proc.pid, f"reply_latency-{kind}", spread_s + 1) if profile
                  else contextlib.nullcontext()):
                end = t0 + lead_ms / 1000 + spread_s + 30
                while time.monotonic() < end:
                    await asyncio.sleep(0.25)
                    if (time.monotonic() - t0 > lead_ms / 1000 + spread_s
                            and len(await lateness(redis, settings)) >= n + _WARM_UP):
                        break
            cpu = cpu_seconds(proc.pid) - cpu0
            others_cpu = {name: cpu_seconds(pid) - others0[name] for name, pid in others.items()}
            scripts = (await redis.info("commandstats")).get("cmdstat_evalsha", {}).get("calls", 0)
            claimed = await _claims(redis, settings)
            first_due = {r[0]: r[5] + r[6] for r in await completed(redis, settings)
                         if r[0].startswith(_WARM_UP_CONV)}
        finally:
            if proc is not None:
                await asyncio.to_thread(stop, proc)
            await redis.aclose()
            llm_at = _first_of_each(llm.records())
            posted = _first_of_each(chatwoot.records())
    stages: dict[str, list[float]] = {"claim": [], "llm": [], "answer": [], "post": [], "total": []}
    for conv, deadline in deadlines.items():
        if conv not in posted or conv not in claimed or conv not in llm_at:
            continue
        claim_ms, posting_ms = claimed[conv]
        stages["claim"].append(claim_ms - deadline)
        stages["llm"].append(llm_at[conv] - claim_ms)
        stages["answer"].append(posting_ms - llm_at[conv])
        stages["post"].append(posted[conv] - posting_ms)
        stages["total"].append(posted[conv] - deadline)
    row: dict[str, Any] = {"kind": kind, "open": n, "answered": len(stages["total"]),
                           "worker_cpu_us_per_burst": cpu / max(1, len(posted)) * 1e6,
                           **{f"{name}_cpu_us_per_burst": used / max(1, len(posted)) * 1e6
                              for name, used in others_cpu.items()}}
    for stage, values in stages.items():
        row[f"{stage}_p50_ms"] = percentile(values, 50)
        row[f"{stage}_p99_ms"] = percentile(values, 99)
    row["total_max_ms"] = max(stages["total"], default=float("nan"))
    first = [posted[conv] - due for conv, due in first_due.items() if conv in posted]
    row["scripts_per_burst"] = scripts / max(1, len(posted))
    row["start_s"] = started_s
    row["first_p50_ms"] = percentile(first, 50)
    row["first_max_ms"] = max(first, default=float("nan"))
    return row


async def _warm_up(settings: Settings, redis: Any) -> None:
    store = BufferStore(redis, replace(settings, buffer_duration_ms=1))
    await asyncio.gather(*(store.append(ChatMessage(1, 900_000 + i, 90_000_000 + i, "warm-up"))
                           for i in range(_WARM_UP)))
    until = time.monotonic() + 60
    while len(await lateness(redis, settings)) < _WARM_UP:
        if time.monotonic() > until:
            raise SystemExit("the worker answered none of the warm-up bursts in 60 s")
        await asyncio.sleep(0.1)


def _first_of_each(records: list[tuple[float, str]]) -> dict[str, float]:
    """Unix ms of each conversation's first request."""
    first: dict[str, float] = {}
    for at, conv in sorted(records):
        first.setdefault(conv, at * 1000)
    return first


async def _claims(redis: Any, settings: Settings) -> dict[str, tuple[int, int]]:
    """(claimed, posting started) unix ms of each completed burst, from its compact record."""
    return {r[0]: (r[5] + r[7], r[5] + r[8]) for r in await completed(redis, settings)}


def main() -> dict[str, Any]:
    p = parser(__doc__.split("\n\n")[0])
    p.add_argument("--rate", type=float, default=1000, help="bursts falling due per second")
    p.add_argument("--spread", type=float, default=0, help="seconds; default 10 (quick 3)")
    p.add_argument("--targets", default="worker@asyncio,worker",
                   help="comma list of worker or a git ref, each optionally @asyncio or @uvloop")
    p.add_argument("--concurrency", type=int, default=0,
                   help="WORKER_CONCURRENCY of the worker (default: the service's default)")
    p.add_argument("--profile", metavar="TARGET", default="",
                   help="record a py-spy flame graph of TARGET's worker in its first run")
    args = p.parse_args()
    spread = args.spread or (3.0 if args.quick else 10.0)
    n = round(args.rate * spread)
    rows: list[dict[str, Any]] = []
    with workdir("reply") as tmp:
        for i in range(repeats(args)):
            for kind in args.targets.split(","):
                row = asyncio.run(run_once(kind, tmp, n, spread, len(rows), args.concurrency,
                                           kind == args.profile and i == 0))
                rows.append(row)
                print(f"run {i + 1} {kind}: {row['answered']}/{n} answered, total p50 "
                      f"{row['total_p50_ms']:.0f} p99 {row['total_p99_ms']:.0f} max "
                      f"{row['total_max_ms']:.0f} ms (p99s: claim {row['claim_p99_ms']:.0f}, llm "
                      f"{row['llm_p99_ms']:.0f}, answer {row['answer_p99_ms']:.0f}, post "
                      f"{row['post_p99_ms']:.0f}); "
                      f"CPU us/burst: worker {row['worker_cpu_us_per_burst']:.0f}, redis "
                      f"{row['redis_cpu_us_per_burst']:.0f}, llm {row['llm_cpu_us_per_burst']:.0f}, "
                      f"chatwoot {row['chatwoot_cpu_us_per_burst']:.0f}; "
                      f"{row['scripts_per_burst']:.1f} script calls/burst; started in "
                      f"{row['start_s']:.2f} s, its first {_WARM_UP} bursts (due at once) p50 "
                      f"{row['first_p50_ms']:.0f} max {row['first_max_ms']:.0f} ms", flush=True)
    summary = {}
    out = []
    for kind in args.targets.split(","):
        mine = [r for r in rows if r["kind"] == kind]
        s = {k: median([r[k] for r in mine]) for k in mine[0] if k != "kind"}
        summary[kind] = s
        out.append([kind, f"{round(s['answered'])} / {n}",
                    *(f"{s[f'{stage}_p50_ms']:.0f} / {s[f'{stage}_p99_ms']:.0f}"
                      for stage in ("claim", "llm", "answer", "post", "total")),
                    round(s["total_max_ms"]), f"{s['first_p50_ms']:.0f} / {s['first_max_ms']:.0f}",
                    *(round(s[f"{name}_cpu_us_per_burst"])
                      for name in ("worker", "redis", "llm", "chatwoot"))])
    print()
    print(table(["target", "answered", "deadline -> claimed", "-> LLM request", "-> posting",
                 "-> posted", "total (p50 / p99 ms)", "total max ms",
                 f"a fresh worker's first {_WARM_UP} (p50 / max ms)", "CPU us/burst: worker", "redis",
                 "LLM stand-in", "Chatwoot stand-in"], out))
    main_kind = "worker" if "worker" in summary else next(iter(summary))
    ok = summary[main_kind]["answered"] >= n and summary[main_kind]["total_p99_ms"] <= 100
    print(f"\n{main_kind}: target p99 deadline -> posted <= 100 ms at {args.rate:.0f} bursts/s: "
          f"{'met' if ok else 'NOT met'}")
    return save("reply_latency", args, {"rate": args.rate, "spread_s": spread, "conversations": n,
                                        "concurrency": args.concurrency, "runs": rows,
                                        "summary": summary, "target_met": ok})


if __name__ == "__main__":
    main()
