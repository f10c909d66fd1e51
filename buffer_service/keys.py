"""Every Redis key and channel name of the service; nothing else spells one out.

Prefix `bs` (KEY_PREFIX), shard `{sN}` as a Redis Cluster hash tag: every key of a shard hashes
to one slot, and a conversation always maps to the same shard (crc32 of "<account>:<conv>"
modulo BUFFER_SHARDS), so every key one script touches lives in one slot.

    bs:{sN}:due              zset  conv -> deadline ms          (the deadline index)
    bs:{sN}:first            hash  conv -> first message ms of a pending burst in the json
                                   format (a compact burst's head holds it)
    bs:{sN}:buf:<conv>       list  pending messages of the burst, in arrival order: compact, a
                                   head "<first ms>[inbox,name,phone]" and a JSON array per
                                   message; json, a JSON object per message stamped with its
                                   arrival ms "t" (lib.lua: buffer formats; BUFFER_FORMAT)
    bs:{sN}:ttl:<conv>       string 1 with PX = time to deadline (expiry event = wake-up hint)
    bs:{sN}:seen:<acct>:<id> string with PX                     (webhook de-duplication; 'own'
                                   for a reply the bot posted, until its echo comes)
    bs:{sN}:hist:<conv>      list  recent messages, both sides  (prompt context): "<id>:<text>"
                                   ("a<id>:..." a reply) or JSON objects (lib.lua for_history)
    bs:{sN}:inflight         zset  batch id -> lease expiry or retry time
    bs:{sN}:active           hash  conv -> batch id             (one batch per conversation)
    bs:{sN}:batch:<id>       hash  job record of one flushed burst
    bs:{sN}:msgs:<id>        list  the burst's messages while the batch is unfinished
    bs:{sN}:failed           zset  batch id -> failure time
    bs:{sN}:jobs:<state>     zset  batch id -> finish time (skipped; completed as written before
                                   compact records: operators list jobs by it, trimmed to
                                   JOB_RETENTION_DAYS)
    bs:{sN}:done:<bucket>    hash  batch sequence -> compact record of a completed job (JSON
                                   array, lib.lua compact), bucket = sequence // 256, kept
                                   JOB_RETENTION_DAYS after its last write
    bs:{sN}:done             zset  bucket -> last write ms: the buckets that still live
    bs:{sN}:donecount        hash  bucket -> its number of records
    bs:{sN}:stats:<hour>     hash  hourly counters of flushes and outcomes, hour = epoch ms //
                                   3600000, kept 8 days (the monitoring figures of ops.py)
    bs:{sN}:manual           hash  conv -> 1: an operator flushed it (the claim labels it "manual")
    bs:{sN}:seq              counter for batch ids and fencing tokens
    bs:{sN}:handoff:<conv>   hash  reason, v: who is in charge, by the newest snapshot
                                   (lib.lua take_charge; reason '' = the bot)
    bs:{sN}:pause:<conv>     string with PX = HUMAN_PAUSE_MS    (a human agent wrote)
    bs:{sN}:sent:<conv>      zset  "<fingerprint>:<batch id>" -> post ms: replies we posted
                                   whose echo has not come yet (lib.lua own_add)
    bs:{sN}:rl:<conv>        string GCRA arrival time of the conversation's message limit
    bs:{sN}:llm:<conv>       zset  the conversation's LLM calls of the last hour (spend guard)
    bs:{sN}:tx:<acct>:<msg>:<n>       string  a voice note's transcript, JSON {"text"} or
                                              {"error", "reason"}, kept HISTORY_TTL_S
    bs:{sN}:txclaim:<acct>:<msg>:<n>  string  token of the process transcribing it, PX lease
    bs:{sN}:moving:0, :1     never exist: every script given the prefix asks for them first, so
                             that Redis refuses it while the slot moves (lib.lua whole_slot)
    bs:rl:global             string GCRA state of the limit of all conversations together
    bs:flags                 hash  feature flags (flags.py)
    bs:log:webhooks          stream, capped: one entry per webhook delivery (journal.py)
    bs:log:sweeps            stream, capped: one entry per worker per sweep period (journal.py)
    bs:wake                  pub/sub channel: "a deadline you do not know yet" as "<ms> <a key
                             of its shard>" (lib.lua wake_up; "<ms>" alone from older versions:
                             every shard), and flag changes

`conv` is "<account id>:<conversation display id>"; a batch id is "<shard>-<sequence>", so a
batch's keys are found from its id alone.

The untagged keys live in no shard: they are used by their own commands, never inside a shard's
script, except the global rate limit: on one server the append script takes it while that limit
is set; a Redis Cluster refuses a script whose keys span slots, so there the limit is checked by
a call of its own to its key's node before the append (globalrate.lua, store.py).

Lua scripts get the keys they touch as KEYS, built here. A script that finds the name of another
key only while it runs (a batch id read from an index, a conversation from a batch record)
builds it from the shard prefix it is passed as an argument (`prefix`, e.g. "bs:{s3}:") and one
of the names below, never by cutting up another key: same prefix, same hash tag, same slot.
This is the one rule that makes those undeclared keys safe on a Redis Cluster, where a script
runs on the node of its KEYS' slot and may touch only keys of that slot (docs/cluster.md;
tests/test_cluster.py checks it, and the integration suite runs on a cluster).
"""

