"""The claims under way: at most one chain of claims per Redis node, the nodes' chains side by side.

A claim sent to a node that hangs (no answer, no reset: a frozen host, a partition that drops
packets) waits out the client's socket timeouts, 5 s an attempt, about 20 s in all, and then
each further shard of that node as long again. Claimed one after another, shard by shard, that
held up every shard of every other node for minutes. So the shards are grouped by the node
that holds their slot (one group on a standalone Redis) and each node's due shards are claimed
in turn by a task of their own: a node that does not answer delays only its own shards.

Free slots (WORKER_CONCURRENCY less the batches running and the slots held by chains) are
shared out per node, a node's share at most the free slots over the number of nodes, and a
chain holds its share while its claims answer: claims that run side by side can never start
more batches than there are free slots. A claim not answered within _HOLD_S gives its slots
back (a late answer's batches start only where slots are free then, the rest are handed back),
and a chain ends at its node's first failed claim: a node that hangs holds no slot for long.
(A standalone Redis is one node: its chain gets every free slot, as the sweep did before.) One
busy node on an otherwise idle cluster fills the free slots in a few claims instead of one:
each chain end frees what it did not use and the next sweep gives that node a share of what
is left.

A stop cancels the chains (`cancel`): a claim that already ran on Redis leaves its batches to
their leases, as a killed worker does; waiting for the claim instead could outlast the
orchestrator's stop timeout (docker stop: 10 s).
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable, Iterable

import structlog
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisClusterException
from redis.exceptions import TimeoutError as RedisTimeoutError

from . import redis_client
from .schedule import ClaimSchedule
from .store import Batch, BufferStore

log = structlog.get_logger("buffer_service.claims")

# How long a stop waits for cancelled chains: redis-py's cluster client can hold a cancellation
# while it refreshes its slot map (worker.py, Worker._listen).
_CANCEL_WAIT_S = 1.0
# How long a claim keeps its slots without an answer. A node that hangs answers nothing for the
# client's socket timeouts (about 20 s): a claim that held its slots all along would keep a
# worker with one free slot (WORKER_CONCURRENCY=1, or all others busy) from every other node.
# Past this the slots go back to the pool; a late answer's batches start only where slots are
# free then, the rest are handed back (release, their attempt not counted) for any worker.
_HOLD_S = 1.0
# What a node that does not answer (or is gone) raises: its chain ends at the first one, since
# each further claim would wait as long (a script error, say a slot moving, concerns one shard).
# (A hung node ends in ConnectionError or TimeoutError after the client's retries; the cluster
# client's "TTL exhausted." follows redirects of one slot that is moving, so it is a shard's.)
_NODE_DOWN = (RedisConnectionError, RedisTimeoutError, RedisClusterException)


class Claims:
    def __init__(self, store: BufferStore, schedule: ClaimSchedule, *,
                 start: Callable[[Batch], None], ended: Callable[[], None],
                 free: Callable[[], int]) -> None:
        self.store = store
        self.schedule = schedule
        self._start = start  # takes a claimed batch on
        self._free = free  # slots neither running a batch nor held by a chain
        self._ended = ended  # a chain ended: its unused slots are free, its node may have more
        self._chains: dict[str, asyncio.Task[None]] = {}  # node -> its chain under way
        self._slots: dict[str, int] = {}  # node -> slots its chain may still fill
        self._error: BaseException | None = None  # unforeseen (a bug): start() raises it

    @property
    def reserved(self) -> int:
        """Slots held by the chains under way, for batches their claims may return."""
        return sum(self._slots.values())

    def start(self, shards: Iterable[int], free: int, now: float) -> int:
        """Start a chain for each node with a due shard and no chain under way, `shards` in the
        order to claim them; returns how many of the `free` slots are left. Raises what a
        chain failed of other than Redis (a bug), as the worker loop's own claims did: a worker
        that cannot claim must end and be restarted, not go on answering nothing."""
        if self._error is not None:
            raise self._error
        by_node: dict[str, list[int]] = {}
        for shard in shards:
            by_node.setdefault(self._node_of(shard), []).append(shard)
        # A share per node, whether due now or not: a node that takes them all and then hangs
        # would keep the others from claiming until its claims fail.
        share = max(free // len(by_node), 1) if by_node else 0
        left = free
        for node, mine in by_node.items():
            if left <= 0:
                break
            if node in self._chains or not any(self.schedule.is_due(s, now) for s in mine):
                continue
            self._slots[node] = min(share, left)
            left -= self._slots[node]
            chain = asyncio.create_task(self._chain(node, mine), name=f"claims-{node or 'redis'}")
            self._chains[node] = chain
            chain.add_done_callback(functools.partial(self._chain_ended, node))
        return left

    def waiting(self, shards: Iterable[int]) -> set[int]:
        """The shards whose node has a chain under way: its end wakes the worker for them."""
        return {shard for shard in shards if self._node_of(shard) in self._chains}

    async def cancel(self) -> None:
        chains = set(self._chains.values())
        for chain in chains:
            chain.cancel()
        if chains:
            await asyncio.wait(chains, timeout=_CANCEL_WAIT_S)

    def _node_of(self, shard: int) -> str:
        return redis_client.node_of(self.store.redis, self.store.keys.due(shard))

    async def _chain(self, node: str, shards: list[int]) -> None:
        clock = asyncio.get_running_loop().time
        schedule = self.schedule
        for shard in shards:
            if not schedule.is_due(shard, clock()):
                continue
            claim = schedule.claiming(shard, clock())
            try:
                now, next_ms, batches = await self._claim(node, shard)
            except redis_client.REDIS_ERRORS as exc:
                log.warning("claim_failed", shard=shard, error=str(exc))
                if isinstance(exc, _NODE_DOWN):
                    for rest in shards[shards.index(shard):]:
                        schedule.failed(rest, clock())
                    return
                schedule.failed(shard, clock())  # one shard's failure: the others are served
                continue
            held = self._slots[node]
            started = batches if held else batches[:max(self._free(), 0)]
            self._slots[node] = max(held - len(started), 0)
            for batch in started:
                self._start(batch)
            for batch in batches[len(started):]:
                await self._hand_back(batch)
            schedule.claimed(claim, now, next_ms)
            if self._slots[node] <= 0:
                return

    async def _claim(self, node: str, shard: int) -> tuple[int, int, list[Batch]]:
        """The claim, its slots given back to the pool if it has not answered within _HOLD_S."""
        claim = asyncio.ensure_future(self.store.claim(shard, self._slots[node]))
        try:
            await asyncio.wait({claim}, timeout=_HOLD_S)
            if not claim.done():
                self._slots[node] = 0
                self._ended()  # the sweep may share them out among the other nodes
            return await claim
        finally:
            if not claim.done():  # a stop cancelled the chain: the claim ends with it
                claim.cancel()
                await asyncio.wait({claim})

    async def _hand_back(self, batch: Batch) -> None:
        try:
            await self.store.release(batch)
        except redis_client.REDIS_ERRORS as exc:
            log.warning("claim_hand_back_failed", batch=batch.id, error=str(exc))  # its lease ends it

    def _chain_ended(self, node: str, chain: asyncio.Task[None]) -> None:
        # Also for a chain cancelled before it ran a line (a stop right after the sweep).
        del self._chains[node], self._slots[node]
        if not chain.cancelled() and (error := chain.exception()) is not None:
            self._error = self._error or error
        self._ended()
