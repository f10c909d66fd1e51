"""Adversarial review of the wake-up subscription's heartbeat (457109c) and the failover paths
around it on a Redis Cluster. Each test shows one finding against the real service code and
fails until it is fixed.

The cluster tests stop a primary with SIGSTOP: a node that neither answers nor resets its
connections, as a frozen VM, a host whose kernel hangs or a network partition that drops packets
leaves it. Their cluster's node timeout (30 s) outlasts the tests, so the stopped primary is
neither failed over nor flagged FAIL: the cluster keeps serving the other primaries' slots, as a
production cluster does for cluster-node-timeout (15 s by default) and for as long as the hang
lasts when no replica can take over."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import structlog
from helpers import wait_for
from redis.asyncio.cluster import RedisCluster
from redis.crc import key_slot

from buffer_service import redis_client, service, worker
from buffer_service.chatwoot import ChatMessage
from buffer_service.config import Settings
from buffer_service.flags import FLAGS_CHANGED, Flags
from buffer_service.keys import Keys
from buffer_service.store import BufferStore
from devtools.chatwoot_standin import ChatwootStandIn
from devtools.payloads import message_payload
from devtools.redis_server import RedisClusterServers, RedisServer


@pytest.fixture
def patient_cluster(tmp_path: Path) -> Iterator[RedisClusterServers]:
    """Three primaries, no replica, a node timeout longer than any test here (see the module)."""
    servers = RedisClusterServers(tmp_path / "cluster", node_timeout_ms=30_000).start()
    yield servers
    for node in servers.nodes:
        if node.proc and node.proc.poll() is None:
            node.proc.send_signal(signal.SIGCONT)
    servers.stop()


@contextlib.contextmanager
def _hung(node: RedisServer) -> Iterator[None]:
    """The node stops answering, its connections stay open (no reset, no refusal)."""
    assert node.proc is not None
    node.proc.send_signal(signal.SIGSTOP)
    try:
        yield
    finally:
        node.proc.send_signal(signal.SIGCONT)


def _slot_owners(cluster: RedisClusterServers) -> dict[int, int]:
    """slot -> port of the primary that holds it."""
    out = subprocess.run(["redis-cli", "-p", str(cluster.nodes[0].port), "CLUSTER", "NODES"],
                         capture_output=True, text=True, timeout=5, check=True).stdout
    owner = {}
    for line in out.splitlines():
        fields = line.split()
        if "master" in fields[2]:
            port = int(fields[1].split("@")[0].rsplit(":", 1)[1])
            for span in fields[8:]:
                low, _, high = span.partition("-")
                for slot in range(int(low), int(high or low) + 1):
                    owner[slot] = port
    return owner


class _Layout:
    """Which primary holds what: the one to stop, and conversations whose shards are elsewhere."""

    def __init__(self, settings: Settings, cluster: RedisClusterServers, victim_key: str) -> None:
        self.keys = Keys(settings)
        self.owner = _slot_owners(cluster)
        self.victim_port = self.node_of(victim_key)
        self.victim = next(n for n in cluster.nodes if n.port == self.victim_port)

    def node_of(self, key: str) -> int:
        return self.owner[key_slot(key.encode())]

    def healthy(self, count: int) -> list[int]:
        """Conversations of account 1 whose shard is not on the victim."""
        convs = (c for c in range(1, 1000)
                 if self.node_of(self.keys.due(self.keys.shard_of(f"1:{c}"))) != self.victim_port)
        return [next(convs) for _ in range(count)]


async def _cluster_store(settings: Settings) -> BufferStore:
    return BufferStore(await redis_client.connect(replace(settings, redis_mode="cluster")), settings)


def _msg(conversation_id: int, message_id: int, text: str) -> ChatMessage:
    return ChatMessage(1, conversation_id, message_id, text, inbox_id=1)

async def _answered_while_hung(s: Settings, layout: _Layout, make_service: Any,
                               chatwoot: ChatwootStandIn, *, conversations: int,
                               hung_for_s: float) -> None:
    """The service answers a probe; then `layout.victim` hangs, and `hung_for_s` later a burst
    due at once in each of `conversations` conversations of the healthy primaries must be
    answered within 8 s."""
    probe, *convs = layout.healthy(conversations + 1)
    store = await _cluster_store(s)
    try:
        await make_service(s, http=False)
        await store.append(_msg(probe, 1, "probe"), buffered=False)
        await wait_for(lambda: bool(chatwoot.posts_for(probe)), timeout=15)
        with _hung(layout.victim):
            await asyncio.sleep(hung_for_s)
            for conv in convs:
                await store.append(_msg(conv, 100 + conv, "anyone there?"), buffered=False)
            await wait_for(lambda: all(chatwoot.posts_for(c) for c in convs), timeout=8)
    finally:
        await store.redis.aclose()



# -- 1. a hung primary holds up every shard's claims ------------------------------------------------
async def test_a_hung_primary_does_not_hold_up_the_bursts_of_the_other_primaries(
        settings: Settings, patient_cluster: RedisClusterServers, make_service,
        chatwoot: ChatwootStandIn, llm: Any) -> None:
    """Finding (older than 457109c, whose re-subscription is one of its triggers): Worker._sweep
    claims shard after shard, each claim awaited before the next. A claim sent to a primary that
    hangs waits out the cluster client's socket timeout on every attempt: 5 s x 4 attempts, 20 s
    (measured), then claim_failed, and the next shard of that primary waits as long again. The
    periodic sweep (BUFFER_PROCESSING_INTERVAL_MS) and the look at every shard made after a
    re-subscription (the heartbeat gives up on the hung primary's subscription after about 6 s)
    send the sweep there, and from then on no burst of the healthy primaries is claimed: a
    third of the cluster hanging stops the replies of all of it, for minutes (six of the 16
    shards live on the stopped primary here: two minutes a sweep).
    Scenario: the primary holding shard 0 (not the flags or the sweep log) is stopped; four
    seconds later bursts due at once arrive in three conversations of the other primaries.
    Expected: they are answered within seconds while that primary still hangs.
    Fix: claim each primary's shards apart from the others' (concurrently, or with a short
    bound on a claim and the shard looked at again later), so that one node's silence only
    delays its own shards."""
    layout = _Layout(settings, patient_cluster, Keys(settings).due(0))
    assert layout.victim_port not in {layout.node_of(k) for k in
                                      (layout.keys.flags, layout.keys.logs["sweeps"])}
    s = replace(settings, redis_url=patient_cluster.url)  # a periodic sweep every 2 s
    # Four seconds: two periodic sweeps have reached the hung primary's shards.
    await _answered_while_hung(s, layout, make_service, chatwoot, conversations=3, hung_for_s=4)


# -- 2./3. a hung primary that holds the flags (or the sweep log) stops the whole service -----------
async def test_a_webhook_is_acknowledged_while_the_primary_holding_the_flags_hangs(
        settings: Settings, patient_cluster: RedisClusterServers, make_service,
        chatwoot: ChatwootStandIn, llm: Any) -> None:
    """Finding (older than the reviewed commits, met while failing primaries over): every
    webhook reads the feature flags (app._buffer: Flags.current), reloaded from Redis once the
    copy is MAX_AGE_S (0.5 s) old, one reload at a time under a lock. `bs:flags` lives in one
    slot, on one primary. While that primary hangs, the reload waits out the client's socket
    timeouts (5 s x 4 attempts) and every webhook, for any conversation on any primary, waits
    behind it until its Redis budget is spent: 500. The cached copy is served only when the
    reload fails with an error, never when it hangs. Chatwoot tries an agent bot's webhook 3
    times 3 s apart, then opens the conversation for humans: a hang of one primary longer than
    about 12 s (shorter than the default cluster-node-timeout) hands every conversation that
    writes meanwhile to humans, although its own shard is served.
    Expected: a webhook for a conversation whose shard is on a healthy primary is acknowledged
    (200, buffered) while the flags' primary hangs.
    Fix: serve the last loaded flags while a reload is pending (reload with a short bound, or
    in the background), as is already done when the reload fails."""
    layout = _Layout(settings, patient_cluster, Keys(settings).flags)
    probe, conv = layout.healthy(2)
    s = replace(settings, redis_url=patient_cluster.url)
    svc = await make_service(s, worker=False)
    status, body = await svc.post("/webhooks/chatwoot",
                                  message_payload(message_id=1, conversation_id=probe, content="a"))
    assert (status, body["status"]) == (200, "buffered")
    with _hung(layout.victim):
        await asyncio.sleep(1)  # the flags' copy is stale now
        started = time.monotonic()
        status, body = await svc.post("/webhooks/chatwoot", message_payload(
            message_id=2, conversation_id=conv, content="still there?"))
        took = time.monotonic() - started
    assert (status, body.get("status")) == (200, "buffered"), (status, body, f"{took:.1f} s")


async def test_bursts_are_answered_while_the_primary_holding_the_flags_and_sweep_log_hangs(
        settings: Settings, patient_cluster: RedisClusterServers, make_service,
        chatwoot: ChatwootStandIn, llm: Any) -> None:
    """Finding (older than the reviewed commits): the worker loop awaits two calls to keys
    outside every shard on each turn: Flags.processing() (a reload of `bs:flags` when the copy
    is 0.5 s old) and SweepLog.swept() (an XADD to `bs:log:sweeps` once a sweep period). Both
    keys hash to slots of the same primary here (1496 and 4063). While it hangs, the loop waits
    out the socket timeouts (20 s a call) before each sweep, so no burst of any primary is
    claimed: late replies everywhere for as long as one primary hangs.
    Scenario: that primary is stopped; a burst due at once arrives in a conversation whose shard
    is on another primary. Expected: answered within seconds while the primary still hangs.
    Fix: the loop must not wait on a node that holds none of the work: serve the last flags
    while a reload is pending (see the webhook test above) and write the sweep log without
    holding up the sweep (in the background, or with a short bound)."""
    layout = _Layout(settings, patient_cluster, Keys(settings).flags)
    assert layout.node_of(layout.keys.logs["sweeps"]) == layout.victim_port
    s = replace(settings, redis_url=patient_cluster.url, processing_interval_ms=1000)
    # 1.5 s: the flags' copy is stale and a sweep period is over.
    await _answered_while_hung(s, layout, make_service, chatwoot, conversations=1, hung_for_s=1.5)


# -- 4. the heartbeat takes a busy event loop for a dead connection --------------------------------
async def test_a_busy_event_loop_is_not_taken_for_a_dead_subscription(
        settings: Settings, redis: Any, make_service, monkeypatch: pytest.MonkeyPatch) -> None:
    """Finding (457109c): worker._heard takes a subscription for lost when nothing was heard
    for 1.5 x HEARTBEAT_S, assuming "a PING went out a HEARTBEAT_S ago". That holds only if the
    loop ran on time: when the event loop is held up (a GC pause, CPU-bound work of a batch, a
    slow synchronous call) for more than half a heartbeat while the subscription is quiet, the
    read's timeout fires late, no PING has been sent at all, and the healthy subscription is
    torn down and made again: a misleading warning ("no answer to a PING within 3.0 s"), a
    CONFIG GET, a claim from every shard, and on a cluster every primary's subscription and a
    slot-map refresh, which marks every connection of the shared client for reconnect. Under
    load, where such stalls happen, that is the work least wanted.
    Scenario (HEARTBEAT_S shortened to 0.3 s so that the test is quick): right after the
    subscription heard a message, the loop is busy for 1 s; then it runs normally.
    Expected: no new subscription: a PING goes out and is answered. Fix: count the silence from
    the PING actually sent (and only once one was sent), not from the last message."""
    if isinstance(redis, RedisCluster):
        pytest.skip("one subscription: the stall starts right after it heard a message")
    monkeypatch.setattr(worker, "HEARTBEAT_S", 0.3)
    subscribed: list[float] = []
    real_nodes = redis_client.subscription_nodes

    async def subscription_nodes(*args: Any) -> Any:
        subscribed.append(time.monotonic())
        return await real_nodes(*args)

    stalls = {"left": 0}
    real_invalidate = Flags.invalidate

    def invalidate(self: Flags) -> None:
        real_invalidate(self)
        if stalls["left"]:  # the listener heard the message and goes back to reading
            stalls["left"] -= 1
            asyncio.get_running_loop().call_soon(time.sleep, 1.0)

    monkeypatch.setattr(redis_client, "subscription_nodes", subscription_nodes)
    monkeypatch.setattr(Flags, "invalidate", invalidate)
    await make_service(replace(settings, processing_interval_ms=60_000), http=False)
    wake = Keys(settings).wake
    await wait_for(lambda: len(subscribed) == 1, timeout=10)
    await asyncio.sleep(1)  # subscribed, a few heartbeats answered
    assert len(subscribed) == 1
    stalls["left"] = 1
    await redis.publish(wake, FLAGS_CHANGED)
    await wait_for(lambda: not stalls["left"], timeout=5)
    await asyncio.sleep(2)  # several heartbeats after the stall
    assert len(subscribed) == 1, f"subscribed again {len(subscribed) - 1} time(s) after a 1 s stall"


# -- 5. the listener's backoff never grows while one primary is down --------------------------------
async def test_the_wakeup_listener_backs_off_while_one_primary_is_down(
        settings: Settings, patient_cluster: RedisClusterServers, make_service,
        chatwoot: ChatwootStandIn, llm: Any) -> None:
    """Finding (206b578, 457109c: every lost subscription and every unforeseen error is made
    again "after the backoff"): `_listen_on` resets the backoff to 0.2 s as soon as its own
    SUBSCRIBE is sent. On a cluster one task per primary does so, and the healthy primaries
    subscribe before the dead one's connection attempts have failed (about 1.4 s of retries):
    every round resets the backoff, so it never grows past 0.2 s. While a primary is down and not
    yet failed over (cluster-node-timeout, 15 s by default; for good without a replica and with
    cluster-require-full-coverage off), the listener tears down and remakes every subscription
    about every 1.6 s, each time with two warnings, a slot-map refresh of the shared client
    (redis-py marks every connection for reconnect), a CONFIG GET per primary and a claim from
    every shard, the dead primary's each failing after its retries. The same holds for an error
    that recurs after subscribing (a message that trips a bug): a restart every 0.2 s, each with a
    traceback. House rule: every retry a bound and backoff.
    Scenario: one primary is killed (connection refused); the others serve.
    Expected: the wait before subscribing again grows (0.2, 0.4, 0.8 ... up to 5 s) while the
    subscriptions keep failing: the fourth lost subscription waits at least 0.8 s.
    Fix: count a subscription as made only when every primary's is (or once it has lived a
    heartbeat or so), and reset the backoff only then."""
    layout = _Layout(settings, patient_cluster, Keys(settings).due(0))
    probe = layout.healthy(1)[0]
    s = replace(settings, redis_url=patient_cluster.url, processing_interval_ms=60_000)
    store = await _cluster_store(s)
    try:
        with structlog.testing.capture_logs() as logged:
            await make_service(s, http=False)
            await store.append(_msg(probe, 1, "probe"), buffered=False)
            await wait_for(lambda: bool(chatwoot.posts_for(probe)), timeout=15)
            layout.victim.kill()

            def lost() -> list[float]:
                return [e["retry_in_s"] for e in logged if e["event"] == "wakeup_subscription_lost"]

            await wait_for(lambda: len(lost()) >= 4, timeout=25)
    finally:
        await store.redis.aclose()
    assert lost()[3] >= 0.8, lost()


# -- 6. a stop waits out a claim on a hung primary --------------------------------------------------
async def test_a_worker_stops_within_docker_s_stop_timeout_while_a_primary_hangs(
        settings: Settings, patient_cluster: RedisClusterServers, chatwoot: ChatwootStandIn,
        llm: Any) -> None:
    """Finding (the sweep of finding 1, on the way out): a stop ends the sweep between two
    shards only (test_pipeline: "at most the claim already under way finishes"), which costs
    about 0.7 s when Redis refuses connections, but a claim sent to a primary that hangs takes
    20 s (4 attempts of the 5 s socket timeout). SIGTERM then finds the worker waiting for it,
    past `docker stop`'s 10 s (and close to Kubernetes' 30 s grace, with the drain still to
    come): the process is killed, its batches in flight are not handed back (release.lua) and
    wait for their leases to lapse (PROCESSING_LEASE_MS), late replies for conversations of
    every primary.
    Scenario: the primary holding shard 0 hangs; a periodic sweep reaches it; the service is
    stopped. Expected: the service has stopped within 8 s of the stop.
    Fix: a stop does not wait for a claim under way (cancel it: a claim that did run leaves its
    batches to their leases, as a killed worker does), or claims are bounded well below that."""
    layout = _Layout(settings, patient_cluster, Keys(settings).due(0))
    assert layout.victim_port not in {layout.node_of(k) for k in
                                      (layout.keys.flags, layout.keys.logs["sweeps"])}
    probe = layout.healthy(1)[0]
    s = replace(settings, redis_url=patient_cluster.url, processing_interval_ms=1000)
    store = await _cluster_store(s)
    stop = asyncio.Event()
    running = asyncio.create_task(service.run(s, http=False, stop=stop))
    try:
        await store.append(_msg(probe, 1, "probe"), buffered=False)
        await wait_for(lambda: bool(chatwoot.posts_for(probe)), timeout=15)
        with _hung(layout.victim):
            await asyncio.sleep(2.5)  # periodic sweeps (every second) have reached its shards
            stop.set()
            done, _ = await asyncio.wait({running}, timeout=8)
            assert done, "still stopping 8 s after the stop"
    finally:
        stop.set()
        await asyncio.wait({running}, timeout=30)
        await store.redis.aclose()
