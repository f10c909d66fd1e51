"""Chaos: three worker processes on one Redis answer 1,000 conversations while one of them is
killed with SIGKILL at random moments (and replaced, as an orchestrator would). In a second run
Chatwoot is also too slow for a share of the reply posts: it creates the message but answers
after the client's timeout, and sends no webhook echo for it.

The verdict comes from an invariant checker over what the stand-ins recorded, not from the
service's own account: every conversation answered exactly once, each reply covering every
message of its conversation in order, every reply one the LLM wrote, nothing left in flight.
"""

from __future__ import annotations

import asyncio
import collections
import os
import random
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import aiohttp
import pytest
from helpers import service_env, wait_for, with_port
from redis.asyncio import Redis

from buffer_service.config import Settings
from buffer_service.store import BufferStore
from devtools.chatwoot_standin import ChatwootStandIn, Post
from devtools.llm_standin import LLMCall, LLMStandIn, default_reply
from devtools.payloads import message_payload
from devtools.processes import spawn_service

CONVERSATIONS = 1000
WORKERS = 3
KILLS = 3


def in_paragraphs(reply: str, parts: int) -> str:
    """The LLM's reply as `parts` paragraphs, each a message of its own (REPLY_SPLIT)."""
    return "\n\n".join([reply, *(f"({i}/{parts}) {reply}" for i in range(2, parts + 1))])


def check_invariants(sent: dict[int, list[str]], posts: list[Post], calls: list[LLMCall],
                     parts: int = 1, apart: Callable[[int, int], bool] = lambda conv, j: False,
                     ) -> list[str]:
    """Every way the run can have gone wrong, as readable lines; empty when it did not. A reply
    of `parts` paragraphs is `parts` posts, each once, in order. A conversation is normally one
    burst and one reply; one whose messages reached the service more than a window apart (a
    loaded machine answers webhooks slowly) is rightly answered in one reply per burst, but only
    there: `apart(conv, j)` says whether message j + 1 may have been stored a whole window after
    message j, and a reply that ends anywhere else split a burst. Either way each message is
    answered exactly once, in the order it was written."""
    problems = []
    by_conv: dict[int, list[Post]] = collections.defaultdict(list)
    for post in posts:
        by_conv[post.conversation_id].append(post)
    llm_replies = {c.reply for c in calls if c.status == 200}
    for conv, texts in sent.items():
        got = by_conv.pop(conv, [])
        if not got or len(got) % parts:
            problems.append(f"conversation {conv}: {len(got)} posts for replies of {parts}")
            continue
        replies = ["\n\n".join(p.body["content"] for p in got[i:i + parts])
                   for i in range(0, len(got), parts)]
        answered = []
        for reply in replies:
            burst = reply.split("\n\n", 1)[0].removeprefix("Reply to: ").split(" | ")
            answered += burst
            if len(answered) < len(texts) and not apart(conv, len(answered) - 1):
                problems.append(f"conversation {conv}: a burst split after message {len(answered) - 1},"
                                " which the next one followed within the window")
            if reply != in_paragraphs("Reply to: " + " | ".join(burst), parts):
                problems.append(f"conversation {conv}: replied {reply!r}, not {parts} parts of a reply")
            if reply not in llm_replies:
                problems.append(f"conversation {conv}: the reply is not one the LLM wrote")
        if answered != texts:
            problems.append(f"conversation {conv}: replies answered {answered}, written {texts}")
    problems += [f"conversation {conv}: replied but never wrote" for conv in by_conv]
    return problems


@pytest.mark.parametrize(("slow_share", "parts"), [(0.0, 1), (0.1, 1), (0.0, 3), (0.1, 3)],
                         ids=["chatwoot-fine", "chatwoot-slow", "split-chatwoot-fine",
                              "split-chatwoot-slow"])
