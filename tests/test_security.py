"""Hardening: webhook and admin authentication, input limits, abuse limits, failing dependencies.

Every rejection is checked twice: by its answer, and by Redis holding nothing from it (no buffered
message, no de-duplication marker that would make a later honest delivery look like a repeat).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import signal
import time
from dataclasses import replace
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from helpers import buffered_in, service_env, user_texts, wait_for, with_port
from prometheus_client import REGISTRY

from buffer_service.app import create_app
from buffer_service.auth import signature_error
from buffer_service.chatwoot import TRUNCATION_MARK
from buffer_service.config import ConfigError, Settings
from buffer_service.downloads import Downloader
from buffer_service.flags import Flags
from buffer_service.journal import WebhookLog
from buffer_service.limits import Limits
from buffer_service.ops import Operations
from buffer_service.store import BufferStore
from buffer_service.transcripts import Transcripts
from devtools.chatwoot_standin import ChatwootStandIn
from devtools.llm_standin import LLMStandIn
from devtools.payloads import message_payload, webhook_headers
from devtools.processes import spawn_service

SECRET = "chatwoot-webhook-secret-from-the-ui"
TOKEN = "webhook-token-0123456789abcdef"
ADMIN = "admin-token-0123456789abcdef"
WEBHOOK = "/webhooks/chatwoot"
ALL_WEBHOOK_PATHS = [WEBHOOK, "/functions/v1/chatwoot-webhook-v2",
                     "/functions/v1/message-buffer-manager?action=handle"]


async def buffered(redis) -> list[dict[str, Any]]:
    """Every message waiting in any conversation's buffer."""
    out = []
    async for key in redis.scan_iter(match="*:buf:*"):
        out += await buffered_in(redis, key)
    return out


async def seen(redis) -> int:
    return len([k async for k in redis.scan_iter(match="*:seen:*")])


async def jobs(redis) -> list[dict[str, str]]:
    """Every batch's job record."""
    return await BufferStore(redis, Settings()).job_records()


async def post_raw(svc, path: str, body: bytes, headers: dict[str, str] | None = None
                   ) -> tuple[int, dict[str, Any], Any]:
    async with svc.session.post(svc.url + path, data=body,
                                headers={"Content-Type": "application/json", **(headers or {})}) as resp:
        return resp.status, orjson.loads(await resp.read()), resp.headers


def signed(payload: dict[str, Any], secret: str = SECRET, timestamp: int | None = None
           ) -> tuple[bytes, dict[str, str]]:
    body = orjson.dumps(payload)
    return body, webhook_headers(body, secret, timestamp=timestamp)


# -- webhook authentication ----------------------------------------------------------------------
async def test_signed_webhooks_valid_accepted_everything_else_401_and_nothing_stored(
        settings, make_service, store):
    svc = await make_service(replace(settings, chatwoot_webhook_secret=SECRET))
    valid = message_payload(message_id=1, conversation_id=5, content="signed")
    body, headers = signed(valid)
    status, answer, _ = await post_raw(svc, WEBHOOK, body, headers)
    assert status == 200 and answer["status"] == "buffered"

    now = int(time.time())
    attempts: dict[str, tuple[bytes, dict[str, str]]] = {}
    p = message_payload(message_id=2, conversation_id=5, content="forged")
    attempts["wrong secret"] = signed(p, secret="not-the-secret")
    body, headers = signed(p)
    attempts["altered body"] = (body.replace(b"forged", b"FORGED"), headers)
    attempts["old timestamp"] = signed(p, timestamp=now - 301)
    attempts["future timestamp"] = signed(p, timestamp=now + 330)  # still future after a slow run
    attempts["no headers"] = (body, {})
    attempts["no timestamp"] = (body, {k: v for k, v in headers.items() if k != "X-Chatwoot-Timestamp"})
    attempts["no signature"] = (body, {k: v for k, v in headers.items() if k != "X-Chatwoot-Signature"})
    # Chatwoot issue #13809: signing the body alone instead of "{timestamp}.{body}".
    bare = "sha256=" + hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
    attempts["body-only signature"] = (body, {**headers, "X-Chatwoot-Signature": bare})
    # The timestamp is signed: moving it forward to pass the window breaks the signature.
    attempts["replayed with new timestamp"] = (
        signed(p, timestamp=now - 600)[0],
        {**signed(p, timestamp=now - 600)[1], "X-Chatwoot-Timestamp": str(now)})
    attempts["token instead of signature"] = (body, {"X-Webhook-Token": TOKEN})
    for name, (raw, hdrs) in attempts.items():
        for path in ALL_WEBHOOK_PATHS:
            status, answer, _ = await post_raw(svc, path, raw, hdrs)
            assert status == 401, (name, path, answer)
            assert answer["status"] == "rejected" and answer["error"], name

    assert [m["id"] for m in await buffered(store.redis)] == [1]
    assert await seen(store.redis) == 1


