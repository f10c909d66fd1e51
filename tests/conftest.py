"""Fixtures: a real redis-server per test (the repo's redis.conf, a free port, its own dir),
local stand-ins for Chatwoot and the LLM, and the service itself in-process or as processes.

TEST_REDIS=cluster runs the tests that use these fixtures on a local Redis Cluster of three
primaries instead (.ci/run does so for the integration suite); a test that needs one server
(it kills or reconfigures it) is marked `standalone_only` and skipped there."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import pytest
from helpers import HeldChatwoot, RefusesStatusOnce, Workers
from redis.asyncio import Redis

from buffer_service import logs, redis_client, service
from buffer_service.config import Settings
from buffer_service.store import BufferStore
from devtools.chatwoot_standin import ChatwootStandIn
from devtools.llm_standin import LLMStandIn
from devtools.net import free_port, wait_http
from devtools.redis_server import RedisClusterServers, RedisServer

logs.configure("console", os.environ.get("TEST_LOG_LEVEL", "warning"))

ON_CLUSTER = os.environ.get("TEST_REDIS", "standalone") == "cluster"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The cluster pass (`make test-cluster`) is for what goes through Redis: a test that uses
    no redis-server runs exactly as in the standalone pass, so it is not run twice."""
    if not ON_CLUSTER:
        return
    for item in items:
        if "redis_server" not in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.skip(reason="uses no Redis: covered by the standalone pass"))


@pytest.fixture
def redis_server(request: pytest.FixtureRequest,
                 tmp_path: Path) -> Iterator[RedisServer | RedisClusterServers]:
    """Extra redis-server arguments come from `@pytest.mark.redis_args(...)`."""
    marker = request.node.get_closest_marker("redis_args")
    if ON_CLUSTER:
        if marker or request.node.get_closest_marker("standalone_only"):
            pytest.skip("needs one redis-server (TEST_REDIS=cluster)")
        cluster = RedisClusterServers(tmp_path / "cluster").start()
        yield cluster
        cluster.stop()
        return
    server = RedisServer(tmp_path / "redis", extra_args=marker.args if marker else ()).start()
    yield server
    server.stop()


@pytest.fixture
async def redis(redis_server: RedisServer | RedisClusterServers) -> AsyncIterator[redis_client.AnyRedis]:
    # A plain client on one server, whatever it says about itself (a test may make it a cluster
    # node by hand); the cluster's client for TEST_REDIS=cluster.
    client = (await redis_client.connect(Settings(redis_url=redis_server.url, redis_mode="cluster"))
              if ON_CLUSTER else Redis.from_url(redis_server.url))
    yield client
    await client.aclose()


@pytest.fixture
async def llm() -> AsyncIterator[LLMStandIn]:
    server = LLMStandIn()
    await server.start()
    yield server
    await server.stop()


@pytest.fixture
async def chatwoot() -> AsyncIterator[ChatwootStandIn]:
    server = ChatwootStandIn()
    await server.start()
    yield server
    await server.stop()


@pytest.fixture
def settings(redis_server: RedisServer, llm: LLMStandIn, chatwoot: ChatwootStandIn) -> Settings:
    """Short windows so timing tests run in a second, everything else as in production."""
    return Settings(
        redis_url=redis_server.url,
        host="127.0.0.1",
        port=free_port(),
        openai_api_key=llm.api_key,
        openai_base_url=f"{llm.base_url}/v1",
        openai_model="stand-in-model",
        llm_max_retries=0,
        chatwoot_base_url=chatwoot.base_url,
        chatwoot_api_token=chatwoot.token,
        buffer_duration_ms=1000,
        processing_interval_ms=2000,
        max_buffer_size=50,
        max_buffer_age_ms=10_000,
        retry_base_ms=100,
        shutdown_grace_s=5,
        processing_lease_ms=5000,
    )


@pytest.fixture
async def store(redis: redis_client.AnyRedis, settings: Settings) -> BufferStore:
    return BufferStore(redis, settings)


class Service:
    """The service running in this test's event loop, reachable over real HTTP."""

    def __init__(self, settings: Settings, *, http: bool = True, worker: bool = True) -> None:
        self.settings = settings
        self.url = f"http://127.0.0.1:{settings.port}"
        self._stop = asyncio.Event()
        self._task = asyncio.create_task(service.run(settings, http=http, worker=worker, stop=self._stop))
        self.session = aiohttp.ClientSession()

    async def wait_ready(self) -> None:
        async def running() -> None:
            if self._task.done():
                self._task.result()  # the service's own error, if it failed to start
                raise RuntimeError("service stopped before it answered")

        await wait_http(self.url + "/healthz", timeout=10, interval=0.02, alive=running)

    async def post(self, path: str, payload: object) -> tuple[int, dict]:
        async with self.session.post(self.url + path, json=payload) as resp:
            return resp.status, await resp.json()

    async def webhook(self, payload: object) -> dict:
        status, body = await self.post("/webhooks/chatwoot", payload)
        assert status == 200, body
        return body

    async def close(self) -> None:
        self._stop.set()
        await asyncio.wait_for(self._task, 15)
        await self.session.close()


@pytest.fixture
async def make_service() -> AsyncIterator:
    started: list[Service] = []

    async def make(settings: Settings, **kwargs: bool) -> Service:
        svc = Service(settings, **kwargs)
        started.append(svc)
        await svc.wait_ready() if kwargs.get("http", True) else await asyncio.sleep(0.1)
        return svc

    yield make
    for svc in started:
        await svc.close()


@pytest.fixture
async def held_chatwoot() -> AsyncIterator[HeldChatwoot]:
    server = HeldChatwoot()
    await server.start()
    yield server
    server.opened.set()
    await server.stop()


@pytest.fixture
async def flaky_chatwoot() -> AsyncIterator[RefusesStatusOnce]:
    server = RefusesStatusOnce()
    await server.start()
    yield server
    await server.stop()


@pytest.fixture
def workers(tmp_path: Path) -> Iterator[Workers]:
    started = Workers(tmp_path)
    yield started
    for proc in started.procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
