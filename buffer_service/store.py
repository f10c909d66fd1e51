"""The buffer store: the reads and writes of buffer state, through the Lua scripts (scripts.py)
on the keys of keys.py (which documents the layout)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson
from redis.asyncio.cluster import RedisCluster

from .chatwoot import ChatMessage, Decision, Handoff, buffered, from_history
from .config import Settings
from .keys import Keys
from .redis_client import AnyRedis
from .scripts import Scripts

# How long, and how many, fingerprints of posted replies are kept for their webhook echo: it
# arrives within seconds, or after Chatwoot's retries of an agent-bot delivery (3 x 3 s) at
# worst, or late when Chatwoot's queue is backed up; each echo consumes its own.
_OWN_REPLY_MEMORY_MS = 3_600_000
_OWN_REPLIES_KEPT = 16


def decoded(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


@dataclass(frozen=True)
class AppendResult:
    buffered: bool
    count: int
    deadline_ms: int
    trigger: str  # buffered: what set the deadline; else why not ('' for a duplicate)
    now_ms: int

    @property
    def duplicate(self) -> bool:
        return not self.buffered and not self.trigger


@dataclass(frozen=True)
class Batch:
    """A claimed burst: its messages, held under a lease that `token` fences."""

    id: str
    token: str
    attempts: int
    conv: str
    first_ms: int
    deadline_ms: int
    trigger: str
    claimed_ms: int
    reply: str  # "" until the LLM has answered; a retry reuses a stored reply
    messages: tuple[dict[str, Any], ...]
    takeover: str = ""  # why the bot must not answer (a human handles it), seen at claim time

    @property
    def account_id(self) -> int:
        return int(self.conv.split(":", 1)[0])

    @property
    def conversation_id(self) -> int:
        return int(self.conv.split(":", 1)[1])

    @property
    def shard(self) -> int:
        return Keys.shard_of_batch(self.id)

    @property
    def fresh(self) -> bool:
        """Whether this claim created the batch (a flush), rather than took an existing one again
        (a retry, a lapsed lease, a batch handed back at shutdown or re-queued by an operator, whose
        attempt count may read 1 again). claim.lua draws a new batch's id and its first token from
        the shard's counter one after the other; any later claim draws a later token."""
        return int(self.token) == int(self.id.rsplit("-", 1)[1]) + 1

    @property
    def due_by(self) -> str:
        """What made the burst due: deadline, size, age, manual (flush command) or immediate."""
        return self.trigger or "deadline"

    @property
    def inbox_id(self) -> int | None:
        """The conversation's inbox, as its messages name it (the last that does, like the job
        record, claim.lua): its settings answer the batch (Settings.for_inbox)."""
        return next((int(m["inbox"]) for m in reversed(self.messages) if m.get("inbox")), None)


class LeaseLost(Exception):
    """Another worker took the batch over (our lease lapsed); stop without side effects."""


@dataclass(frozen=True)
class Progress:
    """How far earlier attempts got with a batch's stored reply: `out` of its parts are out, the
    last of them Chatwoot's message `last_id` (0 for none); `parts`: the split stored with the
    reply (None before its first post)."""

    out: int = 0
    last_id: int = 0
    parts: list[str] | None = None