async def test_three_workers_one_killed_at_random_every_conversation_answered_once(
        settings, llm: LLMStandIn, chatwoot: ChatwootStandIn, redis: Redis, tmp_path: Path,
        slow_share: float, parts: int) -> None:
    seed = int(os.environ.get("CHAOS_SEED", time.time()))
    rng = random.Random(seed)
    print(f"chaos seed {seed} (set CHAOS_SEED to replay the same schedule)")
    settings = replace(settings, buffer_duration_ms=2000, processing_interval_ms=1000,
                       processing_lease_ms=3000)
    # Batches stay in flight long enough for a kill to catch some of them.
    llm.delay = 0.2
    # Split: every reply is several posts (REPLY_SPLIT=paragraphs, the default), so a kill or a
    # slow post also lands between parts.
    llm.reply_fn = lambda messages: in_paragraphs(default_reply(messages), parts)
    # Chatwoot echoes every reply to the webhook, as it does in production, except the slow ones.
    chatwoot.echo_webhook_url = f"http://127.0.0.1:{settings.port}/webhooks/chatwoot"
    chatwoot.slow_share, chatwoot.slow_answer_s, chatwoot.rng = slow_share, 2.0, random.Random(seed)
    # Short pauses between parts: the run is about kills and slow posts, not pacing.
    env = {"CHATWOOT_TIMEOUT_S": "1", "REPLY_PACING_MS_PER_CHAR": "1"}

    server = spawn_service(["serve", "--no-worker"], service_env(settings, **env), tmp_path / "server.log")
    procs: list[subprocess.Popen[bytes]] = [server]

    def start_worker() -> subprocess.Popen[bytes]:
        proc = spawn_service(["worker"], service_env(with_port(settings), **env),
                     tmp_path / f"worker{len(procs)}.log")
        procs.append(proc)
        return proc

    live = [start_worker() for _ in range(WORKERS)]
    # The whole schedule comes from the seed: what each customer writes, when and whom to kill.
    sent = {c: [f"c{c} m{j}" for j in range(rng.randint(1, 3))] for c in range(1, CONVERSATIONS + 1)}
    pauses = [rng.uniform(1.0, 2.5) for _ in range(KILLS)]
    victims = [rng.randrange(WORKERS) for _ in range(KILLS)]
    url = f"http://127.0.0.1:{settings.port}/webhooks/chatwoot"
    kills = 0
    # When each webhook was sent and acknowledged: message j + 1 was stored before message j's
    # deadline, so in the same burst, unless its acknowledgement came a window after j was sent.
    timing: dict[int, list[tuple[float, float]]] = collections.defaultdict(list)
    window_s = settings.buffer_duration_ms / 1000

    def apart(conv: int, j: int) -> bool:
        return timing[conv][j + 1][1] - timing[conv][j][0] > window_s

    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
            for _ in range(600):
                try:
                    async with session.get(f"http://127.0.0.1:{settings.port}/readyz") as resp:
                        if resp.status == 200:
                            break
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.05)

            async def converse(conv: int) -> None:
                for j, text in enumerate(sent[conv]):
                    payload = message_payload(message_id=conv * 10 + j, conversation_id=conv, content=text)
                    sent_at = time.monotonic()
                    async with session.post(url, json=payload) as resp:
                        body = await resp.json()
                        assert resp.status == 200 and body["status"] == "buffered", body
                    timing[conv].append((sent_at, time.monotonic()))

            async def send_all() -> None:
                # Ten waves: the run is a stream of bursts, not one flush.
                for wave in range(10):
                    first = wave * CONVERSATIONS // 10 + 1
                    await asyncio.gather(*(converse(c) for c in range(first, first + CONVERSATIONS // 10)))
                    await asyncio.sleep(0.4)

            async def kill_at_random() -> None:
                nonlocal kills
                for pause, index in zip(pauses, victims, strict=True):
                    await asyncio.sleep(pause)
                    # Only while batches are in flight, so that a kill has something to lose.
                    await wait_for(lambda: sum(c.status == 0 for c in llm.calls) >= 6, timeout=30)
                    victim = live.pop(index)
                    victim.send_signal(signal.SIGKILL)
                    victim.wait()
                    kills += 1
                    live.append(start_worker())

            await asyncio.gather(send_all(), kill_at_random())
        await wait_for(lambda: len(chatwoot.posts) >= CONVERSATIONS * parts, timeout=60)

        async def settled() -> bool:
            keys = [k async for k in redis.scan_iter(match="bs:*:inflight")]
            keys += [k async for k in redis.scan_iter(match="bs:*:due")]
            return all([await redis.zcard(k) == 0 for k in keys])
        for _ in range(200):
            if await settled():
                break
            await asyncio.sleep(0.1)
        await asyncio.sleep(1.0)  # a late duplicate would show up now
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.terminate()
        exits = [proc.wait(20) for proc in procs]

    assert kills == KILLS
    assert exits.count(-signal.SIGKILL) == KILLS and exits.count(0) == len(procs) - KILLS, exits
    problems = check_invariants(sent, chatwoot.posts, llm.calls, parts, apart)
    assert not problems, f"seed {seed}: {len(problems)} violations, e.g. {problems[:5]}"
    assert await settled()
    failed = [(k, i) async for k in redis.scan_iter(match="bs:*:failed")
              for i in await redis.zrange(k, 0, -1)]
    errors = [await redis.hget(k.replace(b":failed", b":batch:" + i), "error") for k, i in failed]
    assert not failed, f"seed {seed}: failed jobs: {errors[:5]}"
    # The kills hit batches in flight, and those were taken over.
    attempts = [int(j.get("attempts", 0)) for j in await BufferStore(redis, Settings()).job_records()]
    assert max(attempts) >= 2, f"seed {seed}: no kill caught a batch in flight"
    slow = sum(1 for r in chatwoot.requests if r.method == "GET")
    print(f"{CONVERSATIONS} conversations in {len(chatwoot.posts) // parts} bursts, "
          f"{sum(map(len, sent.values()))} messages, {kills} kills: "
          f"{sum(a >= 2 for a in attempts)} batches taken over, {len(llm.calls)} LLM calls, "
          f"{len(chatwoot.posts)} replies, {slow} retries that asked Chatwoot first")
    if slow_share:
        assert slow > 0, f"seed {seed}: no post was slow"
