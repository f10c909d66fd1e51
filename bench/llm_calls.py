"""Benchmark 4: LLM calls saved. A seeded synthetic trace (bench/chat_trace.py) replayed through the
whole pipeline: `buffer-service serve --no-worker` and `buffer-service worker` as processes,
the LLM and Chatwoot stand-ins (devtools.chatwoot_standin) as the outside world, a redis-server
of our own. Time runs --scale times faster than the trace, and so does the service's window
(MESSAGE_BUFFER_DURATION_MS = 30 s / scale) and age cap (300 s / scale). The default scale (20)
keeps the compressed load (about 30 bursts/s for 2000 conversations) within what one worker
process handles on this 2-core machine; at 50 the worker falls behind, bursts are claimed
seconds late and then merge with the customer's next burst (fewer calls, later replies).

Reported: LLM calls per incoming message (one call per message would be 1.0), whether every
message was answered exactly once, and whether any burst was split before its window.

    python bench/llm_calls.py [--quick] [--conversations N] [--scale K] [--seed S]
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp
import chat_trace as trace_mod
from common import cpu_seconds, median, parser, percentile, repeats, save, service_env, table, workdir
from redis.asyncio import Redis

from buffer_service.config import Settings
from buffer_service.store import BufferStore
from devtools.chatwoot_standin import ChatwootStandIn
from devtools.llm_standin import LLMStandIn
from devtools.net import free_port, wait_port
from devtools.payloads import message_payload
from devtools.processes import spawn_service, stop
from devtools.redis_server import running_redis

WINDOW_S, MAX_AGE_S = 30.0, 300.0


async def replay(url: str, trace: list[trace_mod.Message], scale: float) -> tuple[dict[int, float], int]:
    """Send every message at its scaled time; returns (message id -> send time, failures)."""
    sent_at: dict[int, float] = {}
    failures = 0
    t0 = time.monotonic() + 0.5
    by_conv: dict[int, list[trace_mod.Message]] = {}
    for m in trace:
        by_conv.setdefault(m.conversation_id, []).append(m)
    connector = aiohttp.TCPConnector(limit=200)
    async with aiohttp.ClientSession(connector=connector,
                                     timeout=aiohttp.ClientTimeout(total=10)) as session:
        async def conversation(messages: list[trace_mod.Message]) -> None:
            nonlocal failures
            for m in messages:
                delay = t0 + m.at_s / scale - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                body = message_payload(message_id=m.message_id, conversation_id=m.conversation_id,
                                       content=m.text)
                sent_at[m.message_id] = time.monotonic() - t0
                async with session.post(url, json=body) as resp:
                    if resp.status != 200 or (await resp.json())["status"] != "buffered":
                        failures += 1

        await asyncio.gather(*(conversation(ms) for ms in by_conv.values()))
    return sent_at, failures


async def batch_states(url: str) -> tuple[dict[str, int], list[int]]:
    """How the job records ended (completed, superseded, ...) and how late each burst was
    claimed (ms after its deadline), from Redis."""
    redis = Redis.from_url(url)
    try:
        records = await BufferStore(redis, Settings(redis_url=url)).job_records()
    finally:
        await redis.aclose()
    late = [int(j["claimed_ms"]) - int(j["deadline_ms"]) for j in records
            if j.get("claimed_ms") and j.get("deadline_ms")]
    return dict(Counter(j.get("state", "?") for j in records)), late


async def run_once(tmp: Path, conversations: int, scale: float, seed: int) -> dict[str, Any]:
    trace = trace_mod.generate(conversations, seed=seed)
    expected_bursts = len(trace_mod.bursts(trace))
    llm, chatwoot = LLMStandIn(), ChatwootStandIn()
    await llm.start()
    await chatwoot.start()
    procs = []
    try:
        with running_redis(tmp) as redis:
            port = free_port()
            env = service_env(
                redis.url, port, OPENAI_API_KEY=llm.api_key, OPENAI_BASE_URL=f"{llm.base_url}/v1",
                OPENAI_MODEL="stand-in-model", CHATWOOT_BASE_URL=chatwoot.base_url,
                CHATWOOT_API_TOKEN=chatwoot.token,
                MESSAGE_BUFFER_DURATION_MS=round(WINDOW_S * 1000 / scale),
                MAX_BUFFER_AGE_MS=round(MAX_AGE_S * 1000 / scale),
                BUFFER_PROCESSING_INTERVAL_MS=1000, LOG_LEVEL="warning")
            serve = spawn_service(["serve", "--no-worker"], env, tmp / "serve.log")
            worker = spawn_service(["worker"], env, tmp / "worker.log")
            procs = [serve, worker]
            wait_port(port, serve)
            cpu0 = {p.pid: cpu_seconds(p.pid) for p in procs}
            started = time.monotonic()
            sent_at, failures = await replay(f"http://127.0.0.1:{port}/webhooks/chatwoot", trace, scale)
            # The last bursts flush one window after their last message.
            deadline = time.monotonic() + 2 * MAX_AGE_S / scale + 10
            answered = 0
            while time.monotonic() < deadline:
                answered = sum(len(p.body["content"].split(" | ")) for p in chatwoot.posts)
                if answered >= len(trace):
                    break
                await asyncio.sleep(0.2)
            await asyncio.sleep(3 * WINDOW_S / scale)  # nothing more may come
            elapsed = time.monotonic() - started
            cpu = {p.pid: cpu_seconds(p.pid) - cpu0[p.pid] for p in procs}
            states, late = await batch_states(redis.url)
    finally:
        for p in procs:
            stop(p)
        await llm.stop()
        await chatwoot.stop()
    verdict = trace_mod.check(trace, [p.body["content"] for p in chatwoot.posts], len(llm.calls),
                              sent_at, WINDOW_S / scale, states.get("superseded", 0))
    return {**verdict.__dict__, "calls_per_message": verdict.calls_per_message,
            "expected_bursts": expected_bursts, "webhook_failures": failures,
            "batch_states": states, "claim_p50_ms": percentile(late, 50),
            "claim_p99_ms": percentile(late, 99), "claim_max_ms": max(late, default=0),
            "seconds": round(elapsed, 1),
            "serve_cpu_us_per_msg": cpu[procs[0].pid] / len(trace) * 1e6,
            "worker_cpu_us_per_msg": cpu[procs[1].pid] / len(trace) * 1e6,
            "worker_cpu_us_per_call": cpu[procs[1].pid] / max(1, len(llm.calls)) * 1e6}


def main() -> dict[str, Any]:
    p = parser(__doc__.split("\n\n")[0])
    p.add_argument("--conversations", type=int, default=0, help="default 2000 (quick 300)")
    p.add_argument("--scale", type=float, default=0,
                   help="time compression (default 20, quick 50). Compressing time multiplies the"
                        " load: the worker must keep up, or bursts wait past their deadline and"
                        " merge with the next one")
    p.add_argument("--seed", type=int, default=20261125)
    args = p.parse_args()
    n = args.conversations or (300 if args.quick else 2000)
    args.scale = args.scale or (50.0 if args.quick else 20.0)
    runs = []
    for i in range(repeats(args)):
        with workdir("llm") as tmp:
            r = asyncio.run(run_once(tmp, n, args.scale, args.seed))
        runs.append(r)
        print(f"run {i + 1}: {r['messages']} messages in {r['bursts']} bursts -> {r['llm_calls']} LLM"
              f" calls ({r['calls_per_message']:.3f}/message); answered once {r['answered_once']},"
              f" unanswered {r['unanswered']}, twice {r['answered_twice']}, split bursts"
              f" {r['split_bursts']} ({r['split_explained']} explained), merged {r['merged']}"
              f" (superseded replies {r['superseded']}); job states {r['batch_states']}; claimed"
              f" p50 {r['claim_p50_ms']} p99 {r['claim_p99_ms']} max {r['claim_max_ms']} ms after"
              " the deadline",
              flush=True)
    s = {k: median([r[k] for r in runs]) for k in runs[0] if k != "batch_states"}
    print()
    print(table(["", "value"], [
        ["messages / bursts in the trace", f"{s['messages']:.0f} / {s['bursts']:.0f}"],
        ["LLM calls (one per message would be)", f"{s['llm_calls']:.0f} ({s['messages']:.0f})"],
        ["LLM calls per message (x baseline 1.0)", f"{s['calls_per_message']:.3f}"],
        ["messages answered exactly once", f"{s['answered_once']:.0f} of {s['messages']:.0f}"],
        ["bursts split / split unexplained", f"{s['split_bursts']:.0f} / "
                                                     f"{s['split_bursts'] - s['split_explained']:.0f}"],
        ["replies mixing bursts / replies superseded (allowed up to)",
         f"{s['merged']:.0f} / {s['superseded']:.0f}"],
        ["burst claimed after its deadline, p50 / p99 / max ms (a busy worker claims late)",
         f"{s['claim_p50_ms']:.0f} / {s['claim_p99_ms']:.0f} / {s['claim_max_ms']:.0f}"],
        ["serve CPU per message (us)", f"{s['serve_cpu_us_per_msg']:.0f}"],
        ["worker CPU per message / per LLM call (us)",
         f"{s['worker_cpu_us_per_msg']:.0f} / {s['worker_cpu_us_per_call']:.0f}"],
    ]))
    ok = all(r["answered_once"] == r["messages"] and r["split_bursts"] == r["split_explained"]
             and r["merged"] <= r["superseded"] for r in runs)
    print(f"\nevery message answered exactly once, no early split: {'yes' if ok else 'NO'}")
    return save("llm_calls", args, {"conversations": n, "scale": args.scale, "seed": args.seed,
                                    "runs": runs, "summary": s, "target_met": ok})


if __name__ == "__main__":
    main()
