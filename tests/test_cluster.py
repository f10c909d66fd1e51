"""Redis Cluster: the mode is detected, every script of a shard runs on the node that holds its
slot, the worker hears wake-ups and expiry events from every primary, and a primary killed with
SIGKILL (its replica promoted) loses no acknowledged message under REDIS_WAIT_REPLICAS=1.

The rest of the integration suite runs on a cluster too: TEST_REDIS=cluster (.ci/run)."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import subprocess
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import aiohttp
import pytest
from helpers import eventually, wait_for, with_port
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.connection import SSLConnection
from redis.crc import key_slot
from redis.exceptions import ResponseError

from buffer_service import redis_client
from buffer_service.config import Settings
from buffer_service.keys import Keys
from buffer_service.scripts import Scripts
from devtools.chatwoot_standin import ChatwootStandIn
from devtools.llm_standin import LLMStandIn
from devtools.payloads import message_payload
from devtools.redis_server import RedisClusterServers, RedisServer


@pytest.fixture
def cluster(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[RedisClusterServers]:
    """Three primaries; `@pytest.mark.replicas(1)` gives each a replica (the failover tests)."""
    marker = request.node.get_closest_marker("replicas")
    servers = RedisClusterServers(tmp_path / "cluster", replicas=marker.args[0] if marker else 0)
    yield servers.start()
    servers.stop()


def nodes_of_shards(keys: Keys, cluster: RedisClusterServers) -> dict[int, int]:
    """shard -> port of the primary that holds its slot."""
    owner = {}
    for line in _cluster_nodes(cluster):
        fields = line.split()
        if "master" in fields[2] and "fail" not in fields[2]:
            port = int(fields[1].split("@")[0].rsplit(":", 1)[1])
            for span in fields[8:]:
                low, _, high = span.partition("-")
                for slot in range(int(low), int(high or low) + 1):
                    owner[slot] = port
    return {s: owner[key_slot(keys.due(s).encode())] for s in range(keys.shards)}


def _cluster_nodes(cluster: RedisClusterServers) -> list[str]:
    node = cluster.primary_nodes()[0]
    out = subprocess.run(["redis-cli", "-p", str(node.port), "CLUSTER", "NODES"], capture_output=True,
                         text=True, timeout=5, check=True).stdout
    return out.splitlines()


def test_every_key_of_a_shard_hashes_to_the_slot_of_its_shard() -> None:
    """The rule that lets scripts build key names while they run (keys.py): same prefix, same
    hash tag, same slot, so a cluster runs the whole script on one node."""
    k = Keys(Settings())
    for conv in ("1:1", "7:42", "123:98765"):
        shard = k.shard_of(conv)
        batch_id = f"{shard}-17"
        names = [k.due(shard), k.first(shard), k.inflight(shard), k.active(shard), k.seq(shard),
                 k.failed(shard), k.manual(shard), k.jobs(shard, "completed"), k.stats(shard, 1),
                 k.buffer(conv), k.ttl(conv), k.history(conv), k.handoff(conv), k.pause(conv),
                 k.sent(conv), k.rate(conv), k.llm_calls(conv), k.seen(conv, 5),
                 k.transcript(conv, 5, 0), k.transcript_claim(conv, 5, 0), k.batch(batch_id),
                 k.messages(batch_id), k.prefix(shard) + "anything:built:at:run:time"]
        assert {key_slot(n.encode()) for n in names} == {key_slot(k.due(shard).encode())}


def test_tls_options_of_the_first_url_reach_every_node() -> None:
    """A managed cluster with its own CA (`rediss://...?ssl_ca_certs=`): the cluster client took
    only host, port, credentials and the scheme, so the CA was ignored and TLS failed."""
    client = redis_client.cluster(Settings(
        redis_url="rediss://user:secret@10.0.0.1:7000?ssl_ca_certs=/etc/ca.pem&ssl_cert_reqs=required,"
                  "rediss://10.0.0.2:7000"))
    made = client.nodes_manager.connection_kwargs
    assert made["connection_class"] is SSLConnection
    assert (made["ssl_ca_certs"], made["ssl_cert_reqs"], made["username"], made["password"]) == (
        "/etc/ca.pem", "required", "user", "secret")
    plain = redis_client.cluster(Settings(redis_url="redis://10.0.0.1:7000"))
    assert plain.nodes_manager.connection_kwargs["connection_class"] is not SSLConnection


async def test_mode_is_detected_from_the_server_or_forced(tmp_path: Path,
                                                          cluster: RedisClusterServers) -> None:
    server = RedisServer(tmp_path / "one").start()
    try:
        clients = [await redis_client.connect(Settings(redis_url=server.url)),
                   await redis_client.connect(Settings(redis_url=cluster.nodes[1].url)),
                   await redis_client.connect(Settings(redis_url=cluster.url)),
                   await redis_client.connect(Settings(redis_url=cluster.nodes[0].url,
                                                       redis_mode="standalone"))]
        kinds = [type(c) for c in clients]
        for client in clients:
            await client.aclose()
        assert kinds == [Redis, RedisCluster, RedisCluster, Redis]
        with pytest.raises(SystemExit, match="not a cluster"):
            await redis_client.connect(Settings(redis_url=f"{server.url},{server.url}"))
    finally:
        server.stop()


@pytest.mark.parametrize("kind", ["standalone", "cluster"])
async def test_global_rate_limit_holds_across_shards_and_nodes(
        settings: Settings, tmp_path: Path, make_service, kind: str) -> None:
    """RATE_LIMIT_GLOBAL counts the buffered messages of every conversation together, wherever
    their shards live: on a cluster its key is on one node and checked by a call of its own
    (globalrate.lua), given back when the append then refuses the message for another reason,
    so the answers are those of one server. Two service processes share the limit."""
    servers = (RedisClusterServers(tmp_path / "cluster") if kind == "cluster"
               else RedisServer(tmp_path / "one")).start()
    try:
        settings = replace(settings, redis_url=servers.url, rate_limit_per_conversation=5,
                           rate_limit_global=8, rate_limit_window_s=3600)
        keys = Keys(settings)
        svcs = [await make_service(s, worker=False) for s in (settings, with_port(settings))]
        # One conversation: 5 buffered, 2 refused by its own limit, a redelivery a duplicate;
        # neither the refused nor the duplicate may use up the global allowance.
        answers = [await svcs[i % 2].webhook(message_payload(message_id=i, conversation_id=20))
                   for i in range(1, 8)]
        assert [a["status"] for a in answers] == ["buffered"] * 5 + ["ignored"] * 2
        assert answers[-1] == {"status": "ignored", "reason": "rate_limited", "limit": "conversation"}
        assert (await svcs[0].webhook(message_payload(message_id=1, conversation_id=20)))["status"] \
            == "duplicate"
        # Twelve other conversations at once, through both processes: 3 more fit under 8.
        convs = list(range(30, 42))
        if kind == "cluster":
            owners = nodes_of_shards(keys, servers)
            assert len({owners[keys.shard_of(f"1:{c}")] for c in convs}) == 3
        answers = await asyncio.gather(*(svcs[c % 2].webhook(
            message_payload(message_id=100 + c, conversation_id=c)) for c in convs))
        assert sorted(a["status"] for a in answers) == ["buffered"] * 3 + ["ignored"] * 9
        assert all(a.get("limit") == "global" for a in answers if a["status"] == "ignored")
    finally:
        servers.stop()


async def send(session: aiohttp.ClientSession, url: str, conv: int, message_id: int,
               text: str) -> bool:
    """One customer message; whether the service acknowledged it (buffered)."""
    payload = message_payload(message_id=message_id, conversation_id=conv, content=text)
    try:
        async with session.post(url + "/webhooks/chatwoot", json=payload) as resp:
            return resp.status == 200 and (await resp.json())["status"] == "buffered"
    except (aiohttp.ClientError, TimeoutError):
        return False


async def test_bursts_of_every_shard_answered_once_with_wakeups_from_every_primary(
        settings: Settings, cluster: RedisClusterServers, make_service, chatwoot: ChatwootStandIn,
        llm: LLMStandIn) -> None:
    # No periodic sweep to lean on: only the wake-ups of the three nodes start the claims.
    settings = replace(settings, redis_url=cluster.url, processing_interval_ms=60_000,
                       buffer_duration_ms=300)
    keys = Keys(settings)
    convs = list(range(1, 61))
    owners = nodes_of_shards(keys, cluster)
    assert len({owners[keys.shard_of(f"1:{c}")] for c in convs}) == 3  # every primary has work
    svc = await make_service(settings)
    await asyncio.sleep(0.3)
    started = time.monotonic()
    async with aiohttp.ClientSession() as session:

        async def converse(c: int) -> list[bool]:
            return [await send(session, svc.url, c, c * 10 + j, f"c{c} m{j}") for j in range(2)]

        acked = await asyncio.gather(*(converse(c) for c in convs))
    assert all(map(all, acked))
    await wait_for(lambda: len(chatwoot.posts) >= len(convs), timeout=15)
    took = time.monotonic() - started
    await asyncio.sleep(0.5)
    assert collections.Counter(p.conversation_id for p in chatwoot.posts) == {c: 1 for c in convs}
    for post in chatwoot.posts:
        c = post.conversation_id
        assert post.body["content"] == f"Reply to: c{c} m0 | c{c} m1"
    assert took < 10  # far below the 60 s sweep: the wake-ups came through from every node

    # The worker listens for expiry events on every primary (they never leave their node).
    assert await subscribed_everywhere(cluster, keys)


async def subscribed_everywhere(cluster: RedisClusterServers, keys: Keys) -> bool:
    """Whether one worker listens for wake-ups and expiry events on every primary."""
    counts = []
    for node in cluster.primary_nodes():
        client = Redis(port=node.port)
        numsub = await client.pubsub_numsub("__keyevent@0__:expired", keys.wake)
        await client.aclose()
        counts.append([n for _, n in numsub])
    return counts == [[1, 1]] * cluster.primaries


@pytest.mark.replicas(1)
@pytest.mark.parametrize("wait_replicas", [1, 0])
async def test_primary_killed_during_bursts(
        settings: Settings, cluster: RedisClusterServers, make_service, chatwoot: ChatwootStandIn,
        llm: LLMStandIn, wait_replicas: int) -> None:
    """kill -9 of a primary while bursts are buffered and in flight; its replica is promoted and
    the killed node comes back as a replica (as an orchestrator restarts it). With
    REDIS_WAIT_REPLICAS=1 every acknowledged message is answered exactly once; with 0 the test
    reports what was lost and checks the service recovers."""
    settings = replace(settings, redis_url=cluster.url, redis_wait_replicas=wait_replicas,
                       buffer_duration_ms=800, processing_interval_ms=1000, processing_lease_ms=3000)
    llm.delay = 0.3  # batches in flight when the node dies
    keys = Keys(settings)
    svc = await make_service(settings)
    victim = cluster.primary_nodes()[0]
    convs = [c for c in range(1, 400) if nodes_of_shards(keys, cluster)[keys.shard_of(f"1:{c}")]
             == victim.port][:30]
    acked: dict[int, list[str]] = collections.defaultdict(list)
    tried: dict[int, list[str]] = collections.defaultdict(list)

    async def converse(session: aiohttp.ClientSession, conv: int, rounds: int, start: int) -> None:
        for j in range(start, start + rounds):
            text = f"c{conv} m{j}"
            tried[conv].append(text)
            if await send(session, svc.url, conv, conv * 100 + j, text):
                acked[conv].append(text)
            await asyncio.sleep(0.25)

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        talking = asyncio.gather(*(converse(session, c, 8, 0) for c in convs))
        await wait_for(lambda: sum(c.status == 0 for c in llm.calls) >= 3, timeout=15)
        victim.kill()
        await asyncio.to_thread(_wait_promoted, cluster, victim)
        victim.start()  # rejoins as the replica of its former replica
        await asyncio.to_thread(cluster.wait_ok)
        await talking
        # After the failover: every conversation still works.
        await asyncio.gather(*(converse(session, c, 1, 50) for c in convs))
    # The worker listens on the promoted replica now (expiry events stay on their node).
    await eventually(lambda: subscribed_everywhere(cluster, keys), timeout=15)
    # Without WAIT some acknowledged messages may be lost: wait for the last message of each
    # conversation instead, answered after everything before it that survived (replies go out
    # in order), rather than for a fixed 15 s.
    await wait_for(lambda: all(_answered(chatwoot, c) >= (set(acked[c]) if wait_replicas
                                                          else {f"c{c} m50"}) for c in convs),
                   timeout=40)
    await asyncio.sleep(1)
    lost, doubled = [], []
    for c in convs:
        answered = [t for p in chatwoot.posts_for(c) for t in _texts(p)]
        counts = collections.Counter(answered)
        lost += [t for t in acked[c] if t not in counts]
        doubled += [t for t, n in counts.items() if n > 1]
        assert f"c{c} m50" in counts  # the service recovered from the failover
    acked_total = sum(map(len, acked.values()))
    print(f"REDIS_WAIT_REPLICAS={wait_replicas}: {acked_total} acknowledged of "
          f"{sum(map(len, tried.values()))} sent, lost {len(lost)} {lost}, answered twice "
          f"{len(doubled)} {doubled}")
    if wait_replicas:
        assert (lost, doubled) == ([], [])


def _texts(post) -> list[str]:
    return post.body["content"].removeprefix("Reply to: ").split(" | ")


def _answered(chatwoot: ChatwootStandIn, conv: int) -> set[str]:
    return {t for p in chatwoot.posts_for(conv) for t in _texts(p)}


def _wait_promoted(cluster: RedisClusterServers, victim: RedisServer) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if len(cluster.primary_nodes()) == cluster.primaries:
            cluster.wait_ok()
            return
        time.sleep(0.1)
    raise AssertionError(f"no replica took over from {victim.port}")


async def test_wait_replicas_on_one_server(settings: Settings, tmp_path: Path, make_service) -> None:
    """REDIS_WAIT_REPLICAS on a standalone primary: without a replica a webhook is refused (500,
    Chatwoot retries), with one it is acknowledged once the replica has the append."""
    primary = RedisServer(tmp_path / "primary").start()
    try:
        settings = replace(settings, redis_url=primary.url, redis_wait_replicas=1)
        svc = await make_service(settings, worker=False)
        hook = "/webhooks/chatwoot"
        status, body = await svc.post(hook, message_payload(message_id=1, conversation_id=1, content="a"))
        assert status == 500, body
        replica = RedisServer(tmp_path / "replica", extra_args=(
            "--replicaof", "127.0.0.1", str(primary.port))).start()
        try:
            await wait_for(lambda: "master_link_status:up" in subprocess.run(
                ["redis-cli", "-p", str(replica.port), "INFO", "replication"], capture_output=True,
                text=True, check=True).stdout, timeout=10)
            status, body = await svc.post(hook, message_payload(message_id=2, conversation_id=1,
                                                                content="b"))
            assert (status, body["status"]) == (200, "buffered")
            # The refused message was written all the same, only not confirmed: Chatwoot's
            # retry of it is acknowledged as a duplicate, not buffered twice.
            status, body = await svc.post(hook, message_payload(message_id=1, conversation_id=1,
                                                                content="a"))
            assert (status, body["status"]) == (200, "duplicate")
            replicated = Redis(port=replica.port)
            keys = Keys(settings)
            assert await replicated.llen(keys.buffer("1:1")) >= 1
            await replicated.aclose()
        finally:
            replica.stop()
    finally:
        primary.stop()


async def test_a_shard_moved_to_another_node_while_it_buffers(
        settings: Settings, cluster: RedisClusterServers, make_service, chatwoot: ChatwootStandIn,
        llm: LLMStandIn) -> None:
    """Resharding: a shard's slot, with its buffered burst, moves to another primary (MIGRATE, as
    `redis-cli --cluster reshard` does it); the service follows the redirection for the rest of
    the burst and the claim, and answers the whole burst once."""
    settings = replace(settings, redis_url=cluster.url, buffer_duration_ms=1500,
                       processing_interval_ms=60_000)
    keys = Keys(settings)
    conv = 5
    shard = keys.shard_of(f"1:{conv}")
    slot = key_slot(keys.due(shard).encode())
    source = nodes_of_shards(keys, cluster)[shard]
    target = next(n.port for n in cluster.primary_nodes() if n.port != source)
    svc = await make_service(settings)
    async with aiohttp.ClientSession() as session:
        assert await send(session, svc.url, conv, 1, "before the move")
        await asyncio.to_thread(_move_slot, slot, source, target)
        assert nodes_of_shards(keys, cluster)[shard] == target
        assert await send(session, svc.url, conv, 2, "after the move")
    await wait_for(lambda: len(chatwoot.posts) >= 1, timeout=10)
    await asyncio.sleep(1)
    assert [p.body["content"] for p in chatwoot.posts] == ["Reply to: before the move | after the move"]


def _move_slot(slot: int, source: int, target: int, *, keys_per_call: int = 100,
               pause_s: float = 0.0) -> None:
    cli = _cli
    source_id, target_id = cli(source, "CLUSTER", "MYID"), cli(target, "CLUSTER", "MYID")
    cli(target, "CLUSTER", "SETSLOT", slot, "IMPORTING", source_id)
    cli(source, "CLUSTER", "SETSLOT", slot, "MIGRATING", target_id)
    while names := cli(source, "CLUSTER", "GETKEYSINSLOT", slot, keys_per_call).split():
        cli(source, "MIGRATE", "127.0.0.1", target, "", 0, 5000, "KEYS", *names)
        time.sleep(pause_s)
    for port in (target, source):
        cli(port, "CLUSTER", "SETSLOT", slot, "NODE", target_id)


async def test_no_shard_script_runs_half_while_its_slot_moves(cluster: RedisClusterServers) -> None:
    """While a slot moves, a script whose KEYS are all still on the old node runs there; a key it
    builds from the prefix may be on the new node already, and Redis fails the script at that
    command, keeping the writes before it (a conversation taken out of the index and never
    claimed, say). Every script given the prefix must be refused before its first write."""
    settings = Settings(redis_url=cluster.url)
    keys, shard = Keys(settings), 0
    prefix = keys.prefix(shard)
    slot = key_slot(prefix.encode())
    source = nodes_of_shards(keys, cluster)[shard]
    target = next(n.port for n in cluster.primary_nodes() if n.port != source)
    client = await redis_client.connect(settings)
    try:
        scripts = Scripts(client)
        given_prefix = [s for s in vars(scripts).values() if "prefix" in s.signature.args]
        assert {s.name for s in given_prefix} >= {"append", "claim", "before_post", "finish", "fail"}
        names = {k: f"{prefix}{k}" for s in given_prefix for k in s.signature.keys}
        for name in names.values():
            await client.set(name, "before")
        _cli(source, "CLUSTER", "SETSLOT", slot, "MIGRATING", _cli(target, "CLUSTER", "MYID"))
        _cli(target, "CLUSTER", "SETSLOT", slot, "IMPORTING", _cli(source, "CLUSTER", "MYID"))
        for script in given_prefix:
            with pytest.raises(ResponseError, match="non local key"):
                await script(keys={k: names[k] for k in script.signature.keys},
                             args={a: prefix if a == "prefix" else "1" for a in script.signature.args})
        assert set(await client.mget(list(names.values()))) == {b"before"}
    finally:
        await client.aclose()


def _cli(port: int, *args: str | int) -> str:
    return subprocess.run(["redis-cli", "-p", str(port), *map(str, args)], capture_output=True,
                          text=True, timeout=10, check=True).stdout.strip()


async def test_a_shard_migrated_while_webhooks_arrive_and_bursts_flush(
        settings: Settings, cluster: RedisClusterServers, make_service, chatwoot: ChatwootStandIn,
        llm: LLMStandIn) -> None:
    """Resharding under load: a shard's slot moves key by key (MIGRATING/IMPORTING, as
    `redis-cli --cluster reshard` does it, slowed down) while its conversations keep sending
    messages and its bursts fall due and are claimed and posted. Webhooks the move makes fail
    answer 500 and are sent again, as Chatwoot does; every acknowledged message must be answered
    exactly once, none lost, none twice. (Found: redis-py rebuilt its cluster client every 5th
    MOVED, closing connections other requests were using; webhooks then failed for over 20 s.)"""
    settings = replace(settings, redis_url=cluster.url, buffer_duration_ms=400,
                       processing_interval_ms=500)
    keys = Keys(settings)
    shard = keys.shard_of("1:1")
    convs = [*[c for c in range(1, 400) if keys.shard_of(f"1:{c}") == shard][:12], 2, 3, 4]
    slot = key_slot(keys.due(shard).encode())
    source = nodes_of_shards(keys, cluster)[shard]
    target = next(n.port for n in cluster.primary_nodes() if n.port != source)
    svc = await make_service(settings)
    acked: set[str] = set()
    sent: set[str] = set()
    moving, moved = asyncio.Event(), asyncio.Event()
    tried_while_moving = 0
    async with aiohttp.ClientSession() as session:

        async def deliver(conv: int, message_id: int, text: str) -> None:
            """Like Chatwoot: again until a 200 (buffered, or a duplicate of a stored one)."""
            nonlocal tried_while_moving
            payload = message_payload(message_id=message_id, conversation_id=conv, content=text)
            sent.add(text)
            last = None
            for _ in range(200):
                tried_while_moving += moving.is_set() and not moved.is_set()
                with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                    async with session.post(svc.url + "/webhooks/chatwoot", json=payload) as resp:
                        if resp.status == 200:
                            acked.add(text)
                            return
                        last = (resp.status, await resp.text())
                await asyncio.sleep(0.1)
            raise AssertionError(f"{text} never acknowledged {last}")

        async def converse(conv: int) -> None:
            # Talks until the move is over (however long a loaded machine makes it), so the
            # traffic surely spans the whole move; whether a webhook meets a refusal is timing.
            j = 0
            while j < 12 or not moved.is_set():
                await deliver(conv, conv * 1000 + j, f"c{conv} m{j}")
                await asyncio.sleep(0.15 if j % 4 else 0.6)  # bursts, some flushed meanwhile
                j += 1

        talking = asyncio.gather(*(converse(c) for c in convs))
        await asyncio.sleep(1.0)
        moving.set()
        try:
            await asyncio.to_thread(_move_slot, slot, source, target, keys_per_call=1, pause_s=0.02)
        finally:
            moved.set()
        await talking
    assert tried_while_moving > 0  # webhooks were sent while the slot moved
    assert nodes_of_shards(keys, cluster)[shard] == target
    expected = sent
    assert acked == expected

    def answered() -> list[str]:
        return [text for p in chatwoot.posts
                for text in p.body["content"].removeprefix("Reply to: ").split(" | ")]

    with contextlib.suppress(AssertionError):
        await wait_for(lambda: set(answered()) >= expected, timeout=30)
    assert expected - set(answered()) == set()
    await asyncio.sleep(1.5)  # a second answer would come now
    assert sorted(answered()) == sorted(expected), collections.Counter(answered()).most_common(3)


def _connections_received(cluster: RedisClusterServers) -> int:
    total = 0
    for node in cluster.nodes:
        out = subprocess.run(["redis-cli", "-p", str(node.port), "INFO", "stats"],
                             capture_output=True, text=True, timeout=5, check=True).stdout
        total += int(next(line for line in out.splitlines()
                          if line.startswith("total_connections_received:")).split(":")[1])
    return total


async def test_an_idle_worker_does_not_reconnect_on_every_topology_check(
        settings: Settings, cluster: RedisClusterServers, make_service, llm: LLMStandIn,
        chatwoot: ChatwootStandIn) -> None:
    """The worker looks for a change of the cluster's primaries every TOPOLOGY_CHECK_S (5 s).
    Done with redis-py's NodesManager.initialize(), that marked every connection of the shared
    client for reconnect (redis-py 8.1 recycles every node's connections on each refresh): each
    check cost a new TCP connection and handshake for every connection in use afterwards, the
    webhooks' included. Expected: an idle worker on an unchanged cluster opens no new
    connection across two checks."""
    s = replace(settings, redis_url=cluster.url)
    await make_service(s, http=False)
    await asyncio.sleep(6)  # subscribed, its pools grown to what an idle worker uses
    before = _connections_received(cluster)
    await asyncio.sleep(11)  # two topology checks, five periodic sweeps
    # The count's own redis-cli connections (one a node) are all that is new.
    assert _connections_received(cluster) - before - len(cluster.nodes) == 0
