"""Delivery guarantees (issue 3): leases, bounded retries, no double reply, superseded answers,
human takeover, Redis restarts, shutdown.

Real redis-server, the stand-ins over HTTP, and real worker processes wherever something is
killed. Every wait is on a state (a post, a job record), with generous bounds, so a loaded
machine makes a test slower, not red.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from helpers import (
    HUMAN,
    buffered_in,
    claim_one,
    conversation_event,
    eventually,
    job_in,
    jobs,
    kill9,
    service_env,
    wait_exit,
    wait_for,
)
from redis.asyncio import Redis

from buffer_service import redis_client, service
from buffer_service.chatwoot import ChatMessage, Decision
from buffer_service.store import BufferStore
from devtools.chatwoot_standin import ChatwootStandIn
from devtools.payloads import message_payload
from devtools.processes import spawn_service


# -- leases and fencing (the scripts, driven directly) -----------------------------------------
async def test_a_post_confirmed_by_its_echo_is_finished_even_after_the_last_attempt(redis, settings):
    store = BufferStore(redis, replace(settings, processing_lease_ms=100, buffer_duration_ms=1))
    await store.append(_message(3, 60))
    for _ in range(3):
        batch = await claim_one(store)
        await asyncio.sleep(0.15)
    assert await store.before_post(batch, "the answer") == ("post", "")
    # Chatwoot took the post, the worker died before `finish`; the echo arrives.
    echo = ChatMessage(1, 3, 777, "the answer", role="assistant")
    assert await store.note(Decision("note", "outgoing", echo)) == "own"
    await asyncio.sleep(0.15)
    retry = await claim_one(store)  # attempt 4 of 3: only to record what happened
    assert await store.before_post(retry, "the answer") == ("posted", "777")
    assert await store.finish(retry, "completed", reply="the answer", reply_id=777)
    assert (await store.job(retry.id))["state"] == "completed"


def _message(conversation_id: int, message_id: int) -> ChatMessage:
    return ChatMessage(1, conversation_id, message_id, f"m{message_id}")


async def test_a_stale_token_changes_nothing_and_a_lapsed_lease_is_taken_again(redis, settings):
    # Short leases so that the test does not wait; nothing else differs from production.
    store = BufferStore(redis, replace(settings, processing_lease_ms=200, buffer_duration_ms=1))
    for i in range(2):
        await store.append(_message(1, 40 + i))
    old = await claim_one(store)
    await asyncio.sleep(0.3)  # the worker holding `old` stopped renewing
    new = await claim_one(store)
    assert new.id == old.id and new.attempts == 2 and new.token != old.token
    assert [m["text"] for m in new.messages] == ["m40", "m41"]
    assert (await store.job(new.id))["error"] == "lease expired while processing (attempt 1)"
    # The first worker wakes up: every step it tries is refused.
    assert not await store.renew(old)
    assert await store.before_post(old, "late reply") == ("lost", "")
    assert not await store.finish(old, "completed", reply="late reply", reply_id=5)
    assert await store.fail(old, "late error", retry_in_ms=0, permanent=False) == ""
    assert not await store.release(old)
    assert await store.before_post(new, "reply") == ("post", "")
    assert await store.finish(new, "completed", reply="reply", reply_id=6)
    assert (await store.job(new.id))["state"] == "completed"


async def test_a_lease_that_lapses_at_every_attempt_ends_failed_with_its_messages(redis, settings):
    store = BufferStore(redis, replace(settings, processing_lease_ms=100, buffer_duration_ms=1))
    await store.append(_message(2, 50))
    for attempt in (1, 2, 3):
        batch = await claim_one(store)
        assert batch.attempts == attempt
        await asyncio.sleep(0.15)
    _, _, batches = await store.claim(batch.shard, 10)
    assert batches == []
    job = await store.job(batch.id)
    assert job["state"] == "failed" and job["attempts"] == "3"
    assert job["error"] == "lease expired while processing (attempt 3)"
    assert await redis.lrange(store.keys.messages(batch.id), 0, -1)
    assert await redis.zscore(store.keys.failed(batch.shard), batch.id)
    assert await redis.hget(store.keys.active(batch.shard), batch.conv) is None


# -- retries --------------------------------------------------------------------------------
async def test_llm_failing_twice_then_answering_gives_one_reply(settings, make_service, llm, chatwoot, redis):
    llm.fail_next(2, 500)
    svc = await make_service(settings)
    for i in range(2):
        await svc.webhook(message_payload(message_id=60 + i, conversation_id=60, content=f"q{i}"))
    await wait_for(lambda: len(chatwoot.posts) == 1, timeout=15)
    await asyncio.sleep(0.5)
    assert len(chatwoot.posts) == 1 and chatwoot.posts[0].body["content"] == "Reply to: q0 | q1"
    assert [c.status for c in llm.calls] == [500, 500, 200]
    [job] = await jobs(redis, "1:60")
    assert job["state"] == "completed" and job["attempts"] == "3"


async def test_llm_failing_always_fails_the_batch_and_a_requeue_answers_it_once(
        settings, make_service, llm, chatwoot, redis, store):
    llm.fail_next(3, 500)
    svc = await make_service(settings)
    for i in range(2):
        await svc.webhook(message_payload(message_id=70 + i, conversation_id=70, content=f"q{i}"))
    failed = await eventually(job_in("failed", redis, "1:70"), timeout=15)
    assert failed["attempts"] == "3" and "HTTP 500" in failed["error"]
    assert len(await buffered_in(redis, store.keys.messages(failed["id"]))) == 2
    assert chatwoot.posts == []  # never an error text to the customer

    assert await store.requeue(failed["id"])
    await wait_for(lambda: len(chatwoot.posts) == 1, timeout=10)
    await asyncio.sleep(0.5)
    assert len(chatwoot.posts) == 1 and chatwoot.posts[0].body["content"] == "Reply to: q0 | q1"
    assert (await store.job(failed["id"]))["state"] == "completed"


async def test_client_errors_are_not_retried_and_a_stored_reply_is_reused(
        settings, make_service, llm, chatwoot, redis, store):
    chatwoot.fail_next(1, 422)
    svc = await make_service(replace(settings, buffer_duration_ms=200))
    await svc.webhook(message_payload(message_id=80, conversation_id=80, content="hello"))
    failed = await eventually(job_in("failed", redis, "1:80"), timeout=10)
    assert failed["attempts"] == "1" and "HTTP 422" in failed["error"]
    assert failed["reply"] == "Reply to: hello"
    # Re-queued, the reply the LLM already wrote is posted: no second call, no other answer.
    assert await store.requeue(failed["id"])
    await wait_for(lambda: len(chatwoot.posts) == 1, timeout=10)
    assert len(llm.calls) == 1

    llm.fail_next(1, 401)
    await svc.webhook(message_payload(message_id=81, conversation_id=81, content="hi"))
    failed = await eventually(job_in("failed", redis, "1:81"), timeout=10)
    assert failed["attempts"] == "1" and "HTTP 401" in failed["error"]


class RateLimitingChatwoot(ChatwootStandIn):
    """Answers its injected 429s with `Retry-After: 2`, as Chatwoot's rack-attack does."""

    def _make_app(self) -> web.Application:
        app = super()._make_app()
        app.middlewares.insert(0, self._retry_after)
        return app

    @web.middleware
    async def _retry_after(self, request: web.Request, handler: Any) -> web.StreamResponse:
        response = await handler(request)
        if response.status == 429:
            response.headers["Retry-After"] = "2"
        return response


