"""The typing indicator: on before the reply is generated, renewed while it takes long, and off
after it in every outcome; Chatwoot's toggle_typing_status and Evolution API's presence, both
against their stand-ins. A failing indicator never holds the reply back."""

from __future__ import annotations

import asyncio
from dataclasses import replace

import pytest
from helpers import buffered_in, wait_for

from buffer_service import metrics, presence
from buffer_service.config import ConfigError, Settings
from devtools.evolution_standin import EvolutionStandIn
from devtools.payloads import message_payload

# _phone_for(contact 1) in the stand-in's payloads, digits only.
NUMBER = "5511900000001"


def _errors(target: str) -> float:
    return sum(metrics.TYPING_CALLS.labels(target, state, "error")._value.get()
               for state in ("on", "off"))


async def _typing_done(chatwoot, conversation_id: int, offs: int = 1) -> list[str]:
    await wait_for(lambda: chatwoot.typing_for(conversation_id).count("off") >= offs, timeout=10)
    return chatwoot.typing_for(conversation_id)


async def test_on_before_the_llm_call_and_off_after_the_post(settings, make_service, llm, chatwoot):
    svc = await make_service(replace(settings, buffer_duration_ms=200))
    await svc.webhook(message_payload(message_id=1, conversation_id=11, content="hi"))
    await wait_for(lambda: len(chatwoot.posts) == 1)
    assert await _typing_done(chatwoot, 11) == ["on", "off"]
    on, off = chatwoot.typing
    assert on.at <= llm.calls[0].at
    assert off.at >= chatwoot.posts[0].at
    assert not on.private and on.account_id == 1


async def test_renewed_while_the_llm_takes_long(settings, make_service, llm, chatwoot, monkeypatch):
    monkeypatch.setattr(presence, "RENEW_S", 0.3)
    llm.delay = 1.2
    svc = await make_service(replace(settings, buffer_duration_ms=200))
    await svc.webhook(message_payload(message_id=2, conversation_id=12, content="hi"))
    await wait_for(lambda: len(chatwoot.posts) == 1)
    states = await _typing_done(chatwoot, 12)
    assert states[-1] == "off" and states.count("off") == 1
    assert states.count("on") >= 3  # renewed during the 1.2 s the model took
    assert chatwoot.typing[-1].at >= chatwoot.posts[0].at


async def test_off_when_the_burst_is_skipped(settings, make_service, llm, chatwoot):
    llm.delay = 1.0
    svc = await make_service(replace(settings, buffer_duration_ms=200))
    await svc.webhook(message_payload(message_id=3, conversation_id=13, content="hi"))
    await wait_for(lambda: len(llm.calls) == 1)
    # A human agent answers while the model thinks: the reply is dropped.
    await svc.webhook(message_payload(message_id=4, conversation_id=13, content="Ana here",
                                      message_type="outgoing", sender_type="user",
                                      sender_name="Ana Lima"))
    assert await _typing_done(chatwoot, 13) == ["on", "off"]
    await asyncio.sleep(0.3)
    assert chatwoot.posts == []
    assert chatwoot.typing[0].at <= llm.calls[0].at


async def test_off_when_the_reply_is_superseded(settings, make_service, llm, chatwoot):
    llm.delay = 1.0
    svc = await make_service(replace(settings, buffer_duration_ms=300))
    await svc.webhook(message_payload(message_id=5, conversation_id=14, content="hi"))
    await wait_for(lambda: len(llm.calls) == 1)
    await svc.webhook(message_payload(message_id=6, conversation_id=14, content="are you there?"))
    await wait_for(lambda: len(chatwoot.posts) == 1, timeout=15)
    states = await _typing_done(chatwoot, 14, offs=2)
    # The superseded attempt's indicator ends before the next burst's begins.
    assert states == ["on", "off", "on", "off"]
    assert chatwoot.posts[0].body["content"] == "Reply to: hi | are you there?"
    second_on = chatwoot.typing[2]
    assert chatwoot.typing[1].at <= second_on.at <= llm.calls[1].at
    assert chatwoot.typing[3].at >= chatwoot.posts[0].at


async def test_off_when_the_batch_fails(settings, make_service, llm, chatwoot):
    llm.fail_next(1, status=400)  # not retryable: failed for good
    svc = await make_service(replace(settings, buffer_duration_ms=200))
    await svc.webhook(message_payload(message_id=7, conversation_id=15, content="hi"))
    assert await _typing_done(chatwoot, 15) == ["on", "off"]
    assert chatwoot.typing[0].at <= llm.calls[0].at
    assert chatwoot.posts == []


async def test_off_when_the_worker_shuts_down(settings, make_service, llm, chatwoot):
    llm.delay = 5.0
    svc = await make_service(replace(settings, buffer_duration_ms=200, shutdown_grace_s=0.3))
    await svc.webhook(message_payload(message_id=8, conversation_id=16, content="hi"))
    await wait_for(lambda: len(llm.calls) == 1)
    await svc.close()
    # The batch was handed back; the indicator went off before the HTTP session closed.
    assert chatwoot.typing_for(16) == ["on", "off"]
    assert chatwoot.posts == []


async def test_a_failing_indicator_never_holds_the_reply_back(settings, make_service, llm, chatwoot):
    before = _errors("chatwoot")
    chatwoot.typing_faults = [500]  # the typing `on`
    svc = await make_service(replace(settings, buffer_duration_ms=200))
    await svc.webhook(message_payload(message_id=9, conversation_id=17, content="hi"))
    await wait_for(lambda: len(chatwoot.posts) == 1)
    assert await _typing_done(chatwoot, 17) == ["off"]
    assert _errors("chatwoot") == before + 1


