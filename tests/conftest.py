"""Fixtures: a real redis-server per test (the repo's redis.conf, a free port, its own dir),
local stand-ins for Chatwoot and the LLM, and the service itself in-process or as processes."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import aiohttp
import pytest
from redis.asyncio import Redis

from buffer_service import logs, service
from buffer_service.config import Settings
from buffer_service.store import BufferStore
from devtools.chatwoot_standin import ChatwootStandIn, LLMStandIn

ROOT = Path(__file__).resolve().parent.parent
REDIS_CONF = ROOT / "redis.conf"

logs.configure("console", os.environ.get("TEST_LOG_LEVEL", "warning"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class RedisServer:
    """A redis-server process of our own, which tests may kill and restart on the same data."""

    port: int
    dir: Path
    proc: subprocess.Popen[bytes] | None = None
    extra_args: tuple[str, ...] = ()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            ["redis-server", str(REDIS_CONF), "--port", str(self.port), "--dir", str(self.dir),
             "--bind", "127.0.0.1", "--daemonize", "no", "--logfile", str(self.dir / "redis.log"),
             *self.extra_args],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), 0.2) as s:
                s.sendall(b"PING\r\n")
                if s.recv(64).startswith(b"+PONG"):
                    return
            time.sleep(0.02)
        raise RuntimeError(f"redis-server did not start; see {self.dir / 'redis.log'}")

    def kill(self) -> None:
        """SIGKILL: no shutdown save, exactly what a crash or OOM kill does."""
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.kill()


@pytest.fixture
def redis_server(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[RedisServer]:
    """Extra redis-server arguments come from `@pytest.mark.redis_args(...)`."""
    if not shutil.which("redis-server"):
        pytest.fail("redis-server is not installed; run `make redis` (or .ci/run) first")
    marker = request.node.get_closest_marker("redis_args")
    server = RedisServer(free_port(), tmp_path / "redis", extra_args=marker.args if marker else ())
    server.dir.mkdir()
    server.start()
    yield server
    server.stop()


@pytest.fixture
async def redis(redis_server: RedisServer) -> AsyncIterator[Redis]:
    client = Redis.from_url(redis_server.url)
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
async def store(redis: Redis, settings: Settings) -> BufferStore:
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
        for _ in range(200):
            with contextlib.suppress(aiohttp.ClientError):
                async with self.session.get(self.url + "/healthz") as resp:
                    if resp.status == 200:
                        return
            if self._task.done():
                self._task.result()
            await asyncio.sleep(0.02)
        raise RuntimeError("service did not start")

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


def service_env(settings: Settings, **extra: str) -> dict[str, str]:
    """The environment an operator would set, for running the service as a real process."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI", "CHATWOOT"))}
    env.update({
        "REDIS_URL": settings.redis_url,
        "HOST": settings.host,
        "PORT": str(settings.port),
        "OPENAI_API_KEY": settings.openai_api_key,
        "OPENAI_BASE_URL": settings.openai_base_url,
        "OPENAI_MODEL": settings.openai_model,
        "CHATWOOT_BASE_URL": settings.chatwoot_base_url,
        "CHATWOOT_API_TOKEN": settings.chatwoot_api_token,
        "MESSAGE_BUFFER_DURATION_MS": str(settings.buffer_duration_ms),
        "BUFFER_PROCESSING_INTERVAL_MS": str(settings.processing_interval_ms),
        "MAX_BUFFER_SIZE": str(settings.max_buffer_size),
        "MAX_BUFFER_AGE_MS": str(settings.max_buffer_age_ms),
        "PROCESSING_LEASE_MS": str(settings.processing_lease_ms),
        "RETRY_BASE_MS": str(settings.retry_base_ms),
        "LLM_MAX_RETRIES": str(settings.llm_max_retries),
        "LOG_LEVEL": "info",
    })
    env.update(extra)
    return env


def spawn(args: list[str], env: dict[str, str], log_path: Path) -> subprocess.Popen[bytes]:
    out = log_path.open("ab")
    return subprocess.Popen([sys.executable, "-m", "buffer_service.cli", *args], env=env,
                            stdout=out, stderr=subprocess.STDOUT)


async def wait_http_ok(session: aiohttp.ClientSession, url: str, timeout: float = 15.0) -> None:
    """Poll a health URL of a service started as a process until it answers 200."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(aiohttp.ClientError):
            async with session.get(url) as resp:
                if resp.status == 200:
                    return
        await asyncio.sleep(0.05)
    raise AssertionError(f"{url} did not answer 200 within {timeout} s")


def with_port(settings: Settings) -> Settings:
    return replace(settings, port=free_port())
