"""Adversarial review of three changes to the delivery path: split replies (4978f8b..bb494f4),
compact completed-job records (dc6d49c) and Redis Cluster support (45d872f..e30f01b). Each test
shows one finding against the real service code and fails until it is fixed."""

from __future__ import annotations

import asyncio
import subprocess
from dataclasses import replace

import aiohttp
import pytest
from helpers import eventually, fail_a_part_late, job_in, jobs, wait_for
from redis.asyncio import Redis
from redis.crc import key_slot
from test_cluster import _cluster_nodes, _move_slot, cluster, nodes_of_shards  # noqa: F401 (the fixture)

from buffer_service.flags import Flags
from buffer_service.keys import Keys
from buffer_service.keywords import parse_keywords
from buffer_service.ops import Operations
from buffer_service.store import BufferStore
from devtools.payloads import message_payload
from devtools.redis_server import RedisClusterServers

THREE = ["Your order left the warehouse today.",
         "It should arrive on Thursday, between 9 and 18.",
         "Anything else I can help with?"]


def _contents(chatwoot, conversation_id: int) -> list[str]:
    return [p.body["content"] for p in chatwoot.posts_for(conversation_id) if not p.body.get("private")]


# -- 1. split replies: the echo of the last part completes a failed batch --------------------------
async def test_a_late_echo_completing_a_failed_split_reply_keeps_the_whole_reply(
        settings, make_service, llm, chatwoot, redis, store):
    """Finding: parts 1 and 2 of 3 are out (part.lua recorded them, their echoes were known by
    id and so never written to the history). Part 3's POST is queued behind a busy Rails: the
    client gives up, the retry cannot ask Chatwoot (500) and the batch fails. Then Chatwoot
    creates part 3 and echoes it: note.lua completes the job (confirmed_by_echo) with the echo's
    entry, part 3 alone, as the bot's reply in the history, and the compact record keeps
    `parts_out` 2 (it never counts the part the echo confirmed).
    Harm: the next burst's prompt shows the bot said only "Anything else I can help with?": the
    LLM no longer knows what it told the customer (when the order arrives) and may contradict or
    repeat it; the operator's record says 2 parts of a 3-part reply went out."""
    llm.reply_fn = lambda messages: "\n\n".join(THREE)
    chatwoot.echo_webhook_url = f"http://127.0.0.1:{settings.port}/webhooks/chatwoot"
    svc = await make_service(replace(settings, buffer_duration_ms=200, max_attempts=1,
                                     chatwoot_timeout_s=0.3, reply_pacing_ms_per_char=20))
    await svc.webhook(message_payload(message_id=1, conversation_id=401, content="where is my order?"))
    await wait_for(lambda: len(chatwoot.posts_for(401)) == 2, timeout=10)
    async with fail_a_part_late(chatwoot, redis, 401, posts=3):  # part 3, then its echo
        pass
    [job] = await jobs(redis, "1:401")
    if job["state"] == "failed":  # a fix may leave it to an operator's retry
        assert await store.requeue(job["id"])
        await eventually(job_in("completed", redis, "1:401"), timeout=10)
        [job] = await jobs(redis, "1:401")
    assert _contents(chatwoot, 401) == THREE
    assert job["state"] == "completed"
    said = [e["text"] for e in await store.history("1:401", 50) if e.get("role") == "assistant"]
    assert "\n\n".join(said) == "\n\n".join(THREE), said
    assert job.get("parts_out") == "3", job


