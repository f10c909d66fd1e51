"""The webhook log and the sweep log: capped Redis streams an operator reads to see what happened
(`buffer-service log`, /admin/logs). Not the process's own log lines: those are structlog's (logs.py).

- `bs:log:webhooks`: one entry per delivery to a webhook path, with its outcome (buffered,
  duplicate, ignored + reason, rejected + reason, unavailable). Written off the hot path: the
  handler's answer does not wait for it; entries are gathered for a few ms and written by one
  script call (lua/weblog.lua: an XADD each), so a burst of webhooks costs one round trip and
  one command, not one each.
- `bs:log:sweeps`: one entry per worker per `BUFFER_PROCESSING_INTERVAL_MS` (the safety-sweep
  period, the old cron's cadence): how many sweeps ran, what they claimed, what the safety net
  caught (bursts claimed late, batches taken again after a lapsed lease or a retry), and whether
  processing was switched off. Written off the worker loop's path the same way: the key lives
  on one node of a cluster, and the loop must go on claiming from the others while it hangs.

Both are global (untagged) keys, written by their own commands, never inside a shard script.
Both are capped (`MAXLEN ~`), so they need no cleanup; losing the newest entries when a process
dies is acceptable for a log, losing a message is not, so nothing here is on the message path.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time

import orjson
import structlog

from .config import Settings
from .keys import Keys
from .redis_client import REDIS_ERRORS, AnyRedis
from .scripts import Scripts
from .store import Batch

log = structlog.get_logger("buffer_service.journal")

LOG_MAXLEN = 10_000
_GATHER_S = 0.02
_MAX_PENDING = 5_000
# Entries per script call: a script holds Redis while it runs (about a microsecond an XADD).
_PER_CALL = 500
_CLOSE_WAIT_S = 1.0
# A burst claimed this long after its deadline was found by a sweep, not by its wake-up.
_LATE_MS = 1_000


def _now_ms() -> int:
    return int(time.time() * 1000)


class _Appender:
    """Entries for one capped stream, written off the caller's path: gathered for a few ms and
    written by one script call (lua/weblog.lua), at most _MAX_PENDING held while Redis is away or
    slow. No caller waits for a write: a node that hangs (it answers neither the write nor with
    an error) holds up only its own stream's entries."""

    def __init__(self, redis: AnyRedis, key: str, failed_event: str) -> None:
        self.key = key
        self.failed_event = failed_event
        self.dropped = 0
        self.scripts = Scripts(redis)
        # Each entry as its fields and values in a row, every value a string (lua/weblog.lua).
        self._pending: list[list[str]] = []
        self._task: asyncio.Task[None] | None = None

    def add(self, entry: list[str]) -> None:
        if len(self._pending) >= _MAX_PENDING:  # Redis is away; keep memory bounded
            self.dropped += 1
            return
        self._pending.append(entry)
        if self._task is None:
            self._task = asyncio.create_task(self._write())

    async def _write(self) -> None:
        try:
            await asyncio.sleep(_GATHER_S)
            while self._pending:
                batch, self._pending = self._pending[:_PER_CALL], self._pending[_PER_CALL:]
                try:
                    await self.scripts.weblog(keys={"log": self.key},
                                              args={"maxlen": LOG_MAXLEN, "entries": orjson.dumps(batch)})
                except REDIS_ERRORS as exc:
                    self.dropped += len(batch)
                    log.warning(self.failed_event, error=str(exc), entries=len(batch))
        finally:
            self._task = None

    async def aclose(self) -> None:
        """The last entries, unless their node hangs: a shutdown (docker stop's 10 s) must not
        wait out its socket timeouts; a log may lose its newest entries."""
        if self._task is not None:
            task = self._task
            _, pending = await asyncio.wait({task}, timeout=_CLOSE_WAIT_S)
            if pending:
                task.cancel()
                await asyncio.wait({task}, timeout=_CLOSE_WAIT_S)


class WebhookLog:
    def __init__(self, redis: AnyRedis, settings: Settings) -> None:
        self._stream = _Appender(redis, Keys(settings).logs["webhooks"], "webhook_log_write_failed")

    def record(self, path: str, outcome: str, status: int, reason: str, body: dict[str, object]) -> None:
        """One delivery's entry: its answer, and the ids and figures the answer's body gave."""
        entry = ["t", str(_now_ms()), "outcome", outcome, "status", str(status), "path", path]
        if reason:
            entry += ("reason", reason)
        for src, dst in (("conversation_id", "conversation"), ("message_id", "message"),
                         ("buffered_messages", "buffered"), ("flush_in_ms", "flush_in_ms")):
            value = body.get(src)
            if isinstance(value, int):
                entry += (dst, str(value))
        self._stream.add(entry)

    async def aclose(self) -> None:
        await self._stream.aclose()


class SweepLog:
    """What one worker's sweeps found and did, one entry per safety-sweep period."""

    def __init__(self, redis: AnyRedis, settings: Settings) -> None:
        self._stream = _Appender(redis, Keys(settings).logs["sweeps"], "sweep_log_write_failed")
        self.period_s = settings.processing_interval_ms / 1000
        self.worker = f"{socket.gethostname()}:{os.getpid()}"
        self._reset()

    def _reset(self) -> None:
        self._started = time.monotonic()
        self.sweeps = self.claimed_new = self.retaken = self.late = 0
        self.paused = False

    def claimed(self, batch: Batch) -> None:
        if batch.fresh:
            self.claimed_new += 1
            if batch.claimed_ms - batch.deadline_ms > _LATE_MS:
                self.late += 1
        else:
            self.retaken += 1

    def swept(self, *, paused: bool) -> None:
        """Counts a turn of the worker loop; once a period, queues its entry (never waits for
        the write: `bs:log:sweeps` lives on one node, whose hang must not stop the loop)."""
        self.sweeps += 1
        self.paused = self.paused or paused
        if time.monotonic() - self._started < self.period_s:
            return
        period_ms = round((time.monotonic() - self._started) * 1000)
        entry = ["t", str(_now_ms()), "worker", self.worker, "sweeps", str(self.sweeps),
                 "claimed", str(self.claimed_new), "retaken", str(self.retaken),
                 "late", str(self.late), "paused", str(int(self.paused)), "period_ms", str(period_ms)]
        self._reset()
        self._stream.add(entry)

    async def aclose(self) -> None:
        await self._stream.aclose()