async def test_chatwoot_429_waits_at_least_its_retry_after(settings, make_service, llm, redis):
    chatwoot = RateLimitingChatwoot()
    await chatwoot.start()
    try:
        chatwoot.fail_next(1, 429)
        svc = await make_service(replace(settings, chatwoot_base_url=chatwoot.base_url))
        await svc.webhook(message_payload(message_id=90, conversation_id=90, content="x"))
        retrying = await eventually(job_in("retrying", redis, "1:90"), timeout=10)
        assert int(retrying["retry_ms"]) - int(retrying["error_ms"]) >= 2000  # the base is 100 ms
        await wait_for(lambda: len(chatwoot.posts) == 1, timeout=15)
        refused = next(r for r in chatwoot.requests if r.status == 429)
        assert chatwoot.posts[0].at - refused.at >= 1.9
    finally:
        await chatwoot.stop()


# -- superseded answers ----------------------------------------------------------------------
async def test_a_message_during_a_slow_llm_call_supersedes_the_stale_reply(
        settings, make_service, llm, chatwoot, redis):
    llm.delay = 3.0  # read when a call starts: only the first call is slow
    svc = await make_service(replace(settings, buffer_duration_ms=300))
    await svc.webhook(message_payload(message_id=100, conversation_id=100, content="where is my order"))
    await wait_for(lambda: len(llm.calls) == 1, timeout=10)  # the LLM is writing
    llm.delay = 0
    await svc.webhook(message_payload(message_id=101, conversation_id=100, content="it is #5521"))
    await wait_for(lambda: len(chatwoot.posts) == 1, timeout=15)
    await asyncio.sleep(1.5)
    assert [p.body["content"] for p in chatwoot.posts] == ["Reply to: where is my order | it is #5521"]
    assert len(llm.calls) == 2
    first, second = await jobs(redis, "1:100")
    assert (first["state"], first["reason"]) == ("superseded", "new_messages")
    assert second["state"] == "completed"
    # The age cap still counts from the first message of the burst.
    assert second["first_ms"] == first["first_ms"]


