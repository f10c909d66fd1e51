"""Split replies (issue 11): a reply of several paragraphs goes out as several messages, in
order, with a typing pause before each further part; every part exactly once, also when the
worker is killed between parts or while a part's outcome is unknown."""

from __future__ import annotations

import asyncio
from dataclasses import replace

import pytest
from helpers import eventually, job_in, jobs, kill9, wait_for

from buffer_service.parts import MAX_PAUSE_S, pause_s, split_reply
from devtools.payloads import message_payload

THREE = ["Your order left the warehouse today.",
         "It should arrive on Thursday, between 9 and 18.",
         "Anything else I can help with?"]
FOUR = ["Part one of four.", "Part two of four.", "Part three of four.", "Part four of four."]


def test_paragraphs_are_parts_and_the_rest_joins_the_last():
    text = "one\n\n two \n \n\nthree\nstill three\n\nfour\n\nfive"
    assert split_reply(text, "paragraphs", 4) == ["one", "two", "three\nstill three", "four\n\nfive"]
    assert split_reply(text, "paragraphs", 1) == ["one\n\ntwo\n\nthree\nstill three\n\nfour\n\nfive"]
    assert split_reply(text, "off", 4) == [text]
    assert split_reply("single", "paragraphs", 4) == ["single"]


def test_the_pause_grows_with_the_part_and_is_capped():
    assert pause_s("x" * 50, 20) == pytest.approx(1.0)
    assert pause_s("x" * 10_000, 20) == MAX_PAUSE_S
    assert pause_s("x" * 50, 0) == 0


async def test_a_three_paragraph_reply_arrives_as_three_posts_in_order_with_pauses(
        settings, make_service, llm, chatwoot, redis):
    llm.reply_fn = lambda messages: "\n\n".join(THREE)
    svc = await make_service(replace(settings, buffer_duration_ms=200, reply_pacing_ms_per_char=10))
    await svc.webhook(message_payload(message_id=1, conversation_id=70, content="where is it?"))
    await wait_for(lambda: "off" in chatwoot.typing_for(70), timeout=10)
    posts = chatwoot.posts_for(70)
    assert [p.body["content"] for p in posts] == THREE
    # Each further part waited its pause (a lower bound: nothing here asserts speed).
    for before, after, text in zip(posts, posts[1:], THREE[1:], strict=False):
        assert after.at - before.at >= pause_s(text, 10) * 0.9
    # Typing on before the LLM call, off after the last part.
    typing = [t for t in chatwoot.typing if t.conversation_id == 70]
    assert typing[0].status == "on" and typing[-1].status == "off"
    assert typing[0].at <= llm.calls[0].at and typing[-1].at >= posts[-1].at
    [job] = await jobs(redis, "1:70")
    assert job["state"] == "completed" and job["reply_id"] == str(posts[-1].message_id)
    assert job["parts_out"] == "3"


async def test_splitting_off_posts_one_message(settings, make_service, llm, chatwoot):
    llm.reply_fn = lambda messages: "\n\n".join(THREE)
    svc = await make_service(replace(settings, buffer_duration_ms=200, reply_split="off"))
    await svc.webhook(message_payload(message_id=2, conversation_id=71, content="where is it?"))
    await wait_for(lambda: chatwoot.posts_for(71), timeout=10)
    await asyncio.sleep(0.5)
    assert [p.body["content"] for p in chatwoot.posts_for(71)] == ["\n\n".join(THREE)]


async def test_the_first_part_out_ends_superseding(settings, make_service, llm, chatwoot):
    """A message arriving after the first part is out waits for the rest and is the next burst."""
    llm.reply_fn = lambda messages: "\n\n".join(f"{p} ({messages[-1]['content']})" for p in THREE)
    svc = await make_service(replace(settings, buffer_duration_ms=200, reply_pacing_ms_per_char=30))
    await svc.webhook(message_payload(message_id=3, conversation_id=72, content="a"))
    await wait_for(lambda: chatwoot.posts_for(72), timeout=10)
    await svc.webhook(message_payload(message_id=4, conversation_id=72, content="b"))
    await wait_for(lambda: len(chatwoot.posts_for(72)) == 6, timeout=15)
    assert [p.body["content"] for p in chatwoot.posts_for(72)] == \
        [f"{p} (a)" for p in THREE] + [f"{p} (b)" for p in THREE]


