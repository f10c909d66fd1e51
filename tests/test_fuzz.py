"""Hostile input at a running server process: hypothesis, and schemathesis against the OpenAPI file.

The server runs as a real process (`buffer-service serve --no-worker`, JSON logs to a file) so
that "never an exception in the logs" is checked on what an operator would see. With no worker,
every message the server accepted is still in Redis at the end, so the buffers must hold exactly
the messages that were answered "buffered": an invalid payload that left anything behind shows.
Hypothesis runs in a thread with a blocking client while the event loop keeps serving the LLM
and Chatwoot stand-ins, which a worker process uses at the end to answer a valid message.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import itertools
import json
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp
import orjson
from helpers import buffered_in, service_env, wait_for, with_port
from hypothesis import HealthCheck, given
from hypothesis import settings as hyp_settings
from hypothesis import strategies as st

from devtools.payloads import message_payload, webhook_headers
from devtools.processes import spawn_service

ADMIN = "admin-token-0123456789abcdef"
PATHS = ["/webhooks/chatwoot", "/functions/v1/chatwoot-webhook-v2",
         "/functions/v1/message-buffer-manager?action=handle"]
# The fields classify() reads; mutating them is where a type confusion would hide.
USED = ["event", "id", "content", "message_type", "private", "attachments", "conversation",
        "conversation.id", "conversation.status", "conversation.inbox_id", "account", "account.id",
        "inbox", "inbox.id", "sender", "sender.name"]
UNICODE_EDGES = ["\u0000", "\ufeff", "\u202e", "\u200b", "\u2028", "\u0085", "e\u0301" * 50,
                 "\U0001f600" * 2000, "\uffff", "\U0010ffff", "Z\u0351\u0352\u0353" * 300,
                 "\ud7ff\ue000", "🇧🇷" * 100, "\t\r\n\x1b[31m", "' OR 1=1 --", "{{7*7}}", "%s%n"]

leaves = (st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70)
          | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=40)
          | st.sampled_from(UNICODE_EDGES))
json_values = st.recursive(
    leaves,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12)
lone_surrogates = st.text(st.characters(categories=["Cs"]), min_size=1, max_size=3)


class Client:
    """A blocking HTTP client for the hypothesis thread; a fresh connection per request, so a
    connection the server closed never spoils the next example."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.outcomes: dict[str, int] = {}

    def post(self, path: str, body: bytes, headers: dict[str, str] | None = None) -> tuple[int, Any]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=15)
        try:
            conn.request("POST", path, body=body, headers={"Content-Type": "application/json",
                                                            **(headers or {})})
            resp = conn.getresponse()
            status, raw = resp.status, resp.read()
        finally:
            conn.close()
        assert status < 500, (status, raw[:300], body[:300])
        answer = orjson.loads(raw)
        assert isinstance(answer, dict) and isinstance(answer.get("status"), str), answer
        if status == 200:
            assert answer["status"] in ("buffered", "duplicate", "ignored"), answer
        else:
            assert answer["status"] == "rejected" and answer["error"], answer
        key = f"{status} {answer['status']}"
        self.outcomes[key] = self.outcomes.get(key, 0) + 1
        return status, answer


def _set(payload: dict[str, Any], dotted: str, value: Any) -> None:
    head, _, rest = dotted.partition(".")
    if rest and isinstance(payload.get(head), dict):
        payload[head][rest] = value
    else:
        payload[head] = value


def _dumps(value: Any, ascii_only: bool) -> bytes:
    # The stdlib encoder: orjson refuses integers beyond 64 bits, which are worth sending.
    return json.dumps(value, ensure_ascii=ascii_only).encode()


