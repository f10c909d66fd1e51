"""Prometheus metrics, served at `GET /metrics`.

Two kinds of series, right for any number of processes:

- Counters and histograms of what *this process* did (webhooks, flushes, LLM and Chatwoot
  calls, outcomes). Each process exposes its own: a server on `PORT`, a worker-only process
  (`buffer-service worker`) on `METRICS_PORT`; Prometheus scrapes each of them and `sum()`
  across instances gives the totals. Alternatively set `PROMETHEUS_MULTIPROC_DIR` (a directory
  shared by the processes of one host, emptied at deploy) and any one of them serves the sum
  of all (prometheus-client's multiprocess mode).
- Gauges read from Redis at scrape time (active buffers, in-flight batches, failed jobs,
  flags): shared truth, the same from every instance, so aggregate them with `max()`.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable, Iterable
from typing import TYPE_CHECKING

import orjson
from aiohttp import web
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
    multiprocess,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from .redis_client import REDIS_ERRORS

if TYPE_CHECKING:
    from .ops import Operations
    from .store import Batch

WEBHOOKS = Counter(
    "buffer_service_webhooks", "Webhook deliveries by outcome (buffered, duplicate, ignored, "
    "rejected, unavailable); reason: the kind of ignore, or the HTTP status of a rejection",
    ["outcome", "reason"])
MESSAGES_BUFFERED = Counter(
    "buffer_service_messages_buffered", "Messages stored in a conversation's buffer")
FLUSHES = Counter(
    "buffer_service_bursts_flushed",
    "Bursts taken by a worker for their first attempt, by what made them due: deadline, size, "
    "age, manual (flush command), immediate (unbuffered path)", ["trigger"])
BURST_MESSAGES = Histogram(
    "buffer_service_burst_messages", "Messages per flushed burst",
    buckets=(1, 2, 3, 4, 5, 7, 10, 15, 20, 30, 50, 100))
FLUSH_LATENESS = Histogram(
    "buffer_service_flush_lateness_seconds", "Deadline to claim of a burst's first attempt",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
LLM_LATENCY = Histogram(
    "buffer_service_llm_latency_seconds", "Duration of answered LLM calls",
    buckets=(0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30, 60, 120))
LLM_TOKENS = Counter("buffer_service_llm_tokens", "LLM tokens used, by kind (prompt, completion)",
                     ["kind"])
CHATWOOT_LATENCY = Histogram(
    "buffer_service_chatwoot_post_latency_seconds", "Duration of accepted Chatwoot reply posts",
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 15))
BATCHES = Counter(
    "buffer_service_batches",
    "Processed batch attempts by outcome: completed, skipped, retrying (a retry is scheduled), "
    "failed (kept for an operator), lost (another worker took the lease over)", ["outcome"])

TYPING_CALLS = Counter(
    "buffer_service_typing_calls",
    "Typing indicator calls by target (chatwoot, evolution), state (on, off) and outcome (ok, "
    "error): a failing indicator never holds a reply back, so this is where it shows",
    ["target", "state", "outcome"])


# WEBHOOKS' series by labels: labels() takes a lock and validates its arguments on every call.
_WEBHOOK_SERIES: dict[tuple[str, str], Counter] = {}


def webhook(outcome: str, reason: str = "", status: int = 200) -> None:
    if outcome == "ignored":
        # Reasons carry values ("event:typing_on"); the label keeps the bounded kind only.
        label = reason.split(":", 1)[0]
    elif outcome == "rejected":
        label = str(status)
    else:
        label = ""
    series = _WEBHOOK_SERIES.get((outcome, label))
    if series is None:
        series = _WEBHOOK_SERIES[outcome, label] = WEBHOOKS.labels(outcome, label)
    series.inc()
    if outcome == "buffered":
        MESSAGES_BUFFERED.inc()


def claimed(batch: Batch) -> None:
    if not batch.fresh:
        return  # counted when the burst was first flushed
    FLUSHES.labels(batch.due_by).inc()
    BURST_MESSAGES.observe(len(batch.messages))
    FLUSH_LATENESS.observe(max(0, batch.claimed_ms - batch.deadline_ms) / 1000)


def llm_answered(seconds: float, prompt_tokens: int, completion_tokens: int) -> None:
    LLM_LATENCY.observe(seconds)
    LLM_TOKENS.labels("prompt").inc(prompt_tokens)
    LLM_TOKENS.labels("completion").inc(completion_tokens)


def chatwoot_posted(seconds: float) -> None:
    CHATWOOT_LATENCY.observe(seconds)


def batch_outcome(task: asyncio.Task[str]) -> None:
    """Done-callback of a batch task: count the outcome the processor returned."""
    if task.cancelled() or task.exception() is not None:
        return
    BATCHES.labels(task.result()).inc()


class _Snapshot(Collector):
    """Gauges read from Redis just before this scrape."""

    def __init__(self, families: list[Metric]) -> None:
        self._families = families

    def collect(self) -> Iterable[Metric]:
        return self._families


async def _redis_gauges(ops: Operations) -> list[Metric]:
    counts = await ops.counts()
    flags = await ops.flags.current()
    families: list[Metric] = []
    for name, key, text in (
        ("buffer_service_active_buffers", "buffering", "Conversations with a pending burst"),
        ("buffer_service_inflight_batches", "processing",
         "Batches being processed or waiting for a retry"),
        ("buffer_service_failed_jobs", "failed", "Failed jobs waiting for an operator"),
    ):
        families.append(GaugeMetricFamily(name, text + " (from Redis, cluster-wide)",
                                          value=counts[key]))
    flag = GaugeMetricFamily("buffer_service_flag_on", "1 when a boolean feature flag is on",
                             labels=["flag"])
    for name in ("message_buffering", "response_quality_enhancement", "processing"):
        flag.add_metric([name], 1.0 if flags.on(name) else 0.0)
    families.append(flag)
    families.append(GaugeMetricFamily("buffer_service_buffering_percent",
                                      "Share of conversations on the buffered path",
                                      value=flags.buffering_percent))
    return families


def _process_registry() -> CollectorRegistry:
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        # prometheus-client leaves this constructor unannotated (it registers itself; nothing returned
        # is used).
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        return registry
    return REGISTRY


async def exposition(ops: Operations) -> tuple[bytes, str]:
    """The text format body and its content type."""
    snapshot = CollectorRegistry(auto_describe=False)
    snapshot.register(_Snapshot(await _redis_gauges(ops)))
    return generate_latest(_process_registry()) + generate_latest(snapshot), CONTENT_TYPE_LATEST


def handler(ops: Operations) -> Callable[[web.Request], Awaitable[web.Response]]:
    """`GET /metrics`, of the service's app and of a worker-only process's own (app.py)."""
    async def serve(request: web.Request) -> web.Response:
        try:
            body, content_type = await exposition(ops)
        except REDIS_ERRORS as exc:
            return web.Response(body=orjson.dumps({"error": f"storage unavailable: {type(exc).__name__}"}),
                                status=503, content_type="application/json")
        # aiohttp wants the charset apart from the content type.
        return web.Response(body=body, headers={"Content-Type": content_type})

    return serve
