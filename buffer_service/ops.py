"""Operations: what an operator sees and does, shared by the CLI and the admin HTTP API.

Everything is read from indexes and counters the Lua scripts keep as they change state, never
from a scan of the keyspace (keys.py): the deadline index (buffering), inflight (processing or
waiting for a retry), failed, jobs:completed and jobs:skipped (trimmed to JOB_RETENTION_DAYS),
the hourly stats, and the webhook and sweep logs (journal.py).

The hourly counters answer the Supabase guide's monitoring queries: bursts flushed and messages
per hour (so messages per burst), and per hour of completion the time from a burst's first
message to its posted reply; per hour of claim the time from deadline to claim.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, cast

from .chatwoot import buffered
from .flags import Flags
from .store import BufferStore, decoded, record

HOUR_MS = 3_600_000
JOB_STATUSES = ("buffering", "processing", "completed", "failed", "skipped")
_TRIGGERS = ("deadline", "size", "age", "manual", "immediate")
# Why a customer message was kept in the history without being buffered (append.lua).
_REFUSALS = ("rate_limited", "buffer_full")
_STAT_FIELDS = ("flushed", "messages", "late_ms", "completed", "reply_ms", "skipped", "failed",
                "superseded", *(f"t:{t}" for t in _TRIGGERS), *_REFUSALS)
STATS_HOURS = 8 * 24  # lua/lib.lua keeps each hour's counters this long


class OpsError(ValueError):
    """The operator asked for something that cannot be done; str() says why."""


class NotFound(OpsError):
    """The job or the pending burst asked for does not exist."""


def iso(ms: int | str | None) -> str | None:
    if ms in (None, "", "0", 0):
        return None
    return datetime.fromtimestamp(int(ms) / 1000, UTC).isoformat(timespec="milliseconds").replace(
        "+00:00", "Z")


def _int(value: Any) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return 0


class Operations:
    def __init__(self, store: BufferStore, flags: Flags) -> None:
        self.store = store
        self.flags = flags
        self.redis = store.redis
        self.settings = store.settings
        self.keys = store.keys

    # -- names --------------------------------------------------------------------------------
    def conversation(self, text: str) -> str:
        """"<account>:<conversation>" (or a bare conversation id when CHATWOOT_ACCOUNT_ID is set)."""
        parts = text.strip().split(":")
        if len(parts) == 1 and self.settings.chatwoot_account_id is not None:
            parts = [str(self.settings.chatwoot_account_id), parts[0]]
        if len(parts) != 2 or not all(p.isdigit() and int(p) > 0 for p in parts):
            raise OpsError(f"conversation must be ACCOUNT:CONVERSATION (e.g. 1:42), got {text!r}")
        return f"{int(parts[0])}:{int(parts[1])}"

    def job_id(self, text: str) -> tuple[int, str]:
        shard, _, seq = text.strip().partition("-")
        if not (shard.isdigit() and seq.isdigit() and int(shard) < self.settings.shards):
            raise OpsError(f"job id must look like 3-1234 (shard-sequence), got {text!r}")
        return int(shard), f"{int(shard)}-{int(seq)}"

    def _index(self, shard: int, status: str) -> str:
        """The index of a shard's jobs of one status (for "buffering": its pending bursts)."""
        k = self.keys
        if status == "buffering":
            return k.due(shard)
        if status == "processing":
            return k.inflight(shard)
        if status == "failed":
            return k.failed(shard)
        return k.jobs(shard, status)

    async def now_ms(self) -> int:
        sec, usec = await self.redis.time()
        return int(sec) * 1000 + int(usec) // 1000

    # -- figures ------------------------------------------------------------------------------
    async def counts(self) -> dict[str, int]:
        """Jobs and buffers by status, from the index sizes."""
        names = ("buffering", "processing", "failed", "completed", "skipped")
        async with self.redis.pipeline(transaction=False) as pipe:
            for shard in range(self.settings.shards):
                for status in names:
                    pipe.zcard(self._index(shard, status))
            sizes = await pipe.execute()
        out = dict.fromkeys(names, 0)
        for i, size in enumerate(sizes):
            out[names[i % len(names)]] += int(size)
        async with self.redis.pipeline(transaction=False) as pipe:
            for shard in range(self.settings.shards):
                pipe.hvals(self.keys.done_counts(shard))
            out["completed"] += sum(int(n) for counts in await pipe.execute() for n in counts)
        return out

    async def stats(self, hours: int = 24) -> dict[str, Any]:
        if not 1 <= hours <= STATS_HOURS:
            raise OpsError(f"hours must be from 1 to {STATS_HOURS}, got {hours}")
        now = await self.now_ms()
        current = now // HOUR_MS
        wanted = [current - i for i in range(hours - 1, -1, -1)]
        async with self.redis.pipeline(transaction=False) as pipe:
            for hour in wanted:
                for shard in range(self.settings.shards):
                    pipe.hmget(self.keys.stats(shard, hour), _STAT_FIELDS)
            per_key = await pipe.execute()
        rows = []
        total = dict.fromkeys(_STAT_FIELDS, 0)
        shards = self.settings.shards
        for n, hour in enumerate(wanted):
            got = dict.fromkeys(_STAT_FIELDS, 0)
            for values in per_key[n * shards:(n + 1) * shards]:
                for name, value in zip(_STAT_FIELDS, values, strict=True):
                    got[name] += _int(value)
            for name, value in got.items():
                total[name] += value
            if any(got.values()):
                rows.append({"hour": iso(hour * HOUR_MS), **_figures(got)})
        return {
            "at": iso(now),
            "hours": hours,
            "active": await self.counts(),
            "totals": _figures(total),
            "hourly": rows,
            "flags": {f["name"]: f["value"] for f in await self.flags.table()},
            "recent_failed_jobs": await self.jobs("failed", limit=10),
        }

    # -- buffers ------------------------------------------------------------------------------
    async def buffers(self, limit: int = 100) -> list[dict[str, Any]]:
        """Pending bursts: every conversation in a deadline index, plus those waiting behind
        a batch in flight (taken out of the index until that batch ends)."""
        now = await self.now_ms()
        async with self.redis.pipeline(transaction=False) as pipe:
            for shard in range(self.settings.shards):
                pipe.zrange(self.keys.due(shard), 0, limit - 1, withscores=True)
                pipe.hgetall(self.keys.active(shard))
            raw = await pipe.execute()
        found: list[tuple[int, str, int | None, str]] = []
        for shard in range(self.settings.shards):
            due, active = raw[2 * shard], raw[2 * shard + 1]
            deadlines = {decoded(conv): int(score) for conv, score in due}
            holders = {decoded(c): decoded(b) for c, b in active.items()}
            for conv in sorted(set(deadlines) | set(holders)):
                found.append((shard, conv, deadlines.get(conv), holders.get(conv, "")))
        async with self.redis.pipeline(transaction=False) as pipe:
            for shard, conv, _, _ in found:
                pipe.llen(self.keys.buffer(conv))
                pipe.lindex(self.keys.buffer(conv), 0)
                pipe.hget(self.keys.first(shard), conv)
            sizes = await pipe.execute()
        rows = []
        for i, (_, conv, deadline, batch) in enumerate(found):
            count, head, first = int(sizes[3 * i]), sizes[3 * i + 1], sizes[3 * i + 2]
            # A compact buffer's head is no message; it names the first message's time.
            if head is not None and (head_first := buffered([head])[0]) is not None:
                count, first = count - 1, str(head_first)
            if count == 0:
                continue  # a conversation whose batch is in flight and nothing new came
            rows.append({
                "conversation": conv, "messages": count,
                "status": "buffering" if deadline is not None else "waiting",
                "first_message_at": iso(decoded(first) if first else None),
                "deadline_at": iso(deadline), "due_in_ms": deadline - now if deadline else None,
                "batch_in_flight": batch or None,
            })
        # Ties (deadlines in the same millisecond) by conversation, not by the shards' order.
        rows.sort(key=lambda r: (r["deadline_at"] is None, r["deadline_at"] or "", r["conversation"]))
        return rows[:limit]

    async def buffer(self, conversation: str) -> dict[str, Any]:
        conv = self.conversation(conversation)
        k = self.keys
        shard = k.shard_of(conv)
        now = await self.now_ms()
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.lrange(k.buffer(conv), 0, -1)
            pipe.zscore(k.due(shard), conv)
            pipe.hget(k.first(shard), conv)
            pipe.hget(k.active(shard), conv)
            pipe.llen(k.history(conv))
            raw, deadline, first, batch, hist = await pipe.execute()
        head_first, msgs = buffered(raw)
        if head_first is not None:
            first = str(head_first)
        return {
            "conversation": conv,
            "shard": shard,
            "status": "buffering" if deadline is not None else ("waiting" if msgs else "empty"),
            "messages": msgs,
            "first_message_at": iso(decoded(first) if first else None),
            "deadline_at": iso(int(deadline) if deadline is not None else None),
            "due_in_ms": int(deadline) - now if deadline is not None else None,
            "batch_in_flight": await self.job(decoded(batch)) if batch else None,
            "history_messages": int(hist),
        }

    # -- jobs ---------------------------------------------------------------------------------
    async def jobs(self, status: str | None = None, limit: int = 50) -> list[dict[str, Any]]:
        if status == "buffering":
            return await self.buffers(limit)
        if status is not None and status not in JOB_STATUSES:
            raise OpsError(f"status must be one of {', '.join(JOB_STATUSES)}, got {status!r}")
        chosen = [status] if status else ["processing", "failed", "completed", "skipped"]
        async with self.redis.pipeline(transaction=False) as pipe:
            for shard in range(self.settings.shards):
                for index in chosen:
                    pipe.zrevrange(self._index(shard, index), 0, limit - 1)
            raw = await pipe.execute()
        ids = [decoded(i) for ids in raw for i in ids]
        found = await self._records(ids)
        if "completed" in chosen:
            found += await self._compact_records(limit)
        # A job that finished between the reads above is in both: its newest record counts.
        newest: dict[str, dict[str, Any]] = {}
        for j in found:
            if j["id"] not in newest or j["_t"] >= newest[j["id"]]["_t"]:
                newest[j["id"]] = j
        # Newest first by what last happened to the job.
        jobs = sorted(newest.values(), key=lambda j: j["_t"], reverse=True)
        for j in jobs:
            del j["_t"]
        return jobs[:limit]

    async def _records(self, ids: list[str]) -> list[dict[str, Any]]:
        return [_job_view(r) for r in await self.store.jobs(ids) if r]

    async def _compact_records(self, limit: int) -> list[dict[str, Any]]:
        """The newest compact completed records, at least `limit` of each shard that has them
        (buckets newest first, a few at a time: most of a bucket's records are completed ones)."""
        out: list[dict[str, Any]] = []
        for shard in range(self.settings.shards):
            taken, start = 0, 0
            while taken < limit:
                buckets = await self.redis.zrevrange(self.keys.done(shard), start, start + 3)
                if not buckets:
                    break
                async with self.redis.pipeline(transaction=False) as pipe:
                    for bucket in buckets:
                        pipe.hgetall(self.keys.done_bucket(shard, int(decoded(bucket))))
                    found = await pipe.execute()
                for records in found:
                    out += [_job_view(record(f"{shard}-{decoded(seq)}", None, raw))
                            for seq, raw in records.items()]
                    taken += len(records)
                start += len(buckets)
        return out

    async def job(self, job_id: str) -> dict[str, Any] | None:
        _, batch_id = self.job_id(job_id)
        records = await self._records([batch_id])
        if not records:
            return None
        job = records[0]
        del job["_t"]
        kept = await self.redis.lrange(self.keys.messages(batch_id), 0, -1)
        job["burst"] = buffered(kept)[1]
        return job

    async def retry(self, job_id: str) -> dict[str, Any]:
        _, batch_id = self.job_id(job_id)
        job = await self.job(batch_id)
        if job is None:
            raise NotFound(f"no job {batch_id}")
        if job["status"] != "failed":
            raise OpsError(f"job {batch_id} is {job['status']}, only failed jobs can be retried")
        if not await self.store.requeue(batch_id):
            raise OpsError(f"job {batch_id} changed meanwhile; look at it again")
        return {"id": batch_id, "status": "queued", "processing": await self.flags.processing()}

    async def retry_all_failed(self) -> dict[str, Any]:
        async with self.redis.pipeline(transaction=False) as pipe:
            for shard in range(self.settings.shards):
                pipe.zrange(self.keys.failed(shard), 0, -1)
            raw = await pipe.execute()
        retried = [decoded(i) for ids in raw for i in ids]
        done = [batch_id for batch_id in retried if await self.store.requeue(batch_id)]
        return {"retried": done, "count": len(done), "processing": await self.flags.processing()}

    # -- actions ------------------------------------------------------------------------------
    async def set_processing(self, on: bool) -> dict[str, Any]:
        return {"processing": await self.flags.set("processing", "on" if on else "off")}

    async def flush(self, conversation: str | None = None) -> dict[str, Any]:
        """One conversation's burst now, or (without one) make every worker sweep at once."""
        processing = await self.flags.processing()
        if conversation is None:
            now = await self.now_ms()
            async with self.redis.pipeline(transaction=False) as pipe:
                for shard in range(self.settings.shards):
                    pipe.zcount(self.keys.due(shard), "-inf", now)
                due = sum(await pipe.execute())
            await self.store.wake_all()
            return {"due_buffers": due, "processing": processing}
        conv = self.conversation(conversation)
        k = self.keys
        shard = k.shard_of(conv)
        n = await self.store.scripts.flush(
            keys={"due": k.due(shard), "manual": k.manual(shard), "buffer": k.buffer(conv)},
            args={"conv": conv, "wake": k.wake})
        if not n:
            raise NotFound(f"conversation {conv} has no pending messages")
        return {"conversation": conv, "messages": int(n), "processing": processing}

    async def cleanup(self, *, purge_failed: bool = False) -> dict[str, int]:
        """Trim the finished-job indexes to JOB_RETENTION_DAYS (finishing a job trims its index
        too; this catches a shard where nothing finished lately): completed jobs whose records
        expired leave the index and the completed count (`completed_index`: how many).
        Records and hourly counters expire by themselves. With purge_failed, delete every
        failed job for good."""
        now = await self.now_ms()
        keep_ms = self.settings.job_retention_days * 86_400_000
        out = {"completed_index": 0, "skipped_index": 0, "failed_purged": 0}
        for shard in range(self.settings.shards):
            async with self.redis.pipeline(transaction=False) as pipe:
                await self.store.scripts.trimdone(
                    keys={"done": self.keys.done(shard), "donecount": self.keys.done_counts(shard),
                          "completed": self.keys.jobs(shard, "completed")},
                    args={"retention_ms": keep_ms}, client=pipe)
                pipe.zremrangebyscore(self.keys.jobs(shard, "skipped"), "-inf", now - keep_ms)
                pipe.zrange(self.keys.failed(shard), 0, -1)
                done, skipped, failed = await pipe.execute()
            out["completed_index"] += done
            out["skipped_index"] += skipped
            if purge_failed:
                for batch_id in map(decoded, failed):
                    out["failed_purged"] += await self.store.scripts.purge(
                        keys={"batch": self.keys.batch(batch_id), "messages": self.keys.messages(batch_id),
                              "failed": self.keys.failed(shard)},
                        args={"batch_id": batch_id})
        return out

    # -- logs ---------------------------------------------------------------------------------
    async def log(self, kind: str, count: int = 50) -> list[dict[str, Any]]:
        logs = self.keys.logs
        if kind not in logs:
            raise OpsError(f"log must be one of {', '.join(logs)}, got {kind!r}")
        # XREVRANGE answers a list (empty for no stream) of entries that each have an id and fields;
        # redis-py's type also allows the None a deleted entry gives in XCLAIM and XREADGROUP.
        entries = cast("list[tuple[bytes | str, dict[bytes | str, bytes | str]]]",
                       await self.redis.xrevrange(logs[kind], count=count))
        out = []
        for entry_id, fields in entries:
            row: dict[str, Any] = {decoded(k): decoded(v) for k, v in fields.items()}
            row = {k: int(v) if v.lstrip("-").isdigit() and k != "reason" else v
                   for k, v in row.items()}
            row["at"] = iso(row.pop("t", None)) or iso(decoded(entry_id).split("-")[0])
            out.append({"id": decoded(entry_id), **row})
        return out


