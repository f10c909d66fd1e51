"""TCP keepalive on every connection the service opens to Redis, whatever redis-py's defaults."""

from __future__ import annotations

import socket
from dataclasses import replace
from typing import Any

import pytest
import redis.asyncio.connection

from buffer_service import redis_client
from buffer_service.config import Settings

_IDLE = getattr(socket, "TCP_KEEPIDLE", None) or getattr(socket, "TCP_KEEPALIVE", None)


@pytest.fixture
def old_redis_py(monkeypatch: pytest.MonkeyPatch) -> None:
    """redis-py before 8 sets no keepalive options of its own (the OS's: 2 hours idle)."""
    monkeypatch.setattr(redis.asyncio.connection, "get_default_socket_keepalive_options", dict)


@pytest.mark.skipif(_IDLE is None, reason="the platform has no TCP keepalive idle time")
async def test_standalone_connections_probe_an_idle_flow_within_a_minute(
        redis_server: Any, old_redis_py: None) -> None:
    """pyproject allows redis>=5, which leaves keepalive to the OS: 7200 s idle before the first
    probe, long after a NAT or load balancer dropped the idle flow of the wake-up subscription
    (AWS NLB: 350 s). Expected: the service's clients set the probes themselves."""
    if not isinstance(redis_server.url, str) or "," in redis_server.url:
        pytest.skip("one server")
    for blocking in (False, True):
        client = redis_client.standalone(redis_server.url, blocking=blocking)
        try:
            conn = await client.connection_pool.get_connection()
            sock = conn._writer.transport.get_extra_info("socket")  # type: ignore[union-attr]
            assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE)
            assert sock.getsockopt(socket.IPPROTO_TCP, _IDLE) <= 60, blocking
            await client.connection_pool.release(conn)
        finally:
            await client.aclose()


@pytest.mark.skipif(_IDLE is None, reason="the platform has no TCP keepalive idle time")
def test_cluster_connections_set_their_keepalive_probes(settings: Settings,
                                                        old_redis_py: None) -> None:
    """The same for the cluster client's connections (no server needed: its settings)."""
    client = redis_client.cluster(replace(settings, redis_mode="cluster"))
    for node in client.nodes_manager.startup_nodes.values():
        assert node.connection_kwargs.get("socket_keepalive")
        options = node.connection_kwargs.get("socket_keepalive_options")
        assert isinstance(options, dict) and options.get(_IDLE, 7200) <= 60, options
