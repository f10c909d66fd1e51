"""ClaimSchedule's decisions, in loop seconds passed in (no clock, no Redis)."""

from __future__ import annotations

import math

from buffer_service.schedule import ClaimSchedule

SHARDS = 4
INTERVAL_S = 2.0


def _swept(t: float = 0.0, *, offsets_ms: dict[int, float] | None = None,
           next_s: float = 100.0) -> ClaimSchedule:
    """A schedule after a full sweep at loop time `t` in which every shard's claim answered
    "next work at t + next_s"; Redis's clock is the loop's plus each shard's offset."""
    offsets_ms = offsets_ms or {}
    schedule = ClaimSchedule(SHARDS, INTERVAL_S)
    schedule.start_sweep(t)
    for shard in range(SHARDS):
        assert schedule.is_due(shard, t)
        claim = schedule.claiming(shard, t)
        offset = offsets_ms.get(shard, 0.0)
        schedule.claimed(claim, int(t * 1000 + offset), int((t + next_s) * 1000 + offset))
    return schedule


def _due(schedule: ClaimSchedule, t: float) -> list[int]:
    return [shard for shard in range(SHARDS) if schedule.is_due(shard, t)]


def test_a_wakeup_for_one_shard_makes_only_that_shard_due():
    schedule = _swept()
    assert _due(schedule, 1.0) == []
    schedule.look(2)
    assert _due(schedule, 1.0) == [2]
    assert schedule.until_next(1.0) == 0.0


def test_a_wakeup_that_names_no_shard_or_an_unknown_one_makes_every_shard_due():
    for named in (None, SHARDS):
        schedule = _swept()
        schedule.look(named)
        assert _due(schedule, 1.0) == list(range(SHARDS))


def test_every_shard_is_claimed_from_again_at_the_periodic_full_sweep_and_not_before():
    schedule = _swept(0.0, next_s=100.0)
    assert schedule.until_next(0.0) == INTERVAL_S  # the full sweep comes before any deadline
    schedule.start_sweep(INTERVAL_S - 0.01)
    assert _due(schedule, INTERVAL_S - 0.01) == []
    schedule.start_sweep(INTERVAL_S)
    assert _due(schedule, INTERVAL_S) == list(range(SHARDS))
    assert schedule.until_full_sweep(INTERVAL_S) == INTERVAL_S


def test_a_wakeups_redis_time_is_turned_into_loop_time_with_its_own_shards_clock_offset():
    # Shard 1's node runs 5 s ahead of shard 0's (a cluster's nodes may differ in clock).
    schedule = _swept(0.0, offsets_ms={0: 0.0, 1: 5000.0}, next_s=100.0)
    schedule.due_at(0, 1000.0)  # Redis time 1 s on shard 0's node: loop time 1 s
    schedule.due_at(1, 6000.0)  # Redis time 6 s on shard 1's node: loop time 1 s too
    assert _due(schedule, 0.99) == []
    assert _due(schedule, 1.0) == [0, 1]
    schedule.due_at(2, 500.0)  # a wake-up only moves a known time earlier ...
    schedule.due_at(2, 50_000.0)  # ... never later
    assert _due(schedule, 0.5) == [2]


def test_a_wakeup_for_a_shard_whose_clock_offset_is_not_known_makes_it_due_now():
    schedule = ClaimSchedule(SHARDS, INTERVAL_S)
    schedule.due_at(3, 1_000_000.0)
    assert schedule.is_due(3, 0.0)
    schedule = _swept()
    schedule.due_at(3, math.nan)  # an unreadable time
    assert _due(schedule, 1.0) == [3]


def test_a_claims_answer_crossed_by_a_wakeup_for_its_shard_is_not_the_last_word():
    schedule = ClaimSchedule(SHARDS, INTERVAL_S)
    schedule.start_sweep(0.0)
    claim = schedule.claiming(1, 0.0)
    schedule.due_at(1, 10.0)  # arrives while the claim runs (its shard's time is not known yet)
    schedule.claimed(claim, 0, 100_000)  # "nothing before 100 s": may predate the wake-up
    assert schedule.is_due(1, 0.0)
    claim = schedule.claiming(1, 0.0)
    schedule.look(2)  # a wake-up for another shard does not make shard 1's answer old
    schedule.claimed(claim, 0, 100_000)
    assert not schedule.is_due(1, 1.0)


def test_a_shard_whose_claim_failed_is_tried_again_a_second_later_not_on_every_sweep():
    schedule = _swept()
    schedule.look(0)
    schedule.failed(0, 1.0)
    assert not schedule.is_due(0, 1.5)
    assert schedule.is_due(0, 2.0)
