"""Adversarial review of three changes to the delivery path: compact buffers (5fa32ec), the post
in doubt that is not counted until asked about (cf4a8ee, `posting_attempt`) and fix4
(6335c91..53e7b2e: trimdone, the late echo completing a failed reply or handoff, the cluster
batcher under REDIS_WAIT_REPLICAS). Each test shows one finding against the real service code
and fails until it is fixed."""

from __future__ import annotations

import asyncio
from dataclasses import replace

from helpers import eventually, fail_a_part_late, job_in, jobs, wait_for

from buffer_service.keywords import parse_keywords
from devtools.payloads import message_payload


def _contents(chatwoot, conversation_id: int) -> list[str]:
    return [p.body["content"] for p in chatwoot.posts_for(conversation_id) if not p.body.get("private")]


# -- 1. fix4: the handoff re-queued by its late echo waits behind a burst the bot answers ---------
async def test_a_handoff_confirmed_by_a_late_echo_stops_the_bot_answering_the_burst_in_flight(
        settings, make_service, llm, chatwoot, redis, store):
    """Finding: the customer asks for a human. HANDOFF_MESSAGE's POST is queued behind a busy
    Rails, the client gives up, the retry's question fails and the batch fails (MAX_ATTEMPTS=1).
    The customer writes again: that burst is claimed and goes to the LLM. Then Chatwoot creates
    the handoff message and echoes it: note.lua (fix4) records it out and re-queues the handoff
    batch with lib.lua `requeue`, which, the conversation being held by the new burst, puts it
    *behind* that burst (`next`). Nothing records the handoff until a worker runs the re-queued
    batch, so the new burst's before_post finds no takeover and posts the LLM's answer.
    Harm: the service already knows the customer was told "a person will answer you", yet the
    bot answers after it (a burst newer than the handoff answered before the handoff completes);
    had the echo come before the batch failed, the batch would have held the conversation and the
    new burst would have been skipped for the handoff."""
    chatwoot.echo_webhook_url = f"http://127.0.0.1:{settings.port}/webhooks/chatwoot"
    message = "A person will answer you here shortly."
    svc = await make_service(replace(settings, buffer_duration_ms=200, max_attempts=1,
                                     chatwoot_timeout_s=0.3, handoff_keywords=parse_keywords("humano"),
                                     handoff_message=message))
    async with fail_a_part_late(chatwoot, redis, 501, posts=1, create_after_s=3.0, send=svc.webhook(
            message_payload(message_id=1, conversation_id=501, content="humano"))):
        assert not chatwoot.posts_for(501), "the handoff message was created before the batch failed"
        llm.delay = 5.0  # the new burst is with the LLM when the echo comes
        await svc.webhook(message_payload(message_id=2, conversation_id=501, content="and my order?"))
        await wait_for(lambda: len(llm.calls) == 1, timeout=10)
    # The echo is in (the handoff batch is re-queued) and the new burst's answer is not out yet.
    assert "queued" in [j.get("state") for j in await jobs(redis, "1:501")]
    assert _contents(chatwoot, 501) == [message]
    await wait_for(lambda: [c.status for c in chatwoot.status_changes] == ["open"], timeout=15)
    await asyncio.sleep(0.5)
    assert _contents(chatwoot, 501) == [message], (
        f"the bot answered after the handoff: {_contents(chatwoot, 501)}; jobs "
        f"{[(j.get('state'), j.get('reason')) for j in await jobs(redis, '1:501')]}")


# -- 2. fix4: a failed split reply completed by its late echo goes into the history after newer ones
THREE = ["Your order left the warehouse today.",
         "It should arrive on Thursday, between 9 and 18.",
         "Anything else I can help with?"]


async def test_a_failed_reply_completed_by_its_late_echo_keeps_the_history_in_order(
        settings, make_service, llm, chatwoot, redis, store):
    """Finding: parts 1 and 2 of a 3-part reply are out, part 3's POST is queued behind a busy
    Rails, the retry's question fails and the batch fails. The customer writes again ("thanks")
    and that burst is answered and archived. Then Chatwoot creates part 3 and echoes it:
    note.lua (fix4) completes the failed job and `archive` appends its burst and the whole reply
    to the end of the history, after the newer burst and its answer.
    Harm: the conversation's history (every later prompt, the handoff note, transcripts) shows
    "where is my order?" and the 3-part answer as the latest exchange, after "thanks": the LLM
    reads an unanswered-looking old question as the customer's last words and the order of what
    was said is wrong for the agents."""
    def reply(messages):
        return "\n\n".join(THREE) if "order" in str(messages[-1].get("content")) else "You're welcome."
    llm.reply_fn = reply
    chatwoot.echo_webhook_url = f"http://127.0.0.1:{settings.port}/webhooks/chatwoot"
    svc = await make_service(replace(settings, buffer_duration_ms=200, max_attempts=1,
                                     chatwoot_timeout_s=0.3, reply_pacing_ms_per_char=20))
    await svc.webhook(message_payload(message_id=1, conversation_id=502, content="where is my order?"))
    await wait_for(lambda: len(chatwoot.posts_for(502)) == 2, timeout=10)
    # Part 3 is created 4 s after it arrives, then echoed (posts=4: after the next burst's answer).
    async with fail_a_part_late(chatwoot, redis, 502, posts=4, create_after_s=4.0):
        await svc.webhook(message_payload(message_id=2, conversation_id=502, content="thanks"))
        await wait_for(lambda: "You're welcome." in _contents(chatwoot, 502), timeout=10)
        await eventually(job_in("completed", redis, "1:502"), timeout=10)
        assert len(chatwoot.posts_for(502)) == 3, "part 3 was created before the next burst was answered"
    states = sorted(j.get("state", "") for j in await jobs(redis, "1:502"))
    assert states == ["completed", "completed"], states  # the echo completed the failed job
    said = [(e.get("role", "user"), e["text"]) for e in await store.history("1:502", 50)]
    assert said == [("user", "where is my order?"), ("assistant", "\n\n".join(THREE)),
                    ("user", "thanks"), ("assistant", "You're welcome.")], said
