"""Adversarial review of branch `talk` (issue 11: typing, handoff keywords, handoff tool).

Each test states a promise of the issue that the branch breaks, against the real Redis of
conftest.py and the stand-ins. They fail on `talk` as reviewed; they pass once fixed."""

from __future__ import annotations

import asyncio
import time
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from types import SimpleNamespace

import orjson
import pytest
from aiohttp import web
from helpers import eventually, job_in, wait_for

from buffer_service import handoff as handoff_module
from buffer_service.keywords import parse_keywords
from devtools.chatwoot_standin import ChatwootStandIn
from devtools.llm_standin import LLMStandIn, _openai_error
from devtools.payloads import message_payload

KEYWORDS = parse_keywords("atendente,humano,human,agent")
SORRY = "Um momento, vou chamar um atendente."


def _handoff(settings, **extra):
    return replace(settings, **{"buffer_duration_ms": 300, "handoff_keywords": KEYWORDS,
                                "handoff_message": SORRY, **extra})


def _public(chatwoot, conversation_id: int) -> list[str]:
    return [p.body["content"] for p in chatwoot.posts_for(conversation_id) if not p.body["private"]]


# -- (a) the default BOT_CONVERSATION_STATUSES gives a handed-over conversation back at once ----
async def test_default_statuses_the_customers_next_message_after_a_handoff_stays_with_the_human(
        settings, make_service, llm, chatwoot):
    """Issue 11: the handoff sets the conversation `open` and the bot is silent afterwards.
    With the default BOT_CONVERSATION_STATUSES=pending,open, the customer's next message comes
    with a snapshot that is newer (Chatwoot's Message `touch: true` bumps `updated_at`) and
    shows `open` with no human assigned yet: the service takes that for "the bot may answer"
    and the bot talks again in the conversation it just handed to a human."""
    svc = await make_service(_handoff(settings))
    await svc.webhook(message_payload(message_id=1, conversation_id=51, content="quero um atendente"))
    await wait_for(lambda: chatwoot.status_changes, timeout=5)
    handed = datetime.fromtimestamp(chatwoot.status_changes[0].updated_at, UTC)
    # What Chatwoot sends next: the customer waits, writes again; the conversation is `open`
    # (the handoff), nobody has picked it up yet, and the message made a newer snapshot.
    await svc.webhook(message_payload(message_id=2, conversation_id=51, content="alguém aí?",
                                      status="open", created_at=handed + timedelta(seconds=20)))
    await asyncio.sleep(1.0)
    assert llm.calls == [], "the bot answered a conversation it had handed to a human"
    assert _public(chatwoot, 51) == [SORRY]


# -- (b) the record is versioned by the service's wall clock --------------------------------------
async def test_a_service_clock_ahead_of_chatwoot_does_not_keep_the_bot_out_after_an_agent_hands_back(
        settings, make_service, llm, chatwoot, monkeypatch):
    """Handover.hand_over versions the human record with `time.time()` of the service's host
    first. A host whose clock runs ahead of Chatwoot's (no NTP in the VM; here one hour) writes
    a version no Chatwoot snapshot reaches for that long; the later write with Chatwoot's own
    `updated_at` cannot lower it (take_charge keeps the newer). An agent who hands the
    conversation back (`pending`, a newer snapshot by Chatwoot's clock) is ignored for the
    whole skew: the customer gets no answer."""
    real = time.time
    # Only the service's clock (handoff.py's), not the stand-in's (Chatwoot's).
    # raising=False: the fixed handoff.py reads no clock at all (nothing left to patch).
    monkeypatch.setattr(handoff_module, "time", SimpleNamespace(time=lambda: real() + 3600),
                        raising=False)
    svc = await make_service(_handoff(settings, bot_conversation_statuses=frozenset({"pending"})))
    await svc.webhook(message_payload(message_id=3, conversation_id=52, content="humano"))
    await wait_for(lambda: chatwoot.status_changes, timeout=5)
    await asyncio.sleep(0.5)  # the handoff's last step (the record at Chatwoot's updated_at)
    handed = datetime.fromtimestamp(chatwoot.status_changes[0].updated_at, UTC)
    # The agent gives it back: `pending`, a snapshot 5 s newer than the handoff's.
    await svc.webhook(message_payload(message_id=4, conversation_id=52, content="still there?",
                                      status="pending", created_at=handed + timedelta(seconds=5)))
    await wait_for(lambda: len(llm.calls) == 1, timeout=5)