def _figures(c: dict[str, int]) -> dict[str, Any]:
    return {
        "bursts": c["flushed"],
        "messages": c["messages"],
        "avg_messages_per_burst": round(c["messages"] / c["flushed"], 2) if c["flushed"] else None,
        # One LLM call per burst where answering each message would take one per message. A
        # superseded burst's messages are counted again in the burst that answers them, so with
        # superseded bursts this is an upper bound.
        "llm_calls_saved": c["messages"] - c["flushed"],
        "completed": c["completed"],
        "avg_first_message_to_reply_s":
            round(c["reply_ms"] / c["completed"] / 1000, 3) if c["completed"] else None,
        "avg_deadline_to_claim_ms": round(c["late_ms"] / c["flushed"], 1) if c["flushed"] else None,
        "skipped": c["skipped"],
        "failed": c["failed"],
        "superseded": c["superseded"],
        "by_trigger": {t: c[f"t:{t}"] for t in _TRIGGERS if c[f"t:{t}"]},
        "refused_messages": {r: c[r] for r in _REFUSALS if c[r]},
    }


def _job_view(h: dict[str, str]) -> dict[str, Any]:
    conv = h.get("conv", "")
    account, _, conversation_id = conv.partition(":")
    times = [_int(h.get(k)) for k in ("finished_ms", "error_ms", "requeued_ms", "claimed_ms")]
    return {
        "id": h.get("id", ""),
        "status": h.get("state", ""),
        "conversation": conv,
        "account_id": _int(account),
        "conversation_id": _int(conversation_id),
        "inbox_id": _int(h.get("inbox")) or None,
        "messages": _int(h.get("count")),
        "trigger": h.get("trigger", ""),
        "attempts": _int(h.get("attempts")),
        "first_message_at": iso(h.get("first_ms")),
        "deadline_at": iso(h.get("deadline_ms")),
        "claimed_at": iso(h.get("claimed_ms")),
        # Set when the LLM's reply was ready and its post began (before_post.lua).
        "posting_at": iso(h.get("posting_ms")),
        "processed_at": iso(h.get("finished_ms")),
        "requeued_at": iso(h.get("requeued_ms")),
        "error": h.get("error") or None,
        "reason": h.get("reason") or None,
        # A reply a takeover cut short: how many of its parts went out (processor.py).
        "note": h.get("note") or None,
        "media": h.get("media") or None,  # what the model could not see or hear, and why
        "reply_message_id": _int(h.get("reply_id")) or None,
        "_t": max(times),
    }