# -- 2. split replies / handoff: a handoff completed by its late echo never hands over -------------
async def test_a_handoff_whose_message_is_confirmed_by_a_late_echo_still_hands_over(
        settings, make_service, llm, chatwoot, redis, store):
    """Finding: the customer asks for a human (keyword). HANDOFF_MESSAGE's POST is queued behind
    a busy Rails; the client gives up and the batch fails (MAX_ATTEMPTS=1). Chatwoot then creates
    the message and echoes it: note.lua completes the failed job as confirmed_by_echo, and the
    handoff that the batch had decided (mark.lua) is dropped: no handoff record, no private note
    for the agents, no `toggle_status open`; an operator cannot retry a completed job.
    Harm: the customer was told a person takes over, yet no agent is told and the conversation
    stays with the bot, which answers the customer's next message itself."""
    chatwoot.echo_webhook_url = f"http://127.0.0.1:{settings.port}/webhooks/chatwoot"
    message = "A person will answer you here shortly."
    svc = await make_service(replace(settings, buffer_duration_ms=200, max_attempts=1,
                                     chatwoot_timeout_s=0.3, handoff_keywords=parse_keywords("humano"),
                                     handoff_message=message))
    # Since a post in doubt on the last attempt gets one more attempt that asks Chatwoot
    # (main, branch ci), the question fails too, as in the first test, for the batch to fail.
    async with fail_a_part_late(chatwoot, redis, 402, posts=1, send=svc.webhook(
            message_payload(message_id=1, conversation_id=402, content="humano"))):
        pass
    [job] = await jobs(redis, "1:402")
    if job["state"] == "failed":  # a fix may leave the rest of the handoff to a retry
        assert await store.requeue(job["id"])
    try:
        await wait_for(lambda: [c.status for c in chatwoot.status_changes] == ["open"], timeout=5)
    except AssertionError:
        [job] = await jobs(redis, "1:402")
        raise AssertionError(f"never handed over: job {job.get('state')} {job.get('reason')}, "
                             f"notes {chatwoot.notes_for(402)}") from None
    assert len(chatwoot.notes_for(402)) == 1
    assert _contents(chatwoot, 402) == [message]


# -- 3. compact records: the completed count outlives the records ----------------------------------
async def test_completed_count_forgets_compact_records_that_expired(
        settings, make_service, llm, chatwoot, redis):
    """Finding: a completed job's compact record lives in a bucket hash that expires after
    JOB_RETENTION_DAYS; `donecount` (what `counts()` / `stats` / `GET /admin/stats` read) and
    the `done` zset are trimmed only when another job of the same shard completes
    (lib.lua compact). `cleanup` trims the legacy `jobs:completed` index but not these, though
    its docstring says it "catches a shard where nothing finished lately".
    Harm: in a shard where nothing completed since (a quiet inbox, fewer conversations), the
    operator's figures keep counting completed jobs whose records are gone, forever, and
    `buffer-service cleanup` does not fix them. The test makes JOB_RETENTION_DAYS pass by
    giving the bucket and its `done` entry the age they would have (Redis expires the bucket)."""
    s = replace(settings, job_retention_days=2)
    svc = await make_service(s)
    await svc.webhook(message_payload(message_id=1, conversation_id=403, content="ok"))
    await wait_for(lambda: len(chatwoot.posts_for(403)) == 1, timeout=5)
    operator = Operations(BufferStore(redis, s), Flags(redis, s))
    await eventually(lambda: _completed(operator), timeout=5)
    keys = operator.keys
    [done] = await operator.jobs("completed")
    bucket, _ = keys.done_of(done["id"])
    shard = keys.shard_of("1:403")
    now = await operator.now_ms()
    # Three days later: Redis expired the bucket (its PEXPIRE was 2 days), the zset entry is old.
    await redis.zadd(keys.done(shard), {bucket.rsplit(":", 1)[1]: now - 3 * 86_400_000})
    await redis.delete(bucket)
    assert await operator.jobs("completed") == []
    await operator.cleanup()
    assert (await operator.counts())["completed"] == 0


async def _completed(operator: Operations) -> bool:
    return (await operator.counts())["completed"] == 1




# -- 5. stats: a reply confirmed by its late echo counts as answered in no time --------------------
async def test_a_reply_completed_by_its_late_echo_counts_its_real_reply_time(
        settings, make_service, llm, chatwoot, redis):
    """Finding: a job completed by finish.lua adds its first-message-to-reply time to the hour's
    `reply_ms` (close_batch); one completed by its reply's late echo after it failed
    (note.lua, confirmed_by_echo) adds 1 to `completed` and nothing to `reply_ms`.
    Harm: `stats` / `GET /admin/stats` report such a reply as answered in 0 s, so
    avg_first_message_to_reply_s drops exactly when Chatwoot is slow (the only time replies end
    this way): here one reply that reached the customer 2 s after the post shows as 0.0 s."""
    chatwoot.echo_webhook_url = f"http://127.0.0.1:{settings.port}/webhooks/chatwoot"
    s = replace(settings, buffer_duration_ms=200, max_attempts=1, chatwoot_timeout_s=0.3)
    svc = await make_service(s)
    # Since a post in doubt on the last attempt gets one more attempt that asks Chatwoot
    # (main, branch ci), the question fails too, as in the first test, for the batch to fail.
    async with fail_a_part_late(chatwoot, redis, 405, posts=1, send=svc.webhook(
            message_payload(message_id=1, conversation_id=405, content="hello"))):
        await eventually(job_in("completed", redis, "1:405"), timeout=10)  # the late echo
    totals = (await Operations(BufferStore(redis, s), Flags(redis, s)).stats(1))["totals"]
    assert totals["completed"] == 1
    assert totals["avg_first_message_to_reply_s"] >= 2.0, totals