# -- (c) a server that does not take `tools` ------------------------------------------------------
class NoTools(LLMStandIn):
    """An OpenAI-compatible server whose model has no tool support, as Ollama answers for such
    a model ("... does not support tools", HTTP 400) and vLLM without
    --enable-auto-tool-choice ("auto" tool choice requires ..., HTTP 400)."""

    async def _answer(self, request, call):
        body = orjson.loads(await request.read())
        if body.get("tools"):
            call.tools = [t["function"]["name"] for t in body["tools"]]
            return _openai_error(400, "registry.ollama.ai/library/gemma:2b does not support tools")
        return await super()._answer(request, call)


@pytest.fixture
async def no_tools_llm():
    server = NoTools()
    await server.start()
    yield server
    await server.stop()


async def test_a_model_without_tool_support_still_answers_with_the_default_handoff_tool(
        settings, make_service, no_tools_llm, chatwoot, redis):
    """HANDOFF_TOOL is on by default. Before this branch a local model server without tool
    support answered every burst; now every chat request carries `tools`, the server answers
    400 (not retryable), and every burst of every conversation fails for good: an upgrade that
    silences the bot. Expected: the reply still goes out (the request again without the tool,
    as media.py does for a model without image input), or start-up says so."""
    svc = await make_service(replace(settings, buffer_duration_ms=200,
                                     openai_base_url=f"{no_tools_llm.base_url}/v1"))
    await svc.webhook(message_payload(message_id=5, conversation_id=53, content="oi"))
    await eventually(lambda: _settled(redis, "1:53"), timeout=10)
    assert [p.body["content"] for p in chatwoot.posts_for(53)] == ["Reply to: oi"]


async def _settled(redis, conv):
    for state in ("completed", "failed", "skipped"):
        if await job_in(state, redis, conv)():
            return True
    return False


# -- (d) a keyword repeated while the first handoff runs ------------------------------------------
class SlowStatus(ChatwootStandIn):
    """Chatwoot under load: toggle_status takes 0.8 s (widens the window a real one has)."""

    async def _toggle_status(self, request):
        await asyncio.sleep(0.8)
        return await super()._toggle_status(request)


@pytest.fixture
async def slow_status_chatwoot():
    server = SlowStatus()
    await server.start()
    yield server
    await server.stop()


async def test_a_keyword_written_twice_hands_over_once(settings, make_service, llm,
                                                       slow_status_chatwoot, redis):
    """A customer who asks for a person usually insists ("atendente", then "ATENDENTE!!").
    The second message comes while the first handoff runs (the status is not yet `open`, so
    its snapshot still shows `pending`): it is parked behind the first batch. When it is
    claimed, the conversation's record says `handoff:keyword`, which `_answer` takes for "this
    batch's own handoff" (`batch.takeover.startswith('handoff:')`) and carries through instead
    of skipping. With a HANDOFF_MESSAGE, before_post.lua happens to stop the second message;
    without one (HANDOFF_MESSAGE unset, the default) nothing does: a second private note and a
    second `toggle_status open` for one handoff, in a conversation already a human's."""
    chatwoot = slow_status_chatwoot
    svc = await make_service(_handoff(replace(settings, chatwoot_base_url=chatwoot.base_url),
                                      handoff_message="",
                                      bot_conversation_statuses=frozenset({"pending"})))
    await svc.webhook(message_payload(message_id=6, conversation_id=54, content="atendente"))
    await wait_for(lambda: chatwoot.notes_for(54), timeout=5)
    await svc.webhook(message_payload(message_id=7, conversation_id=54, content="ATENDENTE!!"))
    await wait_for(lambda: chatwoot.status_changes, timeout=5)
    await asyncio.sleep(2.5)
    assert len(chatwoot.notes_for(54)) == 1, "one handoff, two notes for the agents"
    assert [c.status for c in chatwoot.status_changes] == ["open"]
    assert llm.calls == []


# -- (d) a retry of a half-done handoff with an agent-bot token -----------------------------------
class BotTokenRefusesStatusOnce(ChatwootStandIn):
    """An agent bot's token (may not list messages; the retry's only witness is the
    conversation's `last_non_activity_message`, private notes included), and Chatwoot
    refuses the first toggle_status (a deploy, a 503). No webhook echo reaches the service:
    it was down when Chatwoot sent it (Chatwoot does not retry webhooks)."""

    def __init__(self):
        super().__init__()
        self.bot_token = True
        self.refused = False

    async def _toggle_status(self, request):
        if not self.refused:
            self.refused = True
            return web.json_response({"error": "busy"}, status=503)
        return await super()._toggle_status(request)


@pytest.fixture
async def bot_chatwoot():
    server = BotTokenRefusesStatusOnce()
    await server.start()
    yield server
    await server.stop()