async def test_superseding_can_be_turned_off(settings, make_service, llm, chatwoot):
    llm.delay = 3.0
    svc = await make_service(replace(settings, buffer_duration_ms=300, supersede_stale_replies=False))
    await svc.webhook(message_payload(message_id=110, conversation_id=110, content="a"))
    await wait_for(lambda: len(llm.calls) == 1, timeout=10)
    llm.delay = 0
    await svc.webhook(message_payload(message_id=111, conversation_id=110, content="b"))
    await wait_for(lambda: len(chatwoot.posts) == 2, timeout=15)
    assert [p.body["content"] for p in chatwoot.posts] == ["Reply to: a", "Reply to: b"]
    # "b" was due long before "a" was answered, yet waited: one burst of a conversation at a time.
    assert llm.calls[1].at >= chatwoot.posts[0].at


async def test_a_burst_past_the_age_cap_is_answered_even_if_stale(settings, make_service, llm, chatwoot):
    llm.delay = 3.0
    svc = await make_service(replace(settings, buffer_duration_ms=300, max_buffer_age_ms=1000))
    await svc.webhook(message_payload(message_id=120, conversation_id=120, content="a"))
    await wait_for(lambda: len(llm.calls) == 1, timeout=10)
    llm.delay = 0
    await svc.webhook(message_payload(message_id=121, conversation_id=120, content="b"))
    # The reply to "a" is ready over 3 s after "a": older than the 1 s cap, so it goes out
    # although "b" waits.
    await wait_for(lambda: len(chatwoot.posts) == 2, timeout=15)
    assert [p.body["content"] for p in chatwoot.posts] == ["Reply to: a", "Reply to: b"]


# -- human takeover --------------------------------------------------------------------------
async def test_a_human_agents_message_pauses_the_bot(settings, make_service, llm, chatwoot, redis, store):
    svc = await make_service(replace(settings, buffer_duration_ms=300, human_pause_ms=4000))
    agent = message_payload(message_id=130, conversation_id=130, content="Ana here, let me check",
                            message_type="outgoing", sender_type="user", sender_name="Ana Lima")
    assert await svc.webhook(agent) == {"status": "ignored", "reason": "outgoing"}
    # The customer answers the human; the burst is acknowledged, then dropped with the reason.
    body = await svc.webhook(message_payload(message_id=131, conversation_id=130, content="thanks"))
    assert body["status"] == "buffered"
    skipped = await eventually(job_in("skipped", redis, "1:130"), timeout=10)
    assert skipped["reason"] == "human_agent_replied"
    assert llm.calls == [] and chatwoot.posts == []
    # HUMAN_PAUSE_MS later the bot answers again, with the human's turn in the prompt.
    pause = store.keys.pause("1:130")
    await eventually(lambda: _missing(redis, pause), timeout=10)
    await svc.webhook(message_payload(message_id=132, conversation_id=130, content="one more thing"))
    await wait_for(lambda: len(chatwoot.posts) == 1, timeout=10)
    prompt = [(m["role"], m["content"]) for m in llm.calls[0].messages[1:]]
    assert prompt == [("assistant", "Ana here, let me check"), ("user", "thanks"),
                      ("user", "one more thing")]


async def _missing(redis: Redis, key: str) -> bool:
    return not await redis.exists(key)


async def test_a_human_assignee_means_no_bot_reply(settings, make_service, llm, chatwoot, redis):
    # The window need only outlast the next webhook, sent at once (each phase waits it out).
    svc = await make_service(replace(settings, buffer_duration_ms=1000))
    body = await svc.webhook(message_payload(message_id=140, conversation_id=140, content="hi",
                                             assignee=HUMAN))
    assert body == {"status": "ignored", "reason": "human_assignee"}
    # The next message shows the bot in charge again: that is enough, no event needed.
    body = await svc.webhook(message_payload(message_id=143, conversation_id=140, content="hello?"))
    assert body["status"] == "buffered"
    await wait_for(lambda: len(chatwoot.posts) == 1, timeout=10)
    assert chatwoot.posts[0].body["content"] == "Reply to: hi | hello?"
    chatwoot.reset()
    llm.reset()

    # A burst already waiting when a human is assigned is dropped with the reason.
    await svc.webhook(message_payload(message_id=141, conversation_id=141, content="hello"))
    await svc.webhook(conversation_event("conversation_updated", 141, assignee=HUMAN))
    skipped = await eventually(job_in("skipped", redis, "1:141"), timeout=10)
    assert skipped["reason"] == "human_assignee"
    await asyncio.sleep(1.0)
    assert llm.calls == [] and chatwoot.posts == []

    # Handed back to the bot (unassigned, pending): it answers again.
    await svc.webhook(conversation_event("conversation_updated", 141, status="pending"))
    await svc.webhook(message_payload(message_id=142, conversation_id=141, content="still there?"))
    await wait_for(lambda: len(chatwoot.posts) == 1, timeout=10)


