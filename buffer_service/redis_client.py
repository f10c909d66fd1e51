"""The Redis client of the service: one Redis server, or a Redis Cluster (REDIS_MODE).

`auto` (the default) asks the server REDIS_URL names: `INFO cluster` says cluster_enabled:1 on
a cluster node. A standalone Redis is then used exactly as before this module existed; a cluster
through redis-py's RedisCluster, which routes every command and script by its key's slot and
follows slot moves and failovers (MOVED/ASK, a refreshed slot map).

What makes the key layout safe on a cluster is written once, in keys.py: every key one script
touches carries its shard's hash tag, so the script runs on the one node that holds the slot.
Pub/sub differs per kind of message: a PUBLISH (the wake-up channel) reaches subscribers on
every node of a cluster, but a keyspace event only those of the node where the key expired;
`subscription_nodes` gives the worker every primary to listen on (worker.py).
"""

from __future__ import annotations

import asyncio
import socket
from typing import Any
from urllib.parse import urlparse

import hiredis
import structlog
from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.connection import (
    AbstractConnection,
    Connection,
    SSLConnection,
    UnixDomainSocketConnection,
    parse_url,
)
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.cluster import get_node_name
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import DataError, RedisClusterException, RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.typing import EncodableT
from redis.utils import str_if_bytes

from .config import Settings

# What a Redis call can raise when Redis is away or its topology moves. redis-py's cluster client
# refreshes its slot map outside its own error handling, so a failover's "All slots are not
# covered" (RedisClusterException, not a RedisError) reaches any caller: every place that
# handles Redis being away catches both.
REDIS_ERRORS: tuple[type[Exception], ...] = (RedisError, RedisClusterException)

log = structlog.get_logger("buffer_service.redis_client")

# The client type every module takes: both answer the same commands for keys of one slot.
AnyRedis = Redis | RedisCluster

# How long `auto` keeps asking a Redis that does not answer yet (it may start with us) before
# it settles on standalone, which is what the service did before cluster support.
_DETECT_ATTEMPTS = 5
_MAX_CONNECTIONS = 64
# Per node. redis-py's cluster client has no blocking pool: a command past the limit fails at once
# (MaxConnectionsError) instead of waiting, so the limit is set far above what the webhook
# handlers and WORKER_CONCURRENCY keep in flight (Redis allows 10,000 clients by default).
_CLUSTER_MAX_CONNECTIONS = 1024


class _HiredisPacking(AbstractConnection):
    """Commands packed by hiredis (C) instead of redis-py's asyncio connection, which packs each
    argument in Python: a webhook's EVALSHA of 26 arguments costs a third of the CPU (39 against
    13 us, bench/hot_path.py). Same bytes on the wire; anything hiredis cannot pack is refused as
    redis-py refuses it (DataError), and a non-UTF-8 client encoding keeps redis-py's own."""

    def pack_command(self, *args: EncodableT) -> list[bytes]:
        if self.encoder.encoding.lower().replace("-", "") != "utf8":
            return super().pack_command(*args)
        # As redis-py does: "CONFIG GET" is sent as two arguments.
        first = args[0]
        if isinstance(first, str):
            args = (*first.encode().split(), *args[1:])
        elif isinstance(first, bytes) and b" " in first:
            args = (*first.split(), *args[1:])
        try:
            packed: Any = tuple(bytes(a) if isinstance(a, memoryview) else a for a in args)
            # hiredis's stub types the tuple as one of one item; it takes any number.
            return [hiredis.pack_command(packed)]
        except TypeError as exc:  # bool, None, ...
            raise DataError(str(exc)) from exc


class _FastConnection(_HiredisPacking, Connection):
    pass


class _FastSSLConnection(_HiredisPacking, SSLConnection):
    pass


class _FastUnixConnection(_HiredisPacking, UnixDomainSocketConnection):
    pass


# The class a URL picks (redis://, rediss://, unix://) and the same with hiredis packing.
_FAST: dict[type[AbstractConnection], type[AbstractConnection]] = {
    Connection: _FastConnection, SSLConnection: _FastSSLConnection,
    UnixDomainSocketConnection: _FastUnixConnection}


