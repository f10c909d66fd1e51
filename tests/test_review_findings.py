"""Findings of an adversarial review of the first fix of issue 9, each a sequence that broke
"one reply per burst", "never talk over a human" or a documented statement, reproduced against
a real redis-server and the stand-ins. Each failed before its fix."""

from __future__ import annotations

from dataclasses import replace

import pytest
from helpers import claim_one, eventually, job_in, jobs
from redis.asyncio import Redis

from buffer_service.chatwoot import ChatMessage, Decision
from buffer_service.store import BufferStore
from devtools.chatwoot_standin import ChatwootStandIn
from devtools.net import free_port
from devtools.payloads import message_payload


# -- finding 1: the confirm step takes an earlier reply with the same text for this one --------
@pytest.mark.parametrize("bot_token", [False, True], ids=["user-token", "agent-bot-token"])
async def test_an_earlier_reply_with_the_same_text_is_not_taken_for_an_unsure_post(
        settings, make_service, llm, chatwoot: ChatwootStandIn, redis: Redis, bot_token: bool):
    """The customer says "hi" twice; the second "hi" (id 11) was created in Chatwoot before the
    bot's first reply (id 500000) but its webhook arrived after that reply went out (a slow
    post, a Sidekiq retry). Its burst gets the same answer text, and that post fails with a 503
    that created nothing. The retry asks Chatwoot for an outgoing message with our text newer
    than id 11 and finds the FIRST burst's reply: the second burst is finished as `completed`
    without any reply ever being posted for it."""
    chatwoot.bot_token = bot_token
    svc = await make_service(replace(settings, buffer_duration_ms=300, chatwoot_timeout_s=0.5))
    await svc.webhook(message_payload(message_id=10, conversation_id=400, content="hi"))
    await eventually(job_in("completed", redis, "1:400"), timeout=15)
    assert len(chatwoot.posts_for(400)) == 1

    chatwoot.fail_next(1, 503)  # the next post: a proxy's 503, nothing created
    await svc.webhook(message_payload(message_id=11, conversation_id=400, content="hi"))

    async def both_finished() -> bool:
        found = await jobs(redis, "1:400")
        return len(found) == 2 and all(j["state"] in ("completed", "failed") for j in found)
    await eventually(both_finished, timeout=20)
    first, second = await jobs(redis, "1:400")
    # The second burst's reply was never created: Chatwoot holds one bot message, and the
    # second job claims the first job's message as its own reply.
    assert second["reply_id"] != first["reply_id"], (
        f"burst 2 was 'confirmed' by burst 1's reply {first['reply_id']}")
    assert len(chatwoot.posts_for(400)) == 2


# -- finding 2: an echo is credited to an older batch whose reply had the same text ------------
async def test_an_echo_is_not_credited_to_an_older_failed_batch_with_the_same_text(redis, settings):
    """Batch A's post was unsure and A failed (attempts used up, no echo). The next burst B gets
    the same answer text and is posted (message 900). B's echo takes the OLDEST fingerprint
    entry with that text, A's, and records 900 as A's post. When the operator re-queues A, it
    is finished as `posted` with B's message: A's burst is never answered."""
    store = BufferStore(redis, replace(settings, buffer_duration_ms=1))
    await store.append(ChatMessage(1, 401, 50, "what are your opening hours?"))
    a = await claim_one(store)
    assert await store.before_post(a, "We are open 9 to 5, Monday to Friday.") == ("post", "")
    # The post timed out at its last attempt; nothing says whether Chatwoot created it.
    assert await store.fail(a, "Chatwoot did not answer the reply", retry_in_ms=0,
                            permanent=True) == "failed"

    await store.append(ChatMessage(1, 401, 51, "and on saturday?"))
    b = await claim_one(store)
    assert await store.before_post(b, "We are open 9 to 5, Monday to Friday.") == ("post", "")
    assert await store.finish(b, "completed", reply="We are open 9 to 5, Monday to Friday.",
                              reply_id=900)
    echo = ChatMessage(1, 401, 900, "We are open 9 to 5, Monday to Friday.", role="assistant")
    assert await store.note(Decision("note", "outgoing", echo)) == "own"  # known by its id

    assert await store.requeue(a.id)
    retry = await claim_one(store)
    assert retry.id == a.id
    verdict = await store.before_post(retry, retry.reply)
    # Message 900 is B's reply; A must still ask Chatwoot (confirm), not finish on it.
    assert verdict != ("posted", "900"), "A's burst was finished on B's reply"


# -- finding 3: own:<conv> changed from a hash to a zset with no migration -------------------------
async def test_a_conversation_answered_just_before_the_upgrade_still_works_after_it(
        settings, make_service, llm, chatwoot: ChatwootStandIn, redis: Redis):
    """c4c6250 kept own:<conv> as a HASH (fingerprint -> ms, an hour's TTL refreshed by every
    post). 20de06b reads and writes the same key as a ZSET. Every conversation the bot answered
    in the hour before the upgrade: a human agent's message webhook fails (WRONGTYPE -> 503;
    an account webhook is never retried, so the pause is lost), and the bot's next reply fails
    in before_post at every attempt until the batch is failed."""
    store = BufferStore(redis, settings)
    conv = "1:402"
    own = store.keys.prefix(store.keys.shard_of(conv)) + f"own:{conv}"  # a key of old releases
    await redis.hset(own, "0123456789abcdef0123456789abcdef01234567", 1)  # as c4c6250 left it
    await redis.pexpire(own, 3_600_000)
    svc = await make_service(replace(settings, buffer_duration_ms=300, max_attempts=2,
                                     processing_lease_ms=3000))
    status, body = await svc.post("/webhooks/chatwoot", message_payload(
        message_id=60, conversation_id=402, content="I will handle this", message_type="outgoing",
        sender_type="user", sender_name="Ana Agent"))
    human_status = status  # a human agent's message must pause the bot, not answer 503

    await redis.delete(store.keys.pause(conv))
    await svc.webhook(message_payload(message_id=61, conversation_id=402, content="hello"))

    async def settled() -> dict[str, str] | None:
        return next((j for j in await jobs(redis, conv) if j["state"] in ("completed", "failed")),
                    None)
    done = await eventually(settled, timeout=30)
    assert (human_status, done["state"]) == (200, "completed"), (body, done.get("error"))


