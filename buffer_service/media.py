"""What the model gets of a burst's attachments: images to see, voice notes as transcripts, the
rest described in words, each in its message's place.

Each buffered message becomes one user message of the prompt, as before. A message with an
image shown to the model has a list of content parts: a text part "[image]" marking it, the
image part, then the remaining text (other attachments described, the caption). Everything else
is plain text: a voice note as "[voice note] <transcript>" (transcripts.py; "[voice note: could
not be transcribed]" when there is none), a location with its name, address and coordinates, a
contact card, a file with its name, type and size, a video or sticker named (attachments.py).

Images: the first MAX_IMAGES_PER_BURST of a burst, in arrival order, are shown; the rest are
named in text. IMAGE_INPUT=inline (the default) downloads each (downloads.py: allowed hosts,
size cap, timeout) and sends it as a data URI, because the LLM provider often cannot reach a
Chatwoot installation; IMAGE_INPUT=url sends `data_url` for the provider to fetch. VISION=off
names images in text. A model that refuses image input (an HTTP 4xx to a prompt with images)
is asked once more with the images named in text; the job record and a metric say so.

History keeps what the model understood: earlier messages go into the prompt as text, their
voice notes with the recorded transcript, never image bytes. What went wrong with a burst's
media is written to its job record (`media` field) for operators.
"""

from __future__ import annotations

import asyncio
import base64
from dataclasses import dataclass, field
from typing import Any

import structlog
from prometheus_client import Counter

from .attachments import VOICE_NOTE_FAILED, Attachment, caption, stored
from .config import Settings
from .downloads import Downloader, DownloadError
from .llm import LLMError
from .store import Batch, BufferStore
from .transcripts import TRANSCRIPTIONS, Key, Outcome, Transcripts

log = structlog.get_logger("buffer_service.media")

IMAGES = Counter(
    "buffer_service_images",
    "Images of answered bursts by outcome: shown (to the model), named (in text: VISION=off or "
    "over MAX_IMAGES_PER_BURST), failed; reason: why it failed (refused, too_large, http_error, "
    "timeout, failed, not_an_image)", ["outcome", "reason"])
IMAGE_INPUT_REFUSED = Counter(
    "buffer_service_image_input_refused",
    "Bursts answered again with images named in text because the model refused image input")

# Image types the chat APIs take (OpenAI: PNG, JPEG, WEBP, non-animated GIF).
_IMAGE_TYPES = frozenset({"image/png", "image/jpeg", "image/webp", "image/gif"})
# Statuses with which a server says "not this input" rather than "not now" or "not you".
_REFUSALS = frozenset({400, 404, 415, 422})
_NOTE_CHARS = 1000


def _image_type(download_type: str, att: Attachment) -> str:
    for candidate in (download_type, att.content_type):
        if candidate.split(";", 1)[0].strip().lower() in _IMAGE_TYPES:
            return candidate.split(";", 1)[0].strip().lower()
    return ""


@dataclass
class Rendered:
    """A burst and its history as prompt entries; `content` is a string or content parts."""

    burst: list[dict[str, Any]]
    history: list[dict[str, Any]]
    images: int = 0  # image parts in `burst`
    notes: list[str] = field(default_factory=list)  # what went wrong, for the job record
    text_only: list[dict[str, Any]] = field(default_factory=list)  # the burst, images named


