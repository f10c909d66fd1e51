"""Tests for the Chatwoot and LLM stand-ins.

The rest of the suite trusts these servers to behave like the real products, so they are
checked here with the real clients: ``openai.AsyncOpenAI`` and aiohttp.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import re
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import aiohttp
import openai
import orjson
import pytest
import pytest_asyncio
from aiohttp import web

from devtools.chatwoot_standin import ChatwootStandIn
from devtools.llm_standin import LLMStandIn
from devtools.payloads import attachment, message_payload

LLM_KEY = "sk-test-key"
CW_TOKEN = "cw-bot-token"


@pytest_asyncio.fixture
async def llm() -> AsyncIterator[LLMStandIn]:
    server = LLMStandIn(api_key=LLM_KEY)
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


@pytest_asyncio.fixture
async def chatwoot() -> AsyncIterator[ChatwootStandIn]:
    server = ChatwootStandIn(token=CW_TOKEN)
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


class Receiver:
    """A tiny webhook receiver standing in for buffer-service's webhook endpoint."""

    def __init__(self) -> None:
        self.bodies: list[bytes] = []
        self.headers: list[dict[str, str]] = []
        self.got = asyncio.Event()
        self.runner: web.AppRunner | None = None
        self.url = ""
        #: Statuses the next deliveries are answered with; 200 once they are used up.
        self.answers: list[int] = []

    async def handle(self, request: web.Request) -> web.Response:
        self.bodies.append(await request.read())
        self.headers.append(dict(request.headers))
        self.got.set()
        return web.json_response({"ok": True}, status=self.answers.pop(0) if self.answers else 200)

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/webhooks/chatwoot", self.handle)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        host, port = self.runner.addresses[0][:2]
        self.url = f"http://{host}:{port}/webhooks/chatwoot"

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()


def _client(base: str, key: str = LLM_KEY, max_retries: int = 0) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=base + "/v1", api_key=key, max_retries=max_retries)


# ------------------------------------------------------------------------------------------
# LLM stand-in
# ------------------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_llm_deterministic_reply_and_usage(llm: LLMStandIn) -> None:
    client = _client(llm.base_url)
    try:
        completion = await client.chat.completions.create(
            model="gpt-test",
            messages=[
                {"role": "system", "content": "You are helpful."},
                {"role": "user", "content": "earlier"},
                {"role": "assistant", "content": "ok"},
                {"role": "user", "content": "hello there"},
                {"role": "user", "content": "my order?"},
            ],
        )
    finally:
        await client.close()

    assert completion.object == "chat.completion"
    assert completion.id.startswith("chatcmpl-")
    assert completion.model == "gpt-test"
    choice = completion.choices[0]
    assert choice.finish_reason == "stop"
    assert choice.message.role == "assistant"
    assert choice.message.content == "Reply to: hello there | my order?"
    assert completion.usage is not None
    # 3 + 1 + 1 + 2 + 2 words in; "Reply to: hello there | my order?" is 7 words.
    assert completion.usage.prompt_tokens == 9
    assert completion.usage.completion_tokens == 7
    assert completion.usage.total_tokens == 16

    assert len(llm.calls) == 1
    call = llm.calls[0]
    assert call.status == 200
    assert call.model == "gpt-test"
    assert call.reply == "Reply to: hello there | my order?"
    assert call.messages[-1] == {"role": "user", "content": "my order?"}


@pytest.mark.asyncio
async def test_llm_reply_fn_is_replaceable(llm: LLMStandIn) -> None:
    llm.reply_fn = lambda messages: f"{len(messages)} messages"
    client = _client(llm.base_url)
    try:
        completion = await client.chat.completions.create(
            model="m", messages=[{"role": "user", "content": "x"}]
        )
    finally:
        await client.close()
    assert completion.choices[0].message.content == "1 messages"


@pytest.mark.asyncio
async def test_llm_wrong_key_raises_authentication_error(llm: LLMStandIn) -> None:
    client = _client(llm.base_url, key="sk-wrong")
    try:
        with pytest.raises(openai.AuthenticationError) as info:
            await client.chat.completions.create(
                model="m", messages=[{"role": "user", "content": "x"}]
            )
    finally:
        await client.close()
    assert info.value.status_code == 401
    assert info.value.code == "invalid_api_key"
    assert [c.status for c in llm.calls] == [401]


