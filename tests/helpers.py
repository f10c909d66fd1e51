"""What test modules share besides fixtures: waiting for a condition or a job state, claiming a
batch, webhook events, and the environment an operator would set for the service and its command line,
run as real processes."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
from aiohttp import web
from redis.asyncio import Redis

from buffer_service.chatwoot import buffered
from buffer_service.config import Settings
from buffer_service.store import Batch, BufferStore
from devtools.chatwoot_standin import ChatwootStandIn
from devtools.llm_standin import LLMCall
from devtools.net import free_port
from devtools.payloads import message_payload
from devtools.processes import operator_env, spawn_service

ROOT = Path(__file__).resolve().parent.parent


async def wait_for(predicate, timeout: float = 10.0, interval: float = 0.02) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        await asyncio.sleep(interval)
    raise AssertionError("condition not met in time")


def user_texts(call: LLMCall) -> list[str]:
    return [m["content"] for m in call.messages if m["role"] == "user"]


def service_env(settings: Settings, **extra: str) -> dict[str, str]:
    """The environment an operator would set, for running the service as a real process."""
    return operator_env(**{
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
        **extra,
    })


def with_port(settings: Settings) -> Settings:
    return replace(settings, port=free_port())


async def eventually(check: Callable[[], Awaitable[Any]], timeout: float = 10.0) -> Any:
    """Poll an async check until it returns something truthy; that value is returned."""
    deadline = time.monotonic() + timeout
    while True:
        value = await check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.05)


async def jobs(redis: Redis, conv: str) -> list[dict[str, str]]:
    """The job records of one conversation, oldest first."""
    found = [j for j in await BufferStore(redis, Settings()).job_records() if j.get("conv") == conv]
    return sorted(found, key=lambda j: int(j["id"].split("-")[1]))


def job_in(state: str, redis: Redis, conv: str) -> Callable[[], Awaitable[dict[str, str] | None]]:
    async def check() -> dict[str, str] | None:
        return next((j for j in await jobs(redis, conv) if j["state"] == state), None)
    return check


@asynccontextmanager
async def fail_a_part_late(chatwoot: ChatwootStandIn, redis: Redis, conversation_id: int, *,
                           posts: int, create_after_s: float = 2.0,
                           send: Awaitable[Any] | None = None) -> AsyncIterator[dict[str, str]]:
    """The next POST of a reply (a part, or the whole message) goes in late: Chatwoot creates it
    `create_after_s` after it arrives, the client gives up on it (unsure), the retry's question
    to Chatwoot (GET …/messages) gets a 500 and the batch fails (the caller's MAX_ATTEMPTS=1).
    `send`, if given, is what leads to that POST (a webhook), run once the delay is set.
    The block runs with the failed job while the message is still inside Chatwoot; after it,
    Chatwoot has created the message, the conversation's `posts`-th, and delivered its echo."""
    chatwoot.late_next(1, create_after_s=create_after_s)
    if send is not None:
        await send
    await wait_for(lambda: not chatwoot._late, timeout=10)  # the POST is inside Chatwoot
    chatwoot.fail_next(1)
    yield await eventually(job_in("failed", redis, f"1:{conversation_id}"), timeout=10)
    # At least: what the echo sets off (a handoff's private note) may be posted right after it.
    await wait_for(lambda: len(chatwoot.posts_for(conversation_id)) >= posts, timeout=10)
    late = chatwoot.posts_for(conversation_id)[posts - 1].message_id
    await wait_for(lambda: any(e.message_id == late for e in chatwoot.echoes), timeout=10)


def conversation_event(event: str, conversation_id: int, *, status: str = "pending",
                       assignee: dict[str, Any] | None = None, can_reply: bool = True,
                       at: datetime | None = None) -> dict[str, Any]:
    """A conversation_* webhook: the conversation payload itself plus `event`."""
    conversation = message_payload(message_id=1, conversation_id=conversation_id, status=status,
                                   assignee=assignee, can_reply=can_reply,
                                   created_at=at or datetime.now(UTC))["conversation"]
    return {**conversation, "event": event, "changed_attributes": []}


HUMAN = {"id": 9, "name": "Ana", "type": "user"}


async def claim_one(store: BufferStore) -> Batch:
    """Claim the first due batch of any shard, as a worker would."""
    async def claim() -> Batch | None:
        for shard in range(store.settings.shards):
            _, _, batches = await store.claim(shard, 10)
            if batches:
                return batches[0]
        return None
    return await eventually(claim, timeout=5)


def ops_env(settings: Settings, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI", "CHATWOOT", "REDIS"))}
    env.update({"REDIS_URL": settings.redis_url, **extra})
    return env


async def run_process(argv: list[str], env: dict[str, str]) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        *argv, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def run_cli(settings: Settings, *args: str, **env: str) -> tuple[int, str, str]:
    """`buffer-service ARGS` as an operator runs it (asynchronously: the service under test
    shares this event loop)."""
    return await run_process([sys.executable, "-m", "buffer_service.cli", *args], ops_env(settings, **env))


async def cli_json(settings: Settings, *args: str) -> object:
    code, out, err = await run_cli(settings, *args, "--json")
    assert code == 0, err
    return orjson.loads(out)


class HeldChatwoot(ChatwootStandIn):
    """The Chatwoot stand-in with a door on its message endpoint, to stop a worker at an exact
    step. `hold_before`: a request waits at the door, and one whose client died meanwhile is
    dropped, as if it never reached Chatwoot. `hold_after`: the post is created, and the
    response waits. `opened` lets everything through."""

    def __init__(self) -> None:
        super().__init__()
        self.hold_before = False
        self.hold_after = False
        self.opened = asyncio.Event()
        self.arrived = 0
        self.dropped = 0

    def _make_app(self) -> web.Application:
        app = super()._make_app()
        app.middlewares.insert(0, self._door)  # outside the stand-in's own recording
        return app

    @web.middleware
    async def _door(self, request: web.Request, handler: Any) -> web.StreamResponse:
        if request.path.endswith("/toggle_typing_status"):  # beside the steps, not one of them
            return await handler(request)
        self.arrived += 1
        if self.hold_before:
            await self.opened.wait()
            if request.transport is None:
                self.dropped += 1
                return web.Response(status=499)
        response = await handler(request)
        if self.hold_after:
            await self.opened.wait()
        return response


class Workers:
    """Worker processes of the service, started and killed like an orchestrator would."""

    def __init__(self, logs: Path) -> None:
        self.logs = logs
        self.procs: list[subprocess.Popen[bytes]] = []

    async def start(self, settings: Settings, **env: str) -> subprocess.Popen[bytes]:
        log = self.logs / f"worker{len(self.procs)}.log"
        proc = spawn_service(["worker"], service_env(with_port(settings), **env), log)
        self.procs.append(proc)

        async def started() -> bool:
            assert proc.poll() is None, log.read_text()
            return log.exists() and b"worker_started" in log.read_bytes()
        await eventually(started, timeout=30)
        return proc

    def log_text(self) -> str:
        return "".join(p.read_text() for p in sorted(self.logs.glob("worker*.log")))


def kill9(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait()


async def wait_exit(proc: subprocess.Popen[bytes], timeout: float) -> int:
    deadline = time.monotonic() + timeout
    while proc.poll() is None:
        assert time.monotonic() < deadline, "process did not exit"
        await asyncio.sleep(0.05)
    return proc.returncode


class RefusesStatusOnce(ChatwootStandIn):
    """Chatwoot answering the first `toggle_status` with a 503, the rest as usual."""

    async def _toggle_status(self, request: web.Request) -> web.Response:
        if not self.status_changes and not getattr(self, "refused", False):
            self.refused = True
            return web.json_response({"error": "busy"}, status=503)
        return await super()._toggle_status(request)


async def buffered_in(redis: Redis, key: str) -> list[dict[str, Any]]:
    """The messages a buffer (or a batch's messages list) holds, in either format."""
    return buffered(await redis.lrange(key, 0, -1))[1]