# -- 4. Redis Cluster: WAIT on one node confirms a call that MOVED ran on another ------------------
@pytest.mark.replicas(1)
async def test_a_webhook_redirected_by_moved_is_not_confirmed_by_the_old_nodes_wait(
        settings, cluster, make_service):  # noqa: F811 (the fixture imported above)
    """Finding: with REDIS_WAIT_REPLICAS=1 the batcher queues one WAIT per node, chosen from the
    client's slot map when the pipeline is built. After a reshard (the slot moved, the map not
    yet refreshed), the append goes to the old node, gets MOVED, and redis-py's cluster
    pipeline re-sends it on its own to the new node, after the pipeline, WAIT included, ran:
    the old node's WAIT (its replica is fine) is taken as the confirmation of a write made on
    the new node, whose replica never got it (here it is down).
    Harm: the webhook is acknowledged (200) though no replica holds the message; a failover of
    the new primary loses an acknowledged customer message, the very loss REDIS_WAIT_REPLICAS
    promises to prevent (Chatwoot does not redeliver a 200). Expected: 500 (Chatwoot retries
    it; a 503 it would not)."""
    settings = replace(settings, redis_url=cluster.url, redis_wait_replicas=1)
    keys = Keys(settings)
    owners = nodes_of_shards(keys, cluster)
    conv = 5
    shard = keys.shard_of(f"1:{conv}")
    source = owners[shard]
    target = next(n.port for n in cluster.primary_nodes() if n.port != source)
    await wait_for(lambda: all("master_link_status:up" in _cli(n.port, "INFO", "replication")
                               for n in cluster.nodes if n.port not in owners.values()), timeout=20)
    svc = await make_service(settings, worker=False)
    async with aiohttp.ClientSession() as session:
        # Both nodes know the script and the client has learnt the slot map.
        on_target = next(c for c in range(1, 400) if owners[keys.shard_of(f"1:{c}")] == target)
        for n, c in enumerate((conv, on_target), 1):
            status, body = await _post(session, svc.url, c, n, "before")
            assert (status, body.get("status")) == (200, "buffered"), body
        target_replica = _replica_of(cluster, target)
        target_replica.stop()  # the new owner's only replica is down
        status, _ = await _post(session, svc.url, on_target, 3, "not replicated")
        assert status == 500  # a write made on that node, not redirected, is refused
        await asyncio.to_thread(_move_slot, key_slot(keys.due(shard).encode()), source, target)
        assert nodes_of_shards(keys, cluster)[shard] == target
        status, body = await _post(session, svc.url, conv, 10, "after the move")
    assert status == 500, f"acknowledged ({status} {body}) though no replica of the node has it"


