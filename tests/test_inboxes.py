"""Settings per inbox (INBOX_SETTINGS_FILE): one process, several inboxes, each with its window,
size, prompt, model, typing, handoff tool and keywords. Real redis-server, the real openai client
against the LLM stand-in, the Chatwoot stand-in, real HTTP.
"""

from __future__ import annotations

import asyncio
from dataclasses import replace
from pathlib import Path

from helpers import user_texts, wait_for

from buffer_service.config import Settings
from devtools.payloads import message_payload


def _with_inboxes(settings: Settings, tmp_path: Path, toml: str) -> Settings:
    path = tmp_path / "inboxes.toml"
    path.write_text(toml, encoding="utf-8")
    return settings.with_inbox_file(str(path))


def _call_for(llm, text: str):
    return next(c for c in llm.calls if text in user_texts(c))


async def test_two_inboxes_with_different_windows_and_prompts_behave_differently_in_one_process(
        settings, make_service, llm, chatwoot, tmp_path):
    svc = await make_service(_with_inboxes(replace(settings, buffer_duration_ms=1000), tmp_path, '''
[inbox.1]
message_buffer_duration_ms = 200
system_prompt = "You sell shoes."
openai_model = "sales-model"
typing_indicator = false
[inbox.2]
message_buffer_duration_ms = 600
system_prompt = "You repair shoes."
handoff_tool = false
'''))
    sales = await svc.webhook(message_payload(message_id=1, conversation_id=21, inbox_id=1,
                                              content="how much?"))
    support = await svc.webhook(message_payload(message_id=2, conversation_id=22, inbox_id=2,
                                                content="my sole came off"))
    other = await svc.webhook(message_payload(message_id=3, conversation_id=23, inbox_id=9,
                                              content="hello"))
    # Each burst's deadline is its inbox's window after its message (Redis time, exact).
    assert (sales["flush_in_ms"], support["flush_in_ms"], other["flush_in_ms"]) == (200, 600, 1000)

    await wait_for(lambda: len(chatwoot.posts_for(21)) == 1 and len(chatwoot.posts_for(22)) == 1,
                   timeout=10)
    sold, repaired = _call_for(llm, "how much?"), _call_for(llm, "my sole came off")
    assert sold.messages[0]["content"].startswith("You sell shoes.")
    assert repaired.messages[0]["content"].startswith("You repair shoes.")
    assert (sold.model, repaired.model) == ("sales-model", "stand-in-model")
    assert sold.tools == ["handoff_to_human"] and repaired.tools == []
    await wait_for(lambda: "off" in chatwoot.typing_for(22), timeout=5)
    assert chatwoot.typing_for(21) == []  # inbox 1 shows no typing indicator

    # An inbox the file does not name: the environment's window, prompt and model.
    await wait_for(lambda: len(chatwoot.posts_for(23)) == 1, timeout=15)
    plain = _call_for(llm, "hello")
    assert plain.model == "stand-in-model" and plain.tools == ["handoff_to_human"]
    assert plain.messages[0]["content"].startswith(settings.system_prompt)


async def test_a_burst_is_flushed_by_its_inboxs_size_not_the_services(settings, make_service, llm,
                                                                      chatwoot, tmp_path):
    svc = await make_service(_with_inboxes(
        replace(settings, max_buffer_size=2, buffer_duration_ms=5000), tmp_path,
        "[inbox.5]\nmax_buffer_size = 5\nmessage_buffer_duration_ms = 300\n"))
    texts = [f"part {i}" for i in range(4)]
    for i, text in enumerate(texts):
        await svc.webhook(message_payload(message_id=40 + i, conversation_id=31, inbox_id=5,
                                          content=text))
    # Inbox 6 keeps the service's size of 2: its second message makes the burst due at once.
    for i in range(2):
        body = await svc.webhook(message_payload(message_id=50 + i, conversation_id=32, inbox_id=6,
                                                 content=f"other {i}"))
    assert body["flush_in_ms"] == 0
    await wait_for(lambda: chatwoot.posts_for(31) and chatwoot.posts_for(32), timeout=10)
    # Four messages, under inbox 5's size of five: one burst when its window ends, not split
    # at the service's two when it is claimed.
    assert user_texts(_call_for(llm, "part 0")) == texts
    await asyncio.sleep(0.5)
    assert len(chatwoot.posts_for(31)) == 1


async def test_handoff_keywords_are_the_inboxs(settings, make_service, llm, chatwoot, tmp_path):
    svc = await make_service(_with_inboxes(
        replace(settings, buffer_duration_ms=300, handoff_message="A person will answer."), tmp_path,
        '[inbox.1]\nhandoff_keywords = ["humano"]\n'))
    asked = await svc.webhook(message_payload(message_id=61, conversation_id=41, inbox_id=1,
                                              content="quero um humano"))
    elsewhere = await svc.webhook(message_payload(message_id=62, conversation_id=42, inbox_id=2,
                                                  content="quero um humano"))
    # Inbox 1's keyword makes its burst due at once; in inbox 2 it is an ordinary message.
    assert (asked["flush_in_ms"], elsewhere["flush_in_ms"]) == (0, 300)
    await wait_for(lambda: chatwoot.status_changes and chatwoot.posts_for(42), timeout=10)
    assert [(c.conversation_id, c.status) for c in chatwoot.status_changes] == [(41, "open")]
    assert [p.body["content"] for p in chatwoot.posts_for(41) if not p.body["private"]] == [
        "A person will answer."]
    assert [user_texts(c) for c in llm.calls] == [["quero um humano"]]  # inbox 2's, not inbox 1's