async def test_a_takeover_while_the_llm_writes_is_caught_right_before_posting(
        settings, make_service, llm, chatwoot, redis):
    llm.delay = 3.0
    svc = await make_service(replace(settings, buffer_duration_ms=300))
    await svc.webhook(message_payload(message_id=150, conversation_id=150, content="hi"))
    await wait_for(lambda: len(llm.calls) == 1, timeout=10)
    await svc.webhook(conversation_event("conversation_status_changed", 150, status="snoozed"))
    skipped = await eventually(job_in("skipped", redis, "1:150"), timeout=10)
    assert skipped["reason"] == "conversation_status:snoozed"
    await wait_for(lambda: llm.calls[0].status == 200, timeout=10)
    await asyncio.sleep(0.5)
    assert chatwoot.posts == []


async def test_a_closed_reply_window_skips_without_retrying(settings, make_service, llm, chatwoot, redis):
    svc = await make_service(replace(settings, buffer_duration_ms=1000))
    await svc.webhook(message_payload(message_id=160, conversation_id=160, content="hi"))
    await svc.webhook(conversation_event("conversation_updated", 160, can_reply=False))
    skipped = await eventually(job_in("skipped", redis, "1:160"), timeout=10)
    assert (skipped["reason"], skipped["attempts"]) == ("reply_window_closed", "1")
    assert llm.calls == [] and chatwoot.posts == []


async def test_an_older_webhook_does_not_overrule_a_newer_one(settings, make_service, llm, chatwoot,
                                                              redis):
    svc = await make_service(replace(settings, buffer_duration_ms=1000))
    await svc.webhook(message_payload(message_id=171, conversation_id=170, content="hi"))
    earlier = datetime.now(UTC) + timedelta(seconds=1)
    later = earlier + timedelta(seconds=5)
    await svc.webhook(conversation_event("conversation_updated", 170, assignee=HUMAN, at=later))
    # Delivered late: the view from before the assignment.
    await svc.webhook(conversation_event("conversation_updated", 170, status="pending", at=earlier))
    skipped = await eventually(job_in("skipped", redis, "1:170"), timeout=10)
    assert skipped["reason"] == "human_assignee"
    assert chatwoot.posts == []


async def test_our_own_reply_coming_back_as_a_user_message_never_pauses_the_bot(
        settings, make_service, llm, held_chatwoot, redis):
    """With a user access token Chatwoot shows the bot's replies as a human's (sender.type
    "user"). Neither an echo that arrives while the post is in flight nor one after it pauses."""
    chatwoot = held_chatwoot
    svc = await make_service(replace(settings, buffer_duration_ms=300,
                                     chatwoot_base_url=chatwoot.base_url))

    def echo(post: Any) -> dict[str, Any]:
        return message_payload(message_id=post.message_id, conversation_id=180,
                               content=post.body["content"], message_type="outgoing",
                               sender_type="user", sender_name="Bot Operator")

    chatwoot.hold_after = True
    await svc.webhook(message_payload(message_id=181, conversation_id=180, content="first"))
    await wait_for(lambda: len(chatwoot.posts) == 1, timeout=10)
    await svc.webhook(echo(chatwoot.posts[0]))  # the worker still waits for Chatwoot's answer
    chatwoot.opened.set()
    done = await eventually(job_in("completed", redis, "1:180"), timeout=10)
    assert done["reply_id"] == str(chatwoot.posts[0].message_id)

    await svc.webhook(message_payload(message_id=182, conversation_id=180, content="second"))
    await wait_for(lambda: len(chatwoot.posts) == 2, timeout=10)
    await asyncio.sleep(0.3)
    await svc.webhook(echo(chatwoot.posts[1]))  # after the batch finished

    await svc.webhook(message_payload(message_id=183, conversation_id=180, content="third"))
    await wait_for(lambda: len(chatwoot.posts) == 3, timeout=10)
    # The echoes did not enter the history twice.
    assert [m["role"] for m in llm.calls[2].messages[1:]] == ["user", "assistant", "user", "assistant",
                                                              "user"]
    # A real human's message still pauses it (the check above can fail).
    await svc.webhook(message_payload(message_id=184, conversation_id=180, content="Ana here",
                                      message_type="outgoing", sender_type="user"))
    await svc.webhook(message_payload(message_id=185, conversation_id=180, content="ok"))
    skipped = await eventually(job_in("skipped", redis, "1:180"), timeout=10)
    assert skipped["reason"] == "human_agent_replied"
    assert len(chatwoot.posts) == 3


