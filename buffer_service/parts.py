"""A reply as the customer receives it: a reply of several paragraphs goes out as several
WhatsApp messages, in order, with a pause before each further part that grows with its length,
as a person typing would take (REPLY_SPLIT, REPLY_MAX_PARTS, REPLY_PACING_MS_PER_CHAR).

How the parts are posted exactly once and in order is the processor's (processor.py, part.lua).
"""

from __future__ import annotations

import re

# A blank line (possibly holding spaces) ends a paragraph; a single line break does not, so a
# list stays one message.
_PARAGRAPH_BREAK = re.compile(r"\n[ \t]*\n\s*")
# Longer pauses read as a stalled bot, not as typing.
MAX_PAUSE_S = 4.0


def split_reply(text: str, mode: str, max_parts: int) -> list[str]:
    """The messages `text` goes out as: its paragraphs (mode "paragraphs"), the ones beyond
    `max_parts` joined into the last part; the whole text as one for mode "off"."""
    parts = [p.strip() for p in _PARAGRAPH_BREAK.split(text)] if mode == "paragraphs" else [text]
    parts = [p for p in parts if p] or [text]
    if len(parts) > max_parts:
        parts[max_parts - 1:] = ["\n\n".join(parts[max_parts - 1:])]
    return parts


def pause_s(part: str, ms_per_char: int) -> float:
    """The pause before posting `part` after an earlier one."""
    return min(MAX_PAUSE_S, len(part) * ms_per_char / 1000)