def _keepalive_options() -> dict[int, int]:
    """TCP keepalive probes after 30 s idle, then every 10 s, 3 unanswered: a NAT or load
    balancer keeps an idle connection's entry (AWS NLB drops it after 350 s), and a peer gone
    without a word is noticed within about a minute. Set here rather than left to redis-py: only
    redis-py 8 has such defaults, older ones (pyproject allows redis>=5) leave the OS's 2 hours.
    Each option only where the platform has it (macOS names the idle time TCP_KEEPALIVE)."""
    idle = getattr(socket, "TCP_KEEPIDLE", None) or getattr(socket, "TCP_KEEPALIVE", None)
    wanted = ((idle, 30), (getattr(socket, "TCP_KEEPINTVL", None), 10),
              (getattr(socket, "TCP_KEEPCNT", None), 3))
    return {option: value for option, value in wanted if option is not None}


_KEEPALIVE: dict[str, Any] = {"socket_keepalive": True,
                              "socket_keepalive_options": _keepalive_options()}


def seed_urls(settings: Settings) -> list[str]:
    return [url.strip() for url in settings.redis_url.split(",") if url.strip()]


def _retry() -> Retry:
    return Retry(ExponentialBackoff(cap=0.5, base=0.05), 3)


def standalone(url: str, *, blocking: bool = False) -> Redis:
    """A client that retries a command a few times across a reconnect, with backoff.

    `blocking` is for the pub/sub connection, which waits for messages without a read timeout
    (worker.py sends it a PING when it is quiet). TCP keepalive (`_keepalive_options`) keeps a
    NAT's entry for an idle connection, and lets the kernel notice a peer gone without a word.
    """
    # A blocking pool: a burst of concurrent webhooks waits briefly for a connection instead
    # of failing with "Too many connections".
    pool = BlockingConnectionPool.from_url(
        url,
        max_connections=_MAX_CONNECTIONS,
        timeout=5,
        socket_connect_timeout=2,
        socket_timeout=None if blocking else 5,
        retry=_retry(),
        retry_on_error=[RedisConnectionError, RedisTimeoutError],
        health_check_interval=0 if blocking else 30,
        **_KEEPALIVE,
    )
    pool.connection_class = _FAST.get(pool.connection_class, pool.connection_class)
    return Redis(connection_pool=pool)


def cluster(settings: Settings) -> RedisCluster:
    """A RedisCluster seeded with every node REDIS_URL lists; credentials and TLS from the first,
    its `ssl_*` query options too (`?ssl_ca_certs=/path/ca.pem`), as on one server."""
    urls = seed_urls(settings)
    seeds = [ClusterNode(urlparse(u).hostname or "127.0.0.1", urlparse(u).port or 6379) for u in urls]
    first = parse_url(urls[0])
    tls: dict[str, Any] = {k: v for k, v in first.items() if k.startswith("ssl_")}
    return RedisCluster(
        startup_nodes=seeds,
        username=first.get("username") or None,
        password=first.get("password") or None,
        ssl=first.get("connection_class") is SSLConnection,
        **tls,
        max_connections=_CLUSTER_MAX_CONNECTIONS,
        # redis-py's default rebuilds the client every 5th MOVED by closing every connection,
        # those other requests are using too: during a slot migration (MOVED after an ASK that
        # went out on another connection than its ASKING) they failed with AttributeError and
        # "Connection closed by server", for many seconds. Each MOVED still patches the slot map,
        # and the worker refreshes it when it finds it changed (primary_names, every few seconds).
        reinitialize_steps=0,
        socket_connect_timeout=2,
        socket_timeout=5,
        retry=_retry(),
        retry_on_error=[RedisConnectionError, RedisTimeoutError],
        health_check_interval=30,
        **_KEEPALIVE,
    )


async def is_cluster(settings: Settings, *, attempts: int = _DETECT_ATTEMPTS,
                     fallback: bool = True) -> bool:
    """REDIS_MODE, or for `auto` what the first reachable seed says about itself. When none
    answers in `attempts` rounds: standalone with a warning if `fallback`, else the error."""
    if settings.redis_mode != "auto":
        return settings.redis_mode == "cluster"
    urls = seed_urls(settings)
    delay = 0.2
    for attempt in range(attempts):
        for url in urls:
            probe = Redis.from_url(url, socket_connect_timeout=2, socket_timeout=5)
            try:
                info = await probe.info("cluster")
                return bool(info.get("cluster_enabled"))
            except RedisError as exc:
                last = exc
            finally:
                await probe.aclose()
        if attempt + 1 < attempts:
            await asyncio.sleep(delay)
            delay *= 2
    if not fallback:
        raise last
    log.warning("redis_mode_unknown", error=str(last), assumed="standalone",
                note="set REDIS_MODE=cluster if REDIS_URL names a cluster node")
    return False