# -- crashes (kill -9 of worker processes) -----------------------------------------------------
async def test_kill_9_during_a_slow_llm_call_another_worker_answers_once(
        settings, make_service, llm, chatwoot, workers, redis):
    settings = replace(settings, processing_lease_ms=3000)
    llm.delay = 30  # the first worker is killed while it waits
    await make_service(settings, worker=False)
    first = await workers.start(settings)
    svc_url = f"http://127.0.0.1:{settings.port}/webhooks/chatwoot"
    async with aiohttp.ClientSession() as session:
        for i in range(3):
            payload = message_payload(message_id=200 + i, conversation_id=200, content=f"part {i}")
            async with session.post(svc_url, json=payload) as resp:
                assert resp.status == 200
    await wait_for(lambda: len(llm.calls) == 1, timeout=10)
    kill9(first)
    llm.delay = 0
    await workers.start(settings)
    await wait_for(lambda: len(chatwoot.posts) == 1, timeout=20)
    await asyncio.sleep(1.0)
    assert [p.body["content"] for p in chatwoot.posts] == ["Reply to: part 0 | part 1 | part 2"]
    [job] = await jobs(redis, "1:200")
    assert job["state"] == "completed" and job["attempts"] == "2"


async def test_kill_9_after_the_llm_answered_posts_the_stored_reply_once(
        settings, make_service, llm, held_chatwoot, workers, redis):
    chatwoot = held_chatwoot
    settings = replace(settings, processing_lease_ms=3000, chatwoot_base_url=chatwoot.base_url,
                       buffer_duration_ms=200)
    chatwoot.hold_before = True
    llm.reply_fn = lambda messages: "Your order ships tomorrow."
    svc = await make_service(settings, worker=False)
    first = await workers.start(settings)
    await svc.webhook(message_payload(message_id=210, conversation_id=210, content="when?"))
    posting = await eventually(job_in("posting", redis, "1:210"), timeout=10)
    assert posting["reply"] == "Your order ships tomorrow."
    await wait_for(lambda: chatwoot.arrived == 1, timeout=5)
    kill9(first)  # the reply is stored; Chatwoot never got it
    await asyncio.sleep(0.2)  # let the stand-in's event loop see the connection close
    chatwoot.opened.set()
    await wait_for(lambda: chatwoot.dropped == 1, timeout=5)
    llm.reply_fn = lambda messages: "A different answer"
    await workers.start(settings)
    await wait_for(lambda: len(chatwoot.posts) == 1, timeout=20)
    await asyncio.sleep(1.0)
    assert [p.body["content"] for p in chatwoot.posts] == ["Your order ships tomorrow."]
    assert len(llm.calls) == 1
    [job] = await jobs(redis, "1:210")
    assert job["state"] == "completed" and job["attempts"] == "2"


@pytest.mark.parametrize("echo", [True, False], ids=["with-echo", "without-echo"])
async def test_kill_9_between_post_and_finish(settings, make_service, llm, held_chatwoot, workers, redis,
                                              echo):
    """Chatwoot created the message, the worker died before recording it. Chatwoot's webhook
    echo of the message records it; without an echo the retry asks Chatwoot and finds it. Either
    way the reply is posted once (docs/delivery-guarantees.md)."""
    chatwoot = held_chatwoot
    settings = replace(settings, processing_lease_ms=3000, chatwoot_base_url=chatwoot.base_url,
                       buffer_duration_ms=200)
    chatwoot.hold_after = True
    svc = await make_service(settings, worker=False)
    first = await workers.start(settings)
    await svc.webhook(message_payload(message_id=220, conversation_id=220, content="hi"))
    await wait_for(lambda: len(chatwoot.posts) == 1, timeout=10)
    kill9(first)
    chatwoot.hold_after = False
    chatwoot.opened.set()
    post = chatwoot.posts[0]
    if echo:
        await svc.webhook(message_payload(message_id=post.message_id, conversation_id=220,
                                          content=post.body["content"], message_type="outgoing",
                                          sender_type="agent_bot"))
    await workers.start(settings)
    done = await eventually(job_in("completed", redis, "1:220"), timeout=20)
    await asyncio.sleep(0.5)
    assert len(llm.calls) == 1
    assert len(chatwoot.posts) == 1 and done["reply_id"] == str(post.message_id)
    assert "earlier_post_confirmed" in workers.log_text()
    asked = [r for r in chatwoot.requests if r.method == "GET"]
    assert len(asked) == (0 if echo else 1)


