"""Feature flags kept in Redis, changed at run time, seen by every process within a second.

One untagged hash (`bs:flags`, keys.py) holds them all: a flag is global, never part of a shard's
script, so it needs no hash tag and is read with its own command. Every process keeps a copy
that it reloads when it is older than `MAX_AGE_S`, so a webhook pays for one HGETALL every half
second at most, and a change made with `buffer-service flags set`, the admin API or
`scripts/set-flag.sh` (a plain HSET) reaches every webhook server and worker in under a second.

Gradual migration, as the Supabase guide had it: `buffering_inboxes` restricts buffering to
some inboxes, `buffering_percent` to a stable share of conversations (a hash of the
conversation picks its bucket, so a conversation never flips between paths); every other
message takes the unbuffered path (answered on its own, at once).
"""

from __future__ import annotations

import asyncio
import functools
import time
import zlib
from dataclasses import dataclass, field

import structlog

from .config import Settings
from .keys import Keys
from .redis_client import REDIS_ERRORS, AnyRedis

log = structlog.get_logger("buffer_service.flags")

MAX_AGE_S = 0.5
# How long a caller waits for a reload of a stale copy before it is served that copy (Flags).
RELOAD_WAIT_S = 0.2
_SLOW_OR_FAILED: tuple[type[Exception], ...] = (TimeoutError, *REDIS_ERRORS)
# The wake-up message that says "the flags changed" rather than "a deadline is due".
FLAGS_CHANGED = "flags"


class FlagError(ValueError):
    """An unknown flag or a value it cannot take; str() says which."""


@dataclass(frozen=True)
class FlagSpec:
    kind: str  # "bool" | "percent" | "ids"
    default: str
    description: str


FLAGS: dict[str, FlagSpec] = {
    "message_buffering": FlagSpec(
        "bool", "on", "off: every accepted message is answered on its own at once (rollback)"),
    "response_quality_enhancement": FlagSpec(
        "bool", "on", "on: the prompt carries the conversation history and the contact's name"),
    "processing": FlagSpec(
        "bool", "on", "off: messages are still buffered but no worker claims anything"),
    "buffering_inboxes": FlagSpec(
        "ids", "", "comma list of inbox ids that are buffered; empty: every inbox"),
    "buffering_percent": FlagSpec(
        "percent", "100", "share of conversations (0-100, stable per conversation) that are buffered"),
}

_TRUE = ("on", "1", "true", "yes")
_FALSE = ("off", "0", "false", "no")


def normalize(name: str, value: str) -> str:
    """The stored form of a flag value; raises FlagError for an unknown flag or a bad value."""
    spec = FLAGS.get(name)
    if spec is None:
        raise FlagError(f"unknown flag {name!r}; flags: {', '.join(FLAGS)}")
    raw = value.strip().lower()
    if spec.kind == "bool":
        if raw in _TRUE:
            return "on"
        if raw in _FALSE:
            return "off"
        raise FlagError(f"{name}: expected on or off, got {value!r}")
    if spec.kind == "percent":
        if raw.isdigit() and 0 <= int(raw) <= 100:
            return str(int(raw))
        raise FlagError(f"{name}: expected a whole number from 0 to 100, got {value!r}")
    ids = [part.strip() for part in raw.replace(" ", ",").split(",") if part.strip()]
    if not all(part.isdigit() and int(part) > 0 for part in ids):
        raise FlagError(f"{name}: expected a comma list of inbox ids, got {value!r}")
    return ",".join(str(i) for i in sorted({int(part) for part in ids}))


def _percent_bucket(conv: str) -> int:
    # Salted so the bucket does not follow the shard number (crc32(conv) % shards).
    return zlib.crc32(b"buffering:" + conv.encode()) % 100


@dataclass(frozen=True)
class FlagValues:
    raw: dict[str, str] = field(default_factory=dict)

    def value(self, name: str) -> str:
        return self.raw.get(name) or FLAGS[name].default

    def on(self, name: str) -> bool:
        return self.value(name) == "on"

    @property
    def message_buffering(self) -> bool:
        return self.on("message_buffering")

    @property
    def response_quality_enhancement(self) -> bool:
        return self.on("response_quality_enhancement")

    @property
    def processing(self) -> bool:
        return self.on("processing")

    # Parsed once per reload rather than on every webhook (buffers()); the values never change.
    @functools.cached_property
    def buffering_inboxes(self) -> frozenset[int]:
        return frozenset(int(i) for i in self.value("buffering_inboxes").split(",") if i)

    @functools.cached_property
    def buffering_percent(self) -> int:
        return int(self.value("buffering_percent"))

    def buffers(self, conv: str, inbox_id: int | None) -> bool:
        """Whether this conversation's messages wait for a burst (else: answered at once)."""
        if not self.message_buffering:
            return False
        inboxes = self.buffering_inboxes
        if inboxes and inbox_id not in inboxes:
            return False
        percent = self.buffering_percent
        return percent >= 100 or _percent_bucket(conv) < percent


