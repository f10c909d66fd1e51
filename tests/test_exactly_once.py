"""One answer per burst when a post's outcome is unknown, and fingerprints of our replies that
cannot be mistaken for a human's (issue 9, points 2, 3 and 7).

The Chatwoot stand-in creates the message and answers only after the client gave up, with no
webhook echo: the service cannot know from the post itself whether the reply exists.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
from helpers import claim_one, eventually, job_in, jobs, wait_for
from redis.asyncio import Redis

from buffer_service.chatwoot import ChatMessage, Decision
from buffer_service.config import Settings
from buffer_service.store import BufferStore
from devtools.chatwoot_standin import ChatwootStandIn
from devtools.llm_standin import LLMStandIn
from devtools.payloads import message_payload


async def _history(redis: Redis, settings: Settings, conv: str) -> list[str]:
    return [m["text"] for m in await BufferStore(redis, settings).history(conv, 20)]


@pytest.mark.parametrize("bot_token", [False, True], ids=["user-token", "agent-bot-token"])
async def test_a_reply_created_behind_a_timeout_is_posted_once(settings, make_service, llm: LLMStandIn,
                                                               chatwoot: ChatwootStandIn, redis: Redis,
                                                               bot_token: bool):
    chatwoot.bot_token = bot_token
    chatwoot.slow_next(1, answer_s=1.5)
    svc = await make_service(replace(settings, buffer_duration_ms=300, chatwoot_timeout_s=0.5))
    await svc.webhook(message_payload(message_id=10, conversation_id=200, content="where is my order"))
    done = await eventually(job_in("completed", redis, "1:200"), timeout=20)
    assert len(chatwoot.posts_for(200)) == 1
    assert done["reply_id"] == str(chatwoot.posts[0].message_id)
    assert int(done["attempts"]) == 2
    # The retry asked Chatwoot instead of posting: the list, or for a bot token (refused the
    # list) the conversation itself.
    asked = [(r.method, r.path.rsplit("/", 1)[-1], r.status) for r in chatwoot.requests
             if r.method == "GET"]
    assert asked == ([("GET", "messages", 401), ("GET", "200", 200)] if bot_token
                     else [("GET", "messages", 200)])
    assert await _history(redis, settings, "1:200") == ["where is my order",
                                                         "Reply to: where is my order"]


async def test_a_5xx_that_created_nothing_is_posted_again_after_asking(settings, make_service, llm,
                                                                        chatwoot: ChatwootStandIn, redis):
    chatwoot.fail_next(1, 503)
    svc = await make_service(replace(settings, buffer_duration_ms=300, chatwoot_timeout_s=0.5))
    await svc.webhook(message_payload(message_id=11, conversation_id=201, content="hi"))
    await eventually(job_in("completed", redis, "1:201"), timeout=15)
    assert len(chatwoot.posts_for(201)) == 1
    # 503 on the post, then the list (nothing there), then the post.
    calls = [(r.method, r.status) for r in chatwoot.requests]
    assert calls == [("POST", 503), ("GET", 200), ("POST", 200)]


async def test_an_undecidable_retry_waits_for_the_echo_instead_of_posting_again(
        settings, make_service, llm, chatwoot: ChatwootStandIn, redis):
    """A bot token cannot list messages; the conversation's last message is a newer customer
    message, so the retry cannot tell. It must not post; the echo, when it comes, settles it."""
    chatwoot.bot_token = True
    chatwoot.slow_next(1, answer_s=1.5)
    svc = await make_service(replace(settings, buffer_duration_ms=300, chatwoot_timeout_s=0.5,
                                     max_attempts=8, retry_base_ms=300))
    await svc.webhook(message_payload(message_id=12, conversation_id=202, content="hello"))
    await wait_for(lambda: len(chatwoot.posts) == 1, timeout=10)
    # A customer message Chatwoot holds after our reply (the stand-in shows it as the last one).
    chatwoot.messages[202].append({"id": 10**9, "content": "??", "message_type": 0, "private": False})
    retrying = await eventually(job_in("retrying", redis, "1:202"), timeout=10)
    await eventually(lambda: _error_says(redis, "1:202", "cannot tell"), timeout=10)
    assert len(chatwoot.posts_for(202)) == 1
    # The echo arrives late: the next attempt finishes without a post.
    reply = chatwoot.posts[0]
    echo = message_payload(message_id=reply.message_id, conversation_id=202,
                           content=reply.body["content"], message_type="outgoing",
                           sender_type="agent_bot")
    assert await svc.webhook(echo) == {"status": "ignored", "reason": "outgoing"}
    done = await eventually(job_in("completed", redis, "1:202"), timeout=20)
    assert done["id"] == retrying["id"] and done["reply_id"] == str(reply.message_id)
    assert len(chatwoot.posts_for(202)) == 1


@pytest.mark.parametrize("create_after_s", [0.6, 4.0], ids=["created-before-asked", "created-after-asked"])
async def test_the_window_left_a_post_chatwoot_creates_only_after_the_retry_asked(
        settings, make_service, llm, chatwoot: ChatwootStandIn, redis, create_after_s: float):
    """What is left of the duplicate window: Chatwoot still working on the first post when the
    retry asks. The retry asks no sooner than two client timeouts after the post was sent; a
    message created before that is found, one created after it is posted twice."""
    timeout_s = 0.5
    chatwoot.late_next(1, create_after_s)
    svc = await make_service(replace(settings, buffer_duration_ms=300, chatwoot_timeout_s=timeout_s))
    await svc.webhook(message_payload(message_id=13, conversation_id=206, content="hi"))
    await eventually(job_in("completed", redis, "1:206"), timeout=20)
    await wait_for(lambda: len(chatwoot.posts_for(206)) == (1 if create_after_s < 2 * timeout_s else 2),
                   timeout=10)
    first_post = min((r for r in chatwoot.requests if r.method == "POST"), key=lambda r: r.at)
    asked = min((r for r in chatwoot.requests if r.method == "GET"), key=lambda r: r.at)
    width = asked.at - first_post.at
    print(f"the retry asked Chatwoot {width * 1000:.0f} ms after the post was sent "
          f"(CHATWOOT_TIMEOUT_S={timeout_s})")
    assert width >= 2 * timeout_s


async def _error_says(redis: Redis, conv: str, text: str) -> bool:
    return any(text in j.get("error", "") for j in await jobs(redis, conv))


async def test_a_reply_that_may_be_out_is_never_superseded(settings, make_service, llm, chatwoot, redis):
    """New messages while a possibly delivered reply is retried form the next burst; the reply
    is confirmed, and it is in the history the next prompt reads."""
    chatwoot.slow_next(1, answer_s=1.5)
    svc = await make_service(replace(settings, buffer_duration_ms=300, chatwoot_timeout_s=0.5))
    await svc.webhook(message_payload(message_id=20, conversation_id=203, content="first question"))
    await wait_for(lambda: len(chatwoot.posts) == 1, timeout=10)
    await svc.webhook(message_payload(message_id=21, conversation_id=203, content="second question"))
    await wait_for(lambda: len(chatwoot.posts_for(203)) == 2, timeout=20)
    await eventually(lambda: _all_finished(redis, "1:203", 2), timeout=10)
    assert [p.body["content"] for p in chatwoot.posts_for(203)] == [
        "Reply to: first question", "Reply to: second question"]
    assert [j["state"] for j in await jobs(redis, "1:203")] == ["completed", "completed"]
    prompt = [(m["role"], m["content"]) for m in llm.calls[-1].messages[1:]]
    assert prompt == [("user", "first question"), ("assistant", "Reply to: first question"),
                      ("user", "second question")]


async def _all_finished(redis: Redis, conv: str, n: int) -> bool:
    found = await jobs(redis, conv)
    return len(found) == n and all(j["state"] == "completed" for j in found)


# -- fingerprints of our replies (the scripts, driven directly) ------------------------------------
async def test_an_echo_consumes_its_fingerprint_so_a_human_saying_the_same_pauses_the_bot(
        redis, settings):
    store = BufferStore(redis, replace(settings, buffer_duration_ms=1))
    await store.append(ChatMessage(1, 204, 30, "hi"))
    batch = await claim_one(store)
    assert await store.before_post(batch, "Hello! How can I help?") == ("post", "")
    assert await store.finish(batch, "completed", reply="Hello! How can I help?", reply_id=900)
    echo = ChatMessage(1, 204, 900, "Hello! How can I help?", role="assistant")
    assert await store.note(Decision("note", "outgoing", echo)) == "own"
    assert await store.note(Decision("note", "outgoing", echo)) == "duplicate"  # delivered twice
    human = ChatMessage(1, 204, 901, "Hello! How can I help?", role="assistant")
    assert await store.note(Decision("note", "outgoing", human, from_agent=True)) == "paused"


async def test_fingerprints_are_bounded_in_count(redis, settings):
    store = BufferStore(redis, replace(settings, buffer_duration_ms=1))
    for i in range(40):
        await store.append(ChatMessage(1, 205, 100 + i, f"q{i}"))
        batch = await claim_one(store)
        assert (await store.before_post(batch, f"answer number {i}"))[0] == "post"
        # Chatwoot answered no id: only the fingerprint can recognise the echo.
        assert await store.finish(batch, "completed", reply=f"answer number {i}", reply_id=0)
    own = store.keys.sent("1:205")
    assert await redis.zcard(own) == 16
    assert 0 < await redis.pttl(own) <= 3_600_000
    # The newest are kept: an echo of the last reply is still recognised.
    echo = ChatMessage(1, 205, 1039, "answer number 39", role="assistant")
    assert await store.note(Decision("note", "outgoing", echo)) == "own"


async def test_a_post_in_doubt_on_the_last_attempt_is_settled_not_failed(
        settings, make_service, llm, chatwoot: ChatwootStandIn, redis: Redis):
    """The last attempt's post times out, but Chatwoot created the message: the batch is not
    failed on the spot (the customer has the reply); one more attempt asks Chatwoot, finds it
    and finishes the batch without posting again."""
    chatwoot.slow_next(1, answer_s=1.5)
    svc = await make_service(replace(settings, buffer_duration_ms=300, chatwoot_timeout_s=0.5,
                                     max_attempts=1))
    await svc.webhook(message_payload(message_id=13, conversation_id=203, content="is it sent?"))
    done = await eventually(job_in("completed", redis, "1:203"), timeout=20)
    assert len(chatwoot.posts_for(203)) == 1
    assert done["reply_id"] == str(chatwoot.posts[0].message_id)
    assert int(done["attempts"]) == 2
    assert [r.method for r in chatwoot.requests if r.method == "GET"] == ["GET"]  # it asked