@pytest.mark.replicas(1)
async def test_a_webhook_redirected_by_moved_is_confirmed_by_the_new_nodes_wait(
        settings, cluster, make_service):  # noqa: F811 (the fixture imported above)
    """The fix's other half: with every replica up, a webhook whose append is redirected by
    MOVED (the slot moved, the client's map is stale) is still acknowledged, once the replica of
    the node that ran the append holds the message (its WAIT, not the old node's, confirmed it).
    The batcher sends the redirected call again in a round of its own, not the caller a 500."""
    settings = replace(settings, redis_url=cluster.url, redis_wait_replicas=1)
    keys = Keys(settings)
    owners = nodes_of_shards(keys, cluster)
    await wait_for(lambda: all("master_link_status:up" in _cli(n.port, "INFO", "replication")
                               for n in cluster.nodes if n.port not in owners.values()), timeout=20)
    moved = 5
    svc = await make_service(settings, worker=False)
    async with aiohttp.ClientSession() as session:
        # Every node knows the script and the client has learnt the slot map.
        on_each = {owners[keys.shard_of(f"1:{c}")]: c for c in range(400, 0, -1)}
        for n, c in enumerate([moved, *on_each.values()], 1):
            status, body = await _post(session, svc.url, c, n, "before")
            assert (status, body.get("status")) == (200, "buffered"), body

        slot = key_slot(keys.due(keys.shard_of(f"1:{moved}")).encode())
        source = owners[keys.shard_of(f"1:{moved}")]
        target = next(n.port for n in cluster.primary_nodes() if n.port != source)
        await asyncio.to_thread(_move_slot, slot, source, target)
        status, body = await _post(session, svc.url, moved, 10, "after the move")
        assert (status, body.get("status")) == (200, "buffered"), body
        assert await _replicated(_replica_of(cluster, target).port, keys.buffer(f"1:{moved}")) >= 2


async def test_a_script_load_refused_by_a_node_that_is_down_fails_only_its_calls(
        settings, tmp_path, make_service):
    """Reviewer's observation: after NOSCRIPT (a node restarted, SCRIPT FLUSH) the batcher loaded
    the script with SCRIPT LOAD on every primary; one primary down (a failover in progress)
    failed the load, and with it every caller of the round trip, on healthy nodes too. The
    script is loaded on the node that said NOSCRIPT. A long node timeout keeps the cluster
    serving while the dead node is not yet marked failed."""
    servers = RedisClusterServers(tmp_path / "cluster", node_timeout_ms=60_000).start()
    try:
        settings = replace(settings, redis_url=servers.url)
        keys = Keys(settings)
        # A webhook reads the flags and logs to the webhook log besides its append: the node
        # killed holds none of them.
        busy = {_owner(servers, key) for key in (keys.flags, keys.logs["webhooks"])}
        owners = nodes_of_shards(keys, servers)
        conv = next(c for c in range(1, 400) if owners[keys.shard_of(f"1:{c}")] in busy)
        node = owners[keys.shard_of(f"1:{conv}")]
        svc = await make_service(settings, worker=False)
        async with aiohttp.ClientSession() as session:
            status, body = await _post(session, svc.url, conv, 1, "before")
            assert (status, body.get("status")) == (200, "buffered"), body
            next(n for n in servers.primary_nodes() if n.port not in busy).kill()
            _cli(node, "SCRIPT", "FLUSH")
            status, body = await _post(session, svc.url, conv, 2, "after the flush")
        assert (status, body.get("status")) == (200, "buffered"), body
    finally:
        servers.stop()


def _owner(servers, key: str) -> int:
    """The port of the primary that holds `key`'s slot."""
    slot = key_slot(key.encode())
    for line in _cluster_nodes(servers):
        fields = line.split()
        if "master" in fields[2]:
            for span in fields[8:]:
                low, _, high = span.partition("-")
                if int(low) <= slot <= int(high or low):
                    return int(fields[1].split("@")[0].rsplit(":", 1)[1])
    raise AssertionError(f"no node holds slot {slot}")


async def _replicated(replica: int, key: str) -> int:
    """The length of list `key` on a cluster replica (READONLY: it answers for its primary)."""
    client = Redis(port=replica, single_connection_client=True)
    try:
        await client.execute_command("READONLY")
        return int(await client.llen(key))
    finally:
        await client.aclose()


async def _post(session: aiohttp.ClientSession, url: str, conv: int, message_id: int,
                text: str) -> tuple[int, dict]:
    payload = message_payload(message_id=message_id, conversation_id=conv, content=text)
    async with session.post(url + "/webhooks/chatwoot", json=payload) as resp:
        return resp.status, await resp.json(content_type=None)


def _replica_of(servers, port: int):
    """The node that replicates the primary on `port`."""
    return next(n for n in servers.nodes if n.port != port
                and f"master_port:{port}\n" in _cli(n.port, "INFO", "replication").replace("\r", ""))


def _cli(port: int, *args: str) -> str:
    return subprocess.run(["redis-cli", "-p", str(port), *args], capture_output=True, text=True,
                          timeout=5, check=True).stdout
