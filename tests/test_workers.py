"""Several processes on one Redis: a server without a worker and two worker processes.

Both workers wake at the same deadlines and race for the same conversations; the claim script
must hand each burst to exactly one of them.
"""

from __future__ import annotations

import asyncio
import collections

import aiohttp
import orjson
from helpers import service_env, wait_for, with_port

from devtools.net import wait_http
from devtools.payloads import message_payload
from devtools.processes import spawn_service


async def test_two_worker_processes_never_answer_a_burst_twice(settings, llm, chatwoot, tmp_path):
    llm.delay = 0.05  # keep batches in flight long enough for the workers to overlap
    env = service_env(settings, LOG_FORMAT="json")
    server = spawn_service(["serve", "--no-worker"], env, tmp_path / "server.log")
    worker_logs = [tmp_path / f"worker{i}.log" for i in range(2)]
    workers = [spawn_service(["worker"], service_env(with_port(settings), LOG_FORMAT="json"), path)
               for path in worker_logs]
    url = f"http://127.0.0.1:{settings.port}"
    try:
        async with aiohttp.ClientSession() as session:
            await wait_http(url + "/readyz")
            await asyncio.sleep(0.5)  # workers subscribed

            async def converse(conv: int) -> None:
                for j in range(3):
                    payload = message_payload(message_id=conv * 10 + j, conversation_id=conv,
                                              content=f"c{conv} m{j}")
                    async with session.post(url + "/webhooks/chatwoot", json=payload) as resp:
                        assert resp.status == 200
                        assert (await resp.json())["status"] == "buffered"

            await asyncio.gather(*(converse(c) for c in range(1, 101)))
        await wait_for(lambda: len(chatwoot.posts) >= 100, timeout=30)
        await asyncio.sleep(1.5)  # a double answer would show up now
    finally:
        for proc in [server, *workers]:
            proc.terminate()
        for proc in [server, *workers]:
            assert proc.wait(20) == 0

    posts = collections.Counter(p.conversation_id for p in chatwoot.posts)
    assert posts == {c: 1 for c in range(1, 101)}
    assert len(llm.calls) == 100
    for post in chatwoot.posts:
        c = post.conversation_id
        assert post.body["content"] == f"Reply to: c{c} m0 | c{c} m1 | c{c} m2"
    answered_by = []
    for path in worker_logs:
        lines = [orjson.loads(line) for line in path.read_bytes().splitlines() if line.startswith(b"{")]
        answered_by.append(sum(1 for e in lines if e.get("event") == "reply_posted"))
    assert sum(answered_by) == 100
    assert all(n > 0 for n in answered_by), answered_by  # both really competed
