"""Handing a conversation to a human: a customer's keyword hands it over at once, without the
LLM (HANDOFF_MESSAGE through the exactly-once post path, a private note, `open`), and the
service remembers it against webhooks that still show the bot in charge."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from datetime import UTC, datetime, timedelta

from helpers import eventually, job_in, wait_for

from buffer_service.config import Settings
from buffer_service.keywords import keyword_in, parse_keywords
from buffer_service.store import BufferStore
from devtools.payloads import message_payload

KEYWORDS = parse_keywords("atendente, humano,human , agent,falar com  pessoa")
SORRY = "Um momento, vou chamar um atendente."


def test_keywords_are_whole_words_in_any_case_and_accent():
    assert KEYWORDS == ("atendente", "humano", "human", "agent", "falar com pessoa")
    assert keyword_in("Quero falar com um ATENDÊNTE!", KEYWORDS) == "atendente"
    assert keyword_in("human, please", KEYWORDS) == "human"
    assert keyword_in("Posso FALAR   com\npessoa?", KEYWORDS) == "falar com pessoa"
    # Part of a longer word is not the word.
    assert keyword_in("o agente disse", KEYWORDS) == ""
    assert keyword_in("humanidade", KEYWORDS) == ""
    assert keyword_in("anything", ()) == ""
    assert Settings.from_env({"HANDOFF_KEYWORDS": "Atendênte,,"}).handoff_keywords == ("atendente",)


def _handoff(settings: Settings, **extra) -> Settings:
    return replace(settings, **{"buffer_duration_ms": 5000, "handoff_keywords": KEYWORDS,
                                "handoff_message": SORRY, **extra})


async def test_a_keyword_hands_over_at_once_without_the_llm(settings, make_service, llm, chatwoot,
                                                            redis):
    svc = await make_service(_handoff(settings))
    await svc.webhook(message_payload(message_id=1, conversation_id=31, content="oi, meu pedido"))
    asked = asyncio.get_running_loop().time()
    await svc.webhook(message_payload(message_id=2, conversation_id=31, content="quero um Atendente"))
    await wait_for(lambda: chatwoot.status_changes, timeout=5)
    # Long before the 5 s window would have ended.
    assert asyncio.get_running_loop().time() - asked < 4
    assert llm.calls == [] and chatwoot.typing == []
    replies = [p.body for p in chatwoot.posts_for(31) if not p.body["private"]]
    assert [r["content"] for r in replies] == [SORRY]
    (note,) = chatwoot.notes_for(31)
    assert "keyword:atendente" in note
    assert "customer: oi, meu pedido" in note and "customer: quero um Atendente" in note
    assert [(c.conversation_id, c.status) for c in chatwoot.status_changes] == [(31, "open")]
    job = await eventually(job_in("completed", redis, "1:31"))
    assert job["reason"] == "handoff:keyword"


async def test_the_bot_stays_out_until_a_newer_snapshot_gives_it_back(settings, make_service, llm,
                                                                      chatwoot):
    svc = await make_service(_handoff(settings, buffer_duration_ms=300))
    await svc.webhook(message_payload(message_id=3, conversation_id=32, content="human please"))
    await wait_for(lambda: chatwoot.status_changes, timeout=5)
    handed = datetime.fromtimestamp(chatwoot.status_changes[0].updated_at, UTC)
    # Webhooks that still show it `pending`, as of before the handoff or of the same snapshot.
    for i, at in enumerate((handed - timedelta(seconds=5), handed)):
        body = await svc.webhook(message_payload(message_id=4 + i, conversation_id=32,
                                                 content="hello?", status="pending", created_at=at))
        assert body == {"status": "ignored", "reason": "handoff"}
    await asyncio.sleep(0.8)
    assert llm.calls == []
    # An agent hands it back (`pending`, a newer snapshot): the bot answers again.
    await svc.webhook(message_payload(message_id=6, conversation_id=32, content="still there?",
                                      status="pending", created_at=handed + timedelta(seconds=5)))
    await wait_for(lambda: len(llm.calls) == 1, timeout=5)
    await wait_for(lambda: len([p for p in chatwoot.posts_for(32) if not p.body["private"]]) == 2)


async def test_without_a_handoff_message_only_the_note_and_the_status(settings, make_service, llm,
                                                                      chatwoot, redis):
    svc = await make_service(_handoff(settings, handoff_message=""))
    await svc.webhook(message_payload(message_id=7, conversation_id=33, content="AGENT!"))
    job = await eventually(job_in("skipped", redis, "1:33"))
    assert job["reason"] == "handoff:keyword"
    assert [p.body["private"] for p in chatwoot.posts_for(33)] == [True]
    assert chatwoot.status_changes[0].status == "open"
    assert llm.calls == []


async def test_a_failed_handoff_step_is_retried_without_a_second_message(
        settings, make_service, llm, flaky_chatwoot, redis):
    chatwoot = flaky_chatwoot
    svc = await make_service(_handoff(replace(settings, chatwoot_base_url=chatwoot.base_url)))
    await svc.webhook(message_payload(message_id=8, conversation_id=34, content="humano"))
    job = await eventually(job_in("completed", redis, "1:34"), timeout=15)
    assert job["reason"] == "handoff:keyword" and int(job["attempts"]) == 2
    # The retry found the message in Chatwoot and did not post it again.
    assert [p.body["content"] for p in chatwoot.posts_for(34) if not p.body["private"]] == [SORRY]
    assert [c.status for c in chatwoot.status_changes] == ["open"]
    assert llm.calls == []


async def test_the_record_is_versioned(store: BufferStore, redis):
    assert await store.hand_off("1:35", "handoff:keyword", 100.0)
    # An equal snapshot keeps the human in charge; a newer one gives the bot's handoff back
    # only when it shows the conversation `pending` (an agent returned it to the bot).
    assert not await store.hand_off("1:35", "", 100.0, pending=True)
    assert not await store.hand_off("1:35", "", 101.0)
    assert await store.hand_off("1:35", "", 101.0, pending=True)


async def test_the_first_record_of_a_handoff_takes_the_records_own_version(store: BufferStore):
    """Versioned by the snapshot that let the bot answer, not by the service's clock: an equal
    snapshot keeps the human, a newer `pending` one gives the conversation back."""
    assert await store.hand_off("1:36", "", 100.0, pending=True)
    assert await store.hand_off("1:36", "handoff:keyword", None)
    assert not await store.hand_off("1:36", "", 100.0, pending=True)
    assert await store.hand_off("1:36", "", 100.5, pending=True)


# -- handoff decided by the model ------------------------------------------------------------
def _model_hands_over(llm, text: str = "Vou chamar uma pessoa da equipe.") -> None:
    llm.reply_fn = lambda messages: text
    llm.tool_calls_fn = lambda messages: [{"name": "handoff_to_human", "arguments": {
        "reason": "customer wants a refund", "summary": "Box arrived broken; asks for a refund."}}]


async def test_the_model_hands_over_with_its_tool(settings, make_service, llm, chatwoot, redis):
    _model_hands_over(llm)
    svc = await make_service(replace(settings, buffer_duration_ms=200))
    await svc.webhook(message_payload(message_id=20, conversation_id=40, content="quero reembolso"))
    job = await eventually(job_in("completed", redis, "1:40"))
    assert job["reason"] == "handoff:model"
    assert llm.calls[0].tools == ["handoff_to_human"]
    assert [p.body["content"] for p in chatwoot.posts_for(40) if not p.body["private"]] == [
        "Vou chamar uma pessoa da equipe."]
    (note,) = chatwoot.notes_for(40)
    assert "model:customer wants a refund" in note
    assert "Summary: Box arrived broken; asks for a refund." in note
    assert "customer: quero reembolso" in note
    assert [c.status for c in chatwoot.status_changes] == ["open"]
    assert await _typing_ended(chatwoot, 40)
    # Silence afterwards: a webhook still showing `pending` (same snapshot) does not wake it.
    handed = datetime.fromtimestamp(chatwoot.status_changes[0].updated_at, UTC)
    body = await svc.webhook(message_payload(message_id=21, conversation_id=40, content="oi?",
                                             status="pending", created_at=handed))
    assert body == {"status": "ignored", "reason": "handoff"}
    await asyncio.sleep(0.6)
    assert len(llm.calls) == 1


async def _typing_ended(chatwoot, conversation_id: int) -> bool:
    await wait_for(lambda: chatwoot.typing_for(conversation_id)[-1:] == ["off"])
    return chatwoot.typing[0].at <= chatwoot.posts[0].at <= chatwoot.typing[-1].at


async def test_the_model_hands_over_without_text(settings, make_service, llm, chatwoot, redis):
    _model_hands_over(llm, text="")
    svc = await make_service(replace(settings, buffer_duration_ms=200, handoff_message=SORRY))
    await svc.webhook(message_payload(message_id=22, conversation_id=41, content="hmm"))
    await eventually(job_in("completed", redis, "1:41"))
    assert [p.body["content"] for p in chatwoot.posts_for(41) if not p.body["private"]] == [SORRY]


async def test_the_model_hands_over_without_text_or_message(settings, make_service, llm, chatwoot,
                                                            redis):
    # No text and no HANDOFF_MESSAGE: only the note and the status.
    _model_hands_over(llm, text="")
    svc = await make_service(replace(settings, buffer_duration_ms=200))
    await svc.webhook(message_payload(message_id=23, conversation_id=42, content="hmm"))
    job = await eventually(job_in("skipped", redis, "1:42"))
    assert job["reason"] == "handoff:model"
    assert [p.body["private"] for p in chatwoot.posts_for(42)] == [True]


async def test_the_tool_is_not_offered_when_off(settings, make_service, llm, chatwoot):
    _model_hands_over(llm)
    svc = await make_service(replace(settings, buffer_duration_ms=200, handoff_tool=False))
    await svc.webhook(message_payload(message_id=24, conversation_id=43, content="hi"))
    await wait_for(lambda: len(chatwoot.posts) == 1)
    assert llm.calls[0].tools == [] and chatwoot.status_changes == []


async def test_a_retry_of_the_models_handoff_completes_it_once(settings, make_service, llm,
                                                               flaky_chatwoot, redis):
    chatwoot = flaky_chatwoot
    _model_hands_over(llm)
    svc = await make_service(replace(settings, buffer_duration_ms=200,
                                     chatwoot_base_url=chatwoot.base_url))
    await svc.webhook(message_payload(message_id=25, conversation_id=44, content="reembolso"))
    job = await eventually(job_in("completed", redis, "1:44"), timeout=15)
    assert job["reason"] == "handoff:model" and int(job["attempts"]) == 2
    # The retry reused the stored reply and knew it hands over: one message, one LLM call.
    assert len(llm.calls) == 1
    assert [p.body["content"] for p in chatwoot.posts_for(44) if not p.body["private"]] == [
        "Vou chamar uma pessoa da equipe."]
    assert [c.status for c in chatwoot.status_changes] == ["open"]


async def test_a_failed_handoff_without_a_message_is_carried_through_on_retry(
        settings, make_service, llm, flaky_chatwoot, redis):
    # The first attempt remembered the handoff before Chatwoot refused the status: the retry
    # sees a human in charge by its own handoff, and completes it instead of skipping.
    chatwoot = flaky_chatwoot
    svc = await make_service(_handoff(replace(settings, chatwoot_base_url=chatwoot.base_url),
                                      handoff_message=""))
    await svc.webhook(message_payload(message_id=26, conversation_id=45, content="atendente"))
    job = await eventually(job_in("skipped", redis, "1:45"), timeout=15)
    assert job["reason"] == "handoff:keyword" and int(job["attempts"]) == 2
    assert [c.status for c in chatwoot.status_changes] == ["open"]
    assert llm.calls == []
