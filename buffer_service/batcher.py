"""Coalesce concurrent calls of one Lua script into a single pipelined round trip.

Awaiting one EVALSHA per webhook costs a round trip, a pool checkout and an event-loop wake-up
per request; that, not Redis, is what holds a one-call-per-request handler at about a third of a
bare handler's rate (docs/redis-timing.md). Calls made while the event loop runs
one iteration (aiohttp starts every request that arrived in a read burst in the same
iteration) are queued and sent together at the start of the next iteration. There is no timer:
a lone call waits for nothing, and the batch grows only when calls really overlap.

Each caller gets its own result or its own error; a failed round trip fails every caller in
it, so the webhook still answers 503 when Redis is down.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

from redis.asyncio import Redis
from redis.commands.core import AsyncScript
from redis.exceptions import NoScriptError
from redis.typing import EncodableT, KeyT

# The futures hold the script's reply, whatever Redis made of what the Lua returned.
_Call = tuple[Sequence[KeyT], Sequence[EncodableT], asyncio.Future[Any]]


class ScriptBatcher:
    """`await batcher(keys, args)` behaves like `await script(keys=keys, args=args)`."""

    def __init__(self, redis: Redis, script: AsyncScript, max_batch: int = 256) -> None:
        self._redis = redis
        self._script = script
        self._max_batch = max_batch
        self._queue: list[_Call] = []
        self._flush_scheduled = False
        self._sending: set[asyncio.Task[None]] = set()

    async def __call__(self, keys: Sequence[KeyT], args: Sequence[EncodableT]) -> Any:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        self._queue.append((keys, args, future))
        if len(self._queue) >= self._max_batch:
            self._flush()
        elif not self._flush_scheduled:
            self._flush_scheduled = True
            loop.call_soon(self._flush)
        return await future

    def _flush(self) -> None:
        self._flush_scheduled = False
        batch, self._queue = self._queue, []
        if batch:
            task = asyncio.create_task(self._send(batch))
            self._sending.add(task)
            task.add_done_callback(self._sending.discard)

    async def _send(self, batch: list[_Call]) -> None:
        try:
            results = await self._execute(batch)
        except asyncio.CancelledError:
            for _, _, future in batch:
                future.cancel()
            raise
        except Exception as exc:  # a failed round trip fails every caller in it
            for _, _, future in batch:
                if not future.done():
                    future.set_exception(exc)
            return
        for (_, _, future), result in zip(batch, results, strict=True):
            if future.done():  # the caller gave up (e.g. its request was cancelled)
                continue
            if isinstance(result, Exception):
                future.set_exception(result)
            else:
                future.set_result(result)

    async def _execute(self, batch: list[_Call]) -> list[Any]:
        results = await self._pipeline(batch)
        # After a Redis restart or SCRIPT FLUSH the script is unknown; NOSCRIPT means it did not
        # run, so loading it and sending those calls again cannot apply anything twice.
        missing = [i for i, r in enumerate(results) if isinstance(r, NoScriptError)]
        if missing:
            await self._redis.script_load(self._script.script)
            retried = await self._pipeline([batch[i] for i in missing])
            for i, result in zip(missing, retried, strict=True):
                results[i] = result
        return results

    async def _pipeline(self, batch: list[_Call]) -> list[Any]:
        async with self._redis.pipeline(transaction=False) as pipe:
            for keys, args, _ in batch:
                pipe.evalsha(self._script.sha, len(keys), *keys, *args)
            return await pipe.execute(raise_on_error=False)