async def test_a_hanging_indicator_never_holds_the_reply_back(settings, make_service, llm, chatwoot,
                                                               monkeypatch):
    monkeypatch.setattr(presence, "CALL_TIMEOUT_S", 0.3)
    before = _errors("chatwoot")
    chatwoot.typing_delay = 3.0
    svc = await make_service(replace(settings, buffer_duration_ms=200))
    await svc.webhook(message_payload(message_id=10, conversation_id=18, content="hi"))
    await wait_for(lambda: len(chatwoot.posts) == 1)
    # Posted while the `on` call was still held: the reply did not wait for it.
    assert chatwoot.typing_for(18) == []
    await wait_for(lambda: _errors("chatwoot") >= before + 2)  # on and off gave up


async def test_typing_indicator_off(settings, make_service, llm, chatwoot):
    svc = await make_service(replace(settings, buffer_duration_ms=200, typing_indicator=False))
    await svc.webhook(message_payload(message_id=11, conversation_id=19, content="hi"))
    await wait_for(lambda: len(chatwoot.posts) == 1)
    await asyncio.sleep(0.3)
    assert chatwoot.typing == []


@pytest.fixture
async def evolution():
    server = EvolutionStandIn()
    await server.start()
    yield server
    await server.stop()


def _with_evolution(settings: Settings, evolution: EvolutionStandIn) -> Settings:
    return replace(settings, buffer_duration_ms=200, evolution_api_url=evolution.base_url,
                   evolution_api_key=evolution.api_key, evolution_instance=evolution.instance)


async def test_whatsapp_presence_through_evolution(settings, make_service, llm, chatwoot, evolution,
                                                   store, redis):
    svc = await make_service(_with_evolution(settings, evolution))
    await svc.webhook(message_payload(message_id=12, conversation_id=20, content="hi"))
    # The buffered message carries the contact's number for the presence.
    [buffered] = await buffered_in(redis, store.keys.buffer("1:20"))
    assert buffered["ph"] == NUMBER
    await wait_for(lambda: len(chatwoot.posts) == 1)
    await wait_for(lambda: evolution.presence_for(NUMBER)[-1:] == ["paused"])
    composing, paused = evolution.presence
    assert composing.presence == "composing" and composing.delay == presence.RENEW_S * 1000
    assert composing.at <= llm.calls[0].at
    assert paused.at >= chatwoot.posts[0].at and paused.delay == 0
    assert await _typing_done(chatwoot, 20) == ["on", "off"]


async def test_evolution_presence_renewed_and_ended_on_failure(settings, make_service, llm, chatwoot,
                                                               evolution, monkeypatch):
    monkeypatch.setattr(presence, "RENEW_S", 0.3)
    llm.delay = 1.2
    llm.fail_next(1, status=400)
    svc = await make_service(_with_evolution(settings, evolution))
    await svc.webhook(message_payload(message_id=13, conversation_id=21, content="hi"))
    await wait_for(lambda: evolution.presence_for(NUMBER)[-1:] == ["paused"])
    states = evolution.presence_for(NUMBER)
    # Evolution holds each `composing` for its delay; the next one follows it.
    assert states.count("composing") >= 3 and states.count("paused") == 1
    assert chatwoot.posts == []


async def test_a_failing_evolution_never_holds_the_reply_back(settings, make_service, llm, chatwoot,
                                                              evolution):
    before = _errors("evolution")
    evolution.fail_next(5, status=500)
    svc = await make_service(_with_evolution(settings, evolution))
    await svc.webhook(message_payload(message_id=14, conversation_id=22, content="hi"))
    await wait_for(lambda: len(chatwoot.posts) == 1)
    await wait_for(lambda: _errors("evolution") >= before + 2)


def test_settings():
    assert Settings.from_env({}).typing_indicator is True
    assert Settings.from_env({"TYPING_INDICATOR": "off"}).typing_indicator is False
    full = {"EVOLUTION_API_URL": "http://evolution:8080/", "EVOLUTION_API_KEY": "k",
            "EVOLUTION_INSTANCE": "shop"}
    assert Settings.from_env(full).evolution_api_url == "http://evolution:8080"
    assert Settings.from_env(full).redacted()["evolution_api_key"] == "<set>"
    with pytest.raises(ConfigError, match="EVOLUTION_INSTANCE"):
        Settings.from_env({k: v for k, v in full.items() if k != "EVOLUTION_INSTANCE"})


async def test_an_agent_bot_token_is_not_asked_again(settings, make_service, llm, chatwoot, evolution):
    # Chatwoot lets agent bots post, note and set the status, not toggle typing (401).
    chatwoot.bot_token = True
    refused = metrics.TYPING_CALLS.labels("chatwoot", "on", "error")._value.get()
    svc = await make_service(_with_evolution(settings, evolution))
    for i, conversation_id in enumerate((23, 24)):
        await svc.webhook(message_payload(message_id=15 + i, conversation_id=conversation_id,
                                          content="hi"))
        await wait_for(lambda n=i + 1: len(chatwoot.posts) == n)
    # One refusal, then no more asking: nothing recorded, no error counted after the first.
    assert chatwoot.typing == []
    assert metrics.TYPING_CALLS.labels("chatwoot", "on", "error")._value.get() == refused + 1
    # WhatsApp's presence through Evolution goes on regardless.
    await wait_for(lambda: evolution.presence_for(NUMBER) == ["composing", "paused"] * 2)
