"""Handing a conversation to a human: when the customer asks for one by a keyword
(HANDOFF_KEYWORDS), the burst is due at once and answered without the LLM.

The handoff is a burst's outcome like a reply, so it runs through the same pipeline (lease,
retries, the exactly-once post of HANDOFF_MESSAGE). Its other effects follow the post: the
service remembers the handoff (the conversation's handoff record, lib.lua take_charge, a human
reason versioned by the conversation's `updated_at` after Chatwoot set it `open`), a private
note tells the agents why and what was said, and `toggle_status open` is Chatwoot's bot
handoff. Only a newer snapshot that shows the conversation `pending` gives it back to the bot
(lib.lua take_charge): not the customer's next message, still `open`.
"""

from __future__ import annotations

from typing import Any

import orjson
import structlog

from .chatwoot import ChatwootClient, ChatwootError, typed_text
from .config import Settings
from .keywords import keyword_in
from .llm import LLMReply
from .store import Batch, BufferStore, LeaseLost

log = structlog.get_logger("buffer_service.handoff")

# Messages of the conversation quoted in the note for the agents.
NOTE_MESSAGES = 10
_NOTE_LINE_CHARS = 300


# Offered to the model with every chat request while HANDOFF_TOOL is on.
TOOL_NAME = "handoff_to_human"
TOOL = {
    "type": "function",
    "function": {
        "name": TOOL_NAME,
        "description": (
            "Hand the conversation to a human agent: when the customer asks for a person, when "
            "you cannot help (a complaint, a refund, something outside what you know), or when "
            "the customer is upset. You may still write a short message telling the customer "
            "that a person will take over."),
        "parameters": {
            "type": "object",
            "properties": {
                "reason": {"type": "string", "description": "Why a human is needed, in one sentence."},
                "summary": {"type": "string",
                            "description": "What the customer wants and what was said so far, "
                                           "for the agent who takes over."},
            },
            "required": ["reason", "summary"],
            "additionalProperties": False,
        },
    },
}
_REASON_CHARS = 300


def model_handoff(answer: LLMReply) -> tuple[str, str] | None:
    """(reason, summary) when the model called the handoff tool; arguments that are not the
    JSON asked for still hand over (the model wanted a human), with what could be read."""
    for call in answer.tool_calls:
        if call.name != TOOL_NAME:
            continue
        try:
            args = orjson.loads(call.arguments)
        except orjson.JSONDecodeError:
            args = {}
        args = args if isinstance(args, dict) else {}
        reason, summary = (" ".join(str(args.get(k) or "").split()) for k in ("reason", "summary"))
        return reason[:_REASON_CHARS] or "the model asked for a human", summary
    return None


def burst_keyword(batch: Batch, keywords: tuple[str, ...]) -> str:
    return next((k for m in batch.messages if (k := keyword_in(typed_text(m), keywords))), "")


def note_text(reason: str, summary: str, history: list[dict[str, Any]],
              burst: tuple[dict[str, Any], ...]) -> str:
    lines = [f"Handed over to a human by the bot: {reason}"]
    if summary:
        lines.append(f"Summary: {summary}")
    lines.append("Last messages:")
    for entry in [*history, *burst][-NOTE_MESSAGES:]:
        who = "bot/agent" if entry.get("role") == "assistant" else "customer"
        text = " ".join(str(entry.get("text", "")).split())[:_NOTE_LINE_CHARS]
        lines.append(f"- {who}: {text}")
    return "\n".join(lines)


class Handover:
    """The effects of a handoff that follow its message (if any) and precede the batch's end."""

    def __init__(self, settings: Settings, store: BufferStore, chatwoot: ChatwootClient) -> None:
        self.settings = settings
        self.store = store
        self.chatwoot = chatwoot

    async def hand_over(self, batch: Batch, reason: str, summary: str = "") -> None:
        """Remember, note, set `open`. A retry repeats the record and the status (the same
        again), and the note unless Chatwoot took it before (noted.lua). Chatwoot's errors raise
        as unsure, so that a handoff message already posted is confirmed, not posted again, on
        the retry."""
        record = f"handoff:{reason.split(':', 1)[0]}"
        # Remembered first: even while Chatwoot refuses the rest, the bot stays out. Versioned
        # as the record already is (the snapshot that let the bot answer), which a tie gives
        # the human: never by this host's clock, which no Chatwoot snapshot has to agree with.
        await self.store.hand_off(batch.conv, record, None)
        history = await self.store.history(batch.conv, NOTE_MESSAGES)
        known = {m.get("id") for m in history}
        burst = tuple(m for m in batch.messages if m.get("id") not in known)
        try:
            if not await self.store.handoff_noted(batch):
                await self.chatwoot.post_note(batch.account_id, batch.conversation_id,
                                              note_text(reason, summary, history, burst))
                if not await self.store.note_out(batch):
                    raise LeaseLost
            await self.chatwoot.set_status(batch.account_id, batch.conversation_id, "open")
            # Chatwoot's own snapshot of the change versions the record from now on: its
            # webhook (status open, this updated_at) ties, and a tie keeps the human in charge.
            version = await self.chatwoot.conversation_version(batch.account_id,
                                                               batch.conversation_id)
        except ChatwootError as exc:
            exc.unsure = True
            raise
        if version is not None:
            await self.store.hand_off(batch.conv, record, version)
        log.info("handed_over", reason=reason)
