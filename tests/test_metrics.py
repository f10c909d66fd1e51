"""GET /metrics: it parses with prometheus-client's own parser, its counters move exactly as much
as a scripted run did, and it is right with several processes (each its own, or one for all in
multiprocess mode)."""

from __future__ import annotations

import asyncio
from dataclasses import replace

import aiohttp
from helpers import eventually, service_env, wait_for, with_port
from prometheus_client.parser import text_string_to_metric_families

from buffer_service.flags import MAX_AGE_S, Flags
from buffer_service.ops import Operations
from buffer_service.store import BufferStore
from devtools.net import free_port, wait_http
from devtools.payloads import message_payload
from devtools.processes import spawn_service

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


async def scrape(session: aiohttp.ClientSession, url: str) -> Samples:
    async with session.get(url + "/metrics") as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/plain")
        text = await resp.text()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def delta(before: Samples, after: Samples, name: str, **labels: str) -> float:
    key = (name, tuple(sorted(labels.items())))
    return after.get(key, 0.0) - before.get(key, 0.0)


async def settled(svc, before: Samples, completed: int) -> Samples:
    """Scrape once `completed` more batches have finished: a batch's outcome is counted when its
    task ends, a moment after the stand-in recorded the post."""
    async def check() -> Samples | None:
        after = await scrape(svc.session, svc.url)
        done = delta(before, after, "buffer_service_batches_total", outcome="completed")
        return after if done >= completed else None
    return await eventually(check)


async def test_metrics_parse_and_count_what_the_run_did(settings, make_service, llm, chatwoot, redis):
    svc = await make_service(replace(settings, buffer_duration_ms=500, retry_base_ms=50))
    operator = Operations(BufferStore(redis, settings), Flags(redis, settings))
    before = await scrape(svc.session, svc.url)

    for conv, n in ((90, 3), (91, 2)):
        for i in range(n):
            await svc.webhook(message_payload(message_id=conv * 10 + i, conversation_id=conv))
    await svc.webhook(message_payload(message_id=900, conversation_id=90))  # duplicate
    await svc.webhook(message_payload(message_id=1, conversation_id=5, event="conversation_updated"))
    async with svc.session.post(svc.url + "/webhooks/chatwoot", data=b"[") as resp:
        assert resp.status == 400
    await wait_for(lambda: len(chatwoot.posts) == 2, timeout=5)
    llm.fail_next(1, status=500)  # one retry, then answered
    await svc.webhook(message_payload(message_id=920, conversation_id=92))
    await wait_for(lambda: len(chatwoot.posts) == 3, timeout=5)
    await svc.webhook(message_payload(message_id=930, conversation_id=93))
    await operator.flush("1:93")
    await wait_for(lambda: len(chatwoot.posts) == 4, timeout=5)
    after = await settled(svc, before, completed=4)

    def d(name: str, **labels: str) -> float:
        return delta(before, after, name, **labels)

    assert d("buffer_service_webhooks_total", outcome="buffered", reason="") == 7
    assert d("buffer_service_webhooks_total", outcome="duplicate", reason="") == 1
    assert d("buffer_service_webhooks_total", outcome="ignored", reason="event") == 1
    assert d("buffer_service_webhooks_total", outcome="rejected", reason="400") == 1
    assert d("buffer_service_messages_buffered_total") == 7
    assert d("buffer_service_bursts_flushed_total", trigger="deadline") == 3
    assert d("buffer_service_bursts_flushed_total", trigger="manual") == 1
    assert d("buffer_service_burst_messages_count") == 4
    assert d("buffer_service_burst_messages_sum") == 7
    assert d("buffer_service_burst_messages_bucket", le="1.0") == 2  # 92 and 93
    assert d("buffer_service_burst_messages_bucket", le="2.0") == 3
    assert d("buffer_service_flush_lateness_seconds_count") == 4
    assert d("buffer_service_llm_latency_seconds_count") == 4  # answered calls, not the 500
    assert d("buffer_service_llm_tokens_total", kind="completion") == sum(
        len(c.reply.split()) for c in llm.calls if c.reply)
    assert d("buffer_service_llm_tokens_total", kind="prompt") > 0
    assert d("buffer_service_chatwoot_post_latency_seconds_count") == 4
    assert d("buffer_service_batches_total", outcome="completed") == 4
    assert d("buffer_service_batches_total", outcome="retrying") == 1
    assert d("buffer_service_batches_total", outcome="failed") == 0
    # Gauges read from Redis at scrape time.
    assert after[("buffer_service_active_buffers", ())] == 0
    assert after[("buffer_service_inflight_batches", ())] == 0
    assert after[("buffer_service_failed_jobs", ())] == 0
    assert after[("buffer_service_flag_on", (("flag", "processing"),))] == 1

    # An operator's retry of a failed job answers it, but flushes nothing new.
    llm.fail_next(1, status=400)
    await svc.webhook(message_payload(message_id=940, conversation_id=94))
    [failed] = await eventually(lambda: operator.jobs("failed"))
    before = await scrape(svc.session, svc.url)
    await operator.retry(failed["id"])
    await wait_for(lambda: len(chatwoot.posts) == 5, timeout=5)
    after = await settled(svc, before, completed=1)
    assert d("buffer_service_batches_total", outcome="completed") == 1
    assert d("buffer_service_bursts_flushed_total", trigger="deadline") == 0
    assert d("buffer_service_flush_lateness_seconds_count") == 0

    await svc.webhook(message_payload(message_id=990, conversation_id=99))
    await operator.set_processing(False)
    await asyncio.sleep(MAX_AGE_S + 0.1)  # the server's copy of the flags is at most this old
    gauges = await scrape(svc.session, svc.url)
    assert gauges[("buffer_service_active_buffers", ())] == 1
    assert gauges[("buffer_service_flag_on", (("flag", "processing"),))] == 0