async def connect(settings: Settings, *, attempts: int = _DETECT_ATTEMPTS,
                  fallback: bool = True) -> AnyRedis:
    """The service's client: standalone or cluster, as REDIS_MODE says or the server tells
    (`attempts`, `fallback`: see is_cluster; the CLI asks once and reports an unreachable Redis)."""
    if await is_cluster(settings, attempts=attempts, fallback=fallback):
        client = cluster(settings)
        await client.initialize()
        log.info("redis_cluster", primaries=len(client.get_primaries()))
        return client
    if len(seed_urls(settings)) > 1:
        raise SystemExit("REDIS_URL lists several nodes, but Redis is not a cluster (REDIS_MODE)")
    return standalone(settings.redis_url)


async def subscription_nodes(redis: AnyRedis, settings: Settings) -> list[Redis]:
    """Blocking clients for pub/sub: the standalone server, or each primary of the cluster as it
    is now (the slot map refreshed first, so a promoted replica is among them). The caller
    closes them."""
    if not isinstance(redis, RedisCluster):
        return [standalone(settings.redis_url, blocking=True)]
    await redis.nodes_manager.initialize()
    return [Redis(connection_pool=BlockingConnectionPool(
        **_node_kwargs(node), max_connections=4, timeout=5, socket_connect_timeout=2,
        socket_timeout=None, **_KEEPALIVE, retry=_retry(),
        retry_on_error=[RedisConnectionError, RedisTimeoutError]))
        for node in redis.get_primaries()]


def node_of(redis: AnyRedis, key: str) -> str:
    """The node that holds `key` ("host:port") as the cluster client's slot map has it; '' on a
    standalone Redis, and for a slot the map does not cover (its command will say more)."""
    if not isinstance(redis, RedisCluster):
        return ""
    try:
        node = redis.get_node_from_key(key)
    except (LookupError, RedisError, RedisClusterException):
        return ""
    return node.name if node is not None else ""


async def primary_names(redis: AnyRedis) -> frozenset[str]:
    """Which nodes are primaries now ("host:port"); '' standalone. Read with one CLUSTER SLOTS
    through the client's default node; the client's slot map is refreshed only when that read
    differs from it. Not NodesManager.initialize() every time: redis-py 8.1 marks every
    connection of the client for reconnect on each refresh, and the worker asks every
    TOPOLOGY_CHECK_S (a new connection and handshake for every connection used after each)."""
    if not isinstance(redis, RedisCluster):
        return frozenset({""})
    manager, asked = redis.nodes_manager, redis.get_default_node()
    if asked is None:  # redis-py drops it when a refresh fails or a node says CLUSTERDOWN
        await manager.initialize()
        return frozenset(node.name for node in redis.get_primaries())
    owners: dict[tuple[int, int], str] = {}
    for start, end, primary, *_ in await asked.execute_command("CLUSTER SLOTS"):
        host = str_if_bytes(primary[0]) or asked.host  # '' on a cluster of one node
        owners[(int(start), int(end))] = get_node_name(*manager.remap_host_port(host, int(primary[1])))
    cached = manager.slots_cache
    same = sum(end - start + 1 for start, end in owners) == len(cached) and all(
        cached.get(slot) and cached[slot][0].name == name
        for (start, end), name in owners.items() for slot in range(start, end + 1))
    if same:
        return frozenset(owners.values())
    await manager.initialize()
    return frozenset(node.name for node in redis.get_primaries())


def _node_kwargs(node: ClusterNode) -> dict[str, Any]:
    kwargs = dict(node.connection_kwargs)
    kwargs["connection_class"] = node.connection_class
    for unwanted in ("socket_timeout", "socket_connect_timeout", "socket_keepalive",
                     "socket_keepalive_options", "retry", "retry_on_error", "max_connections"):
        kwargs.pop(unwanted, None)
    return kwargs