class BufferStore:
    """All reads and writes of buffer state (keys from keys.py, scripts from scripts.py)."""

    def __init__(self, redis: AnyRedis, settings: Settings) -> None:
        self.redis = redis
        self.settings = settings
        self.keys = Keys(settings)
        # One registry for the client: Limits, Operations and Transcripts call through it too.
        self.scripts = Scripts(redis, settings.redis_wait_replicas)
        # Inboxes whose window, size or age differ (INBOX_SETTINGS_FILE), for claim.lua.
        limits = {str(inbox): [own.buffer_duration_ms, own.max_buffer_size, own.max_buffer_age_ms]
                  for inbox, own in settings.inboxes.items()}
        own_limits = {inbox: limit for inbox, limit in limits.items() if limit != [
            settings.buffer_duration_ms, settings.max_buffer_size, settings.max_buffer_age_ms]}
        self._inbox_limits = orjson.dumps(own_limits) if own_limits else b""
        self.compact = settings.buffer_format == "compact"
        # Room for a whole burst on top of the history a prompt uses, so that one long burst
        # does not push out every earlier turn (of any inbox: one cap for every conversation).
        largest = max(own.max_buffer_size for own in (settings, *settings.inboxes.values()))
        self._history_cap = settings.history_messages + largest if settings.history_messages else 0

    # -- webhook side -----------------------------------------------------------------------
    async def append(self, msg: ChatMessage, *, buffered: bool = True,
                     snapshot: Handoff | None = None, deadline: float | None = None) -> AppendResult:
        """Take a customer message in (append.lua). `snapshot`: the conversation as the
        message's webhook showed it (its `updated_at` versions who is in charge).
        buffered=False (flags.py): a window of 0, due at once, answered without waiting.
        `deadline` (event-loop time): TimeoutError past it (the webhook's Redis budget)."""
        s, k, conv = self.settings.for_inbox(msg.inbox_id), self.keys, msg.conv
        shard = k.shard_of(conv)
        # The global limit's key is in no shard: on one server the append takes it while that
        # limit is set; on a cluster its own call does, before (keys.py, globalrate.lua).
        apart = bool(s.rate_limit_global) and isinstance(self.redis, RedisCluster)
        taken = apart and not await self._global_rate(s, refund=False, deadline=deadline)
        raw = await self.scripts.append(
            keys={"due": k.due(shard), "first": k.first(shard), "buffer": k.buffer(conv),
                  "ttl": k.ttl(conv), "seen": k.seen(conv, msg.message_id),
                  "handoff": k.handoff(conv), "rate": k.rate(conv), "history": k.history(conv),
                  **({"global_rate": k.global_rate} if s.rate_limit_global and not apart else {})},
            args={"conv": conv, "message": msg.to_json(),
                  "entry": msg.to_entry() if self.compact else b"",
                  "burst": msg.burst_head() if self.compact else b"",
                  "window_ms": s.buffer_duration_ms if buffered else 0,
                  "max_age_ms": s.max_buffer_age_ms, "max_size": s.max_buffer_size,
                  "dedup_ms": s.dedup_ttl_s * 1000, "wake": k.wake, "max_bytes": s.max_buffer_bytes,
                  "version": _version(snapshot.version if snapshot else None),
                  "rate_limit": s.rate_limit_per_conversation,
                  "rate_period_ms": s.rate_limit_window_s * 1000,
                  "global_limit": 0 if apart else s.rate_limit_global,
                  "history_cap": self._history_cap, "history_ttl_ms": s.history_ttl_s * 1000,
                  "prefix": k.prefix(shard), "pending": int(bool(snapshot and snapshot.pending)),
                  "global_refused": int(apart and not taken)},
            deadline=deadline,
        )
        result = AppendResult(int(raw[0]) == 1, int(raw[1]), int(raw[2]), decoded(raw[3]), int(raw[4]))
        if taken and not result.buffered:
            await self._global_rate(s, refund=True, deadline=deadline)
        return result

    async def _global_rate(self, s: Settings, *, refund: bool, deadline: float | None) -> bool:
        """Take one message's global allowance (True: refused), or give one back (globalrate.lua).
        If the append fails after a take, the allowance stays used: a retry may take another,
        so the limit errs on refusing, never on letting more through."""
        return bool(await self.scripts.globalrate(
            keys={"rate": self.keys.global_rate},
            args={"limit": s.rate_limit_global, "period_ms": s.rate_limit_window_s * 1000,
                  "refund": int(refund)}, deadline=deadline))

    async def note(self, decision: Decision) -> str:
        """Record what a webhook the bot does not answer tells, in one round trip: who handles
        the conversation, and the message itself (history once; a human agent's pauses the bot;
        the echo of our reply confirms its post). Returns what the message was ('recorded',
        'duplicate', 'own', 'paused'), or '' when there was none."""
        s, k = self.settings, self.keys
        msg, handoff = decision.message, decision.handoff
        conv = msg.conv if msg is not None else handoff.conv if handoff is not None else None
        if conv is None:
            return ""
        async with self.redis.pipeline(transaction=False) as pipe:
            if handoff is not None:
                await self.scripts.handoff(
                    keys={"handoff": k.handoff(conv)},
                    args={"reason": handoff.reason, "version": _version(handoff.version),
                          "ttl_ms": s.history_ttl_s * 1000, "pending": int(handoff.pending)},
                    client=pipe)
            if msg is not None:
                outgoing = msg.role == "assistant"
                await self.scripts.note(
                    keys={"seen": k.seen(conv, msg.message_id), "history": k.history(conv),
                          "pause": k.pause(conv), "sent": k.sent(conv), "handoff": k.handoff(conv)},
                    args={"entry": self._for_history(msg), "history_cap": self._history_cap,
                          "history_ttl_ms": s.history_ttl_s * 1000, "dedup_ms": s.dedup_ttl_s * 1000,
                          "message_id": msg.message_id, "outgoing_text": msg.text if outgoing else "",
                          "prefix": k.prefix(k.shard_of(conv)),
                          "pause_ms": s.human_pause_ms if decision.from_agent else 0,
                          "retention_ms": s.job_retention_days * 86_400_000, "wake": k.wake},
                    client=pipe)
            results = await pipe.execute()
        return decoded(results[-1]) if msg is not None else ""

    async def hand_off(self, conv: str, reason: str, version: float | None, *,
                       pending: bool = False) -> bool:
        """Put a human in charge of the conversation as of snapshot `version` (handoff.py; None:
        as of the record's own version, which a tie keeps); False when a newer snapshot already
        says otherwise. `pending`: the snapshot shows the conversation `pending`."""
        return bool(await self.scripts.handoff(
            keys={"handoff": self.keys.handoff(conv)},
            args={"reason": reason, "version": "" if version is None else _version(version),
                  "ttl_ms": self.settings.history_ttl_s * 1000, "pending": int(pending)}))

    # -- worker side ------------------------------------------------------------------------
    async def claim(self, shard: int, limit: int) -> tuple[int, int, list[Batch]]:
        """Claim up to `limit` batches of one shard; returns (redis now, next wake ms, batches)."""
        s, k = self.settings, self.keys
        raw = await self.scripts.claim(
            keys={"due": k.due(shard), "first": k.first(shard), "inflight": k.inflight(shard),
                  "active": k.active(shard), "seq": k.seq(shard), "failed": k.failed(shard)},
            args={"prefix": k.prefix(shard), "shard": shard, "limit": limit,
                  "lease_ms": s.processing_lease_ms, "window_ms": s.buffer_duration_ms,
                  "max_size": s.max_buffer_size, "max_age_ms": s.max_buffer_age_ms,
                  "max_attempts": s.max_attempts, "inboxes": self._inbox_limits},
        )
        batches = [
            Batch(id=decoded(b[0]), token=decoded(b[1]), attempts=int(b[2]), conv=decoded(b[3]),
                  first_ms=int(b[4] or 0), deadline_ms=int(b[5] or 0), trigger=decoded(b[6] or ""),
                  claimed_ms=int(b[7]), reply=decoded(b[8] or ""),
                  messages=tuple(buffered(b[9])[1]), takeover=decoded(b[10]))
            for b in raw[2:]
        ]
        return int(raw[0]), int(raw[1]), batches

    async def renew(self, batch: Batch) -> bool:
        return bool(await self.scripts.renew(
            keys={"batch": self.keys.batch(batch.id), "inflight": self.keys.inflight(batch.shard)},
            args={"batch_id": batch.id, "token": batch.token,
                  "lease_ms": self.settings.processing_lease_ms},
        ))

    async def mark_handoff(self, batch: Batch, reason: str, summary: str) -> bool:
        """Store with the batch whether its reply hands over (mark.lua); False: lease lost."""
        return bool(await self.scripts.mark(
            keys={"batch": self.keys.batch(batch.id)},
            args={"token": batch.token, "reason": reason, "summary": summary[:2000]}))

    async def note_media(self, batch: Batch, note: str) -> bool:
        """Store with the batch what the model could not see or hear; False: lease lost."""
        return bool(await self.scripts.medianote(
            keys={"batch": self.keys.batch(batch.id)}, args={"token": batch.token, "note": note}))

    async def handoff_mark(self, batch: Batch) -> tuple[str, str]:
        """(reason, summary) an earlier attempt stored with its reply; reason '' for none."""
        reason, summary = await self.redis.hmget(self.keys.batch(batch.id), "handoff", "handoff_summary")
        return decoded(reason or ""), decoded(summary or "")

    async def before_post(self, batch: Batch, reply: str, *, absent: bool = False,
                          parts: list[str] | None = None, out: int = 0) -> tuple[str, str]:
        """The fenced step before posting `reply` (before_post.lua): returns (verdict, detail),
        verdict one of 'post', 'posted' (detail: the message id), 'confirm' (an earlier post may
        have gone through: ask Chatwoot, then call again with absent=True if it has no such
        message), 'skip' (detail: the reason), 'superseded' (detail: messages now waiting),
        'lost'. `parts`: the parts `reply` goes out as (parts.py; stored with the batch the first
        time), `out` of them out already; None for a reply posted whole."""
        parts = parts or [reply]
        s, k, conv, shard = self.settings.for_inbox(batch.inbox_id), self.keys, batch.conv, batch.shard
        verdict, detail = await self.scripts.before_post(
            keys={"batch": k.batch(batch.id), "due": k.due(shard), "first": k.first(shard),
                  "buffer": k.buffer(conv), "ttl": k.ttl(conv), "messages": k.messages(batch.id),
                  "pause": k.pause(conv), "handoff": k.handoff(conv), "sent": k.sent(conv)},
            args={"batch_id": batch.id, "token": batch.token, "reply": reply,
                  "supersede": int(s.supersede_stale_replies), "max_age_ms": s.max_buffer_age_ms,
                  "max_size": s.max_buffer_size, "lease_ms": s.processing_lease_ms,
                  "own_memory_ms": _OWN_REPLY_MEMORY_MS, "own_kept": _OWN_REPLIES_KEPT,
                  "retention_ms": s.job_retention_days * 86_400_000, "wake": k.wake,
                  "absent": int(absent), "prefix": k.prefix(shard),
                  "part": parts[min(out, len(parts) - 1)], "parts": orjson.dumps(parts)},
        )
        return decoded(verdict), decoded(detail)

    async def progress(self, batch: Batch) -> Progress:
        """What an earlier attempt stored and got out of the batch's reply (before_post.lua,
        part.lua)."""
        out, last_id, parts = await self.redis.hmget(self.keys.batch(batch.id), "parts_out",
                                                     "last_id", "parts")
        return Progress(int(out or 0), int(last_id or 0), orjson.loads(parts) if parts else None)

    async def handoff_noted(self, batch: Batch) -> bool:
        """Whether an earlier attempt got the handoff's private note out (noted.lua)."""
        return bool(await self.redis.hexists(self.keys.batch(batch.id), "note_out"))

    async def note_out(self, batch: Batch) -> bool:
        """Record that Chatwoot took the handoff's private note (noted.lua). False: lease lost."""
        return bool(await self.scripts.noted(keys={"batch": self.keys.batch(batch.id)},
                                             args={"token": batch.token}))

    async def part_out(self, batch: Batch, parts_out: int, message_id: int, last: bool) -> bool:
        """Record that the reply's first `parts_out` parts are out, the last of them as
        `message_id` (part.lua); `last`: the whole reply is. False: lease lost."""
        k = self.keys
        return bool(await self.scripts.part(
            keys={"batch": k.batch(batch.id), "sent": k.sent(batch.conv),
                  "seen": k.seen(batch.conv, message_id)},
            args={"batch_id": batch.id, "token": batch.token, "parts_out": parts_out,
                  "message_id": message_id, "last": int(last),
                  "dedup_ms": self.settings.dedup_ttl_s * 1000}))

    async def release(self, batch: Batch) -> bool:
        """Hand a batch back for any worker to take at once, its attempt not counted (shutdown)."""
        return bool(await self.scripts.release(
            keys={"batch": self.keys.batch(batch.id), "inflight": self.keys.inflight(batch.shard)},
            args={"batch_id": batch.id, "token": batch.token, "wake": self.keys.wake},
        ))

    async def finish(self, batch: Batch, state: str, *, reason: str = "", reply: str = "",
                     reply_id: int = 0, note: str = "") -> bool:
        s, k = self.settings, self.keys
        entry = self._for_history(ChatMessage(batch.account_id, batch.conversation_id, reply_id, reply,
                                              role="assistant")) if reply else b""
        return bool(await self.scripts.finish(
            keys={"batch": k.batch(batch.id), "messages": k.messages(batch.id),
                  "history": k.history(batch.conv), "seen": k.seen(batch.conv, reply_id),
                  "jobs": k.jobs(batch.shard, state)},
            args={"batch_id": batch.id, "token": batch.token, "state": state, "reason": reason,
                  "reply_id": reply_id, "entry": entry, "history_cap": self._history_cap,
                  "history_ttl_ms": s.history_ttl_s * 1000,
                  "retention_ms": s.job_retention_days * 86_400_000, "dedup_ms": s.dedup_ttl_s * 1000,
                  "wake": k.wake, "prefix": k.prefix(batch.shard), "note": note},
        ))

    async def fail(self, batch: Batch, error: str, *, retry_in_ms: int, permanent: bool,
                   not_posted: bool = False) -> str:
        """Returns 'retrying', 'failed', or '' when the lease was lost meanwhile. `not_posted`:
        the reply's post certainly created no message (refused, or never sent), so its next
        attempt need not ask Chatwoot first (before_post.lua: confirm)."""
        k = self.keys
        return decoded(await self.scripts.fail(
            keys={"batch": k.batch(batch.id), "failed": k.failed(batch.shard)},
            args={"batch_id": batch.id, "token": batch.token, "error": error[:1000],
                  "retry_ms": retry_in_ms, "max_attempts": self.settings.max_attempts,
                  "permanent": int(permanent), "wake": k.wake, "not_posted": int(not_posted),
                  "prefix": k.prefix(batch.shard)},
        ))

    async def requeue(self, batch_id: str) -> bool:
        """Put a failed batch back in line (operator action)."""
        k = self.keys
        shard = k.shard_of_batch(batch_id)
        return bool(await self.scripts.requeue(
            keys={"batch": k.batch(batch_id)},
            args={"batch_id": batch_id, "wake": k.wake, "prefix": k.prefix(shard)},
        ))

    async def known_messages(self, batch: Batch, ids: list[int]) -> set[int]:
        """Which of these Chatwoot message ids of the batch's conversation the service has seen
        (their seen markers: messages its webhooks took, replies it recorded)."""
        if not ids:
            return set()
        async with self.redis.pipeline(transaction=False) as pipe:
            for message_id in ids:
                pipe.exists(self.keys.seen(batch.conv, message_id))
            found = await pipe.execute()
        return {i for i, hit in zip(ids, found, strict=True) if hit}

    async def history(self, conv: str, last: int) -> list[dict[str, Any]]:
        """The conversation's `last` most recent history entries, oldest first."""
        if last <= 0:
            return []
        raw = await self.redis.lrange(self.keys.history(conv), -last, -1)
        return [from_history(r) for r in raw]

    async def job(self, batch_id: str) -> dict[str, str]:
        return (await self.jobs([batch_id]))[0]

    async def jobs(self, ids: list[str]) -> list[dict[str, str]]:
        """The jobs' records: each its whole hash, else a completed job's compact record in that
        shape, else {}."""
        async with self.redis.pipeline(transaction=False) as pipe:
            for batch_id in ids:
                pipe.hgetall(self.keys.batch(batch_id))
                pipe.hget(*self.keys.done_of(batch_id))
            raw = await pipe.execute()
        return [record(i, whole, compact) for i, whole, compact in zip(ids, raw[::2], raw[1::2], strict=True)]

    async def job_records(self) -> list[dict[str, str]]:
        """Every job record in Redis, by a scan (tests and benchmarks; operators page by index)."""
        found = []
        async for key in self.redis.scan_iter(match=self.keys.base + ":*:batch:*", count=1000):
            found.append(record("", await self.redis.hgetall(key), None))
        async for key in self.redis.scan_iter(match=self.keys.base + ":*:done:*", count=1000):
            shard = self.keys.shard_of_key(decoded(key))
            for seq, raw in (await self.redis.hgetall(key)).items():
                found.append(record(f"{shard}-{decoded(seq)}", None, raw))
        return [r for r in found if r]

    async def due_count(self) -> int:
        async with self.redis.pipeline(transaction=False) as pipe:
            for shard in range(self.settings.shards):
                pipe.zcard(self.keys.due(shard))
            return sum(await pipe.execute())

    async def wake_all(self) -> None:
        await self.redis.publish(self.keys.wake, 0)

    def _for_history(self, msg: ChatMessage) -> bytes:
        # The history follows BUFFER_FORMAT: versions before it read json entries only.
        return msg.to_history() if self.compact else msg.to_json()