def test_signature_window_is_symmetric_and_tolerates_small_skew():
    body, now = b'{"a":1}', 1_800_000_000
    for skew in (-300, -1, 0, 1, 300):
        headers = webhook_headers(body, SECRET, timestamp=now + skew)
        assert signature_error(body, headers["X-Chatwoot-Timestamp"], headers["X-Chatwoot-Signature"],
                               SECRET, 300, now=now) == ""
    for bad_ts in ("", "-5", "1e9", "١٢٣", "9" * 40, " 1800000000"):
        sig = webhook_headers(body, SECRET, timestamp=now)["X-Chatwoot-Signature"]
        assert signature_error(body, bad_ts, sig, SECRET, 300, now=now)
    assert signature_error(body, str(now), "sha256=ü", SECRET, 300, now=now)  # non-ASCII: no crash


async def test_token_mode_query_or_header(settings, make_service, store):
    svc = await make_service(replace(settings, webhook_token=TOKEN))
    body = orjson.dumps(message_payload(message_id=1, conversation_id=6, content="by query"))
    status, answer, _ = await post_raw(svc, f"{WEBHOOK}?token={TOKEN}", body)
    assert status == 200 and answer["status"] == "buffered"
    body = orjson.dumps(message_payload(message_id=2, conversation_id=6, content="by header"))
    status, answer, _ = await post_raw(svc, WEBHOOK, body, {"X-Webhook-Token": TOKEN})
    assert status == 200 and answer["status"] == "buffered"
    status, _, _ = await post_raw(svc, f"/functions/v1/message-buffer-manager?action=handle&token={TOKEN}",
                                  orjson.dumps(message_payload(message_id=3, conversation_id=6)))
    assert status == 200

    body = orjson.dumps(message_payload(message_id=9, conversation_id=6, content="intruder"))
    for path, headers in [(WEBHOOK, {}), (f"{WEBHOOK}?token=wrong", {}), (f"{WEBHOOK}?token=", {}),
                          (WEBHOOK, {"X-Webhook-Token": TOKEN[:-1]}),
                          (WEBHOOK, {"X-Webhook-Token": TOKEN + "x"}),
                          (WEBHOOK, {"Authorization": f"Bearer {TOKEN}"}),
                          (WEBHOOK, signed(message_payload(message_id=9, conversation_id=6))[1]),
                          ("/functions/v1/chatwoot-webhook-v2", {}),
                          ("/functions/v1/message-buffer-manager", {"X-Webhook-Token": "x"})]:
        status, answer, _ = await post_raw(svc, path, body, headers)
        assert status == 401, (path, headers, answer)
    assert sorted(m["id"] for m in await buffered(store.redis)) == [1, 2, 3]
    assert await seen(store.redis) == 3


async def test_secret_and_token_together_accept_either(settings, make_service, store):
    svc = await make_service(replace(settings, chatwoot_webhook_secret=SECRET, webhook_token=TOKEN))
    body, headers = signed(message_payload(message_id=1, conversation_id=7))
    assert (await post_raw(svc, WEBHOOK, body, headers))[0] == 200
    body = orjson.dumps(message_payload(message_id=2, conversation_id=7))
    assert (await post_raw(svc, f"{WEBHOOK}?token={TOKEN}", body))[0] == 200
    body, headers = signed(message_payload(message_id=3, conversation_id=7), secret="wrong")
    assert (await post_raw(svc, WEBHOOK, body, headers))[0] == 401
    unsigned = orjson.dumps(message_payload(message_id=4, conversation_id=7))
    assert (await post_raw(svc, WEBHOOK, unsigned))[0] == 401
    assert sorted(m["id"] for m in await buffered(store.redis)) == [1, 2]