from __future__ import annotations

import zlib

from .config import Settings

# Batch sequence numbers per bucket of compact job records (lib.lua compact uses the same).
DONE_BUCKET = 256


class Keys:
    def __init__(self, settings: Settings) -> None:
        self.base = settings.key_prefix
        self.shards = settings.shards
        self.flags = f"{self.base}:flags"
        self.wake = f"{self.base}:wake"
        self.global_rate = f"{self.base}:rl:global"
        self.logs = {"webhooks": f"{self.base}:log:webhooks", "sweeps": f"{self.base}:log:sweeps"}

    # -- shards -------------------------------------------------------------------------------
    def shard_of(self, conv: str) -> int:
        return zlib.crc32(conv.encode()) % self.shards

    @staticmethod
    def shard_of_batch(batch_id: str) -> int:
        return int(batch_id.split("-", 1)[0])

    def shard_of_key(self, name: str) -> int:
        """The shard of a per-shard key (its hash tag)."""
        return int(name[len(self.base) + 3:name.index("}")])

    def prefix(self, shard: int) -> str:
        """The shard's prefix, hash tag included: what scripts build run-time names from."""
        return f"{self.base}:{{s{shard}}}:"

    def is_deadline(self, name: str) -> bool:
        """Whether an expired key is a burst's TTL key (its expiry is a wake-up hint)."""
        return name.startswith(f"{self.base}:{{s") and ":ttl:" in name

    # -- per shard ------------------------------------------------------------------------------
    def due(self, shard: int) -> str:
        return self.prefix(shard) + "due"

    def first(self, shard: int) -> str:
        return self.prefix(shard) + "first"

    def inflight(self, shard: int) -> str:
        return self.prefix(shard) + "inflight"

    def active(self, shard: int) -> str:
        return self.prefix(shard) + "active"

    def seq(self, shard: int) -> str:
        return self.prefix(shard) + "seq"

    def failed(self, shard: int) -> str:
        return self.prefix(shard) + "failed"

    def manual(self, shard: int) -> str:
        return self.prefix(shard) + "manual"

    def jobs(self, shard: int, state: str) -> str:
        return self.prefix(shard) + f"jobs:{state}"

    def done(self, shard: int) -> str:
        return self.prefix(shard) + "done"

    def done_counts(self, shard: int) -> str:
        return self.prefix(shard) + "donecount"

    def done_bucket(self, shard: int, bucket: int) -> str:
        return self.prefix(shard) + f"done:{bucket}"

    def done_of(self, batch_id: str) -> tuple[str, str]:
        """The bucket and field of a completed job's compact record."""
        shard, _, seq = batch_id.partition("-")
        return self.done_bucket(int(shard), int(seq) // DONE_BUCKET), seq

    def stats(self, shard: int, hour: int) -> str:
        return self.prefix(shard) + f"stats:{hour}"

    # -- per conversation -----------------------------------------------------------------------
    def _conv(self, name: str, conv: str) -> str:
        return self.prefix(self.shard_of(conv)) + f"{name}:{conv}"

    def buffer(self, conv: str) -> str:
        return self._conv("buf", conv)

    def ttl(self, conv: str) -> str:
        return self._conv("ttl", conv)

    def history(self, conv: str) -> str:
        return self._conv("hist", conv)

    def handoff(self, conv: str) -> str:
        return self._conv("handoff", conv)

    def pause(self, conv: str) -> str:
        return self._conv("pause", conv)

    def sent(self, conv: str) -> str:
        return self._conv("sent", conv)

    def rate(self, conv: str) -> str:
        return self._conv("rl", conv)

    def llm_calls(self, conv: str) -> str:
        return self._conv("llm", conv)

    def seen(self, conv: str, message_id: int) -> str:
        """The de-duplication marker of one Chatwoot message of the conversation's account."""
        return self._message("seen", conv, message_id)

    def transcript(self, conv: str, message_id: int, index: int) -> str:
        return self._message("tx", conv, message_id, index)

    def transcript_claim(self, conv: str, message_id: int, index: int) -> str:
        return self._message("txclaim", conv, message_id, index)

    def _message(self, name: str, conv: str, message_id: int, *more: int) -> str:
        account = conv.split(":", 1)[0]
        return self.prefix(self.shard_of(conv)) + ":".join((name, account, str(message_id),
                                                             *map(str, more)))

    # -- per batch --------------------------------------------------------------------------------
    def batch(self, batch_id: str) -> str:
        return self.prefix(self.shard_of_batch(batch_id)) + f"batch:{batch_id}"

    def messages(self, batch_id: str) -> str:
        return self.prefix(self.shard_of_batch(batch_id)) + f"msgs:{batch_id}"
