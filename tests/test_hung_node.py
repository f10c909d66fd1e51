"""What a cluster primary that hangs (SIGSTOP: no answer, no reset) may hold up besides its own
shards, beyond the reviewer's findings in test_review8.py (whose fixtures these tests share)."""

from __future__ import annotations

import asyncio
from dataclasses import replace

from test_review8 import _hung, _Layout, patient_cluster  # noqa: F401 (a fixture)

from buffer_service import redis_client
from buffer_service.config import Settings
from buffer_service.keys import Keys
from buffer_service.store import Batch, BufferStore
from devtools.redis_server import RedisClusterServers


async def test_a_script_unknown_to_a_healthy_primary_runs_while_another_primary_hangs(
        settings: Settings, patient_cluster: RedisClusterServers) -> None:  # noqa: F811
    """redis-py's Script answers NOSCRIPT with SCRIPT LOAD, which a cluster client sends to
    every primary: while one hangs, the first call of each script on a node that has not seen
    it yet (a fresh or restarted node, a promoted replica, SCRIPT FLUSH) waits out the hung
    one's socket timeouts (20 s), though its keys are on a healthy node. Met as the first
    batch's `finish` hanging after its reply was posted (test_review8's stop test, now and
    then). Expected: the script runs on its keys' node within the client's socket timeout."""
    layout = _Layout(settings, patient_cluster, Keys(settings).due(0))
    shard = layout.keys.shard_of(f"1:{layout.healthy(1)[0]}")
    s = replace(settings, redis_url=patient_cluster.url)
    store = BufferStore(await redis_client.connect(replace(s, redis_mode="cluster")), s)
    try:
        with _hung(layout.victim):
            renewed = await asyncio.wait_for(store.renew(_unknown_batch(shard)), timeout=4)
        assert renewed is False
    finally:
        await store.redis.aclose()


def _unknown_batch(shard: int) -> Batch:
    return Batch(id=f"{shard}-999999", token="t", attempts=1, conv="1:1", first_ms=0,
                 deadline_ms=0, trigger="", claimed_ms=0, reply="", messages=())
