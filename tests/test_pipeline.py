"""End to end: webhook -> Redis buffer -> deadline -> one LLM call per burst -> one Chatwoot reply.

Real redis-server, the real openai client against the LLM stand-in, real HTTP everywhere.
Timing assertions are generous bounds on behaviour (flushed after the window, not before),
never speed claims.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import replace

import pytest
import structlog.testing
from helpers import eventually, job_in, user_texts, wait_for

from buffer_service.handoff import TOOL
from buffer_service.llm import LLMClient
from devtools.payloads import attachment, message_payload


async def test_burst_of_three_gets_one_call_and_one_reply(settings, make_service, llm, chatwoot):
    svc = await make_service(settings)
    texts = ["hi", "I ordered last week", "the box arrived broken"]
    for i, text in enumerate(texts):
        body = await svc.webhook(message_payload(message_id=100 + i, conversation_id=7, content=text))
        assert body["status"] == "buffered"
        assert body["buffered_messages"] == i + 1
        last_sent = time.time()
        if i < len(texts) - 1:
            await asyncio.sleep(0.3)

    await wait_for(lambda: len(chatwoot.posts) == 1, timeout=5)
    await asyncio.sleep(0.5)  # nothing more may come
    assert len(llm.calls) == 1
    assert user_texts(llm.calls[0]) == texts
    assert llm.calls[0].messages[0]["role"] == "system"
    post = chatwoot.posts[0]
    assert post.conversation_id == 7 and post.account_id == 1
    assert post.body["message_type"] == "outgoing"
    assert post.body["content"] == "Reply to: hi | I ordered last week | the box arrived broken"
    # The window is 1 s after the last message: not before it, and not much after.
    delay = llm.calls[0].at - last_sent
    assert 0.95 <= delay < 2.5, delay
    assert len(chatwoot.posts) == 1


async def test_max_size_flushes_at_once(settings, make_service, llm, chatwoot):
    svc = await make_service(replace(settings, max_buffer_size=3, buffer_duration_ms=5000))
    started = time.time()
    for i in range(5):
        await svc.webhook(message_payload(message_id=200 + i, conversation_id=8, content=f"m{i}"))
    await wait_for(lambda: len(chatwoot.posts) >= 1, timeout=3)
    assert chatwoot.posts[0].at - started < 2.5  # long before the 5 s window
    assert user_texts(llm.calls[0]) == ["m0", "m1", "m2"]
    # The rest is the next burst, answered after its own window, in order.
    await wait_for(lambda: len(chatwoot.posts) == 2, timeout=10)
    # m0-m2 come back as history (with the first reply), then the new burst.
    assert llm.calls[1].reply == "Reply to: m3 | m4"
    assert [m["role"] for m in llm.calls[1].messages[-3:]] == ["assistant", "user", "user"]


async def test_max_age_caps_a_sliding_window(settings, make_service, llm, chatwoot):
    svc = await make_service(replace(settings, buffer_duration_ms=1000, max_buffer_age_ms=1500))
    started = time.time()
    # A message every 400 ms would slide a 1 s window forever; the age cap flushes at 1.5 s.
    for i in range(6):
        await svc.webhook(message_payload(message_id=300 + i, conversation_id=9, content=f"a{i}"))
        await asyncio.sleep(0.4)
    await wait_for(lambda: len(chatwoot.posts) >= 1, timeout=5)
    first = llm.calls[0]
    assert 1.4 <= first.at - started < 2.6
    assert user_texts(first) == [f"a{i}" for i in range(len(user_texts(first)))]
    await wait_for(lambda: len(chatwoot.posts) == 2, timeout=5)
    all_texts = user_texts(first) + [t for t in user_texts(llm.calls[1]) if t not in user_texts(first)]
    assert all_texts == [f"a{i}" for i in range(6)]


async def test_ignored_events(settings, make_service, llm, chatwoot, store):
    svc = await make_service(settings)
    cases = {
        "event:conversation_status_changed": message_payload(
            message_id=1, conversation_id=5, event="conversation_status_changed"),
        "message_type:template": message_payload(message_id=2, conversation_id=5, message_type="template"),
        "private_note": message_payload(message_id=3, conversation_id=5, private=True),
        "conversation_status:resolved": message_payload(message_id=4, conversation_id=5, status="resolved"),
        "empty_message": message_payload(message_id=5, conversation_id=5, content=None),
        "outgoing": message_payload(message_id=6, conversation_id=5, message_type="outgoing",
                                    sender_type="agent_bot"),
    }
    for reason, payload in cases.items():
        body = await svc.webhook(payload)
        assert body == {"status": "ignored", "reason": reason}
    status, body = await svc.post("/webhooks/chatwoot", {"event": "message_created", "id": "x"})
    assert status == 400 and "id" in body["error"]
    status, body = await svc.post("/webhooks/chatwoot", [1, 2])
    assert status == 400
    async with svc.session.post(svc.url + "/webhooks/chatwoot", data=b"{not json") as resp:
        assert resp.status == 400
    assert await store.due_count() == 0
    await asyncio.sleep(1.5)
    assert llm.calls == [] and chatwoot.posts == []


async def test_attachments_are_named_and_media_without_caption_is_buffered(settings, make_service, llm):
    # The stand-in payload's data_urls name chatwoot.example.com, not the configured Chatwoot:
    # never fetched, and said so in the prompt (test_media.py covers what is fetched).
    svc = await make_service(settings)
    await svc.webhook(message_payload(message_id=10, conversation_id=11, content=None,
                                      attachments=[attachment("audio")]))
    await svc.webhook(message_payload(message_id=11, conversation_id=11, content="look",
                                      attachments=[attachment("image")]))
    await wait_for(lambda: len(llm.calls) == 1, timeout=5)
    assert user_texts(llm.calls[0]) == ["[voice note: could not be transcribed]",
                                        "[image: could not be loaded] look"]


async def test_duplicate_delivery_is_buffered_once(settings, make_service, llm, chatwoot):
    svc = await make_service(replace(settings, buffer_duration_ms=200))
    payload = message_payload(message_id=42, conversation_id=12, content="only once")
    assert (await svc.webhook(payload))["status"] == "buffered"
    assert (await svc.webhook(payload))["status"] == "duplicate"
    # The same message id in another account is another message.
    other = message_payload(message_id=42, conversation_id=12, content="other account", account_id=2)
    assert (await svc.webhook(other))["status"] == "buffered"
    await wait_for(lambda: len(chatwoot.posts) == 2, timeout=5)
    assert sorted(user_texts(c) for c in llm.calls) == [["only once"], ["other account"]]
    # A redelivery after the reply is still a duplicate, not a new burst.
    assert (await svc.webhook(payload))["status"] == "duplicate"


async def test_two_hundred_conversations_each_get_their_own_reply(settings, make_service, llm, chatwoot):
    svc = await make_service(settings)

    async def converse(conv: int) -> None:
        for j in range(2):
            await svc.webhook(message_payload(message_id=conv * 10 + j, conversation_id=conv,
                                              content=f"c{conv} m{j}"))

    await asyncio.gather(*(converse(c) for c in range(1, 201)))
    await wait_for(lambda: len(chatwoot.posts) >= 200, timeout=20)
    await asyncio.sleep(0.5)
    assert len(chatwoot.posts) == 200 and len(llm.calls) == 200
    by_conv = {p.conversation_id: p.body["content"] for p in chatwoot.posts}
    assert set(by_conv) == set(range(1, 201))
    for conv, content in by_conv.items():
        assert content == f"Reply to: c{conv} m0 | c{conv} m1"


async def test_history_of_both_sides_reaches_the_next_prompt(settings, make_service, llm, chatwoot,
                                                             redis):
    # A human agent's message pauses the bot (test_guarantees.py); here the pause is off.
    svc = await make_service(replace(settings, human_pause_ms=0, buffer_duration_ms=200))
    await svc.webhook(message_payload(message_id=1, conversation_id=13, content="first question"))
    # Finished, not only posted: the finish writes the burst and the reply to the history, and
    # on a loaded machine the agent's message below could otherwise get there first.
    await eventually(job_in("completed", redis, "1:13"), timeout=5)
    # A human agent answers in between; then the customer writes again.
    await svc.webhook(message_payload(message_id=2, conversation_id=13, content="agent here",
                                      message_type="outgoing", sender_type="user"))
    await svc.webhook(message_payload(message_id=3, conversation_id=13, content="second question"))
    await wait_for(lambda: len(llm.calls) == 2, timeout=5)
    roles = [(m["role"], m["content"]) for m in llm.calls[1].messages[1:]]
    assert roles == [
        ("user", "first question"),
        ("assistant", "Reply to: first question"),
        ("assistant", "agent here"),
        ("user", "second question"),
    ]


async def test_legacy_supabase_paths(settings, make_service, llm, chatwoot):
    svc = await make_service(replace(settings, chatwoot_account_id=3))
    # The old guide's curl test: no `event`, no `account`, conversation status "open".
    bare = {
        "id": 12345, "content": "Test message", "message_type": "incoming",
        "conversation": {"id": 1, "status": "open", "channel": "Channel::Whatsapp"},
        "sender": {"id": 1, "name": "Test User", "phone_number": "+1234567890"},
        "created_at": "2026-11-25T10:00:00.000Z",
    }
    status, body = await svc.post("/functions/v1/message-buffer-manager?action=handle", bare)
    assert status == 200 and body["status"] == "buffered"
    status, body = await svc.post("/functions/v1/chatwoot-webhook-v2",
                                  message_payload(message_id=12346, conversation_id=1, account_id=3,
                                                  content="second"))
    assert status == 200 and body["status"] == "buffered"
    status, body = await svc.post("/functions/v1/message-buffer-manager?action=bogus", bare)
    assert status == 400
    await wait_for(lambda: len(chatwoot.posts) == 1, timeout=5)
    assert chatwoot.posts[0].account_id == 3
    assert user_texts(llm.calls[0]) == ["Test message", "second"]


async def test_buffer_processor_path_flushes_due_buffers_now(settings, make_service, llm, chatwoot, store):
    # A long safety sweep and no wake-ups from appends: only the trigger can make it prompt.
    token = "admin-token-for-tests-0123456789"
    svc = await make_service(replace(settings, processing_interval_ms=60_000, buffer_duration_ms=300,
                                     admin_token=token))
    await store.redis.config_set("notify-keyspace-events", "")
    async with svc.session.post(svc.url + "/functions/v1/buffer-processor", json={},
                                headers={"Authorization": f"Bearer {token}"}) as resp:
        assert resp.status == 200 and await resp.json() == {"status": "triggered", "due_buffers": 0}
    await svc.webhook(message_payload(message_id=1, conversation_id=14, content="x"))
    await wait_for(lambda: len(chatwoot.posts) == 1, timeout=5)


@pytest.mark.standalone_only
async def test_health_checks(settings, make_service, redis_server):
    svc = await make_service(settings)
    async with svc.session.get(svc.url + "/healthz") as resp:
        assert resp.status == 200
    async with svc.session.get(svc.url + "/readyz") as resp:
        assert resp.status == 200
    redis_server.kill()
    async with svc.session.get(svc.url + "/readyz") as resp:
        assert resp.status == 503
    async with svc.session.get(svc.url + "/healthz") as resp:
        assert resp.status == 200
    status, body = await svc.post("/webhooks/chatwoot", message_payload(message_id=1, conversation_id=1))
    assert status == 500 and body["status"] == "unavailable"


@pytest.mark.redis_args("--rename-command", "CONFIG", "", "--notify-keyspace-events", "")
async def test_managed_redis_without_config_still_flushes_on_time(settings, make_service, llm, chatwoot):
    # Managed Redis services refuse CONFIG SET: no expiry events at all, the index suffices.
    with structlog.testing.capture_logs() as logged:
        svc = await make_service(replace(settings, processing_interval_ms=60_000))
        sent = time.time()
        await svc.webhook(message_payload(message_id=1, conversation_id=15, content="hello"))
        await wait_for(lambda: len(chatwoot.posts) == 1, timeout=5)
    assert 0.95 <= llm.calls[0].at - sent < 2.5
    assert [e["event"] for e in logged].count("expiry_events_unavailable") == 1


@pytest.mark.standalone_only
async def test_a_worker_stops_promptly_when_redis_is_gone(settings, make_service, redis_server, redis):
    """SIGTERM (here: the stop event) while Redis is down: the sweep in progress must not go on
    claiming shard after shard, each failing only after its connection retries (16 shards took
    about 12 s); at most the claim already under way finishes."""
    with structlog.testing.capture_logs() as logged:
        # A short sweep interval: the first claim after the kill comes soon.
        svc = await make_service(replace(settings, processing_interval_ms=300), http=False)
        # Once it has claimed (its flags are loaded: they hold while Redis is away), it sweeps on.
        await eventually(lambda: _has_claimed(redis), timeout=10)
        redis_server.kill()
        await wait_for(lambda: any(e["event"] == "claim_failed" for e in logged), timeout=10)
        stopped_at = len(logged)
        await svc.close()
    after_stop = [e["event"] for e in logged[stopped_at:]]
    assert after_stop.count("claim_failed") <= 1, after_stop


async def _has_claimed(redis) -> bool:
    return "cmdstat_evalsha" in await redis.info("commandstats")


async def test_the_llm_client_is_built_before_the_first_call_without_asking_the_llm(settings, llm):
    # What the first call would import and build (the chat resources, the models, the transform
    # caches) is built by one call answered in this process: the server is not asked.
    client = LLMClient(settings)
    try:
        await client.warm([TOOL])
        assert "chat" in vars(client._client)  # openai builds the resource on first access
        assert llm.calls == []
        answer = await client.reply([{"role": "user", "content": "hi"}])
        assert answer.text == "Reply to: hi" and len(llm.calls) == 1
    finally:
        await client.close()


async def test_a_worker_whose_warm_up_fails_starts_and_answers(settings, make_service, llm, chatwoot,
                                                               monkeypatch):
    warmed: list[object] = []

    async def broken(self, tools=None):
        warmed.append(tools)
        raise RuntimeError("no warm-up today")

    monkeypatch.setattr(LLMClient, "warm", broken)
    with structlog.testing.capture_logs() as logs:
        svc = await make_service(settings)
        await svc.webhook(message_payload(message_id=1, conversation_id=5, content="still answered?"))
        await wait_for(lambda: len(chatwoot.posts) == 1, timeout=5)
    assert warmed == [[TOOL] if settings.handoff_tool else None]
    assert [e["error"] for e in logs if e["event"] == "warm_up_failed"] == \
        ["RuntimeError: no warm-up today"]
    assert len(llm.calls) == 1