async def test_readyz_reports_the_auth_mode_and_warns_when_open(settings, make_service):
    open_svc = await make_service(settings)
    async with open_svc.session.get(open_svc.url + "/readyz") as resp:
        ready = await resp.json()
    assert resp.status == 200 and ready["webhook_auth"] == "none"
    assert "CHATWOOT_WEBHOOK_SECRET" in ready["warnings"][0]
    assert ready["admin_api"].startswith("off")

    closed = await make_service(replace(with_port(settings), chatwoot_webhook_secret=SECRET,
                                        admin_token=ADMIN))
    async with closed.session.get(closed.url + "/readyz") as resp:
        ready = await resp.json()
    assert ready["webhook_auth"] == "signature" and "warnings" not in ready
    assert ready["admin_api"] == "on"


# -- admin authentication ------------------------------------------------------------------------
@contextlib.asynccontextmanager
async def app_client(settings: Settings, redis):
    """The app in aiohttp's test server, with an /admin route of its own that has no guard."""
    store, flags = BufferStore(redis, settings), Flags(redis, settings)
    transcripts = Transcripts(settings, store, Limits(store), Downloader(settings))
    app = create_app(settings, store, flags=flags, operations=Operations(store, flags),
                     webhook_log=WebhookLog(redis, settings), transcripts=transcripts)

    async def probe(request: web.Request) -> web.Response:
        return web.json_response({"reached": True})

    app.router.add_get("/admin/probe", probe)
    async with TestClient(TestServer(app)) as client:
        yield client
    await transcripts.close()


async def test_admin_paths_are_closed_without_a_token(settings, redis):
    async with app_client(settings, redis) as client:
        for method, path in [("GET", "/admin/probe"), ("GET", "/admin"), ("GET", "/admin/nothing"),
                             ("POST", "/functions/v1/buffer-processor")]:
            for headers in ({}, {"Authorization": "Bearer "}, {"Authorization": f"Bearer {ADMIN}"}):
                resp = await client.request(method, path, headers=headers)
                assert resp.status == 403, (path, headers)
                assert "ADMIN_TOKEN" in (await resp.json())["error"]


async def test_admin_paths_need_the_bearer_token(settings, redis):
    async with app_client(replace(settings, admin_token=ADMIN), redis) as client:
        wrong = [{}, {"Authorization": ADMIN}, {"Authorization": f"Basic {ADMIN}"},
                 {"Authorization": f"Bearer {ADMIN[:-1]}"}, {"Authorization": f"Bearer {ADMIN}x"},
                 {"Authorization": "Bearer ünïcode"}, {"X-Webhook-Token": ADMIN}]
        for path in ["/admin/probe", "/admin/nothing",
                     "/functions/v1/buffer-processor"]:
            method = "POST" if path.startswith("/functions") else "GET"
            for headers in wrong:
                resp = await client.request(method, path, headers=headers)
                assert resp.status == 401, (path, headers)
                assert resp.headers["WWW-Authenticate"].startswith("Bearer")
        good = {"Authorization": f"bearer  {ADMIN}"}  # scheme is case-insensitive
        resp = await client.get("/admin/probe", headers=good)
        assert resp.status == 200 and await resp.json() == {"reached": True}
        resp = await client.post("/functions/v1/buffer-processor", headers=good)
        assert resp.status == 200 and (await resp.json())["status"] == "triggered"
        # Public paths stay public.
        assert (await client.get("/healthz")).status == 200
        assert (await client.get("/openapi.json")).status == 200