# -- Redis refusing a write: Chatwoot delivers the message again --------------------------------
@pytest.mark.standalone_only
async def test_a_message_redis_could_not_store_is_delivered_again_and_answered_once(
        settings, make_service, redis, llm, chatwoot):
    """An agent bot's webhook job is performed again only after a 429 or a 500; any other
    failure is final, the message is never delivered again and Chatwoot hands the conversation
    to humans (docs/chatwoot.md). The stand-in delivers with that policy. Redis refuses writes
    for a moment (no replica for min-replicas-to-write: the same refusal as an out-of-memory
    or an unconfirmed WAIT): the answer must make Chatwoot retry, and the retry is buffered and
    answered once, the conversation left with the bot."""
    settings = replace(settings, buffer_duration_ms=300)
    svc = await make_service(settings)
    chatwoot.webhook_retry_s = 0.5
    payload = message_payload(message_id=1, conversation_id=77, content="where is my order?")
    await redis.config_set("min-replicas-to-write", 1)
    try:
        delivering = asyncio.create_task(chatwoot.deliver(svc.url + "/webhooks/chatwoot", payload))
        await wait_for(lambda: bool(chatwoot.deliveries), timeout=10)
    finally:
        await redis.config_set("min-replicas-to-write", 0)
    assert chatwoot.deliveries[0].status == 500
    assert await delivering == 200
    assert chatwoot.statuses.get(77, "pending") == "pending"  # not handed to humans
    await wait_for(lambda: len(chatwoot.posts_for(77)) == 1, timeout=10)
    await eventually(job_in("completed", redis, "1:77"), timeout=10)
    assert [p.body["content"] for p in chatwoot.posts_for(77)] == ["Reply to: where is my order?"]
    assert len(llm.calls) == 1


# -- Redis restarts ---------------------------------------------------------------------------
@pytest.mark.standalone_only
async def test_redis_kill_9_loses_no_acknowledged_message(settings, llm, chatwoot, redis_server, tmp_path):
    # No periodic sweep to lean on: after the restart, only the reconnect makes it look.
    settings = replace(settings, buffer_duration_ms=2500, processing_interval_ms=60_000)
    proc = spawn_service(["serve"], service_env(settings), tmp_path / "service.log")
    url = f"http://127.0.0.1:{settings.port}"
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=15)) as session:
            async def get(path: str) -> int:
                async with session.get(url + path) as resp:
                    return resp.status

            async def ready() -> bool:
                try:
                    return await get("/readyz") == 200
                except aiohttp.ClientError:
                    return False
            await eventually(ready, timeout=30)

            async def post(payload: dict[str, Any]) -> tuple[int, dict[str, Any]]:
                async with session.post(url + "/webhooks/chatwoot", json=payload) as resp:
                    return resp.status, await resp.json()

            for conv in range(1, 21):
                for j in range(2):
                    status, body = await post(message_payload(message_id=conv * 10 + j,
                                                              conversation_id=conv, content=f"c{conv} m{j}"))
                    assert (status, body["status"]) == (200, "buffered")
            await asyncio.sleep(1.2)  # AOF everysec: acknowledged over a second ago
            redis_server.kill()

            started = time.monotonic()
            status, body = await post(message_payload(message_id=999, conversation_id=99))
            assert (status, body["status"]) == (500, "unavailable")  # Chatwoot retries a 500
            assert time.monotonic() - started < 4.5  # answered before Chatwoot's 5 s timeout
            assert await get("/readyz") == 503
            await asyncio.sleep(2.0)  # the deadlines pass while Redis is down

            redis_server.start()
            restarted = time.monotonic()
            await wait_for(lambda: len(chatwoot.posts) >= 20, timeout=30)
            assert time.monotonic() - restarted < 15
            assert proc.poll() is None  # the same process reconnected by itself
            assert await get("/readyz") == 200
            status, body = await post(message_payload(message_id=1000, conversation_id=21, content="after"))
            assert (status, body["status"]) == (200, "buffered")
            await wait_for(lambda: len(chatwoot.posts) == 21, timeout=15)
    finally:
        proc.terminate()
        assert proc.wait(20) == 0
    by_conv = {p.conversation_id: p.body["content"] for p in chatwoot.posts}
    assert len(chatwoot.posts) == 21
    for conv in range(1, 21):
        assert by_conv[conv] == f"Reply to: c{conv} m0 | c{conv} m1"