@pytest.mark.asyncio
async def test_llm_fail_next_then_client_retry_succeeds(llm: LLMStandIn) -> None:
    llm.fail_next(1, 500)
    client = _client(llm.base_url, max_retries=2)
    try:
        completion = await client.chat.completions.create(
            model="m", messages=[{"role": "user", "content": "retry me"}]
        )
    finally:
        await client.close()
    assert completion.choices[0].message.content == "Reply to: retry me"
    assert [c.status for c in llm.calls] == [500, 200]
    assert llm.calls[0].reply is None


@pytest.mark.asyncio
async def test_llm_429_has_openai_error_shape_and_retry_after(llm: LLMStandIn) -> None:
    llm.fail_next(1, 429)
    async with aiohttp.ClientSession() as session:
        async with session.post(
            llm.base_url + "/v1/chat/completions",
            json={"model": "m", "messages": [{"role": "user", "content": "x"}]},
            headers={"Authorization": f"Bearer {LLM_KEY}"},
        ) as resp:
            assert resp.status == 429
            assert resp.headers["retry-after"] == "0"
            body = await resp.json()
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["code"] == "rate_limit_exceeded"


@pytest.mark.asyncio
async def test_llm_stream_rejected_and_models_listed(llm: LLMStandIn) -> None:
    client = _client(llm.base_url)
    try:
        with pytest.raises(openai.BadRequestError):
            await client.chat.completions.create(
                model="m", messages=[{"role": "user", "content": "x"}], stream=True
            )
        models = await client.models.list()
    finally:
        await client.close()
    assert [m.id for m in models.data] == [llm.model]


@pytest.mark.asyncio
async def test_llm_delay_makes_calls_slow_and_visible_in_flight(llm: LLMStandIn) -> None:
    llm.delay = 0.3
    client = _client(llm.base_url)
    try:
        task = asyncio.create_task(
            client.chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}])
        )
        await asyncio.sleep(0.1)
        assert len(llm.calls) == 1 and llm.calls[0].status == 0  # in flight
        assert not task.done()
        await task
    finally:
        await client.close()
    assert llm.calls[0].status == 200


# ------------------------------------------------------------------------------------------
# Chatwoot stand-in
# ------------------------------------------------------------------------------------------


def _messages_url(base: str, account_id: int = 3, conversation_id: int = 245) -> str:
    return f"{base}/api/v1/accounts/{account_id}/conversations/{conversation_id}/messages"


@pytest.mark.asyncio
async def test_chatwoot_accepts_post_with_token(chatwoot: ChatwootStandIn) -> None:
    async with aiohttp.ClientSession() as session:
        async with session.post(
            _messages_url(chatwoot.base_url),
            json={"content": "Olá!", "message_type": "outgoing", "private": False},
            headers={"api_access_token": CW_TOKEN},
        ) as resp:
            assert resp.status == 200
            msg = await resp.json()
        async with session.post(
            _messages_url(chatwoot.base_url),
            json={"content": "second"},
            headers={"api_access_token": CW_TOKEN},
        ) as resp:
            second = await resp.json()

    assert isinstance(msg["id"], int)
    assert msg["message_type"] == 1
    assert msg["content"] == "Olá!"
    assert msg["conversation_id"] == 245
    assert msg["content_type"] == "text"
    assert msg["status"] == "sent"
    assert msg["content_attributes"] == {}
    assert isinstance(msg["created_at"], int)
    assert msg["private"] is False
    assert msg["source_id"] is None
    assert msg["sender"]["type"] == "agent_bot"
    assert second["id"] > msg["id"]

    assert [(p.account_id, p.conversation_id, p.message_id) for p in chatwoot.posts] == [
        (3, 245, msg["id"]),
        (3, 245, second["id"]),
    ]
    assert chatwoot.posts[0].body["content"] == "Olá!"
    assert [r.status for r in chatwoot.requests] == [200, 200]


@pytest.mark.asyncio
async def test_chatwoot_rejects_bad_token_and_bad_body(chatwoot: ChatwootStandIn) -> None:
    async with aiohttp.ClientSession() as session:
        async with session.post(
            _messages_url(chatwoot.base_url),
            json={"content": "x"},
            headers={"api_access_token": "wrong"},
        ) as resp:
            assert resp.status == 401
            assert await resp.json() == {"error": "Invalid Access Token"}
        async with session.post(_messages_url(chatwoot.base_url), json={"content": "x"}) as resp:
            assert resp.status == 401
        async with session.post(
            _messages_url(chatwoot.base_url),
            json={"private": True},
            headers={"api_access_token": CW_TOKEN},
        ) as resp:
            assert resp.status == 422
            assert "error" in await resp.json()
    assert chatwoot.posts == []
    assert [r.status for r in chatwoot.requests] == [401, 401, 422]