def _parse(raw: dict[bytes | str, bytes | str]) -> FlagValues:
    values: dict[str, str] = {}
    for k, v in raw.items():
        name = k.decode() if isinstance(k, bytes) else k
        text = v.decode() if isinstance(v, bytes) else v
        if name not in FLAGS:
            continue
        try:
            values[name] = normalize(name, text)
        except FlagError as exc:
            # A hand-typed HSET with a typo must not stop the service: the default holds.
            log.warning("flag_value_invalid", flag=name, error=str(exc))
    return FlagValues(values)


class Flags:
    """This process's view of the flags: reloaded from Redis when older than MAX_AGE_S.

    `bs:flags` lives in one slot, on one node of a cluster. A reload that node does not answer
    (a hang waits out the client's socket timeouts, 5 s an attempt) must not hold up a webhook
    or the worker loop, whose own keys may all be on healthy nodes: a caller waits for a reload
    at most RELOAD_WAIT_S and is then served the last loaded copy, while the reload goes on in
    the background (one at a time). Staleness: while the flags' node answers, a copy is at most
    MAX_AGE_S + RELOAD_WAIT_S old; while it does not, the last copy holds until it answers
    again. A change cannot be written to a node that does not answer, so what the copy can miss
    is a change made just before the hang; a worker told of it (FLAGS_CHANGED) drops its copy,
    and `processing` then counts as off until a reload succeeds (the rollback switch is never
    missed by a worker that heard of it)."""

    def __init__(self, redis: AnyRedis, settings: Settings, max_age_s: float = MAX_AGE_S) -> None:
        self.redis = redis
        keys = Keys(settings)
        self.key = keys.flags
        self.wake_channel = keys.wake
        self.max_age_s = max_age_s
        self._values: FlagValues | None = None
        self._loaded_at = 0.0
        self._reload: asyncio.Task[FlagValues] | None = None
        self._reload_started = 0.0
        # Counts invalidations: a reload that was sent before one may have read the hash before
        # the change it announces, so its answer must not become the copy.
        self._generation = 0

    async def current(self, deadline: float | None = None) -> FlagValues:
        """The flags as last loaded, reloaded first if the copy is stale and the reload answers
        within RELOAD_WAIT_S of its start. With no copy at all (start, or dropped by
        `invalidate`), waits for the reload until `deadline` (event-loop time; None: its own
        timeouts), then TimeoutError. Only a reload has a timer: the copy in hand costs none."""
        if self._values is not None and time.monotonic() - self._loaded_at < self.max_age_s:
            return self._values
        now = asyncio.get_running_loop().time()
        reload = self._reload
        if reload is None:  # one reload for all the callers that found the copy stale
            self._reload_started = now
            reload = self._reload = asyncio.create_task(self._load())
            reload.add_done_callback(self._reloaded)
        if self._values is not None:
            deadline = self._reload_started + RELOAD_WAIT_S
        try:
            # Shielded: a caller that gives up (its budget spent) leaves the reload to the others.
            return await asyncio.wait_for(asyncio.shield(reload),
                                          None if deadline is None else max(deadline - now, 0.0))
        except _SLOW_OR_FAILED:
            if self._values is None:
                raise
            # Slow or failed: the last view holds until a reload succeeds. (Without Redis
            # nothing is buffered or claimed anyway.)
            return self._values

    async def processing(self) -> bool:
        """The worker's switch. Unreadable, or without a copy and not loaded within
        RELOAD_WAIT_S, counts as off: claiming would fail just the same, or the loop would wait
        on a node that holds none of its work (it asks again MAX_AGE_S later)."""
        try:
            deadline = asyncio.get_running_loop().time() + RELOAD_WAIT_S
            return (await self.current(deadline)).processing
        except _SLOW_OR_FAILED as exc:
            log.warning("flags_unavailable", error=str(exc) or f"no answer within {RELOAD_WAIT_S} s")
            return False

    async def _load(self) -> FlagValues:
        started, generation = time.monotonic(), self._generation
        values = _parse(await self.redis.hgetall(self.key))
        if generation == self._generation:
            self._values, self._loaded_at = values, started
        return values

    def _reloaded(self, reload: asyncio.Task[FlagValues]) -> None:
        if self._reload is reload:  # not one that an invalidation left behind
            self._reload = None
        if not reload.cancelled():
            reload.exception()  # retrieved: a caller that waited for it has seen it

    async def set(self, name: str, value: str) -> str:
        stored = normalize(name, value)
        await self.redis.hset(self.key, name, stored)
        # Workers drop their cached copy and look again at once (worker.py, Worker._listen) instead of
        # at their next reload, so `processing off` followed by a flush does not race.
        await self.redis.publish(self.wake_channel, FLAGS_CHANGED)
        self.invalidate()
        return stored

    def invalidate(self) -> None:
        """The flags changed: drop the copy, and the reload under way (its answer may predate
        the change; the next look starts one that does not)."""
        self._values = None
        self._generation += 1
        self._reload = None

    async def table(self) -> list[dict[str, str]]:
        """Every flag with its value, its default and what it does (for `flags` listings)."""
        self.invalidate()
        values = await self.current()
        return [
            {"name": name, "kind": spec.kind, "value": values.value(name), "default": spec.default,
             "set": "yes" if name in values.raw else "no", "description": spec.description}
            for name, spec in FLAGS.items()
        ]
