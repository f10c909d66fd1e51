"""Which shards a worker claims from now, and when next: its memory of each shard's last claim.

Claiming from every shard on every wake-up cost a round trip each (16 by default) for one burst;
the worker claims only from a shard that has work by now (worker.py says why, BENCHMARKS.md §8
what it saved). That needs a memory the worker loop should not have to spell out: each shard's
next time as its last claim said it, what wake-ups and expiry events said since, the periodic
full sweep that makes up for any of them missed, and each shard's clock offset (a cluster's
nodes may differ in clock) that turns a wake-up's Redis time into loop time.

Times are loop seconds (`loop.time()`), passed in by the caller: the class reads no clock, so
that its decisions can be tested without waiting.
"""

from __future__ import annotations

import collections
import math
from collections.abc import Collection
from dataclasses import dataclass

# After a failed claim a shard is tried again this much later, not on every wake-up meanwhile:
# Redis may be away, and the other shards must still be served.
_RETRY_FAILED_S = 1.0


@dataclass(frozen=True, slots=True)
class Claim:
    """A claim under way: its shard, the loop time it was sent, and the wake-ups counted then
    (for itself and for all), so that its answer can tell whether a wake-up crossed it."""
    shard: int
    sent: float
    looks: tuple[int, int]


class ClaimSchedule:
    def __init__(self, shards: int, interval_s: float) -> None:
        self.shards = shards
        self.interval_s = interval_s  # between full sweeps: BUFFER_PROCESSING_INTERVAL_MS
        # Shard -> loop time at which its last claim said it has work next (inf: none); a
        # shard missing is claimed from at the next sweep.
        self._due: dict[int, float] = {}
        # Wake-ups per shard and for all, so that a claim's answer that crossed a wake-up for
        # its shard is not taken for the last word (its shard is claimed from again).
        self._looks: collections.Counter[int] = collections.Counter()
        self._looks_all = 0
        self._full_sweep_at = 0.0
        # Shard -> Redis ms minus loop seconds x 1000 as of its last claim: turns a Redis time
        # into loop time. The loop clock is read before the claim is sent, so whatever its
        # answer took makes a wake-up early (a spare claim), never late.
        self._offset_ms: dict[int, float] = {}

    def look(self, shard: int | None = None) -> None:
        """Claim from `shard` (None, or a shard this worker does not know: from every shard) at
        the next sweep."""
        if shard is None or not 0 <= shard < self.shards:
            self._due.clear()
            self._looks_all += 1
        else:
            self._due.pop(shard, None)
            self._looks[shard] += 1

    def due_at(self, shard: int | None, at_ms: float) -> None:
        """A wake-up says `shard` has work at Redis time `at_ms` (nan: unreadable): a shard
        whose next time and clock offset are known only moves its time earlier (no claim
        before then), any other is looked at."""
        known = self._due.get(shard) if shard is not None else None
        offset = self._offset_ms.get(shard) if shard is not None else None
        if shard is None or known is None or offset is None or math.isnan(at_ms):
            self.look(shard)
            return
        self._due[shard] = min(known, (at_ms - offset) / 1000)
        self._looks[shard] += 1  # a claim running now may answer without this deadline

    def start_sweep(self, now: float) -> None:
        """The safety net: every shard at least every `interval_s`, whatever it said."""
        if now >= self._full_sweep_at:
            self._due.clear()
            self._full_sweep_at = now + self.interval_s

    def is_due(self, shard: int, now: float) -> bool:
        return self._due.get(shard, -math.inf) <= now

    def claiming(self, shard: int, now: float) -> Claim:
        """Note a claim about to be sent from `shard` at loop time `now`."""
        return Claim(shard, now, (self._looks_all, self._looks[shard]))

    def claimed(self, claim: Claim, redis_ms: int, next_ms: int) -> None:
        """The claim's answer: Redis's time when it ran, and the shard's next time (-1: none)."""
        offset = self._offset_ms[claim.shard] = redis_ms - claim.sent * 1000
        if claim.looks != (self._looks_all, self._looks[claim.shard]):
            self._due.pop(claim.shard, None)  # woken for it meanwhile: its answer may be old
        else:
            self._due[claim.shard] = (next_ms - offset) / 1000 if next_ms >= 0 else math.inf

    def failed(self, shard: int, now: float) -> None:
        self._due[shard] = now + _RETRY_FAILED_S

    def until_full_sweep(self, now: float) -> float:
        """Seconds until the next full sweep: the sleep of a worker with no free slot (a
        finishing batch wakes it)."""
        return self._full_sweep_at - now

    def until_next(self, now: float, waiting: Collection[int] = ()) -> float:
        """Seconds until the first shard has work or the next full sweep; 0 while any shard's
        time is not known (woken for while its claim ran, or not claimed from this sweep).
        `waiting`: shards left out, whose claims are under way or queued behind one (the end
        of those claims wakes the worker)."""
        ours = [shard for shard in range(self.shards) if shard not in waiting]
        if any(shard not in self._due for shard in ours):
            return 0.0
        first = min((self._due[shard] for shard in ours), default=math.inf)
        return max(0.0, min(first, self._full_sweep_at) - now)