async def _two_processes(settings, tmp_path, **extra: str):
    """A server without a worker and a worker with its own METRICS_PORT, answering two bursts."""
    metrics_port = free_port()
    server = spawn_service(["serve", "--no-worker"], service_env(settings, **extra), tmp_path / "server.log")
    worker = spawn_service(["worker"], service_env(with_port(settings), METRICS_PORT=str(metrics_port),
                                           **extra), tmp_path / "worker.log")
    return server, worker, f"http://127.0.0.1:{settings.port}", f"http://127.0.0.1:{metrics_port}"


async def _run_two_bursts(session, server_url: str, chatwoot) -> None:
    await wait_http(server_url + "/healthz")
    for conv in (1, 2):
        async with session.post(server_url + "/webhooks/chatwoot",
                                json=message_payload(message_id=conv, conversation_id=conv)) as resp:
            assert resp.status == 200
    await wait_for(lambda: len(chatwoot.posts) == 2, timeout=15)


async def _stop(*procs) -> None:
    for proc in procs:
        proc.terminate()
    for proc in procs:
        await asyncio.to_thread(proc.wait, 15)


async def test_each_process_exposes_its_own_counters(settings, llm, chatwoot, tmp_path):
    server, worker, server_url, worker_url = await _two_processes(settings, tmp_path)
    try:
        async with aiohttp.ClientSession() as session:
            await _run_two_bursts(session, server_url, chatwoot)
            await asyncio.sleep(0.2)
            on_server = await scrape(session, server_url)
            on_worker = await scrape(session, worker_url)
    finally:
        await _stop(server, worker)
    key = ("buffer_service_webhooks_total", (("outcome", "buffered"), ("reason", "")))
    done = ("buffer_service_batches_total", (("outcome", "completed"),))
    assert on_server[key] == 2 and on_server.get(done, 0) == 0
    assert on_worker.get(key, 0) == 0 and on_worker[done] == 2
    # The Redis gauges are the same everywhere.
    assert on_server[("buffer_service_failed_jobs", ())] == on_worker[("buffer_service_failed_jobs", ())]


async def test_multiprocess_mode_sums_every_process(settings, llm, chatwoot, tmp_path):
    shared = tmp_path / "prom"
    shared.mkdir()
    server, worker, server_url, worker_url = await _two_processes(
        settings, tmp_path, PROMETHEUS_MULTIPROC_DIR=str(shared))
    try:
        async with aiohttp.ClientSession() as session:
            await _run_two_bursts(session, server_url, chatwoot)
            await asyncio.sleep(0.2)
            views = [await scrape(session, url) for url in (server_url, worker_url)]
    finally:
        await _stop(server, worker)
    for view in views:  # either process shows the sum of both
        assert view[("buffer_service_webhooks_total", (("outcome", "buffered"), ("reason", "")))] == 2
        assert view[("buffer_service_batches_total", (("outcome", "completed"),))] == 2
        assert view[("buffer_service_llm_latency_seconds_count", ())] == 2