# -- finding 4: the append script reaches outside its shard's cluster slot -------------------------
@pytest.mark.redis_args("--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                        "--cluster-port", str(free_port()))
async def test_a_webhook_can_be_stored_on_a_redis_cluster(redis, settings):
    """README: "every key a script touches shares that shard's tag, so the same code runs on a
    Redis Cluster". The global rate limit's key `bs:rl:global` has no shard tag: passed to the
    append script whether or not RATE_LIMIT_GLOBAL is set, a cluster refused the script
    (CROSSSLOT) and every webhook answered 503. One node owning every slot shows it."""
    await redis.execute_command("CLUSTER", "ADDSLOTSRANGE", 0, 16383)

    async def cluster_ok() -> bool:
        info = (await redis.execute_command("CLUSTER", "INFO")).decode()
        return "cluster_state:ok" in info
    await eventually(cluster_ok, timeout=10)
    store = BufferStore(redis, settings)
    result = await store.append(ChatMessage(1, 403, 70, "hello"))
    assert result.buffered


# -- finding 5: the confirm step sees a human's answer and posts over it ---------------------------
async def test_a_retry_that_sees_a_human_answer_in_chatwoot_does_not_post_over_it(
        settings, make_service, llm, chatwoot: ChatwootStandIn, redis: Redis):
    """The bot's post fails with a 503 that created nothing. Before the retry, a human agent
    answers the customer in Chatwoot; that message's webhook is late (webhooks overtake each
    other: the premise of issue 9). The retry lists the conversation's messages after the burst
    (user token), sees the human's outgoing public answer, finds no reply of its own, and
    posts: the bot talks over a human although the evidence was in its hands."""
    chatwoot.fail_next(1, 503)
    svc = await make_service(replace(settings, buffer_duration_ms=300, chatwoot_timeout_s=0.5,
                                     retry_base_ms=1500))
    await svc.webhook(message_payload(message_id=80, conversation_id=404, content="I need a refund"))
    await eventually(job_in("retrying", redis, "1:404"), timeout=10)
    chatwoot.messages.setdefault(404, []).append({
        "id": 10**9, "content": "Hi, this is Ana, I'll handle your refund.", "message_type": 1,
        "private": False, "sender": {"id": 9, "name": "Ana", "type": "user"}})

    async def settled() -> dict[str, str] | None:
        return next((j for j in await jobs(redis, "1:404")
                     if j["state"] in ("completed", "skipped", "failed")), None)
    await eventually(settled, timeout=20)
    assert chatwoot.posts_for(404) == [], "the bot posted after a human had answered"


# -- finding 6: a reply confirmed by its echo after its batch failed never reaches the history ------
async def test_a_reply_whose_echo_comes_after_its_batch_failed_is_in_the_history(redis, settings):
    """An unsure post's batch runs out of attempts (undecidable with a bot token, or Chatwoot
    slow for every attempt) and is failed; then the echo arrives: the reply IS in front of the
    customer. note.lua only records posted_id on the failed job and returns 'own', so neither
    the reply nor its burst is in the history the next burst's prompt reads (issue 9, point 3:
    "Every reply that reached Chatwoot is in the history"), and the job stays listed as failed."""
    store = BufferStore(redis, replace(settings, buffer_duration_ms=1))
    await store.append(ChatMessage(1, 405, 90, "do you deliver to Porto?"))
    a = await claim_one(store)
    assert await store.before_post(a, "Yes, we deliver to Porto in 2 days.") == ("post", "")
    assert await store.fail(a, "cannot tell whether the reply was posted", retry_in_ms=0,
                            permanent=True) == "failed"
    echo = ChatMessage(1, 405, 950, "Yes, we deliver to Porto in 2 days.", role="assistant")
    assert await store.note(Decision("note", "outgoing", echo)) == "own"
    history = [m["text"] for m in await store.history("1:405", 20)]
    assert history == ["do you deliver to Porto?", "Yes, we deliver to Porto in 2 days."]


# -- finding 7: the documented width of the remaining duplicate window does not hold for a 5xx -----
async def test_the_retry_after_a_gateway_error_asks_no_sooner_than_two_timeouts(
        settings, make_service, llm, chatwoot: ChatwootStandIn, redis: Redis):
    """docs/delivery-guarantees.md, window 1: "The retry asks no sooner than 2 x
    CHATWOOT_TIMEOUT_S after the POST was sent", also after a proxy in front of Chatwoot
    answered 502/504 quickly (upstream reset, a short proxy timeout) while Chatwoot may still
    work on the post."""
    timeout_s = 0.5
    chatwoot.fail_next(1, 502)
    svc = await make_service(replace(settings, buffer_duration_ms=300, chatwoot_timeout_s=timeout_s))
    await svc.webhook(message_payload(message_id=95, conversation_id=406, content="hi"))
    await eventually(job_in("completed", redis, "1:406"), timeout=20)
    post = min((r for r in chatwoot.requests if r.method == "POST"), key=lambda r: r.at)
    asked = min((r for r in chatwoot.requests if r.method == "GET"), key=lambda r: r.at)
    assert asked.at - post.at >= 2 * timeout_s, f"asked {asked.at - post.at:.2f} s after the post"
