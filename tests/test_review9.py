"""Adversarial review of fix8 (b409872): claims per node in tasks of their own (claims.py) and
the topology check read from one node (redis_client.primary_names). Each test shows one finding
against the real service code and fails until it is fixed.

The cluster tests stop a primary with SIGSTOP, as tests/test_review8.py does: a node that
neither answers nor resets its connections (a frozen VM, a partition that drops packets)."""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import structlog
from helpers import wait_for
from test_review8 import (  # noqa: F401
    _answered_while_hung,
    _cluster_store,
    _hung,
    _Layout,
    _msg,
    _slot_owners,
    patient_cluster,
)

from buffer_service import worker
from buffer_service.config import Settings
from buffer_service.keys import Keys
from devtools.chatwoot_standin import ChatwootStandIn
from devtools.redis_server import RedisClusterServers


# -- 1. a hung node's claims hold the only free slot for every one of its shards -------------------
async def test_a_hung_primary_does_not_hold_the_only_slot_for_minutes(
        settings: Settings, patient_cluster: RedisClusterServers,  # noqa: F811
        make_service, chatwoot: ChatwootStandIn, llm: Any) -> None:
    """Finding (claims.py, Claims._chain): a node's chain holds its share of the free slots until
    it ends, and it does not end at a failed claim: it goes on to the node's next shard, which
    waits out the socket timeouts again (about 20 s a claim). A primary that hangs thus holds its
    share for 20 s times its shards (six of 16 here: two minutes), and claims again a second after
    (ClaimSchedule.failed); seen: claim_failed for shard 9, then 12 s later for shard 13, one chain.
    When a worker has one free slot (WORKER_CONCURRENCY=1, or every other slot busy with a
    batch) the hung primary's share is that slot, and no burst of the healthy primaries is
    claimed meanwhile: the stall review8's first finding was about, back for small workers (and
    for a busy large one, with fewer slots for the healthy primaries for minutes).
    User impact: late replies, minutes, on the primaries that answer.
    Scenario: WORKER_CONCURRENCY=1; the primary holding shard 0 (not the flags or the sweep log)
    is stopped; four seconds later bursts due at once arrive in three conversations of the other
    primaries.
    Expected: they are answered within seconds while that primary still hangs (as with the
    default concurrency, test_review8.py's first test).
    Fix: a chain ends (and frees its slots) at its node's first failed claim, and a claim to a
    node that does not answer gives up well before the socket timeouts (its batches, if it ran,
    wait for their lease); or slots are not held by a claim that has not answered."""
    layout = _Layout(settings, patient_cluster, Keys(settings).due(0))
    assert layout.victim_port not in {layout.node_of(k) for k in
                                      (layout.keys.flags, layout.keys.logs["sweeps"])}
    s = replace(settings, redis_url=patient_cluster.url, worker_concurrency=1)
    # Four seconds: two periodic sweeps have reached the hung primary's shards.
    await _answered_while_hung(s, layout, make_service, chatwoot, conversations=3, hung_for_s=4)




# -- 2. the topology check after the cluster client closed itself -----------------------------------
@pytest.fixture
def quick_cluster(tmp_path: Path) -> Iterator[RedisClusterServers]:
    """Three primaries, no replica, a node timeout of a second: a stopped primary is flagged
    FAIL and the cluster goes down (CLUSTERDOWN) within seconds, as in a failover's window."""
    servers = RedisClusterServers(tmp_path / "cluster").start()
    yield servers
    for node in servers.nodes:
        if node.proc and node.proc.poll() is None:
            node.proc.send_signal(signal.SIGCONT)
    servers.stop()


async def test_the_topology_check_is_no_unforeseen_error_while_the_cluster_is_down(
        settings: Settings, quick_cluster: RedisClusterServers, make_service,
        chatwoot: ChatwootStandIn, llm: Any) -> None:
    """Finding (fix8's primary_names, redis_client.py): it reads CLUSTER SLOTS through
    `redis.get_default_node()`, which redis-py sets to None whenever a refresh of its slot map
    fails (RedisCluster.initialize closes the NodesManager on any error, a cancellation too) or a
    command is answered CLUSTERDOWN, until a refresh succeeds. A primary that hangs or dies makes
    the worker's claims and reloads refresh the map, and some of those fail; the next topology
    check (every TOPOLOGY_CHECK_S) then fails with AttributeError: 'NoneType' object has no
    attribute 'execute_command'. Worker._listen takes it for an unforeseen bug:
    wakeup_listener_failed, an error with a traceback, on a node failure. Every subscription is
    made again either way, and the look at every shard made then covers the wake-ups missed, so
    no reply is lost or late for it: the impact is an alarm that reads like a bug (and would
    hide a real one) whenever a node fails, and the subscriptions torn down with it.
    Scenario: a cluster whose node timeout is a second; the primary holding shard 0 stopped
    (SIGSTOP) for up to 24 s: flagged FAIL, claims to it fail ("Connection closed by server").
    Expected: no wakeup_listener_failed (a lost subscription, if any, is a Redis error:
    wakeup_subscription_lost). On main: wakeup_listener_failed with that AttributeError.
    Fix: with no default node (or one that does not answer), refresh the slot map
    (NodesManager.initialize) or ask another primary."""
    layout = _Layout(settings, quick_cluster, Keys(settings).due(0))
    probe = layout.healthy(1)[0]
    s = replace(settings, redis_url=quick_cluster.url)
    store = await _cluster_store(s)

    def failed() -> list[dict[str, Any]]:
        return [e for e in logged if e["event"] == "wakeup_listener_failed"]

    try:
        with structlog.testing.capture_logs() as logged:
            await make_service(s, http=False)
            await store.append(_msg(probe, 1, "probe"), buffered=False)
            await wait_for(lambda: bool(chatwoot.posts_for(probe)), timeout=15)
            with _hung(layout.victim):
                # Flagged FAIL within a few seconds; then topology checks and sweeps. Not every
                # check finds the client without a default node: until one does, or four.
                with contextlib.suppress(AssertionError):
                    await wait_for(lambda: bool(failed()), timeout=4 * worker.TOPOLOGY_CHECK_S + 4)
    finally:
        await store.redis.aclose()
    assert not failed(), [repr(e.get("exc_info")) for e in failed()]