@pytest.mark.asyncio
async def test_chatwoot_fail_next(chatwoot: ChatwootStandIn) -> None:
    chatwoot.fail_next(2, 503)
    statuses = []
    async with aiohttp.ClientSession() as session:
        for _ in range(3):
            async with session.post(
                _messages_url(chatwoot.base_url),
                json={"content": "x"},
                headers={"api_access_token": CW_TOKEN},
            ) as resp:
                statuses.append(resp.status)
    assert statuses == [503, 503, 200]
    assert len(chatwoot.posts) == 1
    assert [r.status for r in chatwoot.requests] == [503, 503, 200]


@pytest.mark.asyncio
async def test_chatwoot_echo_webhook_delivered() -> None:
    receiver = Receiver()
    await receiver.start()
    server = ChatwootStandIn(token=CW_TOKEN, echo_webhook_url=receiver.url, echo_secret="s3cret")
    await server.start()
    try:
        async with aiohttp.ClientSession() as session:
            async with session.post(
                _messages_url(server.base_url, 3, 245),
                json={"content": "Seu pedido saiu."},
                headers={"api_access_token": CW_TOKEN},
            ) as resp:
                msg = await resp.json()
        await asyncio.wait_for(receiver.got.wait(), timeout=5)
        await server.wait_echoes()
    finally:
        await server.stop()
        await receiver.stop()

    raw = receiver.bodies[0]
    payload = orjson.loads(raw)
    assert payload["event"] == "message_created"
    assert payload["id"] == msg["id"]
    assert payload["message_type"] == "outgoing"
    assert payload["sender"] == {"id": server.bot_id, "name": server.bot_name, "type": "agent_bot"}
    assert payload["content"] == "Seu pedido saiu."
    assert payload["account"]["id"] == 3
    assert payload["conversation"]["id"] == 245
    assert payload["conversation"]["status"] == "pending"
    assert payload["conversation"]["messages"][0]["message_type"] == 1
    assert [e.status for e in server.echoes] == [200]

    headers = {k.lower(): v for k, v in receiver.headers[0].items()}
    ts = headers["x-chatwoot-timestamp"]
    mac = hmac.new(b"s3cret", ts.encode() + b"." + raw, hashlib.sha256).hexdigest()
    assert headers["x-chatwoot-signature"] == "sha256=" + mac
    assert headers["x-chatwoot-delivery"]


@pytest.mark.asyncio
async def test_chatwoot_echo_failure_is_logged_not_raised() -> None:
    server = ChatwootStandIn(token=CW_TOKEN, echo_webhook_url="http://127.0.0.1:9/nowhere")
    await server.start()
    try:
        async with aiohttp.ClientSession() as session:
            async with session.post(
                _messages_url(server.base_url),
                json={"content": "x"},
                headers={"api_access_token": CW_TOKEN},
            ) as resp:
                assert resp.status == 200
        await server.wait_echoes()
    finally:
        await server.stop()
    assert len(server.echoes) == 1
    assert server.echoes[0].status is None and server.echoes[0].error


@pytest.mark.parametrize(("answers", "agent_bot", "tried", "final", "opened"), [
    ([500, 429], True, [500, 429, 200], 200, False),  # 429 and 500 are retried
    ([500, 500, 500], True, [500, 500, 500], 500, True),  # 3 attempts in all, then humans
    ([503], True, [503], 503, True),  # any other failure is final at once
    ([502], True, [502], 502, True),
    ([400], True, [400], 400, True),
    ([500], False, [500], 500, False),  # an account webhook: delivered once, no status change
])
async def test_chatwoot_delivers_webhooks_with_the_agent_bot_retry_policy(
        answers: list[int], agent_bot: bool, tried: list[int], final: int, opened: bool) -> None:
    receiver = Receiver()
    await receiver.start()
    receiver.answers = list(answers)
    server = ChatwootStandIn(token=CW_TOKEN)
    server.webhook_retry_s = 0.01
    await server.start()
    try:
        status = await server.deliver(receiver.url, message_payload(message_id=7, conversation_id=245),
                                      agent_bot=agent_bot)
    finally:
        await server.stop()
        await receiver.stop()
    assert status == final
    assert [(d.attempt, d.status) for d in server.deliveries] == list(enumerate(tried, 1))
    assert len({h["X-Chatwoot-Delivery"] for h in receiver.headers}) == 1  # one job, retried
    assert server.statuses.get(245, "pending") == ("open" if opened else "pending")


