"""The processor: one claimed burst in, at most one reply posted to Chatwoot.

Steps, each recorded before the next so that a retry after a crash repeats nothing done:
1. skip the batch if a human handles the conversation (the claim looked);
2. ask the LLM, unless an earlier attempt stored its reply, or a customer's keyword asks for a
   human (handoff.py: the reply is HANDOFF_MESSAGE); the typing indicator runs from before
   the LLM call until the batch ends, whatever the outcome (presence.py); a model that calls
   its handoff tool has that decision stored with the batch;
3. before_post, one fenced script: skip if a human took over meanwhile, supersede if the
   customer wrote again (old and new are answered together), else store the reply and its split
   with the batch as "posting", unsure until its outcome is known;
4. post the reply to Chatwoot: as one message, or split at its paragraphs (parts.py) part by
   part with a typing pause before each further part; each part's message id is recorded
   (part.lua) before the next part, the handoff or the finish, so a retry resumes at the next
   part of the stored split. Once a part is out the reply is no longer superseded, but a
   person's takeover, checked again before every part, drops the rest (skipped, the parts out
   archived as the reply);
5. a handoff: remember it, note it for the agents, set the conversation open;
6. finish the batch with Chatwoot's message id (its last part's).
A retry whose post Chatwoot's webhook echo already confirmed goes from 3 straight to the next
part or to 5. A retry after a post whose outcome is unknown (a crash, a timeout, a lost
connection, a 5xx) first asks Chatwoot whether that part exists, and posts it only when it does
not; such a reply is never superseded, as the customer may have it. What is left of the
windows for a duplicate reply is in docs/delivery-guarantees.md.
"""

from __future__ import annotations

import asyncio
import copy
import random
import time
from typing import Any, TypeVar

import structlog

from . import metrics
from .chatwoot import ChatwootClient, ChatwootError, earlier_post
from .config import Settings
from .flags import Flags
from .handoff import TOOL, Handover, burst_keyword, model_handoff
from .limits import Limits
from .llm import LLMClient, LLMError, LLMReply
from .media import Media
from .parts import pause_s, split_reply
from .presence import Presence, Typing
from .redis_client import REDIS_ERRORS
from .store import Batch, BufferStore, LeaseLost, Progress

log = structlog.get_logger("buffer_service.processor")

_MAX_BACKOFF_MS = 300_000

T = TypeVar("T")


def build_prompt(system_prompt: str, history: list[dict[str, Any]],
                 burst: tuple[dict[str, Any], ...] | list[dict[str, Any]],
                 contact_name: str = "") -> list[dict[str, Any]]:
    """System prompt, then earlier turns of the conversation, then the burst in arrival order;
    a burst entry's `content` (images as content parts, media.py) stands in for its text."""
    if contact_name:
        system_prompt += f"\n\nThe customer's name (from their WhatsApp profile): {contact_name}"
    messages = [{"role": "system", "content": system_prompt}]
    for entry in history:
        messages.append({"role": entry.get("role", "user"), "content": entry.get("text", "")})
    for entry in burst:
        messages.append({"role": "user", "content": entry.get("content", entry.get("text", ""))})
    return messages


def backoff_ms(attempt: int, base_ms: int, retry_after_s: float | None = None) -> int:
    """Exponential backoff with full jitter; a server's Retry-After is a floor, not a suggestion."""
    delay = min(_MAX_BACKOFF_MS, base_ms * 2 ** max(0, attempt - 1))
    delay = int(delay / 2 + random.random() * delay / 2)
    if retry_after_s is not None:
        delay = max(delay, int(retry_after_s * 1000))
    return delay