# -- shutdown ---------------------------------------------------------------------------------
async def test_sigterm_finishes_a_batch_in_flight_and_exits_0(settings, make_service, llm, chatwoot, workers):
    settings = replace(settings, buffer_duration_ms=200)
    llm.delay = 1.5
    svc = await make_service(settings, worker=False)
    worker = await workers.start(settings, SHUTDOWN_GRACE_S="10")
    await svc.webhook(message_payload(message_id=300, conversation_id=300, content="bye"))
    await wait_for(lambda: len(llm.calls) == 1, timeout=10)
    worker.terminate()
    assert await wait_exit(worker, timeout=15) == 0
    assert [p.body["content"] for p in chatwoot.posts] == ["Reply to: bye"]


async def test_sigterm_does_not_release_a_batch_whose_post_may_have_gone_out(
        settings, make_service, llm, held_chatwoot, workers, redis):
    chatwoot = held_chatwoot
    settings = replace(settings, processing_lease_ms=3000, chatwoot_base_url=chatwoot.base_url,
                       buffer_duration_ms=200)
    chatwoot.hold_after = True
    svc = await make_service(settings, worker=False)
    worker = await workers.start(settings, SHUTDOWN_GRACE_S="0.5")
    await svc.webhook(message_payload(message_id=320, conversation_id=320, content="hi"))
    await wait_for(lambda: len(chatwoot.posts) == 1, timeout=10)
    worker.terminate()
    assert await wait_exit(worker, timeout=10) == 0
    [job] = await jobs(redis, "1:320")
    assert job["state"] == "posting"  # left to its lease, for the echo to arrive meanwhile
    post = chatwoot.posts[0]
    await svc.webhook(message_payload(message_id=post.message_id, conversation_id=320,
                                      content=post.body["content"], message_type="outgoing",
                                      sender_type="agent_bot"))
    chatwoot.opened.set()
    await workers.start(settings)
    await eventually(job_in("completed", redis, "1:320"), timeout=20)
    assert len(chatwoot.posts) == 1


async def test_sigterm_releases_what_it_cannot_finish_for_another_worker_at_once(
        settings, make_service, llm, chatwoot, workers, redis):
    # A long lease: the batch can only come back this soon because it was released.
    settings = replace(settings, processing_lease_ms=60_000, buffer_duration_ms=200)
    llm.delay = 30
    svc = await make_service(settings, worker=False)
    worker = await workers.start(settings, SHUTDOWN_GRACE_S="0.5")
    await svc.webhook(message_payload(message_id=310, conversation_id=310, content="slow one"))
    await wait_for(lambda: len(llm.calls) == 1, timeout=10)
    worker.terminate()
    assert await wait_exit(worker, timeout=10) == 0
    [job] = await jobs(redis, "1:310")
    assert (job["state"], job["attempts"]) == ("released", "0")
    llm.delay = 0
    await workers.start(settings)
    await wait_for(lambda: len(chatwoot.posts) == 1, timeout=20)
    # The stand-in records the post before the worker hears back and finishes the batch.
    job = await eventually(job_in("completed", redis, "1:310"), timeout=10)
    assert job["attempts"] == "1" and len(await jobs(redis, "1:310")) == 1


async def test_a_process_that_cannot_take_its_port_stops_what_it_started(settings, redis):
    """The worker starts before the HTTP server; a server that cannot listen must not leave it
    running, nor any client open, behind the error."""
    before = asyncio.all_tasks()
    with socket.socket() as taken:
        taken.bind((settings.host, settings.port))
        taken.listen()
        with pytest.raises(OSError):
            await service.run(settings)
    assert {t for t in asyncio.all_tasks() - before if not t.done()} == set()

    async def no_subscriber() -> bool:
        return not await redis.client_list(_type="pubsub")
    await eventually(no_subscriber)


async def test_a_worker_stops_when_the_redis_client_swallows_its_cancellation(settings, redis,
                                                                              monkeypatch):
    """redis-py's cluster client can swallow a CancelledError that arrives while it refreshes the
    slot map (seen as a hang of the test above on a cluster): the wake-up listener must still end
    when the worker stops, not wait in its next task group for subscriptions nobody ends."""
    real = redis_client.subscription_nodes
    refreshing = asyncio.Event()

    async def swallowing(client: Any, s: Any) -> Any:
        refreshing.set()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.sleep(1.0)
        return await real(client, s)

    monkeypatch.setattr(redis_client, "subscription_nodes", swallowing)
    stop = asyncio.Event()
    running = asyncio.create_task(service.run(settings, http=False, stop=stop))
    await asyncio.wait_for(refreshing.wait(), timeout=10)
    stop.set()
    # A bound for a hang, not a timing assertion: it stops in about a second.
    await asyncio.wait_for(running, timeout=20)