async def test_chatwoot_delivery_without_an_answer_is_final_at_once() -> None:
    server = ChatwootStandIn(token=CW_TOKEN)
    server.webhook_retry_s = 0.01
    await server.start()
    try:
        status = await server.deliver("http://127.0.0.1:9/nowhere",
                                      message_payload(message_id=7, conversation_id=245))
    finally:
        await server.stop()
    assert status is None and len(server.deliveries) == 1 and server.deliveries[0].error
    assert server.statuses[245] == "open"


# ------------------------------------------------------------------------------------------
# Payload builders
# ------------------------------------------------------------------------------------------


def test_message_payload_incoming_contact_shape() -> None:
    when = datetime(2026, 8, 18, 14, 3, 27, 512345, tzinfo=UTC)
    p: dict[str, Any] = message_payload(
        message_id=90412,
        conversation_id=245,
        content="Oi!",
        account_id=3,
        inbox_id=12,
        sender_id=1187,
        created_at=when,
        assignee={"id": 7, "name": "PedidosBot", "avatar_url": "", "type": "agent_bot"},
    )
    assert p["event"] == "message_created"
    assert p["message_type"] == "incoming"
    assert p["created_at"] == "2026-08-18T14:03:27.512Z"
    assert "type" not in p["sender"]
    assert p["sender"]["id"] == 1187
    assert p["sender"]["phone_number"].startswith("+")
    assert "attachments" not in p
    for absent in ("status", "conversation_id", "inbox_id", "contact", "sender_type"):
        assert absent not in p
    conv = p["conversation"]
    assert conv["id"] == 245 and conv["inbox_id"] == 12
    assert conv["status"] == "pending" and conv["channel"] == "Channel::Whatsapp"
    assert conv["meta"]["assignee_type"] == "AgentBot"
    assert conv["meta"]["sender"]["type"] == "contact"
    push = conv["messages"][0]
    assert push["message_type"] == 0
    assert push["created_at"] == int(when.timestamp())
    assert push["conversation_id"] == 245
    assert re.fullmatch(r"wamid\.[A-Z2-7]+", p["source_id"])


def test_message_payload_senders_assignees_and_attachments() -> None:
    user = message_payload(
        message_id=1,
        conversation_id=2,
        message_type="outgoing",
        sender_type="user",
        sender_id=7,
        sender_name="Ana",
        assignee={"id": 7, "name": "Ana", "type": "user"},
    )
    assert set(user["sender"]) == {"id", "name", "email", "type"}
    assert user["sender"]["type"] == "user"
    assert user["conversation"]["meta"]["assignee_type"] == "User"
    assert user["conversation"]["messages"][0]["message_type"] == 1

    bot = message_payload(
        message_id=1, conversation_id=2, message_type="template", sender_type="agent_bot"
    )
    assert set(bot["sender"]) == {"id", "name", "type"}
    assert bot["conversation"]["meta"]["assignee"] is None
    assert bot["conversation"]["meta"]["assignee_type"] is None
    assert bot["conversation"]["messages"][0]["message_type"] == 3

    media = message_payload(
        message_id=55,
        conversation_id=2,
        content=None,
        account_id=4,
        attachments=[attachment("image"), attachment("location"), attachment("audio")],
    )
    img, loc, audio = media["attachments"]
    assert media["content"] is None
    assert img["message_id"] == 55 and img["account_id"] == 4 and img["file_type"] == "image"
    assert {"extension", "data_url", "thumb_url", "file_size", "width", "height"} <= set(img)
    assert {"coordinates_lat", "coordinates_long", "fallback_title", "data_url"} <= set(loc)
    assert audio["transcribed_text"] == "" and audio["thumb_url"] == ""
    assert attachment("file", data_url="http://x/f.pdf")["data_url"] == "http://x/f.pdf"