async def test_a_retried_handoff_with_a_bot_token_still_sets_the_conversation_open(
        settings, make_service, llm, bot_chatwoot, redis):
    """hand_over posts the private note before toggle_status. When toggle_status fails (or the
    worker dies after the note), the retry must first confirm the handoff message (the batch is
    unsure). With a bot token the only witness is `last_non_activity_message`, which is now
    the bot's own private note: earlier_post cannot tell, raises unsure, and every retry does
    the same until the batch fails. The customer was told a person comes; the conversation
    is never set `open`, so it stays in the bot's `pending` queue where no agent looks, and the
    bot stays silent (its record says handoff): nobody answers."""
    chatwoot = bot_chatwoot
    svc = await make_service(_handoff(replace(settings, chatwoot_base_url=chatwoot.base_url)))
    await svc.webhook(message_payload(message_id=8, conversation_id=55, content="humano"))
    await eventually(lambda: _settled(redis, "1:55"), timeout=20)
    assert await job_in("completed", redis, "1:55")(), "the handoff was given up half done"
    assert [c.status for c in chatwoot.status_changes] == ["open"]
    assert _public(chatwoot, 55) == [SORRY]


# -- (f) keywords read in what the customer did not write -----------------------------------------
async def test_a_shared_contact_card_named_like_a_keyword_is_not_a_request_for_a_human(
        settings, make_service, llm, chatwoot):
    """HANDOFF_KEYWORDS is matched against the message as text, which includes the service's
    own description of its attachments: a contact card's name, a file's name, a location's
    address. A customer who shares the card of their "Agent" (keyword `agent`), a file
    `human-resources.pdf` or an address on "Rua do Atendente" is handed to a human at once,
    without the LLM, though they asked for nothing of the kind."""
    svc = await make_service(_handoff(settings))
    card = {"id": 9001, "file_type": "contact", "fallback_title": "+5511988887777",
            "data_url": "", "meta": {"firstName": "Insurance", "lastName": "Agent"}}
    await svc.webhook(message_payload(message_id=9, conversation_id=56,
                                      content="this is who sold me the policy",
                                      attachments=[card]))
    await wait_for(lambda: llm.calls or chatwoot.status_changes, timeout=5)
    assert chatwoot.status_changes == [], "a contact card's name handed the conversation over"
    assert len(llm.calls) == 1


# -- (e) typing left on at shutdown -----------------------------------------------------------------
async def test_typing_is_turned_off_at_shutdown_when_chatwoot_answers_typing_slowly(
        settings, make_service, llm, chatwoot):
    """Issue 11: typing is `off` afterwards in every outcome, also when the worker shuts down.
    A Chatwoot whose toggle_typing_status takes 4 s (under CALL_TIMEOUT_S = 5 s: not an error)
    during a deploy: the reply is posted, the burst ends, the service is told to stop. The
    Chatwoot loop still awaits its `on`; Presence.close waits CLOSE_WAIT_S = 3 s, then cancels
    it, and the `off` is never sent. The `on` lands after that, and the indicator stays on."""
    chatwoot.typing_delay = 4.0
    svc = await make_service(replace(settings, buffer_duration_ms=200))
    await svc.webhook(message_payload(message_id=10, conversation_id=57, content="hi"))
    await wait_for(lambda: chatwoot.posts_for(57), timeout=5)
    await svc.close()
    await asyncio.sleep(1.5)  # the `on` still in Chatwoot's hands lands
    assert chatwoot.typing_for(57)[-1:] == ["off"], chatwoot.typing_for(57)


async def test_default_statuses_a_customer_repeating_the_keyword_gets_one_handoff_message(
        settings, make_service, llm, chatwoot):
    """The same root as the first test, as the customer sees it: after the handoff the
    customer, still waiting, writes "humano??" again. Its snapshot (`open`, newer) gives the
    conversation back to the bot under the default statuses, the keyword makes it due at once,
    and the bot posts HANDOFF_MESSAGE, a note and `open` again: one per insistence."""
    svc = await make_service(_handoff(settings))
    await svc.webhook(message_payload(message_id=11, conversation_id=58, content="humano"))
    await wait_for(lambda: chatwoot.status_changes, timeout=5)
    handed = datetime.fromtimestamp(chatwoot.status_changes[0].updated_at, UTC)
    await svc.webhook(message_payload(message_id=12, conversation_id=58, content="humano??",
                                      status="open", created_at=handed + timedelta(seconds=30)))
    await asyncio.sleep(1.5)
    assert _public(chatwoot, 58) == [SORRY]
    assert len(chatwoot.notes_for(58)) == 1
