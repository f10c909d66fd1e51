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
  processing was switched off.

Both are global (untagged) keys, written by their own commands, never inside a shard script.
Both are capped (`MAXLEN ~`), so they need no cleanup; losing the newest entries when a process
dies is acceptable for a log, losing a message is not, so nothing here is on the message path.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
from typing import cast

import orjson
import structlog
from redis.typing import EncodableT, FieldT

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
# A burst claimed this long after its deadline was found by a sweep, not by its wake-up.
_LATE_MS = 1_000


def _now_ms() -> int:
    return int(time.time() * 1000)


def _fields(entry: dict[str, str | int]) -> dict[FieldT, EncodableT]:
    # redis-py types XADD's fields as a dict of its widest key and value types, and dict is
    # invariant: a dict of str to str | int is one at run time, only not to the type checker.
    return cast("dict[FieldT, EncodableT]", entry)


class WebhookLog:
    def __init__(self, redis: AnyRedis, settings: Settings) -> None:
        self.redis = redis
        self.key = Keys(settings).logs["webhooks"]
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
                    log.warning("webhook_log_write_failed", error=str(exc), entries=len(batch))
        finally:
            self._task = None

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
        self.add(entry)

    async def aclose(self) -> None:
        if self._task is not None:
            await asyncio.gather(self._task, return_exceptions=True)


class SweepLog:
    """What one worker's sweeps found and did, one entry per safety-sweep period."""

    def __init__(self, redis: AnyRedis, settings: Settings) -> None:
        self.redis = redis
        self.key = Keys(settings).logs["sweeps"]
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

    async def swept(self, *, paused: bool) -> None:
        self.sweeps += 1
        self.paused = self.paused or paused
        if time.monotonic() - self._started < self.period_s:
            return
        entry: dict[str, str | int] = {
            "t": _now_ms(), "worker": self.worker, "sweeps": self.sweeps,
            "claimed": self.claimed_new, "retaken": self.retaken, "late": self.late,
            "paused": int(self.paused), "period_ms": round((time.monotonic() - self._started) * 1000),
        }
        self._reset()
        try:
            await self.redis.xadd(self.key, _fields(entry), maxlen=LOG_MAXLEN, approximate=True)
        except REDIS_ERRORS as exc:
            log.warning("sweep_log_write_failed", error=str(exc))