# -- input limits and validation -----------------------------------------------------------------
async def test_oversized_bodies_get_413_before_being_read(settings, make_service, store):
    svc = await make_service(settings)
    host, port = "127.0.0.1", settings.port
    big = orjson.dumps(message_payload(message_id=1, conversation_id=8, content="x" * (1024 * 1024)))
    status, answer, _ = await post_raw(svc, WEBHOOK, big)
    assert status == 413 and "1048576" in answer["error"]

    # Announce 50 MB, send a few bytes, and wait: the answer must come without the rest.
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(f"POST {WEBHOOK} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 f"Content-Length: {50 * 1024 * 1024}\r\n\r\n{{\"id\": 1".encode())
    await writer.drain()
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert head.startswith(b"HTTP/1.1 413"), head
    writer.close()

    # Chunked, without Content-Length: refused as soon as the read passes the cap.
    async def chunks():
        for _ in range(40):
            yield b"[" + b"0," * 16_000 + b"0]"

    async with svc.session.post(svc.url + WEBHOOK, data=chunks()) as resp:
        assert resp.status == 413
    assert await buffered(store.redis) == [] and await seen(store.redis) == 0
    # The service is fine afterwards.
    assert (await svc.webhook(message_payload(message_id=2, conversation_id=8)))["status"] == "buffered"


BAD_FIELDS: list[tuple[str, Any, str]] = [
    ("id", "12", "id"), ("id", 0, "id"), ("id", -1, "id"), ("id", True, "id"), ("id", 1.5, "id"),
    ("id", 2**63, "id"), ("id", None, "id"),
    ("conversation", "7", "conversation"), ("conversation", None, "conversation"),
    ("conversation.id", "7", "conversation.id"), ("conversation.id", 0, "conversation.id"),
    ("conversation.id", [7], "conversation.id"), ("conversation.id", 9.2e18, "conversation.id"),
    ("conversation.status", ["open"], "conversation.status"),
    ("conversation.status", {"a": 1}, "conversation.status"),
    ("account", [1], "account"), ("account.id", "1", "account.id"), ("account.id", -3, "account.id"),
    ("content", 5, "content"), ("content", {"text": "hi"}, "content"), ("content", ["hi"], "content"),
    ("attachments", {"file_type": "image"}, "attachments"), ("attachments", "image", "attachments"),
    ("private", "false", "private"), ("private", 0, "private"),
    ("message_type", 0, "message_type"), ("message_type", ["incoming"], "message_type"),
]


@pytest.mark.parametrize("path", [WEBHOOK, "/functions/v1/message-buffer-manager?action=handle"])
async def test_wrong_types_get_400_naming_the_field_and_store_nothing(settings, make_service, store, path):
    svc = await make_service(settings)
    for dotted, value, named in BAD_FIELDS:
        payload = message_payload(message_id=1, conversation_id=9)
        target, *rest = dotted.split(".")
        if rest:
            payload[target][rest[0]] = value
        else:
            payload[target] = value
        status, answer, _ = await post_raw(svc, path, orjson.dumps(payload))
        assert status == 400, (dotted, value, answer)
        assert answer == {"status": "rejected", "error": answer["error"]}
        assert answer["error"].startswith(named), (dotted, answer)
    for raw, error in [(b"", "JSON"), (b"{", "JSON"), (b"\xff\xfe", "JSON"), (b'"text"', "object"),
                       (b"[1]", "object"), (b"null", "object"), (b'{"id": "\\ud800"}', "JSON"),
                       (b"[" * 5000 + b"]" * 5000, "JSON")]:
        status, answer, _ = await post_raw(svc, path, raw)
        assert status == 400 and error in answer["error"], (raw[:20], answer)
    assert await buffered(store.redis) == [] and await seen(store.redis) == 0


async def test_long_messages_are_truncated_and_marked(settings, make_service, llm, chatwoot):
    svc = await make_service(settings)
    long_text = "é" * 10_000
    answer = await svc.webhook(message_payload(message_id=1, conversation_id=10, content=long_text))
    assert answer["status"] == "buffered" and answer["truncated"] is True
    many = [{"file_type": "image"}] * 5000
    answer = await svc.webhook(message_payload(message_id=2, conversation_id=10, content="x",
                                               attachments=many))
    assert answer["status"] == "buffered"
    await wait_for(lambda: len(chatwoot.posts) == 1, timeout=5)
    first, second = user_texts(llm.calls[0])
    assert len(first) == settings.max_message_chars and first.endswith(TRUNCATION_MARK)
    assert first.startswith("é" * 100)
    assert second == "[image] " * 10 + "x"  # ten attachments are named, not five thousand


async def test_a_buffer_stops_growing_at_its_byte_cap(settings, make_service, store):
    # No worker: nobody flushes, the worst case for a flooded conversation.
    svc = await make_service(replace(settings, max_buffer_bytes=40_000, max_buffer_size=1000),
                             worker=False)
    outcomes = []
    for i in range(30):
        answer = await svc.webhook(message_payload(message_id=100 + i, conversation_id=11,
                                                   content="y" * 3000))
        outcomes.append(answer["status"] if answer["status"] != "ignored" else answer["reason"])
    kept = outcomes.count("buffered")
    assert kept >= 6 and outcomes == ["buffered"] * kept + ["buffer_full"] * (30 - kept), outcomes
    [key] = [k async for k in store.redis.scan_iter(match="*:buf:*")]
    assert len(await buffered_in(store.redis, key)) == kept
    assert await store.redis.memory_usage(key, samples=0) <= 40_000
    # Refused messages are acknowledged once and kept in the history (what the customer wrote
    # reaches the next prompt); a redelivery is a duplicate, not a second refusal.
    assert await seen(store.redis) == 30
    [hist] = [k async for k in store.redis.scan_iter(match="*:hist:*")]
    assert await store.redis.llen(hist) == 30 - kept
    # Other conversations are not affected.
    other = await svc.webhook(message_payload(message_id=1, conversation_id=12))
    assert other["status"] == "buffered"


# -- abuse limits --------------------------------------------------------------------------------
def _metric(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


async def test_rate_limits_per_conversation_and_global(settings, make_service, store):
    svc = await make_service(replace(settings, rate_limit_per_conversation=5, rate_limit_global=8,
                                     rate_limit_window_s=3600))
    before = _metric("buffer_service_rate_limited_total", scope="conversation")
    answers = [await svc.webhook(message_payload(message_id=i, conversation_id=20, content=f"m{i}"))
               for i in range(1, 8)]
    assert [a["status"] for a in answers] == ["buffered"] * 5 + ["ignored"] * 2
    assert answers[-1] == {"status": "ignored", "reason": "rate_limited", "limit": "conversation"}
    assert _metric("buffer_service_rate_limited_total", scope="conversation") == before + 2
    # Other conversations: 3 more fit under the global limit of 8, then everyone is refused.
    answers = [await svc.webhook(message_payload(message_id=100 + c, conversation_id=c))
               for c in range(30, 35)]
    assert [a["status"] for a in answers] == ["buffered"] * 3 + ["ignored"] * 2
    assert answers[-1]["limit"] == "global"
    # Refused messages were not buffered, but are kept in their history (and so seen: a
    # redelivery is a duplicate); other events are not limited.
    assert len(await buffered(store.redis)) == 8 and await seen(store.redis) == 12
    ignored = await svc.webhook(message_payload(message_id=999, conversation_id=20, event="typing_on"))
    assert ignored["reason"] == "event:typing_on"


async def test_default_rate_limit_lets_a_fast_typist_and_an_album_through(settings, make_service):
    svc = await make_service(settings)  # defaults: 120 per conversation per minute, no global limit
    answers = await asyncio.gather(*(
        svc.webhook(message_payload(message_id=i, conversation_id=21, content=None,
                                    attachments=[{"file_type": "image"}])) for i in range(1, 31)))
    assert {a["status"] for a in answers} == {"buffered"}  # a 30-photo album, all at once
    for i in range(31, 71):  # then typing quickly
        assert (await svc.webhook(message_payload(message_id=i, conversation_id=21)))["status"] == "buffered"


async def test_rate_limits_hold_across_two_server_processes(settings, tmp_path):
    env = {"RATE_LIMIT_PER_CONVERSATION": "10", "RATE_LIMIT_GLOBAL": "25", "RATE_LIMIT_WINDOW_S": "3600",
           "LOG_FORMAT": "json", "ADMIN_TOKEN": ADMIN}
    servers = [replace(settings, port=settings.port), with_port(settings)]
    procs = [spawn_service(["serve", "--no-worker"], service_env(s, **env), tmp_path / f"server{i}.log")
             for i, s in enumerate(servers)]
    urls = [f"http://127.0.0.1:{s.port}" for s in servers]
    try:
        async with aiohttp.ClientSession() as session:
            for url in urls:
                for _ in range(300):
                    with contextlib.suppress(aiohttp.ClientError):
                        async with session.get(url + "/readyz") as resp:
                            if resp.status == 200:
                                break
                    await asyncio.sleep(0.05)

            async def send(i: int, conv: int) -> dict[str, Any]:
                async with session.post(urls[i % 2] + WEBHOOK,
                                        json=message_payload(message_id=i, conversation_id=conv)) as resp:
                    assert resp.status == 200
                    return await resp.json()

            one_conv = await asyncio.gather(*(send(i, 40) for i in range(1, 31)))
            many = await asyncio.gather(*(send(1000 + i, 100 + i) for i in range(40)))
    finally:
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        for proc in procs:
            assert proc.wait(20) == 0

    def count(answers, **match):
        return sum(1 for a in answers if all(a.get(k) == v for k, v in match.items()))

    assert count(one_conv, status="buffered") == 10
    assert count(one_conv, reason="rate_limited", limit="conversation") == 20
    assert count(many, status="buffered") == 15  # 25 global, 10 used by the first conversation
    assert count(many, reason="rate_limited", limit="global") == 25
    logs = [(tmp_path / f"server{i}.log").read_text() for i in range(2)]
    for log in logs:
        # Open webhooks are announced loudly, and no secret reaches a log line.
        assert "WEBHOOK_AUTHENTICATION_OFF" in log
        for secret in (ADMIN, settings.openai_api_key, settings.chatwoot_api_token):
            assert secret not in log
        assert '"admin_token":"<set>"' in log


async def test_llm_spend_guard_skips_bursts_over_the_hourly_limit(settings, make_service, llm, chatwoot,
                                                                   store):
    svc = await make_service(replace(settings, max_llm_calls_per_conversation_per_hour=2,
                                     buffer_duration_ms=200))
    for i in range(1, 3):
        await svc.webhook(message_payload(message_id=i, conversation_id=50, content=f"burst {i}"))
        await wait_for(lambda i=i: len(chatwoot.posts) == i, timeout=5)
    await svc.webhook(message_payload(message_id=3, conversation_id=50, content="burst 3"))
    await asyncio.sleep(1.0)  # well past its 0.2 s window
    await svc.webhook(message_payload(message_id=10, conversation_id=51, content="other"))
    await wait_for(lambda: any(p.conversation_id == 51 for p in chatwoot.posts), timeout=5)
    await asyncio.sleep(0.5)  # a retry of the skipped burst would show up now
    assert [p.conversation_id for p in chatwoot.posts] == [50, 50, 51]
    assert len(llm.calls) == 3
    assert sorted((j["state"], j.get("reason", "")) for j in await jobs(store.redis)
                  if j["conv"] == "1:50") == [("completed", ""), ("completed", ""),
                                              ("skipped", "llm_quota_exceeded")]


# -- dependencies failing ------------------------------------------------------------------------
async def test_hung_or_dead_redis_answers_500_before_chatwoot_gives_up(settings, make_service, redis_server):
    svc = await make_service(settings)
    assert (await svc.webhook(message_payload(message_id=1, conversation_id=60)))["status"] == "buffered"
    assert redis_server.proc is not None
    redis_server.proc.send_signal(signal.SIGSTOP)  # alive but silent: the slow case
    try:
        started = time.monotonic()
        status, answer, headers = await post_raw(
            svc, WEBHOOK, orjson.dumps(message_payload(message_id=2, conversation_id=60)))
        assert status == 500 and headers["Retry-After"] == "1" and answer["status"] == "unavailable"
        assert time.monotonic() - started < 4.5  # Chatwoot waits 5 s, then hands over to humans
        started = time.monotonic()
        async with svc.session.get(svc.url + "/readyz") as resp:
            assert resp.status == 503
        assert time.monotonic() - started < 4.5
    finally:
        redis_server.proc.send_signal(signal.SIGCONT)
    await asyncio.sleep(0.2)
    assert (await svc.webhook(message_payload(message_id=9, conversation_id=61)))["status"] == "buffered"
    redis_server.kill()
    started = time.monotonic()
    status, _, headers = await post_raw(svc, WEBHOOK, orjson.dumps(message_payload(message_id=10,
                                                                                   conversation_id=61)))
    assert status == 500 and headers["Retry-After"] == "1"
    assert time.monotonic() - started < 4.5


class MisbehavingLLM(LLMStandIn):
    """The LLM stand-in, except for conversations whose text asks it to misbehave."""

    release = asyncio.Event()  # set at the end of the test: hanging requests may end then

    async def _chat_completions(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        text = raw.decode(errors="replace")
        if "HANG" in text:
            await self.release.wait()
        if "GARBAGE" in text:
            return web.Response(body=b"<html>502 Bad Gateway</html>", content_type="application/json")
        if "SHAPE" in text:
            return web.json_response({"choices": [{"message": "not an object"}]})
        if "HUGE" in text:
            content = "z" * (10 * 1024 * 1024)
            return web.json_response({"choices": [{"index": 0, "finish_reason": "stop",
                                                   "message": {"role": "assistant", "content": content}}]})
        return await super()._chat_completions(request)  # aiohttp keeps the body read above


async def test_misbehaving_llm_fails_its_batch_cleanly_and_others_are_answered(settings, make_service,
                                                                                chatwoot, store):
    bad_llm = MisbehavingLLM(api_key=settings.openai_api_key)
    await bad_llm.start()
    try:
        s = replace(settings, openai_base_url=f"{bad_llm.base_url}/v1", llm_timeout_s=1.0,
                    max_attempts=2, retry_base_ms=100, buffer_duration_ms=300)
        svc = await make_service(s)
        for conv, text in [(70, "HANG"), (71, "GARBAGE"), (72, "SHAPE"), (73, "HUGE")]:
            await svc.webhook(message_payload(message_id=conv, conversation_id=conv, content=text))
        sent = time.monotonic()
        for conv in range(80, 90):
            await svc.webhook(message_payload(message_id=conv, conversation_id=conv, content=f"fine {conv}"))
        await wait_for(lambda: len(chatwoot.posts) == 10, timeout=10)
        # Answered on time although the bad batches were in flight (window 0.3 s).
        assert time.monotonic() - sent < 3
        assert {p.conversation_id for p in chatwoot.posts} == set(range(80, 90))

        async def bad_jobs() -> dict[str, dict[str, str]]:
            return {j["conv"]: j for j in await jobs(store.redis) if int(j["conv"].split(":")[1]) < 80}

        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and {j["state"] for j in (await bad_jobs()).values()} != {"failed"}:
            await asyncio.sleep(0.1)
        bad = await bad_jobs()
        assert {c: j["state"] for c, j in bad.items()} == {f"1:{c}": "failed" for c in (70, 71, 72, 73)}
        errors = {c: j.get("error", "") for c, j in bad.items()}
        assert "timed out" in errors["1:70"].lower()
        assert "not JSON" in errors["1:71"]
        assert "not a chat completion" in errors["1:72"]
        assert "larger than" in errors["1:73"]
        assert all(len(e) <= 1000 for e in errors.values())
        assert not any(p.conversation_id < 80 for p in chatwoot.posts)
        # The worker lives on: a new conversation is still answered.
        await svc.webhook(message_payload(message_id=99, conversation_id=99, content="still there?"))
        await wait_for(lambda: any(p.conversation_id == 99 for p in chatwoot.posts), timeout=5)
    finally:
        bad_llm.release.set()
        await bad_llm.stop()


class MisbehavingChatwoot(ChatwootStandIn):
    """The Chatwoot stand-in, except for a few conversations whose replies meet a broken server."""

    release = asyncio.Event()

    async def _create_message(self, request: web.Request) -> web.StreamResponse:
        conv = int(request.match_info["conversation_id"])
        if conv == 90:
            await self.release.wait()  # slower than CHATWOOT_TIMEOUT_S
        if conv == 91:
            return web.json_response({"id": 1, "content": "z" * (10 * 1024 * 1024)})
        if conv == 92:
            return web.Response(body=b"<html>ok</html>", content_type="text/html")
        if conv == 93:
            return web.json_response([1, 2, 3])
        if conv == 94:
            return web.Response(status=500, body=b"<html>" + b"e" * 100_000 + b"</html>")
        return await super()._create_message(request)


async def test_misbehaving_chatwoot_never_blocks_other_conversations(settings, make_service, llm, store):
    bad_cw = MisbehavingChatwoot(token=settings.chatwoot_api_token)
    await bad_cw.start()
    try:
        s = replace(settings, chatwoot_base_url=bad_cw.base_url, chatwoot_timeout_s=1.0, max_attempts=2,
                    retry_base_ms=100, buffer_duration_ms=300)
        svc = await make_service(s)
        for conv in range(90, 95):
            await svc.webhook(message_payload(message_id=conv, conversation_id=conv, content=f"to {conv}"))
        sent = time.monotonic()
        for conv in range(100, 110):
            await svc.webhook(message_payload(message_id=conv, conversation_id=conv, content="fine"))
        await wait_for(lambda: {p.conversation_id for p in bad_cw.posts} == set(range(100, 110)), timeout=10)
        assert time.monotonic() - sent < 3

        async def states() -> dict[int, str]:
            return {int(j["conv"].split(":")[1]): j["state"] for j in await jobs(store.redis)
                    if int(j["conv"].split(":")[1]) < 100}

        expected = {90: "failed", 91: "completed", 92: "completed", 93: "completed", 94: "failed"}
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and await states() != expected:
            await asyncio.sleep(0.1)
        # A 2xx means Chatwoot created the message, whatever its body says: posting again would
        # duplicate it. A timeout or a 5xx is retried, then kept as a failed job.
        assert await states() == expected
        failed = {int(j["conv"].split(":")[1]): j["error"] for j in await jobs(store.redis)
                  if j["state"] == "failed"}
        assert "TimeoutError" in failed[90] and "HTTP 500" in failed[94]
        assert all(len(e) <= 1000 for e in failed.values())
    finally:
        bad_cw.release.set()
        await bad_cw.stop()


# -- secrets -------------------------------------------------------------------------------------
def test_secrets_are_redacted_and_weak_tokens_refused():
    env = {"OPENAI_API_KEY": "sk-abcdef", "CHATWOOT_API_TOKEN": "cw-api-token",
           "CHATWOOT_WEBHOOK_SECRET": SECRET, "WEBHOOK_TOKEN": TOKEN, "ADMIN_TOKEN": ADMIN}
    s = Settings.from_env({**env, "REDIS_URL": "rediss://default:redis-pass-123@cache.example:6380/0"})
    dump = orjson.dumps(s.redacted()).decode()
    for value in env.values():
        assert value not in dump and value not in repr(s)
    assert "redis-pass-123" not in dump
    assert s.redacted()["redis_url"] == "rediss://default:<set>@cache.example:6380/0"
    for name in ("openai_api_key", "chatwoot_api_token", "chatwoot_webhook_secret", "webhook_token",
                 "admin_token"):
        assert s.redacted()[name] == "<set>"
    for name in ("WEBHOOK_TOKEN", "ADMIN_TOKEN"):
        for weak in ("short", "has spaces in the middle of it", "ünïcode-token-0123456789"):
            with pytest.raises(ConfigError, match=f"^{name}: "):
                Settings.from_env({name: weak})