class Processor:
    def __init__(self, settings: Settings, store: BufferStore, *, flags: Flags, limits: Limits,
                 llm: LLMClient, chatwoot: ChatwootClient, media: Media, presence: Presence,
                 handover: Handover) -> None:
        self.settings = settings
        self.store = store
        self.flags = flags
        self.limits = limits
        self.llm = llm
        self.chatwoot = chatwoot
        self.media = media
        self.presence = presence
        self.handover = handover
        self._inboxes: dict[int, Processor] = {}

    def for_inbox(self, inbox_id: int | None) -> Processor:
        """This processor as a batch's inbox has it (INBOX_SETTINGS_FILE): the same clients and
        state, the inbox's settings. A part that keeps a per-inbox setting of its own (the
        model, typing, vision) is swapped here; everything else reads `self.settings`."""
        settings = self.settings.for_inbox(inbox_id)
        if inbox_id is None or settings is self.settings:
            return self
        if inbox_id not in self._inboxes:
            self._inboxes[inbox_id] = _with(
                self, settings=settings, llm=_with(self.llm, model=settings.openai_model),
                presence=_with(self.presence, enabled=settings.typing_indicator),
                media=_with(self.media, settings=settings))
        return self._inboxes[inbox_id]

    async def warm(self) -> None:
        """What the first burst would build, built before the first claim (LLMClient.warm). A
        failure here costs only the head start: the first burst builds it as it always did."""
        try:
            await self.llm.warm([TOOL] if self.settings.handoff_tool else None)
        except Exception as exc:
            log.warning("warm_up_failed", error=f"{type(exc).__name__}: {exc}")

    async def process(self, batch: Batch) -> str:
        """Answer one batch; returns its outcome (completed, skipped, superseded, retrying,
        failed, lost, interrupted). Cancelled (shutdown), it hands the batch back first."""
        if (inbox := self.for_inbox(batch.inbox_id)) is not self:
            return await inbox.process(batch)  # with its inbox's prompt, model, ...
        structlog.contextvars.bind_contextvars(
            batch=batch.id, conversation=batch.conv, attempt=batch.attempts)
        keeper = asyncio.create_task(self._keep_lease(batch))
        typing = self.presence.typing(batch)
        try:
            return await self._answer(batch, typing)
        except LeaseLost:
            log.warning("lease_lost")
            return "lost"
        except ChatwootError as exc:
            return await self._failed(batch, str(exc), exc.retryable, exc.retry_after_s,
                                      not_posted=not exc.unsure)
        except LLMError as exc:
            return await self._failed(batch, str(exc), exc.retryable, exc.retry_after_s)
        except REDIS_ERRORS as exc:
            return _interrupted(exc)
        except asyncio.CancelledError:
            await self._release(batch)
            raise
        except Exception as exc:  # a bug or an unexpected answer must not kill the worker
            log.exception("batch_error")
            return await self._failed(batch, f"{type(exc).__name__}: {exc}", True, None)
        finally:
            keeper.cancel()
            # Whatever the outcome (posted, skipped, superseded, failed, lost, shut down).
            typing.stop()

    async def _answer(self, batch: Batch, typing: Typing) -> str:
        reply = batch.reply
        # Asked for a human by a keyword: handed over without the LLM; or the model asks for
        # one with its tool (handoff.py). "kind:reason", "" for a plain reply.
        keyword = burst_keyword(batch, self.settings.handoff_keywords)
        handoff, summary = (f"keyword:{keyword}" if keyword else ""), ""
        # A handoff an earlier attempt of this batch decided is stored with the batch (mark.lua)
        # before any of its effects, so that the handoff record a retry finds is known for its
        # own and carried through; a later batch (the customer insisting) finds another's.
        marked, marked_summary = ("", "") if batch.fresh else \
            await self.store.handoff_mark(batch)
        if marked:
            handoff, summary = marked, marked_summary
        # With a stored reply, before_post decides: an earlier attempt may have posted it.
        if batch.takeover and not reply and not marked:
            return await self._skip(batch, batch.takeover)
        if reply:
            log.info("reply_reused")
        elif handoff:
            reply = self.settings.handoff_message
        else:
            typing.start()
            if not await self.limits.allow_llm_call(batch.conv, f"{batch.id}:{batch.attempts}"):
                # Spend guard: the conversation used up its LLM calls of the hour. Skipped for
                # good (its messages still reach the history), never retried into the same wall.
                log.warning("llm_quota_exceeded")
                return await self._skip(batch, "llm_quota_exceeded")
            answer = await self._ask_llm(batch)
            reply = answer.text
            if asked := model_handoff(answer):
                handoff, summary = f"model:{asked[0]}", asked[1]
                reply = reply or self.settings.handoff_message
            elif not reply:  # only a call of a tool we did not offer
                raise LLMError("LLM returned no text and no handoff")
        # A retry reusing the reply must know whether it hands over.
        if handoff != marked and not await self.store.mark_handoff(batch, handoff, summary):
            raise LeaseLost
        if handoff and not reply:
            await self.handover.hand_over(batch, handoff, summary)
            return await self._skip(batch, _handoff_reason(handoff))

        # A retry posts the parts the first attempt stored, whatever its own split settings,
        # and resumes after those an earlier attempt got out (before_post.lua, part.lua).
        progress = await self.store.progress(batch) if batch.reply else Progress()
        parts = progress.parts or split_reply(reply, self.settings.reply_split,
                                              self.settings.reply_max_parts)
        out, reply_id = min(progress.out, len(parts)), progress.last_id
        # Fenced: if our lease lapsed while the LLM thought, another worker owns the batch now.
        verdict, detail = await self.store.before_post(batch, reply, parts=parts, out=out)
        if verdict == "confirm":
            verdict, detail = await self._settle_earlier_post(batch, reply, parts, out, reply_id)
        if verdict == "lost":
            raise LeaseLost
        if verdict == "skip":
            return await self._skip(batch, detail, parts, out, reply_id)
        if verdict == "superseded":
            log.info("reply_superseded", waiting_messages=int(detail))
            return "superseded"
        started = time.monotonic()
        if verdict == "posted":
            reply_id = int(detail)
            log.warning("earlier_post_confirmed", reply_id=reply_id, part=min(out + 1, len(parts)))
            if out < len(parts):  # the part in flight, confirmed by its echo or by Chatwoot
                out += 1
                await self._part_out(batch, out, reply_id, len(parts))
        if batch.reply and out < len(parts):
            # A retry with a stored reply started no LLM call: typing shows before its first
            # post too, so that its `off` after the last part, not a killed worker's `on`, is
            # the last word.
            typing.start()
        while out < len(parts):
            if verdict != "post":
                # A further part: after its pause (typing shows), marked in flight like the
                # first; a person who took over meanwhile stops the rest (before_post.lua).
                typing.start()
                await asyncio.sleep(pause_s(parts[out], self.settings.reply_pacing_ms_per_char))
                verdict, detail = await self.store.before_post(batch, reply, parts=parts, out=out)
                if verdict == "skip":
                    return await self._skip(batch, detail, parts, out, reply_id)
                if verdict != "post":  # the rest of a reply begun is not superseded
                    raise LeaseLost
            posting = time.monotonic()
            reply_id = await self.chatwoot.post_reply(batch.account_id, batch.conversation_id,
                                                      parts[out])
            metrics.chatwoot_posted(time.monotonic() - posting)
            out += 1
            await self._part_out(batch, out, reply_id, len(parts))
            verdict = ""
        post_ms = round((time.monotonic() - started) * 1000)
        if handoff:
            await self.handover.hand_over(batch, handoff, summary)
        await self._finish_posted(batch, reply, reply_id, _handoff_reason(handoff) if handoff else "")
        log.info("reply_posted", reply_id=reply_id, parts=len(parts), post_ms=post_ms,
                 messages=len(batch.messages),
                 trigger=batch.trigger, lateness_ms=batch.claimed_ms - batch.deadline_ms,
                 wait_ms=batch.claimed_ms - batch.first_ms)
        return "completed"

    async def _settle_earlier_post(self, batch: Batch, reply: str, parts: list[str], out: int,
                                   last_part_id: int) -> tuple[str, str]:
        """An earlier attempt may have posted the part after the `out` parts out of `reply`:
        Chatwoot's messages after the burst and the parts already out (`last_part_id`, 0 for
        none) say whether it did, and whether a person answered meanwhile (then the bot stays
        out). Undecidable raises, and the batch waits for a retry, or for the echo, rather than
        risk a duplicate."""
        after = max([last_part_id, *(int(m.get("id", 0)) for m in batch.messages)])
        messages, complete = await self.chatwoot.messages_after(batch.account_id,
                                                                batch.conversation_id, after)
        known = await self.store.known_messages(batch, [int(m["id"]) for m in messages])
        found, message_id = earlier_post(messages, complete, parts[min(out, len(parts) - 1)], known)
        if found == "posted":
            return "posted", str(message_id)
        if found == "human":
            log.info("person_answered_meanwhile", message_id=message_id)
            return "skip", "human_agent_replied"
        log.info("earlier_post_not_found")
        return await self.store.before_post(batch, reply, absent=True, parts=parts, out=out)

    async def _part_out(self, batch: Batch, out: int, message_id: int, parts: int) -> None:
        # Recorded before the next part, the handoff's note or the finish (part.lua).
        if not await self.store.part_out(batch, out, message_id, out == parts):
            raise LeaseLost

    async def _ask_llm(self, batch: Batch) -> LLMReply:
        # The response_quality_enhancement flag: history and the contact's name, or the burst only.
        enhanced = (await self.flags.current()).response_quality_enhancement
        # The list keeps a burst's worth more than a prompt uses; read only what it uses.
        history = (await self.store.history(batch.conv, self.settings.history_messages)
                   if enhanced else [])
        name = next((m["name"] for m in reversed(batch.messages) if m.get("name")), "")
        # Waits for voice notes still being transcribed and loads the images (media.py).
        media = await self.media.render(batch, history)
        name = name if enhanced else ""
        tools = [TOOL] if self.settings.handoff_tool else None
        started = time.monotonic()
        try:
            answer = await self.llm.reply(
                build_prompt(self.settings.system_prompt, media.history, media.burst, name), tools)
        except LLMError as exc:
            # A model without image input: once more with the images named in text.
            if not self.media.refused(media, exc) or not await self.limits.allow_llm_call(
                    batch.conv, f"{batch.id}:{batch.attempts}:text"):
                raise
            answer = await self.llm.reply(
                build_prompt(self.settings.system_prompt, media.history, media.text_only, name), tools)
        finally:
            await self.media.record(batch, media)
        elapsed = time.monotonic() - started
        metrics.llm_answered(elapsed, answer.prompt_tokens, answer.completion_tokens)
        log.info("llm_answered", messages=len(batch.messages), llm_ms=round(elapsed * 1000),
                 prompt_tokens=answer.prompt_tokens, completion_tokens=answer.completion_tokens)
        return answer

    async def _skip(self, batch: Batch, reason: str, parts: list[str] | None = None, out: int = 0,
                    last_id: int = 0) -> str:
        """End the batch unanswered; a reply a takeover cut short after `out` of its `parts`
        reaches the history as far as it went out (`last_id`: its last part's message id)."""
        parts = parts or []
        note = f"{out} of {len(parts)} parts were out" if out else ""
        if not await self.store.finish(batch, "skipped", reason=reason, reply="\n\n".join(parts[:out]),
                                       reply_id=last_id if out else 0, note=note):
            raise LeaseLost
        log.info("batch_skipped", reason=reason, parts_out=out, parts=len(parts))
        return "skipped"

    async def _finish_posted(self, batch: Batch, reply: str, reply_id: int, reason: str) -> None:
        """Record the post. Chatwoot has the reply now, and a retry by another worker would post
        it again, so a Redis outage is waited out for as long as the lease would last."""
        give_up = time.monotonic() + self.settings.processing_lease_ms / 1000
        delay = 0.1
        while True:
            try:
                finished = await self.store.finish(batch, "completed", reason=reason, reply=reply,
                                                   reply_id=reply_id)
                break
            except REDIS_ERRORS as exc:
                if time.monotonic() + delay > give_up:
                    raise
                log.warning("finish_retry", error=str(exc), retry_in_s=delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)
        if not finished:
            # The lease lapsed during the post and another worker holds the batch: it finds the
            # reply in Chatwoot (or its echo in the store) before it would post it again.
            log.error("lease_lost_after_post", reply_id=reply_id)
            raise LeaseLost

    async def _failed(self, batch: Batch, error: str, retryable: bool, retry_after_s: float | None,
                      *, not_posted: bool = False) -> str:
        delay = backoff_ms(batch.attempts, self.settings.retry_base_ms, retry_after_s)
        try:
            outcome = await self.store.fail(batch, error, retry_in_ms=delay, permanent=not retryable,
                                            not_posted=not_posted)
        except REDIS_ERRORS as exc:
            return _interrupted(exc)
        if outcome == "failed":
            log.error("batch_failed", error=error)
        elif outcome == "retrying":
            log.warning("batch_retry", error=error, retry_in_ms=delay)
        else:
            outcome = "lost"
        return outcome

    async def _release(self, batch: Batch) -> None:
        """Shutdown ran out of grace: hand the batch back so another worker takes it at once."""
        try:
            released = await self.store.release(batch)
        except REDIS_ERRORS:
            released = False
        # Not released (a post in doubt, or Redis away): the lease lapses and a worker takes it then.
        log.warning("batch_released" if released else "batch_left_to_lease_expiry")

    async def _keep_lease(self, batch: Batch) -> None:
        """Renew the lease at a third of its length, so one slow renewal does not lose it."""
        interval = self.settings.processing_lease_ms / 3000
        while True:
            await asyncio.sleep(interval)
            try:
                if not await self.store.renew(batch):
                    log.warning("lease_renew_refused")
                    return
            except Exception as exc:  # Redis briefly away: the next renewal may succeed
                log.warning("lease_renew_error", error=str(exc))


def _with(part: T, **attributes: object) -> T:
    """A shallow copy of `part` (sharing its clients, tasks and state) with other `attributes`."""
    view = copy.copy(part)
    for name, value in attributes.items():
        setattr(view, name, value)
    return view


def _handoff_reason(handoff: str) -> str:
    # The job record's reason: the kind (keyword, model), as the handoff record has it.
    return "handoff:" + handoff.split(":", 1)[0]


def _interrupted(exc: Exception) -> str:
    # Nothing can be recorded while Redis is away. The batch's lease lapses and a worker takes
    # it again, as it would after a crash.
    log.warning("batch_interrupted", error=str(exc))
    return "interrupted"
