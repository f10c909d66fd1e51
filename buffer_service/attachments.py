"""Attachments of a Chatwoot message: what the buffer keeps of each, and how each reads as text.

Chatwoot renders `attachments[]` with `Attachment#push_event_data`: `id, message_id, file_type,
account_id` plus fields by `file_type` (Chatwoot's app/models/attachment.rb):

    image, video, file, audio   extension, content_type, data_url, thumb_url, file_size, width,
                                height; audio also `transcribed_text` ("" unless Chatwoot's own
                                transcription is on)
    location                    coordinates_lat, coordinates_long, fallback_title ("name,
                                address"), data_url
    contact                     fallback_title (the phone number), meta {firstName, lastName}
    fallback, embed, ...        fallback_title, data_url

WhatsApp stickers arrive as `image` (webp) and voice notes as `audio`. `data_url` is an
ActiveStorage redirect URL on Chatwoot's FRONTEND_URL, followed to the storage (downloads.py).

The buffer stores a compact dict per attachment (short keys: one copy per buffered message, and
the entries move on into the conversation's history): never the bytes, which are fetched when
the burst is answered (images) or as soon as the webhook arrives (voice notes, transcripts.py).
Every field from the payload is type-checked and length-capped, because a webhook may be forged.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlparse

# Attachment URLs of ActiveStorage are ~200 characters; a longer one is not Chatwoot's.
_URL_CHARS = 2048
_TITLE_CHARS = 200
_TRANSCRIPT_CHARS = 4000

VOICE_NOTE_FAILED = "[voice note: could not be transcribed]"


def _text(value: Any, cap: int) -> str:
    if not isinstance(value, str):
        return ""
    return "".join(ch for ch in value[:cap] if ch.isprintable() or ch == "\n").strip()


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        return None
    try:
        number = float(value)
    except ValueError:
        return None
    return number if math.isfinite(number) else None


def _kind(value: Any) -> str:
    kind = value if isinstance(value, str) else ""
    kind = "".join(ch for ch in kind[:32] if ch.isalnum() or ch == "_")
    return kind or "file"


@dataclass(frozen=True)
class Attachment:
    """One attachment, reduced to what the prompt needs."""

    kind: str  # Chatwoot's file_type
    url: str = ""  # data_url
    content_type: str = ""
    size: int = 0
    title: str = ""  # fallback_title: a location's name and address, a contact's phone number
    name: str = ""  # a contact card's name
    transcript: str = ""  # Chatwoot's own transcribed_text of a voice note
    lat: float | None = None
    lon: float | None = None

    @classmethod
    def from_payload(cls, raw: Any) -> Attachment:
        if not isinstance(raw, dict):
            return cls("file")
        meta = raw.get("meta")
        name = ""
        if isinstance(meta, dict):
            name = " ".join(p for p in (_text(meta.get("firstName"), 80),
                                        _text(meta.get("lastName"), 80)) if p)
        size = raw.get("file_size")
        return cls(
            kind=_kind(raw.get("file_type")),
            url=_text(raw.get("data_url"), _URL_CHARS),
            content_type=_text(raw.get("content_type"), 100),
            size=size if isinstance(size, int) and not isinstance(size, bool) and size > 0 else 0,
            title=_text(raw.get("fallback_title"), _TITLE_CHARS),
            name=name,
            transcript=_text(raw.get("transcribed_text"), _TRANSCRIPT_CHARS),
            lat=_number(raw.get("coordinates_lat")),
            lon=_number(raw.get("coordinates_long")),
        )

    def to_dict(self) -> dict[str, Any]:
        keys = {"kind": "k", "url": "u", "content_type": "ct", "size": "sz", "title": "t",
                "name": "n", "transcript": "tx", "lat": "la", "lon": "lo"}
        return {short: getattr(self, full) for full, short in keys.items()
                if getattr(self, full) not in ("", 0, None)}

    @classmethod
    def from_dict(cls, raw: Any) -> Attachment:
        """From the buffer's entry; a plain string is an entry stored before attachments were
        kept whole (it named the file_type only)."""
        if isinstance(raw, str):
            return cls(_kind(raw))
        if not isinstance(raw, dict):
            return cls("file")
        return cls(kind=_kind(raw.get("k")), url=raw.get("u", ""), content_type=raw.get("ct", ""),
                   size=raw.get("sz", 0), title=raw.get("t", ""), name=raw.get("n", ""),
                   transcript=raw.get("tx", ""), lat=raw.get("la"), lon=raw.get("lo"))

    @property
    def file_name(self) -> str:
        """The file's name as ActiveStorage puts it at the end of the URL."""
        path = urlparse(self.url).path if self.url else ""
        return unquote(path.rsplit("/", 1)[-1])[:_TITLE_CHARS] if "." in path.rsplit("/", 1)[-1] else ""

    def describe(self) -> str:
        """The attachment as the model reads it when it is not shown (an image) or heard (a
        voice note without a transcript): everything the payload tells, in one bracket."""
        if self.kind == "audio":
            return f"[voice note] {self.transcript}" if self.transcript else "[voice note]"
        if self.kind == "location":
            parts = [self.title] if self.title else []
            if self.lat is not None and self.lon is not None:
                parts.append(f"({self.lat:.9g}, {self.lon:.9g})")
            return f"[location: {' '.join(parts)}]" if parts else "[location]"
        if self.kind == "contact":
            card = ", ".join(p for p in (self.name, self.title) if p)
            return f"[contact card: {card}]" if card else "[contact card]"
        if self.kind == "file":
            details = ", ".join(p for p in (self.content_type, _size(self.size)) if p)
            label = " ".join(p for p in (self.file_name, f"({details})" if details else "") if p)
            return f"[file: {label}]" if label else "[file]"
        if self.kind in ("image", "video", "sticker"):
            return f"[{self.kind}]"
        # fallback, embed, share, story_mention, ig_*: a link or a post; say what it is.
        return f"[{self.kind}: {self.title}]" if self.title else f"[{self.kind}]"


def _size(size: int) -> str:
    if not size:
        return ""
    if size < 1024 * 1024:
        return f"{max(1, round(size / 1024))} KB"
    return f"{size / (1024 * 1024):.1f} MB"


def parse(raw: list[Any], limit: int) -> tuple[Attachment, ...]:
    return tuple(Attachment.from_payload(a) for a in raw[:limit])


def stored(entry: dict[str, Any]) -> tuple[Attachment, ...]:
    """The attachments of a buffered or history entry."""
    raw = entry.get("att")
    return tuple(Attachment.from_dict(a) for a in raw) if isinstance(raw, list) else ()


def caption(entry: dict[str, Any], attachments: tuple[Attachment, ...]) -> str:
    """The message's own text, without the descriptions that `message_text` put first."""
    text: str = entry.get("text", "")
    prefix = " ".join(a.describe() for a in attachments)
    if prefix and text.startswith(prefix):
        return text[len(prefix):].strip()
    # Truncated inside the descriptions (a tiny MAX_MESSAGE_CHARS): there is no caption left.
    return "" if prefix else text