def _version(version: float | None) -> str:
    # A snapshot without `updated_at` is older than any with one (lib.lua take_charge).
    return "0" if version is None else repr(version)


def record(batch_id: str, whole: dict[Any, Any] | None, compact: bytes | str | None) -> dict[str, str]:
    """A job record as its hash has it, from the hash, else from a completed job's compact record
    (lib.lua compact: times in it are ms after the first message, -1 for none; what it does not
    keep, such as an earlier attempt's error, is absent), else {}."""
    if whole:
        return {decoded(k): decoded(v) for k, v in whole.items()}
    if not compact:
        return {}
    (conv, inbox, count, trigger, attempts, first, deadline, claimed, posting, finished, requeued,
     reply_id, parts_out, reason, media) = orjson.loads(compact)
    out = {"id": batch_id, "state": "completed", "conv": conv, "inbox": str(inbox), "count": str(count),
           "trigger": trigger, "attempts": str(attempts), "first_ms": str(first),
           "reply_id": str(reply_id), "parts_out": str(parts_out or ""), "reason": reason, "media": media}
    for name, after in (("deadline_ms", deadline), ("claimed_ms", claimed), ("posting_ms", posting),
                        ("finished_ms", finished), ("requeued_ms", requeued)):
        if after >= 0:
            out[name] = str(first + after)
    return {k: v for k, v in out.items() if k not in ("media", "parts_out") or v}
