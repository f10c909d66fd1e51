"""The processor: one claimed burst in, one reply posted to Chatwoot.

Order of steps, each recorded before the next so a retry after a crash repeats nothing done:
ask the LLM (only if no reply is stored yet) -> store the reply on the batch -> post it to
Chatwoot -> finish the batch (which records the posted message id). The only window for a
duplicate reply is a crash after Chatwoot accepted the post and before `finish` ran.
"""

from __future__ import annotations

import asyncio
import random
import time
from typing import Any

import structlog

from .chatwoot import ChatwootClient, ChatwootError
from .config import Settings
from .limits import Limits
from .llm import LLMClient, LLMError
from .store import Batch, BufferStore

log = structlog.get_logger("buffer_service.processor")

_MAX_BACKOFF_MS = 300_000


def build_prompt(system_prompt: str, history: list[dict[str, Any]],
                 burst: tuple[dict[str, Any], ...]) -> list[dict[str, str]]:
    """System prompt, then earlier turns of the conversation, then the burst in arrival order."""
    messages = [{"role": "system", "content": system_prompt}]
    for entry in history:
        messages.append({"role": entry.get("role", "user"), "content": entry.get("text", "")})
    for entry in burst:
        messages.append({"role": "user", "content": entry.get("text", "")})
    return messages


def backoff_ms(attempt: int, base_ms: int, retry_after_s: float | None = None) -> int:
    """Exponential backoff with full jitter; a server's Retry-After is a floor, not a suggestion."""
    delay = min(_MAX_BACKOFF_MS, base_ms * 2 ** max(0, attempt - 1))
    delay = int(delay / 2 + random.random() * delay / 2)
    if retry_after_s is not None:
        delay = max(delay, int(retry_after_s * 1000))
    return delay


class LeaseLost(Exception):
    """Another worker took the batch over (our lease lapsed); stop without side effects."""


class Processor:
    def __init__(self, settings: Settings, store: BufferStore, llm: LLMClient,
                 chatwoot: ChatwootClient) -> None:
        self.settings = settings
        self.store = store
        self.llm = llm
        self.chatwoot = chatwoot
        self.limits = Limits(store)

    async def process(self, batch: Batch) -> str:
        """Answer one batch; returns its outcome (completed, skipped, retrying, failed, lost)."""
        structlog.contextvars.bind_contextvars(
            batch=batch.id, conversation=batch.conv, attempt=batch.attempts)
        keeper = asyncio.create_task(self._keep_lease(batch))
        try:
            return await self._answer(batch)
        except LeaseLost:
            log.warning("lease_lost")
            return "lost"
        except (LLMError, ChatwootError) as exc:
            return await self._failed(batch, str(exc), exc.retryable, exc.retry_after_s)
        except Exception as exc:  # a bug or an unexpected answer must not kill the worker
            log.exception("batch_error")
            return await self._failed(batch, f"{type(exc).__name__}: {exc}", True, None)
        finally:
            keeper.cancel()

    async def _answer(self, batch: Batch) -> str:
        reply = batch.reply
        if reply:
            log.info("reply_reused")
        else:
            if not await self.limits.allow_llm_call(batch.conv, f"{batch.id}:{batch.attempts}"):
                # Spend guard: the conversation used up its LLM calls of the hour. Skipped for
                # good (its messages still reach the history), never retried into the same wall.
                if not await self.store.finish(batch, "skipped", reason="llm_quota_exceeded"):
                    raise LeaseLost
                log.warning("llm_quota_exceeded")
                return "skipped"
            history = await self.store.history(batch.conv)
            limit = self.settings.history_messages
            prompt = build_prompt(self.settings.system_prompt, history[-limit:] if limit else [],
                                  batch.messages)
            started = time.monotonic()
            answer = await self.llm.reply(prompt)
            reply = answer.text
            log.info("llm_answered", messages=len(batch.messages),
                     llm_ms=round((time.monotonic() - started) * 1000),
                     prompt_tokens=answer.prompt_tokens, completion_tokens=answer.completion_tokens)
        # Fenced: if our lease lapsed while the LLM thought, another worker owns the batch now.
        if not await self.store.record(batch, reply=reply, posting_ms=int(time.time() * 1000)):
            raise LeaseLost
        started = time.monotonic()
        reply_id = await self.chatwoot.post_reply(batch.account_id, batch.conversation_id, reply)
        post_ms = round((time.monotonic() - started) * 1000)
        if not await self.store.finish(batch, "completed", reply=reply, reply_id=reply_id):
            raise LeaseLost
        log.info("reply_posted", reply_id=reply_id, post_ms=post_ms, messages=len(batch.messages),
                 trigger=batch.trigger, lateness_ms=batch.claimed_ms - batch.deadline_ms,
                 wait_ms=batch.claimed_ms - batch.first_ms)
        return "completed"

    async def _failed(self, batch: Batch, error: str, retryable: bool,
                      retry_after_s: float | None) -> str:
        delay = backoff_ms(batch.attempts, self.settings.retry_base_ms, retry_after_s)
        outcome = await self.store.fail(batch, error, retry_in_ms=delay, permanent=not retryable)
        if outcome == "failed":
            log.error("batch_failed", error=error)
        elif outcome == "retrying":
            log.warning("batch_retry", error=error, retry_in_ms=delay)
        else:
            outcome = "lost"
        return outcome

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