def run_properties(client: Client, examples: int) -> None:
    ids = itertools.count(1)
    common = hyp_settings(max_examples=examples, deadline=None, database=None, derandomize=True,
                      suppress_health_check=list(HealthCheck))

    @common
    @given(path=st.sampled_from(PATHS), conv=st.integers(1, 30),
           content=st.one_of(st.text(max_size=200), st.sampled_from(UNICODE_EDGES)),
           mutations=st.lists(st.tuples(st.sampled_from(USED) | st.text(max_size=6), json_values),
                              max_size=3), ascii_only=st.booleans())
    def mutated_messages(path: str, conv: int, content: str, mutations: list[tuple[str, Any]],
                         ascii_only: bool) -> None:
        payload = message_payload(message_id=next(ids), conversation_id=conv, content=content)
        for dotted, value in mutations:
            _set(payload, dotted, value)
        client.post(path, _dumps(payload, ascii_only))

    @common
    @given(path=st.sampled_from(PATHS), value=json_values, ascii_only=st.booleans())
    def any_json(path: str, value: Any, ascii_only: bool) -> None:
        client.post(path, _dumps(value, ascii_only))

    # One fixed body, so that what is drawn from it never depends on state outside hypothesis.
    valid = orjson.dumps(message_payload(message_id=10**12, conversation_id=1))

    @common
    @given(path=st.sampled_from(PATHS), data=st.data())
    def malformed_bytes(path: str, data: st.DataObject) -> None:
        body = data.draw(st.one_of(
            st.binary(max_size=300),
            st.integers(0, len(valid)).map(lambda n: valid[:n]),  # cut short
            st.tuples(st.integers(0, len(valid) - 1), st.binary(min_size=1, max_size=4)).map(
                lambda t: valid[:t[0]] + t[1] + valid[t[0] + 1:]),  # bytes replaced
            lone_surrogates.map(lambda s: valid.replace(b'"hi"', json.dumps(s).encode())),
        ))
        client.post(path, body)

    @hyp_settings(common, max_examples=max(20, examples // 10))
    @given(path=st.sampled_from(PATHS), depth=st.integers(1, 3000), as_dict=st.booleans(),
           where=st.sampled_from([None, "content", "conversation", "attachments", "sender", "extra"]))
    def deep_nesting(path: str, depth: int, as_dict: bool, where: str | None) -> None:
        nested = ('{"a":' * depth + "1" + "}" * depth) if as_dict else ("[" * depth + "]" * depth)
        if where is None:
            body = nested.encode()
        else:
            payload = message_payload(message_id=next(ids), conversation_id=2)
            payload[where] = "@@"
            body = orjson.dumps(payload).replace(b'"@@"', nested.encode())
        client.post(path, body)

    @hyp_settings(common, max_examples=max(10, examples // 40))
    @given(path=st.sampled_from(PATHS),
           size=st.sampled_from([4001, 70_000, 500_000, 1_048_000, 1_048_577, 1_500_000]),
           char=st.sampled_from(["a", "é", "😀", "\u0000"]),
           where=st.sampled_from(["content", "sender.name", "event", "message_type", "extra"]))
    def huge_strings(path: str, size: int, char: str, where: str) -> None:
        payload = message_payload(message_id=next(ids), conversation_id=3)
        _set(payload, where, char * (size // len(char.encode())))
        status, answer = client.post(path, orjson.dumps(payload))
        assert status in (200, 400, 413), answer
        if where == "content" and answer.get("status") == "buffered":
            assert answer.get("truncated") is True

    mutated_messages()
    any_json()
    malformed_bytes()
    deep_nesting()
    huge_strings()


async def _ready(url: str, proc: subprocess.Popen[bytes]) -> None:
    async with aiohttp.ClientSession() as session:
        for _ in range(300):
            assert proc.poll() is None, "the server exited"
            with contextlib.suppress(aiohttp.ClientError):
                async with session.get(url + "/readyz") as resp:
                    if resp.status == 200:
                        return
            await asyncio.sleep(0.05)
    raise AssertionError("server not ready")


def _log_problems(path: Path) -> list[str]:
    problems = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            entry = orjson.loads(line)
        except orjson.JSONDecodeError:  # aiohttp's own logger writes plain lines, tracebacks too
            problems.append(line)
            continue
        if entry.get("level") not in ("debug", "info", "warning") or "exception" in entry:
            problems.append(line)
    return problems


async def _stop(*procs: subprocess.Popen[bytes]) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    for proc in procs:
        assert await asyncio.to_thread(proc.wait, 20) == 0


async def test_hostile_payloads_never_5xx_never_log_an_exception_never_store_anything(
        settings, redis, llm, chatwoot, tmp_path):
    env = service_env(settings, LOG_FORMAT="json", RATE_LIMIT_PER_CONVERSATION="0")
    server = spawn_service(["serve", "--no-worker"], env, tmp_path / "server.log")
    worker = None
    try:
        url = f"http://127.0.0.1:{settings.port}"
        await _ready(url, server)
        client = Client(settings.port)
        await asyncio.to_thread(run_properties, client, 800)
        total = sum(client.outcomes.values())
        assert total >= 2000, client.outcomes  # thousands of examples, all kinds of outcome
        assert {"200 buffered", "200 ignored", "400 rejected", "413 rejected"} <= set(client.outcomes)

        stored = 0
        async for key in redis.scan_iter(match="*:buf:*"):
            stored += len(await buffered_in(redis, key))
        assert stored == client.outcomes["200 buffered"], client.outcomes
        assert _log_problems(tmp_path / "server.log") == []

        # Still serving: a valid message gets its reply (a worker joins for that).
        await redis.flushdb()
        worker = spawn_service(["worker"], service_env(with_port(settings), LOG_FORMAT="json"),
                       tmp_path / "worker.log")
        await asyncio.sleep(1.0)  # the worker subscribes to wake-ups
        async with aiohttp.ClientSession() as session:
            payload = message_payload(message_id=10**9, conversation_id=77, content="still there?")
            async with session.post(url + PATHS[0], json=payload) as resp:
                assert resp.status == 200 and (await resp.json())["status"] == "buffered"
        await wait_for(lambda: any(p.conversation_id == 77 for p in chatwoot.posts), timeout=10)
        assert chatwoot.posts[-1].body["content"] == "Reply to: still there?"
    finally:
        await _stop(server, *([worker] if worker else []))
    assert _log_problems(tmp_path / "server.log") == []


async def test_forged_signatures_never_get_in(settings, redis, tmp_path):
    secret = "chatwoot-webhook-secret-from-the-ui"
    env = service_env(settings, LOG_FORMAT="json", CHATWOOT_WEBHOOK_SECRET=secret)
    server = spawn_service(["serve", "--no-worker"], env, tmp_path / "server.log")
    try:
        await _ready(f"http://127.0.0.1:{settings.port}", server)
        client = Client(settings.port)
        # What http.client can put in a header: printable latin-1.
        latin1 = st.text(st.characters(codec="latin-1", categories=["L", "N", "P", "S", "Zs"]), max_size=80)
        header_values = latin1 | st.sampled_from(
            ["sha256=", "sha256=" + "0" * 64, "SHA256=" + "a" * 64, "0", "-1", "99999999999999"])

        @hyp_settings(max_examples=400, deadline=None, database=None, derandomize=True,
                  suppress_health_check=list(HealthCheck))
        @given(path=st.sampled_from(PATHS), conv=st.integers(1, 5), data=st.data())
        def forged(path: str, conv: int, data: st.DataObject) -> None:
            body = orjson.dumps(message_payload(message_id=conv, conversation_id=conv))
            real = webhook_headers(body, secret)
            headers = {}
            for name in ("X-Chatwoot-Signature", "X-Chatwoot-Timestamp"):
                choice = data.draw(st.sampled_from(["real", "other secret", "random", "absent"]))
                if choice == "real":
                    headers[name] = real[name]
                elif choice == "other secret":
                    headers[name] = webhook_headers(body, secret + "x")[name]
                elif choice == "random":
                    headers[name] = data.draw(header_values)
            tamper = data.draw(st.booleans())
            if headers == {n: real[n] for n in headers} and len(headers) == 2 and not tamper:
                tamper = True  # the one honest combination; make it dishonest
            if tamper:
                body = body.replace(b'"hi"', b'"hj"')
            status, answer = client.post(path, body, headers)
            assert status == 401, answer

        await asyncio.to_thread(forged)
        stored = [k async for k in redis.scan_iter(match="*:buf:*")]
        assert stored == [] and [k async for k in redis.scan_iter(match="*:seen:*")] == []
    finally:
        await _stop(server)
    assert _log_problems(tmp_path / "server.log") == []


async def test_schemathesis_finds_no_server_error_in_the_public_api(settings, tmp_path):
    env = service_env(settings, LOG_FORMAT="json", ADMIN_TOKEN=ADMIN)
    server = spawn_service(["serve", "--no-worker"], env, tmp_path / "server.log")
    try:
        url = f"http://127.0.0.1:{settings.port}"
        await _ready(url, server)
        proc = await asyncio.create_subprocess_exec(
            str(Path(sys.executable).parent / "schemathesis"), "run", f"{url}/openapi.json",
            "--checks", "not_a_server_error,status_code_conformance,content_type_conformance,"
                        "response_schema_conformance,response_headers_conformance",
            "--max-examples", "50", "--seed", "1", "--generation-database", "none", "--no-color",
            "--header", f"Authorization: Bearer {ADMIN}", "--request-timeout", "10",
            cwd=tmp_path,  # it keeps a cache directory where it runs
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
        out, _ = await asyncio.wait_for(proc.communicate(), 120)
        report = out.decode(errors="replace")
        assert proc.returncode == 0, report[-4000:]
        assert "No issues found" in report, report[-2000:]
    finally:
        await _stop(server)
    assert _log_problems(tmp_path / "server.log") == []