async def test_a_takeover_between_parts_archives_the_parts_out_and_notes_how_far_it_went(
        settings, make_service, llm, chatwoot, redis, store):
    """The rest of the reply is dropped; the job says why and how much went out, and the parts
    out reach the history as the bot's reply (the next prompt sees what the customer read)."""
    llm.reply_fn = lambda messages: "\n\n".join(THREE)
    svc = await make_service(replace(settings, buffer_duration_ms=200, reply_pacing_ms_per_char=40))
    await svc.webhook(message_payload(message_id=5, conversation_id=73, content="where is it?"))
    await wait_for(lambda: chatwoot.posts_for(73), timeout=10)
    await svc.webhook(message_payload(message_id=6, conversation_id=73, content="Ana here",
                                      message_type="outgoing", sender_type="user",
                                      sender_name="Ana Lima"))
    skipped = await eventually(job_in("skipped", redis, "1:73"), timeout=15)
    assert (skipped["reason"], skipped["note"]) == ("human_agent_replied", "1 of 3 parts were out")
    assert skipped["reply_id"] == str(chatwoot.posts_for(73)[0].message_id)
    history = [(e.get("role", "user"), e["text"]) for e in await store.history("1:73", 10)]
    assert ("assistant", THREE[0]) in history


@pytest.mark.parametrize("unsure", [False, True], ids=["between-parts", "part-outcome-unknown"])
async def test_kill_9_between_parts_resumes_at_the_next_part_and_repeats_none(
        settings, make_service, llm, held_chatwoot, workers, redis, unsure):
    """A worker killed after part 2 of 4 is recorded (or, `unsure`, while Chatwoot created part
    3 but had not answered: the retry asks Chatwoot, finds it, and goes on with part 4)."""
    chatwoot = held_chatwoot
    settings = replace(settings, processing_lease_ms=3000, chatwoot_base_url=chatwoot.base_url,
                       buffer_duration_ms=200)
    llm.reply_fn = lambda messages: "\n\n".join(FOUR)
    svc = await make_service(settings, worker=False)
    # ~1.7 s pauses: long enough to be killed in, short next to the lease.
    first = await workers.start(settings, REPLY_PACING_MS_PER_CHAR="100")
    await svc.webhook(message_payload(message_id=5, conversation_id=73, content="tell me"))

    async def two_out() -> bool:
        return any(j.get("parts_out") == "2" for j in await jobs(redis, "1:73"))
    await eventually(two_out, timeout=15)
    if unsure:
        chatwoot.hold_after = True  # part 3 is created, its answer never comes
        await wait_for(lambda: len(chatwoot.posts_for(73)) == 3, timeout=10)
    kill9(first)
    chatwoot.hold_after = False
    await workers.start(settings, REPLY_PACING_MS_PER_CHAR="100")
    await wait_for(lambda: len(chatwoot.posts_for(73)) >= 4, timeout=30)
    await asyncio.sleep(1.0)  # a repeated part would show up now
    assert [p.body["content"] for p in chatwoot.posts_for(73)] == FOUR
    [job] = await jobs(redis, "1:73")
    assert job["state"] == "completed" and job["attempts"] == "2"
    assert len(llm.calls) == 1
    # The unsure part was settled by asking Chatwoot before the next one went.
    assert any(r.method == "GET" for r in chatwoot.requests) == unsure


async def test_a_part_out_spares_the_attempt_so_a_slow_chatwoot_does_not_fail_a_split_reply(
        settings, make_service, llm, chatwoot, redis):
    """Each of the three posts is slow once (created, answered after the client gave up): every
    attempt fails, but every retry confirms its part by asking Chatwoot and gets it out. Counted
    against MAX_ATTEMPTS=2 as before, the reply would stop failed after part 1 of 3."""
    llm.reply_fn = lambda messages: "\n\n".join(THREE)
    chatwoot.slow_next(3, answer_s=1.0)
    svc = await make_service(replace(settings, buffer_duration_ms=200, max_attempts=2,
                                     chatwoot_timeout_s=0.3, reply_pacing_ms_per_char=0))
    await svc.webhook(message_payload(message_id=6, conversation_id=74, content="where is it?"))
    job = await eventually(job_in("completed", redis, "1:74"), timeout=20)
    assert [p.body["content"] for p in chatwoot.posts_for(74)] == THREE
    assert job["attempts"] == "4"


async def test_echoes_of_the_parts_do_not_count_for_the_next_part(settings, make_service, llm, chatwoot):
    """Chatwoot echoes each part to the webhook, often before the worker records it: the echo
    names the part just posted, never the next one, which still goes out."""
    llm.reply_fn = lambda messages: "\n\n".join(THREE)
    chatwoot.echo_webhook_url = f"http://127.0.0.1:{settings.port}/webhooks/chatwoot"
    svc = await make_service(replace(settings, buffer_duration_ms=200, reply_pacing_ms_per_char=0))
    for conversation_id in range(75, 80):
        await svc.webhook(message_payload(message_id=conversation_id, conversation_id=conversation_id,
                                          content="where is it?"))
    await wait_for(lambda: all(len(chatwoot.posts_for(c)) == 3 for c in range(75, 80)), timeout=15)
    await chatwoot.wait_echoes()
    await asyncio.sleep(0.5)
    assert all([p.body["content"] for p in chatwoot.posts_for(c)] == THREE for c in range(75, 80))
