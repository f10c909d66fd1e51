"""Voice-note transcripts: started when the webhook arrives, kept in Redis, awaited by the burst.

A customer who sends a voice note and then types two lines waits for the window anyway; the
transcription runs during that window, so it costs the reply no time unless it takes longer
than the window. The webhook handler stores the message first (as any other), acknowledges it,
and `start` begins the transcription as a task of the HTTP process. When the burst is answered,
the processor (`outcomes`) waits only for transcriptions still running, up to MEDIA_TIMEOUT_S.

Keys (keys.py: tx:, txclaim:, in the conversation's shard, so its Redis Cluster slot): the
outcome, kept HISTORY_TTL_S so that the history reads it too, and the claim of the process
transcribing it.

Paid once, lost never: a transcription runs only under its claim (SET NX PX), renewed at a
third of PROCESSING_LEASE_MS like a batch's lease, and a recorded transcript is never redone (a
failure is tried once more when the burst is answered only if nothing was paid for and another
try may succeed: the download failed for a passing reason, or the transcription server answered
5xx/429 or could not be reached). A
process that dies mid-transcription leaves a claim that lapses; whoever needs the transcript
next (at the latest the worker answering the burst) claims it and does it again. Only that
unfinished call can be paid twice, the price of not losing the voice note. Each transcription
counts against the conversation's LLM spend guard (MAX_LLM_CALLS_PER_CONVERSATION_PER_HOUR).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass, replace
from typing import Any

import openai
import orjson
import structlog
from prometheus_client import Counter, Histogram

from .attachments import Attachment, stored
from .chatwoot import ChatMessage
from .config import Settings
from .downloads import Downloader, DownloadError
from .limits import Limits
from .outbound import llm_http_client
from .store import BufferStore

log = structlog.get_logger("buffer_service.transcripts")

TRANSCRIPTIONS = Counter(
    "buffer_service_transcriptions",
    "Voice notes by outcome: transcribed, reused (Chatwoot's own transcript), failed; reason: "
    "why it failed (refused, too_large, http_error, timeout, failed, transcription_failed, "
    "llm_quota_exceeded, off)", ["outcome", "reason"])
TRANSCRIPTION_LATENCY = Histogram(
    "buffer_service_transcription_seconds", "Download and transcription of a voice note",
    buckets=(0.25, 0.5, 1, 2, 4, 8, 15, 30, 60, 120))

# How often a burst waiting for a transcript looks for it: a small fraction of any window.
_POLL_S = 0.05
# Tries of a voice note whose failures cost nothing: on arrival, and when its burst is answered.
_MAX_ATTEMPTS = 2
# Transcription calls one process makes at once (as many as batches a worker answers at once);
# more wait for a connection.
_CONCURRENCY = 32


@dataclass(frozen=True)
class Outcome:
    text: str = ""
    error: str = ""  # why there is no transcript, for the job record
    reason: str = ""  # the same as a fixed label, for the metric
    transient: bool = False  # nothing was paid for and another try may succeed
    attempts: int = 1

    @property
    def final(self) -> bool:
        return not (self.error and self.transient and self.attempts < _MAX_ATTEMPTS)

    def to_json(self) -> bytes:
        return orjson.dumps({"text": self.text} if not self.error else
                            {"error": self.error, "reason": self.reason,
                             "transient": self.transient, "attempts": self.attempts})

    @classmethod
    def from_json(cls, raw: bytes | str) -> Outcome:
        data = orjson.loads(raw)
        return cls(data.get("text", ""), data.get("error", ""), data.get("reason", ""),
                   data.get("transient", False), data.get("attempts", 1))


Key = tuple[int, int]  # (message id, attachment index)


def pending(attachments: tuple[Attachment, ...]) -> list[tuple[int, Attachment]]:
    """The voice notes that need a transcript of ours: Chatwoot sent none."""
    return [(i, a) for i, a in enumerate(attachments) if a.kind == "audio" and not a.transcript]


class Transcripts:
    def __init__(self, settings: Settings, store: BufferStore, limits: Limits,
                 downloader: Downloader) -> None:
        self.settings = settings
        self.store = store
        self.redis = store.redis
        self.limits = limits
        self.downloader = downloader
        self.model = settings.transcription_model
        # A process started without credentials or CHATWOOT_BASE_URL (an HTTP-only process may
        # lack them) leaves the work to the worker, which always has them: an attempt here would
        # record a refusal that the worker then believes.
        self.can_start = settings.transcription and bool(settings.chatwoot_base_url) and bool(
            settings.transcription_api_key or settings.openai_api_key
            or settings.transcription_base_url or settings.openai_base_url)
        self._client: openai.AsyncOpenAI | None = None
        self._tasks: set[asyncio.Task[Outcome | None]] = set()

    def warm(self) -> None:
        """Build the client now: it and its audio resources load lazily, ~0.8 s on first use
        (measured), which the HTTP process should spend at start-up, not on the first voice note."""
        if self.can_start:
            _ = self._openai().audio.transcriptions

    def _keys(self, conv: str, message_id: int, index: int) -> tuple[str, str]:
        keys = self.store.keys
        return (keys.transcript(conv, message_id, index),
                keys.transcript_claim(conv, message_id, index))

    def _openai(self) -> openai.AsyncOpenAI:
        if self._client is None:
            s = self.settings
            self._client = openai.AsyncOpenAI(
                api_key=s.transcription_api_key or s.openai_api_key or "unused",
                base_url=s.transcription_base_url or s.openai_base_url or None,
                timeout=s.media_timeout_s, max_retries=s.llm_max_retries,
                http_client=llm_http_client(s.media_timeout_s, _CONCURRENCY))
        return self._client

    # -- webhook side ------------------------------------------------------------------------
    def start(self, msg: ChatMessage) -> None:
        """Begin transcribing the voice notes of a message just buffered; returns at once."""
        if not self.can_start:
            return
        for index, att in pending(msg.attachments):
            task = asyncio.create_task(self._run(msg.conv, msg.message_id, index, att))
            self._tasks.add(task)
            task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[Outcome | None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            # Redis away: nothing recorded, the claim lapses, and the burst's worker redoes it.
            log.warning("transcription_not_recorded", error=str(task.exception()))

    # -- both sides ---------------------------------------------------------------------------
    async def _run(self, conv: str, message_id: int, index: int, att: Attachment) -> Outcome | None:
        """Transcribe under the claim and record the outcome; None when another process holds
        the claim (it is transcribing now)."""
        result_key, claim_key = self._keys(conv, message_id, index)
        token = uuid.uuid4().hex
        lease_ms = self.settings.processing_lease_ms
        if not await self.redis.set(claim_key, token, nx=True, px=lease_ms):
            return None
        keeper = asyncio.create_task(self._keep(claim_key, token, lease_ms))
        try:
            # Recorded while we were not looking: never paid twice.
            earlier = await self.redis.get(result_key)
            last = Outcome.from_json(earlier) if earlier is not None else None
            if last is not None and last.final:
                return last
            outcome = await self._transcribe(conv, f"tx:{message_id}:{index}", att)
            if last is not None:  # a failure that cost nothing, tried once more
                outcome = replace(outcome, attempts=last.attempts + 1)
            await self.redis.set(result_key, outcome.to_json(), ex=self.settings.history_ttl_s)
            return outcome
        finally:
            keeper.cancel()
            # Released at once, so that a cancelled attempt (shutdown) is redone without waiting
            # for the lease; a Redis error here leaves the claim to lapse.
            await asyncio.shield(self._release(claim_key, token))

    async def _release(self, claim_key: str, token: str) -> None:
        try:
            await self.store.scripts.mediaclaim(keys={"claim": claim_key},
                                                args={"token": token, "ttl_ms": ""})
        except Exception as exc:  # the claim lapses by itself
            log.warning("transcription_claim_not_released", error=str(exc))

    async def _keep(self, claim_key: str, token: str, lease_ms: int) -> None:
        while True:
            await asyncio.sleep(lease_ms / 3000)
            try:
                if not await self.store.scripts.mediaclaim(keys={"claim": claim_key},
                                                           args={"token": token, "ttl_ms": lease_ms}):
                    return
            except Exception as exc:  # Redis briefly away: the next renewal may succeed
                log.warning("transcription_claim_renew_error", error=str(exc))

    async def _transcribe(self, conv: str, call_id: str, att: Attachment) -> Outcome:
        started = time.monotonic()
        outcome = await self._call(conv, call_id, att)
        TRANSCRIPTION_LATENCY.observe(time.monotonic() - started)
        TRANSCRIPTIONS.labels("failed" if outcome.error else "transcribed", outcome.reason).inc()
        log.info("voice_note_transcribed" if not outcome.error else "voice_note_not_transcribed",
                 conversation=conv, call=call_id, error=outcome.error or None,
                 ms=round((time.monotonic() - started) * 1000))
        return outcome

    async def _call(self, conv: str, call_id: str, att: Attachment) -> Outcome:
        if not await self.limits.allow_llm_call(conv, call_id):
            return Outcome(error="the conversation used up its LLM calls of the hour",
                           reason="llm_quota_exceeded")
        try:
            audio = await self.downloader.fetch(att.url)
        except DownloadError as exc:
            return Outcome(error=f"download: {exc}", reason=exc.reason, transient=exc.transient)
        name = att.file_name or "voice-note.ogg"
        try:
            result = await self._openai().audio.transcriptions.create(
                model=self.model, file=(name, audio.data, audio.content_type or att.content_type))
        except (openai.APIError, ValueError) as exc:
            # Refused (5xx, 429) or never reached: not billed. A timeout may have been.
            unpaid = (isinstance(exc, openai.APIStatusError)
                      and (exc.status_code >= 500 or exc.status_code == 429)) or (
                isinstance(exc, openai.APIConnectionError) and not isinstance(exc, openai.APITimeoutError))
            return Outcome(error=f"transcription: {type(exc).__name__}: {str(exc)[:200]}",
                           reason="transcription_failed", transient=unpaid)
        text = (getattr(result, "text", "") or "").strip()
        if not text:
            return Outcome(error="transcription: no speech recognised", reason="transcription_failed")
        return Outcome(text[:self.settings.max_message_chars])

    # -- worker side ---------------------------------------------------------------------------
    async def outcomes(self, conv: str, entries: tuple[dict[str, Any], ...]) -> dict[Key, Outcome]:
        """The transcript of every voice note of a burst: recorded ones at once, running ones
        when they finish, unfinished ones (no outcome and no live claim: the process that took
        them died) redone here; all within MEDIA_TIMEOUT_S."""
        wanted = [(int(e["id"]), i, a) for e in entries for i, a in pending(stored(e))]
        if not wanted:
            return {}
        end = asyncio.get_running_loop().time() + self.settings.media_timeout_s
        results = await asyncio.gather(*(self._await_one(conv, m, i, a, end) for m, i, a in wanted))
        return {(m, i): outcome for (m, i, _), outcome in zip(wanted, results, strict=True)}

    async def _await_one(self, conv: str, message_id: int, index: int, att: Attachment,
                         end: float) -> Outcome:
        result_key, _ = self._keys(conv, message_id, index)
        while True:
            raw = await self.redis.get(result_key)
            recorded = Outcome.from_json(raw) if raw is not None else None
            if recorded is not None and (recorded.final or not self.settings.transcription):
                return recorded
            if not self.settings.transcription:
                TRANSCRIPTIONS.labels("failed", "off").inc()
                return Outcome(error="transcription is off (TRANSCRIPTION_MODEL=off)", reason="off")
            try:
                async with asyncio.timeout_at(end):
                    if (outcome := await self._run(conv, message_id, index, att)) is not None:
                        return outcome
                    await asyncio.sleep(_POLL_S)
            except TimeoutError:
                TRANSCRIPTIONS.labels("failed", "timeout").inc()
                return Outcome(error=f"no transcript within MEDIA_TIMEOUT_S "
                               f"({self.settings.media_timeout_s:g} s)", reason="timeout")

    async def history(self, conv: str, entries: list[dict[str, Any]]) -> dict[Key, Outcome]:
        """Recorded transcripts of earlier messages, for the history part of a prompt."""
        wanted = [(int(e["id"]), i) for e in entries if e.get("role", "user") == "user"
                  and isinstance(e.get("id"), int) for i, _ in pending(stored(e))]
        if not wanted:
            return {}
        raw = await self.redis.mget([self._keys(conv, m, i)[0] for m, i in wanted])
        return {key: Outcome.from_json(r) for key, r in zip(wanted, raw, strict=True) if r is not None}

    async def stop(self, grace_s: float) -> None:
        """Let transcriptions started for webhooks finish for up to `grace_s`, then cancel the
        rest (their claims are released: the worker answering the burst redoes them)."""
        if self._tasks and grace_s > 0:
            await asyncio.wait(list(self._tasks), timeout=grace_s)
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*list(self._tasks), return_exceptions=True)

    async def close(self) -> None:
        await self.stop(grace_s=0)
        if self._client is not None:
            await self._client.close()
