"""The buffer store: every Redis key of the service and the Lua scripts that change them.

Key layout (prefix `bs`, shard `{sN}` as a hash tag so that every key one script touches lives
in one Redis Cluster slot; a conversation always maps to the same shard):

    bs:{sN}:due              zset  conv -> deadline ms          (the deadline index)
    bs:{sN}:first            hash  conv -> first message ms of the pending burst
    bs:{sN}:buf:<conv>       list  pending messages of the burst, in arrival order (each
                                   stamped with its arrival ms, "t")
    bs:{sN}:ttl:<conv>       string with PX = time to deadline  (expiry event = wake-up hint)
    bs:{sN}:seen:<acct>:<id> string with PX                     (webhook de-duplication)
    bs:{sN}:hist:<conv>      list  recent messages, both sides  (prompt context)
    bs:{sN}:inflight         zset  batch id -> lease expiry or retry time
    bs:{sN}:active           hash  conv -> batch id             (one batch per conversation)
    bs:{sN}:batch:<id>       hash  job record of one flushed burst
    bs:{sN}:msgs:<id>        list  the burst's messages while the batch is unfinished
    bs:{sN}:failed           zset  batch id -> failure time
    bs:{sN}:jobs:<state>     zset  batch id -> finish time (completed, skipped; finish.lua)
    bs:{sN}:stats:<hour>     hash  hourly counters of flushes and outcomes (claim.lua, lib.lua)
    bs:{sN}:manual           hash  conv -> 1: an operator flushed it (flush.lua; see ops.py)
    bs:{sN}:seq              counter for batch ids and fencing tokens
    bs:{sN}:handoff:<conv>   hash  reason, v: who is in charge, by the newest snapshot
                                   (lib.lua take_charge; reason '' = the bot)
    bs:{sN}:pause:<conv>     string with PX = HUMAN_PAUSE_MS    (a human agent wrote)
    bs:{sN}:sent:<conv>      zset  "<fingerprint>:<batch id>" -> post ms: replies we posted
                                   whose echo has not come yet (lib.lua own_add)
    bs:{sN}:rl:<conv>        string GCRA state of the conversation's rate limit (append.lua)
    bs:wake                  pub/sub channel: "a deadline you do not know yet"

`conv` is "<account id>:<conversation display id>".
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from importlib import resources
from typing import Any

import orjson
from redis.asyncio import Redis
from redis.commands.core import AsyncScript

from .batcher import ScriptBatcher
from .chatwoot import ChatMessage, Decision, Handoff
from .config import Settings

# How long, and how many, fingerprints of posted replies are kept for their webhook echo: it
# arrives within seconds, or after Chatwoot's retries of an agent-bot delivery (3 x 3 s) at
# worst, or late when Chatwoot's queue is backed up; each echo consumes its own.
_OWN_REPLY_MEMORY_MS = 3_600_000
_OWN_REPLIES_KEPT = 16


def _load(name: str) -> str:
    lua = resources.files(__package__).joinpath("lua")
    # lib.lua holds only local helpers; every script may use them.
    return lua.joinpath("lib.lua").read_text(encoding="utf-8") + lua.joinpath(
        f"{name}.lua").read_text(encoding="utf-8")


def _s(value: Any) -> str:
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
        return int(self.id.split("-", 1)[0])

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


class BufferStore:
    """All reads and writes of buffer state; nothing else in the service builds a key."""

    def __init__(self, redis: Redis, settings: Settings) -> None:
        self.redis = redis
        self.settings = settings
        self.wake_channel = f"{settings.key_prefix}:wake"
        # One key for all conversations, in no shard. The append script takes it only when the
        # global limit is set: a Redis Cluster would refuse a script whose keys span slots.
        self.global_rate_key = f"{settings.key_prefix}:rl:global"
        self._scripts: dict[str, AsyncScript] = {
            name: redis.register_script(_load(name))
            for name in ("append", "claim", "renew", "before_post", "finish", "fail", "release",
                         "requeue", "note", "handoff", "mark", "part")
        }
        # Webhooks arrive concurrently: their appends share one round trip (see batcher.py).
        self._append = ScriptBatcher(redis, self._scripts["append"])
        # Inboxes whose window, size or age differ (INBOX_SETTINGS_FILE), for claim.lua.
        limits = {str(inbox): [own.buffer_duration_ms, own.max_buffer_size, own.max_buffer_age_ms]
                  for inbox, own in settings.inboxes.items()}
        own_limits = {inbox: limit for inbox, limit in limits.items() if limit != [
            settings.buffer_duration_ms, settings.max_buffer_size, settings.max_buffer_age_ms]}
        self._inbox_limits = orjson.dumps(own_limits) if own_limits else b""

    # -- keys -------------------------------------------------------------------------------
    def shard_of(self, conv: str) -> int:
        return zlib.crc32(conv.encode()) % self.settings.shards

    def prefix(self, shard: int) -> str:
        return f"{self.settings.key_prefix}:{{s{shard}}}:"

    def key(self, shard: int, name: str) -> str:
        return self.prefix(shard) + name

    def shard_keys(self, shard: int) -> dict[str, str]:
        p = self.prefix(shard)
        return {n: p + n for n in ("due", "first", "inflight", "active", "seq", "failed")}

    # -- webhook side -----------------------------------------------------------------------
    async def append(self, msg: ChatMessage, *, buffered: bool = True,
                     snapshot: Handoff | None = None) -> AppendResult:
        """Take a customer message in (append.lua). `snapshot`: the conversation as the
        message's webhook showed it (its `updated_at` versions who is in charge).
        buffered=False (flags.py): a window of 0, due at once, answered without waiting."""
        s = self.settings.for_inbox(msg.inbox_id)
        shard = self.shard_of(msg.conv)
        k = self.shard_keys(shard)
        raw = await self._append(
            [k["due"], k["first"], self.key(shard, f"buf:{msg.conv}"),
             self.key(shard, f"ttl:{msg.conv}"),
             self.key(shard, f"seen:{msg.account_id}:{msg.message_id}"),
             self.key(shard, f"handoff:{msg.conv}"), self.key(shard, f"rl:{msg.conv}"),
             self.key(shard, f"hist:{msg.conv}"),
             *([self.global_rate_key] if s.rate_limit_global else [])],
            [msg.conv, msg.to_json(), s.buffer_duration_ms if buffered else 0, s.max_buffer_age_ms,
             s.max_buffer_size, s.dedup_ttl_s * 1000, self.wake_channel, s.max_buffer_bytes,
             _version(snapshot.version if snapshot else None), s.rate_limit_per_conversation,
             s.rate_limit_window_s * 1000, s.rate_limit_global, self._history_cap(),
             s.history_ttl_s * 1000, self.prefix(shard), int(bool(snapshot and snapshot.pending))],
        )
        return AppendResult(int(raw[0]) == 1, int(raw[1]), int(raw[2]), _s(raw[3]), int(raw[4]))


    async def note(self, decision: Decision) -> str:
        """Record what a webhook the bot does not answer tells, in one round trip: who handles
        the conversation, and the message itself (history once; a human agent's pauses the bot;
        the echo of our reply confirms its post). Returns what the message was ('recorded',
        'duplicate', 'own', 'paused'), or '' when there was none."""
        s = self.settings
        msg, handoff = decision.message, decision.handoff
        conv = msg.conv if msg is not None else handoff.conv if handoff is not None else None
        if conv is None:
            return ""
        shard = self.shard_of(conv)
        async with self.redis.pipeline(transaction=False) as pipe:
            if handoff is not None:
                await self._scripts["handoff"](
                    keys=[self.key(shard, f"handoff:{conv}")],
                    args=[handoff.reason, _version(handoff.version), s.history_ttl_s * 1000,
                          int(handoff.pending)],
                    client=pipe)
            if msg is not None:
                outgoing = msg.role == "assistant"
                await self._scripts["note"](
                    keys=[self.key(shard, f"seen:{msg.account_id}:{msg.message_id}"),
                          self.key(shard, f"hist:{conv}"), self.key(shard, f"pause:{conv}"),
                          self.key(shard, f"sent:{conv}")],
                    args=[msg.to_json(), self._history_cap(), s.history_ttl_s * 1000,
                          s.dedup_ttl_s * 1000, msg.message_id, msg.text if outgoing else "",
                          self.prefix(shard), s.human_pause_ms if decision.from_agent else 0,
                          s.job_retention_days * 86_400_000],
                    client=pipe)
            results = await pipe.execute()
        return _s(results[-1]) if msg is not None else ""

    async def hand_off(self, conv: str, reason: str, version: float | None, *,
                       pending: bool = False) -> bool:
        """Put a human in charge of the conversation as of snapshot `version` (handoff.py; None:
        as of the record's own version, which a tie keeps); False when a newer snapshot already
        says otherwise. `pending`: the snapshot shows the conversation `pending`."""
        shard = self.shard_of(conv)
        return bool(await self._scripts["handoff"](
            keys=[self.key(shard, f"handoff:{conv}")],
            args=[reason, "" if version is None else _version(version),
                  self.settings.history_ttl_s * 1000, int(pending)]))

    # -- worker side ------------------------------------------------------------------------
    async def claim(self, shard: int, limit: int) -> tuple[int, int, list[Batch]]:
        """Claim up to `limit` batches of one shard; returns (redis now, next wake ms, batches)."""
        s = self.settings
        k = self.shard_keys(shard)
        raw = await self._scripts["claim"](
            keys=[k["due"], k["first"], k["inflight"], k["active"], k["seq"], k["failed"]],
            args=[self.prefix(shard), shard, limit, s.processing_lease_ms, s.buffer_duration_ms,
                  s.max_buffer_size, s.max_buffer_age_ms, s.max_attempts, self._inbox_limits],
        )
        batches = [
            Batch(id=_s(b[0]), token=_s(b[1]), attempts=int(b[2]), conv=_s(b[3]),
                  first_ms=int(b[4] or 0), deadline_ms=int(b[5] or 0), trigger=_s(b[6] or ""),
                  claimed_ms=int(b[7]), reply=_s(b[8] or ""),
                  messages=tuple(orjson.loads(m) for m in b[9]), takeover=_s(b[10]))
            for b in raw[2:]
        ]
        return int(raw[0]), int(raw[1]), batches

    async def renew(self, batch: Batch) -> bool:
        shard = batch.shard
        return bool(await self._scripts["renew"](
            keys=[self.key(shard, f"batch:{batch.id}"), self.key(shard, "inflight")],
            args=[batch.id, batch.token, self.settings.processing_lease_ms],
        ))

    async def mark_handoff(self, batch: Batch, reason: str, summary: str) -> bool:
        """Store with the batch whether its reply hands over (mark.lua); False: lease lost."""
        return bool(await self._scripts["mark"](
            keys=[self.key(batch.shard, f"batch:{batch.id}")],
            args=[batch.token, reason, summary[:2000]]))

    async def handoff_mark(self, batch: Batch) -> tuple[str, str]:
        """(reason, summary) an earlier attempt stored with its reply; reason '' for none."""
        reason, summary = await self.redis.hmget(self.key(batch.shard, f"batch:{batch.id}"),
                                                 "handoff", "handoff_summary")
        return _s(reason or ""), _s(summary or "")

    async def before_post(self, batch: Batch, reply: str, *, absent: bool = False) -> tuple[str, str]:
        """The fenced step before posting `reply` (before_post.lua): returns (verdict, detail),
        verdict one of 'post', 'posted' (detail: the message id), 'confirm' (an earlier post may
        have gone through: ask Chatwoot, then call again with absent=True if it has no such
        message), 'skip' (detail: the reason), 'superseded' (detail: messages now waiting),
        'lost'."""
        s = self.settings.for_inbox(batch.inbox_id)
        shard = batch.shard
        k = self.shard_keys(shard)
        verdict, detail = await self._scripts["before_post"](
            keys=[self.key(shard, f"batch:{batch.id}"), k["due"], k["first"],
                  self.key(shard, f"buf:{batch.conv}"), self.key(shard, f"ttl:{batch.conv}"),
                  self.key(shard, f"msgs:{batch.id}"), self.key(shard, f"pause:{batch.conv}"),
                  self.key(shard, f"handoff:{batch.conv}"), self.key(shard, f"sent:{batch.conv}")],
            args=[batch.id, batch.token, reply, int(s.supersede_stale_replies), s.max_buffer_age_ms,
                  s.max_buffer_size, s.processing_lease_ms, _OWN_REPLY_MEMORY_MS, _OWN_REPLIES_KEPT,
                  s.job_retention_days * 86_400_000, self.wake_channel, int(absent),
                  self.prefix(shard)],
        )
        return _s(verdict), _s(detail)

    async def part_out(self, batch: Batch, parts_out: int, message_id: int, next_part: str) -> bool:
        """Record that the reply's first `parts_out` parts are out, the last as `message_id`, and
        that `next_part` ('' after the last) is now in flight (part.lua); False: lease lost."""
        s = self.settings
        shard = batch.shard
        return bool(await self._scripts["part"](
            keys=[self.key(shard, f"batch:{batch.id}"), self.key(shard, f"sent:{batch.conv}"),
                  self.key(shard, f"seen:{batch.account_id}:{message_id}"), self.key(shard, "inflight")],
            args=[batch.id, batch.token, parts_out, message_id, next_part, _OWN_REPLY_MEMORY_MS,
                  _OWN_REPLIES_KEPT, s.processing_lease_ms, s.dedup_ttl_s * 1000]))

    async def release(self, batch: Batch) -> bool:
        """Hand a batch back for any worker to take at once, its attempt not counted (shutdown)."""
        shard = batch.shard
        return bool(await self._scripts["release"](
            keys=[self.key(shard, f"batch:{batch.id}"), self.key(shard, "inflight")],
            args=[batch.id, batch.token, self.wake_channel],
        ))

    async def finish(self, batch: Batch, state: str, *, reason: str = "", reply: str = "",
                     reply_id: int = 0) -> bool:
        s = self.settings
        shard = batch.shard
        entry = ChatMessage(batch.account_id, batch.conversation_id, reply_id, reply,
                            role="assistant").to_json() if reply else b""
        return bool(await self._scripts["finish"](
            keys=[self.key(shard, f"batch:{batch.id}"), self.key(shard, f"msgs:{batch.id}"),
                  self.key(shard, f"hist:{batch.conv}"),
                  self.key(shard, f"seen:{batch.account_id}:{reply_id}"),
                  self.key(shard, f"jobs:{state}")],
            args=[batch.id, batch.token, state, reason, reply_id, entry, self._history_cap(),
                  s.history_ttl_s * 1000, s.job_retention_days * 86_400_000, s.dedup_ttl_s * 1000,
                  self.wake_channel, self.prefix(shard)],
        ))

    async def fail(self, batch: Batch, error: str, *, retry_in_ms: int, permanent: bool,
                   not_posted: bool = False) -> str:
        """Returns 'retrying', 'failed', or '' when the lease was lost meanwhile. `not_posted`:
        the reply's post certainly created no message (refused, or never sent), so its next
        attempt need not ask Chatwoot first (before_post.lua: confirm)."""
        s = self.settings
        shard = batch.shard
        return _s(await self._scripts["fail"](
            keys=[self.key(shard, f"batch:{batch.id}"), self.key(shard, "failed")],
            args=[batch.id, batch.token, error[:1000], retry_in_ms, s.max_attempts,
                  int(permanent), self.wake_channel, int(not_posted), self.prefix(shard)],
        ))

    async def requeue(self, batch_id: str) -> bool:
        """Put a failed batch back in line (operator action)."""
        shard = int(batch_id.split("-", 1)[0])
        k = self.shard_keys(shard)
        return bool(await self._scripts["requeue"](
            keys=[self.key(shard, f"batch:{batch_id}"), k["inflight"], k["active"], k["failed"]],
            args=[batch_id, self.wake_channel, self.prefix(shard)],
        ))

    async def known_messages(self, batch: Batch, ids: list[int]) -> set[int]:
        """Which of these Chatwoot message ids of the batch's conversation the service has seen
        (their seen markers: messages its webhooks took, replies it recorded)."""
        if not ids:
            return set()
        async with self.redis.pipeline(transaction=False) as pipe:
            for message_id in ids:
                pipe.exists(self.key(batch.shard, f"seen:{batch.account_id}:{message_id}"))
            found = await pipe.execute()
        return {i for i, hit in zip(ids, found, strict=True) if hit}

    async def history(self, conv: str, last: int) -> list[dict[str, Any]]:
        """The conversation's `last` most recent history entries, oldest first."""
        if last <= 0:
            return []
        shard = self.shard_of(conv)
        raw = await self.redis.lrange(self.key(shard, f"hist:{conv}"), -last, -1)
        return [orjson.loads(r) for r in raw]

    async def job(self, batch_id: str) -> dict[str, str]:
        shard = int(batch_id.split("-", 1)[0])
        raw = await self.redis.hgetall(self.key(shard, f"batch:{batch_id}"))
        return {_s(k): _s(v) for k, v in raw.items()}

    async def due_count(self) -> int:
        async with self.redis.pipeline(transaction=False) as pipe:
            for shard in range(self.settings.shards):
                pipe.zcard(self.key(shard, "due"))
            return sum(await pipe.execute())

    async def wake_all(self) -> None:
        await self.redis.publish(self.wake_channel, 0)

    def _history_cap(self) -> int:
        # Room for a whole burst on top of the history a prompt uses, so that one long burst
        # does not push out every earlier turn (of any inbox: one cap for every conversation).
        s = self.settings
        largest = max(own.max_buffer_size for own in (s, *s.inboxes.values()))
        return s.history_messages + largest if s.history_messages else 0


def _version(version: float | None) -> str:
    # A snapshot without `updated_at` is older than any with one (lib.lua take_charge).
    return "0" if version is None else repr(version)