async def test_the_worker_sweeps_when_its_subscription_reconnects(settings, make_service, llm, chatwoot,
                                                                  redis, store):
    """Wake-ups published while the worker's subscription is away are lost; it must look at the
    index as soon as it is back, also when the client reconnects on its own."""
    await make_service(replace(settings, processing_interval_ms=60_000), http=False)

    async def subscribed() -> bool:
        return bool(await redis.client_list(_type="pubsub"))
    await eventually(subscribed)
    await asyncio.sleep(2.0)  # the worker swept once, found nothing, sleeps for a minute
    # A due burst whose wake-up the worker never heard (written without the append's PUBLISH).
    conv = "1:190"
    shard = store.keys.shard_of(conv)
    await redis.rpush(store.keys.buffer(conv), ChatMessage(1, 190, 1, "anyone?").to_json())
    await redis.hset(store.keys.first(shard), conv, int(time.time() * 1000))
    await redis.zadd(store.keys.due(shard), {conv: int(time.time() * 1000)})
    await asyncio.sleep(0.5)
    assert chatwoot.posts == []
    await redis.client_kill_filter(_type="pubsub")
    await wait_for(lambda: len(chatwoot.posts) == 1, timeout=10)


async def test_a_wake_up_names_its_shard_and_an_older_versions_wakes_every_shard(
        settings, make_service, llm, chatwoot, redis, store):
    """A sweep claims only from shards with work (worker.py): a wake-up names its shard
    ("<ms> <key of the shard>", lib.lua wake_up), and one that names none, as versions before
    sent it ("<ms>"), makes the worker look at every shard, so that a rolling upgrade's older
    processes still wake the newer workers."""
    await make_service(replace(settings, processing_interval_ms=60_000), http=False)

    async def subscribed() -> bool:
        return bool(await redis.client_list(_type="pubsub"))
    await eventually(subscribed)
    await asyncio.sleep(2.0)  # the worker swept once, found nothing, sleeps for a minute
    for n, (conv, wake) in enumerate([("1:191", "named"), ("1:192", "older"), ("1:193", "other")],
                                     start=1):
        # The sweeps the last wake-up set off are over (on a cluster every primary relays each
        # message: three wake-ups, each of an older version a look at every shard).
        await asyncio.sleep(0.5)
        shard = store.keys.shard_of(conv)
        now = int(time.time() * 1000)
        await redis.rpush(store.keys.buffer(conv), ChatMessage(1, int(conv[2:]), n, "hi").to_json())
        await redis.hset(store.keys.first(shard), conv, now)
        await redis.zadd(store.keys.due(shard), {conv: now})
        if wake == "other":  # a wake-up for another shard does not find this one's burst
            other = store.keys.due((shard + 1) % settings.shards)
            await redis.publish(store.keys.wake, f"{now} {other}")
            await asyncio.sleep(0.5)
            assert len(chatwoot.posts) == n - 1
            break
        await redis.publish(store.keys.wake, f"{now} {store.keys.due(shard)}" if wake == "named"
                            else str(now))
        await wait_for(lambda n=n: len(chatwoot.posts) == n, timeout=5)


class IdlessChatwoot(ChatwootStandIn):
    """Creates the message but answers without its id (a proxy that rewrote the body, say)."""

    def _make_app(self) -> web.Application:
        app = super()._make_app()
        app.middlewares.insert(0, self._strip)
        return app

    @web.middleware
    async def _strip(self, request: web.Request, handler: Any) -> web.StreamResponse:
        await handler(request)
        return web.json_response({})


async def test_the_echo_of_a_reply_whose_id_is_unknown_is_still_ours(settings, make_service, llm, redis):
    chatwoot = IdlessChatwoot()
    await chatwoot.start()
    try:
        svc = await make_service(replace(settings, buffer_duration_ms=300,
                                         chatwoot_base_url=chatwoot.base_url))
        await svc.webhook(message_payload(message_id=195, conversation_id=195, content="first"))
        done = await eventually(job_in("completed", redis, "1:195"), timeout=10)
        assert done["reply_id"] == "0"
        post = chatwoot.posts[0]
        await svc.webhook(message_payload(message_id=post.message_id, conversation_id=195,
                                          content=post.body["content"], message_type="outgoing",
                                          sender_type="user"))
        await svc.webhook(message_payload(message_id=196, conversation_id=195, content="second"))
        await wait_for(lambda: len(chatwoot.posts) == 2, timeout=10)
        history = [(m["role"], m["content"]) for m in llm.calls[1].messages[1:]]
        assert history == [("user", "first"), ("assistant", "Reply to: first"), ("user", "second")]
    finally:
        await chatwoot.stop()
