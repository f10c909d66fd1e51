"""The process's copy of the flags (flags.Flags) against a real Redis."""

from __future__ import annotations

import asyncio
from typing import Any

from buffer_service import redis_client
from buffer_service.config import Settings
from buffer_service.flags import Flags


class _HeldAnswers:
    """A client whose HGETALL runs on Redis at once but whose answer is held back until
    `release` is set: a reload that read the hash before a change and answers after it."""

    def __init__(self, redis: redis_client.AnyRedis) -> None:
        self._redis = redis
        self.release = asyncio.Event()
        self.release.set()

    async def hgetall(self, key: str) -> Any:
        raw = await self._redis.hgetall(key)
        await self.release.wait()
        return raw

    def __getattr__(self, name: str) -> Any:
        return getattr(self._redis, name)


async def test_a_reload_that_read_before_a_change_does_not_bring_the_old_flags_back(
        redis: redis_client.AnyRedis, settings: Settings) -> None:
    """`processing off` (the rollback switch) set while a reload is on its way: the worker is
    told (FLAGS_CHANGED, `invalidate`) and must not claim again. The reload read the hash before
    the change; when its answer arrives it must not become the copy, fresh for MAX_AGE_S, that
    says `processing on` (before the fix it did: the worker went on claiming for another half
    second, and as long as the flags' node kept such answers coming)."""
    held = _HeldAnswers(redis)
    flags = Flags(held, settings)  # type: ignore[arg-type]
    assert await flags.processing()
    await asyncio.sleep(flags.max_age_s)  # the copy is stale: the next look reloads
    held.release.clear()
    looking = asyncio.create_task(flags.processing())  # the reload reads "on", its answer held
    await asyncio.sleep(0.05)
    await Flags(redis, settings).set("processing", "off")
    flags.invalidate()
    held.release.set()
    await looking  # whatever it said, it said it before the change reached this process
    assert not await flags.processing()
    assert not (await flags.current()).processing
