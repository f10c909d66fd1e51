"""Coalesce concurrent calls of one Lua script into a single pipelined round trip.

Awaiting one EVALSHA per webhook costs a round trip, a pool checkout and an event-loop wake-up
per request; that, not Redis, is what holds a one-call-per-request handler at about a third of a
bare handler's rate (docs/redis-timing.md). Calls made while the event loop runs
one iteration (aiohttp starts every request that arrived in a read burst in the same
iteration) are queued and sent together at the start of the next iteration. There is no timer:
a lone call waits for nothing, and the batch grows only when calls really overlap.

Each caller gets its own result or its own error; a failed round trip fails every caller in
it, so the webhook still answers 500 when Redis is down. A caller may give a deadline (event-loop
time): a round trip ends with TimeoutError at the earliest deadline of its calls, so a webhook's
Redis budget costs one timer per round trip instead of one per webhook. Calls that did not run (NOSCRIPT, a
redirect) go again in a further round trip, a bounded number of times.

With `replicas` (REDIS_WAIT_REPLICAS) each node's calls are followed on the same connection by
WAIT: Redis replicates asynchronously, so a write the primary answered can vanish with it in a
failover; a caller whose node's replicas did not confirm in time gets NotReplicated (its write
may still survive: it is not undone, only not promised). On a Redis Cluster the pipeline is
redis-py's cluster pipeline: it groups the calls by the node that holds each one's slot and
sends the groups concurrently. It would follow MOVED/ASK per call on its own, after the WAITs
ran, on a node none of them covers: with WAITs a MOVED call goes again in a round of its own
instead, followed by the WAIT of the node that now holds its slot, and an ASKed one (its slot
is being migrated) fails, not confirmed.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any, cast

from redis.asyncio.cluster import ClusterNode, ClusterPipeline, RedisCluster
from redis.commands.core import AsyncScript
from redis.exceptions import MovedError, NoScriptError, RedisError
from redis.typing import EncodableT, KeyT

from .redis_client import AnyRedis

# The futures hold the script's reply, whatever Redis made of what the Lua returned.
_Call = tuple[Sequence[KeyT], Sequence[EncodableT], asyncio.Future[Any], float | None]
# Bounded like every Redis call; a replica that lags longer than this fails the call instead.
WAIT_TIMEOUT_MS = 2000
# Round trips per batch: a NOSCRIPT or a redirect sends its calls again, a bounded number of times.
_ROUNDS = 3


class NotReplicated(RedisError):
    """The write ran on the primary, but fewer replicas than REDIS_WAIT_REPLICAS confirmed it."""


class ScriptBatcher:
    """`await batcher(keys, args)` behaves like `await script(keys=keys, args=args)`."""

    def __init__(self, redis: AnyRedis, script: AsyncScript, max_batch: int = 256, *,
                 replicas: int = 0) -> None:
        self._redis = redis
        self._script = script
        self._replicas = replicas
        self._max_batch = max_batch
        self._queue: list[_Call] = []
        self._flush_scheduled = False
        self._sending: set[asyncio.Task[None]] = set()

    async def __call__(self, keys: Sequence[KeyT], args: Sequence[EncodableT],
                       deadline: float | None = None) -> Any:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        self._queue.append((keys, args, future, deadline))
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
        deadlines = [deadline for *_, deadline in batch if deadline is not None]
        try:
            async with asyncio.timeout_at(min(deadlines) if deadlines else None):
                results = await self._execute(batch)
        except asyncio.CancelledError:
            for _, _, future, _ in batch:
                future.cancel()
            raise
        except Exception as exc:  # a failed or timed-out round trip fails every caller in it
            for _, _, future, _ in batch:
                if not future.done():
                    future.set_exception(exc)
            return
        for (_, _, future, _), result in zip(batch, results, strict=True):
            if future.done():  # the caller gave up (e.g. its request was cancelled)
                continue
            if isinstance(result, Exception):
                future.set_exception(result)
            else:
                future.set_result(result)

    async def _execute(self, batch: list[_Call]) -> list[Any]:
        results: list[Any] = [None] * len(batch)
        todo = list(range(len(batch)))
        for _ in range(_ROUNDS):
            sent = await self._pipeline([batch[i] for i in todo])
            for i, result in zip(todo, sent, strict=True):
                results[i] = result
            todo = await self._again(batch, results, todo)
            if not todo:
                break
        return results

    async def _again(self, batch: list[_Call], results: list[Any], sent: list[int]) -> list[int]:
        """Which of the calls `sent` go again: none of them ran. After a Redis restart or SCRIPT
        FLUSH the script is unknown (NOSCRIPT): loaded here on the node that said so, and if
        that node is away, only its calls fail. A call MOVED to another node (which the cluster
        pipeline leaves to us when it sends WAITs: _pipeline) goes once the slot map is mended;
        ASK and TRYAGAIN (its slot is being migrated) fail the call: it did not run."""
        again: list[int] = []
        loads: dict[str, tuple[ClusterNode | None, list[int]]] = {}
        for i in sent:
            result = results[i]
            if isinstance(result, NoScriptError):
                node = self._node(self._redis, batch[i][0]) \
                    if isinstance(self._redis, RedisCluster) else None
                loads.setdefault(node.name if node else "", (node, []))[1].append(i)
            elif isinstance(result, MovedError) and isinstance(self._redis, RedisCluster):
                await self._redis.nodes_manager.move_slot(result)
                again.append(i)
        for node, calls in loads.values():
            try:
                if node is not None:
                    await self._redis.execute_command("SCRIPT LOAD", self._script.script,
                                                      target_nodes=node)
                else:
                    await self._redis.script_load(self._script.script)
            except RedisError as exc:
                for i in calls:
                    results[i] = exc
                continue
            again.extend(calls)
        return sorted(again)

    @staticmethod
    def _node(redis: RedisCluster, keys: Sequence[KeyT]) -> ClusterNode | None:
        # Typed str, but it hashes whatever a key may be (bytes here) through the encoder.
        return redis.get_node_from_key(cast(str, keys[0]))

    async def _pipeline(self, batch: list[_Call]) -> list[Any]:
        async with self._redis.pipeline(transaction=False) as pipe:
            for keys, args, _, _ in batch:
                # By command name: the cluster pipeline refuses its evalsha() method outright.
                pipe.execute_command("EVALSHA", self._script.sha, len(keys), *keys, *args)
            waits = self._queue_waits(pipe, batch) if self._replicas else []
            if waits and isinstance(pipe, ClusterPipeline):
                # A call redis-py redirected on its own would run after the WAITs, on a node
                # none of them covers: the redirected calls go again in a round of their own.
                results = await pipe.execute(raise_on_error=False, allow_redirections=False)
            else:
                results = await pipe.execute(raise_on_error=False)
        calls, acks = results[:len(batch)], results[len(batch):]
        for i, wait in enumerate(waits):
            confirmed = acks[wait] if wait is not None else "no node holds the slot:"
            if not isinstance(calls[i], Exception) and (
                    not isinstance(confirmed, int) or confirmed < self._replicas):
                calls[i] = NotReplicated(f"{confirmed} of {self._replicas} replicas confirmed the write")
        return calls

    def _queue_waits(self, pipe: Any, batch: list[_Call]) -> list[int | None]:
        """Queue one WAIT per node after its calls; for each call, the index of its WAIT (None:
        no node is known for its slot, so nothing can confirm it)."""
        if not isinstance(self._redis, RedisCluster):
            pipe.execute_command("WAIT", self._replicas, WAIT_TIMEOUT_MS)
            return [0] * len(batch)
        nodes: dict[str, int] = {}
        waits: list[int | None] = []
        for keys, *_ in batch:
            node = self._node(self._redis, keys)
            if node is None:
                waits.append(None)
                continue
            if node.name not in nodes:
                nodes[node.name] = len(nodes)
                # The node's commands share one connection, in order: WAIT covers those before it.
                pipe.execute_command("WAIT", self._replicas, WAIT_TIMEOUT_MS, target_nodes=node)
            waits.append(nodes[node.name])
        return waits
