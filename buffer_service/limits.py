"""Abuse limits kept in Redis, so every replica enforces the same numbers.

Their keys (keys.py: rl:, llm:, the global rl:global) live in the conversation's shard, so
in its Redis Cluster slot, but for the global limit's one key.

Message limits (GCRA, lua/lib.lua) admit a burst of up to N accepted messages and then N per
window. They are checked inside the append script (append.lua), after de-duplication and
atomically with it (on a Redis Cluster the global one by its own call first, given back when the
append does not buffer the message: globalrate.lua), and only for customer messages the bot
would answer: neither Chatwoot's other events nor its redeliveries use them up, and a message
one conversation's limit refuses does not count against the global one. A refused message is
still kept in the history. The spend guard (lua/llmquota.lua) is an exact count per hour-long window.
"""

from __future__ import annotations

from prometheus_client import Counter

from .store import BufferStore

RATE_LIMITED = Counter("buffer_service_rate_limited",
                       "Webhook messages refused by a rate limit, by the limit that refused them",
                       ["scope"])
LLM_QUOTA_EXCEEDED = Counter("buffer_service_llm_quota_exceeded",
                             "Batches skipped because their conversation used up its LLM calls per hour")

_HOUR_MS = 3_600_000


class Limits:
    def __init__(self, store: BufferStore) -> None:
        self.store = store
        self.settings = store.settings

    async def allow_llm_call(self, conv: str, call_id: str) -> bool:
        """Count one LLM call of `conv`; False once it made its allowance of the last hour."""
        limit = self.settings.max_llm_calls_per_conversation_per_hour
        if not limit:
            return True
        allowed = bool((await self.store.scripts.llmquota(
            keys={"calls": self.store.keys.llm_calls(conv)},
            args={"limit": limit, "period_ms": _HOUR_MS, "call_id": call_id}))[0])
        if not allowed:
            LLM_QUOTA_EXCEEDED.inc()
        return allowed