class Media:
    def __init__(self, settings: Settings, store: BufferStore, downloader: Downloader,
                 transcripts: Transcripts) -> None:
        self.settings = settings
        self.store = store
        self.downloader = downloader
        self.transcripts = transcripts

    async def render(self, batch: Batch, history: list[dict[str, Any]]) -> Rendered:
        entries = batch.messages
        notes: list[str] = []
        transcripts, images, past = await asyncio.gather(
            self.transcripts.outcomes(batch.conv, entries), self._images(entries, notes),
            self.transcripts.history(batch.conv, history))
        notes += [f"voice note {m}/{i}: {o.error}" for (m, i), o in transcripts.items() if o.error]
        reused = sum(a.kind == "audio" and bool(a.transcript) for e in entries for a in stored(e))
        if reused:
            TRANSCRIPTIONS.labels("reused", "").inc(reused)
        burst = [_entry(e, transcripts, images) for e in entries]
        shown = sum(isinstance(v, dict) for v in images.values())
        text_images: dict[Key, dict[str, Any] | str] = {
            k: v if isinstance(v, str) else "[image: could not be shown]" for k, v in images.items()}
        return Rendered(
            burst=burst,
            history=[_entry(e, past, {}) for e in history],
            images=shown,
            notes=notes,
            text_only=[_entry(e, transcripts, text_images) for e in entries] if shown else burst,
        )

    async def _images(self, entries: tuple[dict[str, Any], ...],
                      notes: list[str]) -> dict[Key, dict[str, Any] | str]:
        """Each image of the burst: an image content part, or the text that stands in for it
        (with a note of why when it could not be loaded)."""
        s = self.settings
        found = [((int(e["id"]), i), a) for e in entries
                 for i, a in enumerate(stored(e)) if a.kind == "image" and a.url]
        out: dict[Key, dict[str, Any] | str] = {}
        fetch: list[tuple[Key, Attachment]] = []
        for n, (key, att) in enumerate(found):
            if not s.vision:
                out[key] = "[image]"
                IMAGES.labels("named", "").inc()
            elif n >= s.max_images_per_burst:
                out[key] = f"[image: not shown, more than {s.max_images_per_burst} images in these messages]"
                IMAGES.labels("named", "").inc()
            elif not self.downloader.allowed(att.url):
                out[key] = "[image: could not be loaded]"
                notes.append(f"image {key[0]}/{key[1]}: not a Chatwoot URL (MEDIA_ALLOWED_HOSTS)")
                IMAGES.labels("failed", "refused").inc()
            elif s.image_input == "url":
                out[key] = {"type": "image_url", "image_url": {"url": att.url}}
                IMAGES.labels("shown", "").inc()
            else:
                fetch.append((key, att))
        loaded = await asyncio.gather(*(self._inline(a) for _, a in fetch))
        for (key, _), (part, error) in zip(fetch, loaded, strict=True):
            out[key] = part
            if error:
                notes.append(f"image {key[0]}/{key[1]}: {error}")
        return out

    async def _inline(self, att: Attachment) -> tuple[dict[str, Any] | str, str]:
        """The image as a data URI part, or its stand-in text and why."""
        try:
            image = await self.downloader.fetch(att.url)
        except DownloadError as exc:
            IMAGES.labels("failed", exc.reason).inc()
            return "[image: could not be loaded]", str(exc)
        mime = _image_type(image.content_type, att)
        if not mime:
            IMAGES.labels("failed", "not_an_image").inc()
            return "[image: could not be loaded]", f"not an image ({image.content_type or 'no type'})"
        IMAGES.labels("shown", "").inc()
        uri = f"data:{mime};base64,{base64.b64encode(image.data).decode()}"
        return {"type": "image_url", "image_url": {"url": uri}}, ""

    def refused(self, rendered: Rendered, exc: LLMError) -> bool:
        """Whether the model turned the prompt down for its images: answer it again without."""
        if not rendered.images or exc.status not in _REFUSALS:
            return False
        IMAGE_INPUT_REFUSED.inc()
        rendered.notes.append(f"image input refused by the model, answered with images named in "
                              f"text: {str(exc)[:200]}")
        log.warning("image_input_refused", error=str(exc))
        return True

    async def record(self, batch: Batch, rendered: Rendered) -> None:
        """Say in the job record what the model could not see or hear, and why."""
        if rendered.notes:
            await self.store.note_media(batch, "; ".join(rendered.notes)[:_NOTE_CHARS])


def _entry(entry: dict[str, Any], transcripts: dict[Key, Outcome],
           images: dict[Key, dict[str, Any] | str]) -> dict[str, Any]:
    """One prompt entry: its attachments in order, then its caption."""
    attachments = stored(entry)
    if not attachments or entry.get("role", "user") != "user":
        return entry
    message_id = int(entry.get("id", 0))
    parts: list[dict[str, Any]] = []
    words: list[str] = []
    for index, att in enumerate(attachments):
        key = (message_id, index)
        shown = images.get(key)
        if att.kind == "audio" and not att.transcript:
            # No outcome at all: an earlier message that was never transcribed (history).
            outcome = transcripts.get(key)
            words.append(f"[voice note] {outcome.text}" if outcome and outcome.text
                         else VOICE_NOTE_FAILED if outcome else "[voice note]")
        elif isinstance(shown, dict):
            parts += [{"type": "text", "text": " ".join([*words, "[image]"])}, shown]
            words = []
        else:
            words.append(shown or att.describe())
    if text := caption(entry, attachments):
        words.append(text)
    if parts and words:
        parts.append({"type": "text", "text": " ".join(words)})
    rendered = {**entry, "text": " ".join(words)}
    if parts:
        rendered["content"] = parts
    return rendered
