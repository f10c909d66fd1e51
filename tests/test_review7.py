"""Adversarial review of fast3 (e129740: a worker claims only from shards with work, its next
deadline kept per shard, a wake-up's time turned into loop time) and fix6 (webhooks answer 500
when nothing was stored, the listener's re-subscription, RedisClusterException, the drain on a
listener failure). Each test shows one finding against the real service code and fails until it
is fixed. The sweep interval is set to a minute wherever a test shows that a burst waits for the
periodic sweep instead of being claimed promptly, so "not within a few seconds" is unambiguous."""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import replace
from typing import Any

import pytest
from helpers import eventually, job_in, wait_for
from redis.asyncio.cluster import RedisCluster

from buffer_service import worker
from buffer_service.chatwoot import ChatMessage
from buffer_service.store import BufferStore

# Long enough that nothing in a test is claimed by the periodic sweep or a lapsed lease.
_MINUTE_MS = 60_000


def _quiet(settings: Any, **more: Any) -> Any:
    return replace(settings, processing_interval_ms=_MINUTE_MS, processing_lease_ms=_MINUTE_MS,
                   **more)


def _msg(conversation_id: int, message_id: int, text: str) -> ChatMessage:
    return ChatMessage(1, conversation_id, message_id, text, inbox_id=1)


async def _without_expiry_events(redis: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """A Redis that sends no expired-key events and refuses CONFIG (a managed service,
    docs/redis-timing.md): the wake-up messages and the deadline index are all there is."""
    async def refused(node: Any) -> None:
        return None

    monkeypatch.setattr(worker.Worker, "_enable_expiry_events", staticmethod(refused))
    if isinstance(redis, RedisCluster):
        await redis.config_set("notify-keyspace-events", "", target_nodes=RedisCluster.ALL_NODES)
    else:
        await redis.config_set("notify-keyspace-events", "")


async def _settled(claims: list[int]) -> None:
    """Until the worker stops claiming: its first sweeps (start, subscription) are over."""
    await wait_for(lambda: len(claims) > 0, timeout=15)
    seen = -1
    while seen != len(claims):
        seen = len(claims)
        await asyncio.sleep(0.5)


# -- 1. a retry time nobody is told of -------------------------------------------------------------
async def test_another_worker_retries_a_batch_at_its_retry_time(settings, store, redis, llm,
                                                                chatwoot, make_service):
    """Finding: fail.lua puts a retrying batch in the inflight set at its retry time and
    publishes nothing. The worker whose attempt failed looks at the shard again (outcome
    'retrying' is not in _ENDED) and learns the time; every other worker still remembers the
    shard's next time as its last claim saw it (here the failed attempt's 60 s lease). Before
    e129740 any wake-up, for any shard, made them claim from every shard, so in a busy system
    they found it soon (in a quiet one they did not either); now nothing but the periodic sweep
    tells them. Scenario: worker A asks the LLM, worker B starts meanwhile
    (its sweep sees the batch leased for a minute), the LLM answers 500, the batch is retrying,
    and A is stopped (a deploy, a scale-down) before the retry time.
    Expected: B takes the batch at its retry time (seconds), not at the next periodic sweep.
    Fix: fail.lua publishes wake_up(wake, retry_at, KEYS[1]) for a retrying batch."""
    s = _quiet(settings, retry_base_ms=8000)  # first retry 4-8 s after the failure
    llm.delay = 3.0  # A's call is under way while B starts and sweeps
    llm.fail_next(1)
    a = await make_service(s, http=False)
    await store.append(_msg(801, 1, "where is my order?"), buffered=False)
    await wait_for(lambda: len(llm.calls) == 1, timeout=15)
    await make_service(s, http=False)  # B
    await eventually(job_in("retrying", redis, "1:801"), timeout=15)
    llm.delay = 0.0
    await a.close()
    await wait_for(lambda: len(llm.calls) == 2, timeout=20)
    await wait_for(lambda: bool(chatwoot.posts_for(801)), timeout=10)


# -- 2. a wake-up's time turned into loop time with an offset measured late ------------------------
async def test_a_claim_answer_that_arrives_late_does_not_delay_the_next_wakeup(
        settings, store, redis, llm, chatwoot, make_service, monkeypatch):
    """Finding: Worker._due_at turns a wake-up's Redis time into loop time with _offset_ms,
    measured as "the claim's Redis now minus the loop clock read after the answer was handled".
    Whatever passed between Redis reading its clock and the sweep resuming (a slow link, a big
    answer to decode, a loop busy with other batches, a GC pause) is taken for clock offset, and
    every later wake-up for a shard whose next time is known is put that much later, until some
    claim measures again (a quiet worker claims nothing until then). Here one claim's answer
    reaches the sweep 8 s after Redis answered; then an operator flush (or a burst due at once)
    in another conversation waits those 8 s. With the p99 <= 50 ms promise, tens of ms of
    such delay already matter. Expiry events are off (a managed Redis): the TTL key's event
    would otherwise mask the delay here, as it does not under load (docs/redis-timing.md).
    Expected: a burst made due at once is claimed within seconds whatever an earlier claim's
    answer took. Fix: measure the offset from the loop clock read before the claim is sent
    (a late answer then makes wake-ups early, one spare claim, never late)."""
    s = _quiet(settings)
    await _without_expiry_events(redis, monkeypatch)
    real = BufferStore.claim
    claims: list[int] = []
    stall = {"s": 0.0}

    async def claim(self: BufferStore, shard: int, limit: int) -> Any:
        answer = await real(self, shard, limit)
        claims.append(shard)
        if answer[2] and stall["s"]:
            delay, stall["s"] = stall["s"], 0.0
            await asyncio.sleep(delay)  # the answer reaches the sweep this much later
        return answer

    monkeypatch.setattr(BufferStore, "claim", claim)
    await make_service(s, http=False)
    await _settled(claims)
    stall["s"] = 8.0
    # Due after its window: claimed at its deadline, not while copies of its wake-up (one per
    # primary of a cluster) still arrive, which would make the worker claim again at once.
    await store.append(_msg(701, 1, "first"))
    await wait_for(lambda: bool(chatwoot.posts_for(701)), timeout=20)
    await _settled(claims)
    await store.append(_msg(702, 1, "second"), buffered=False)
    await wait_for(lambda: bool(chatwoot.posts_for(702)), timeout=4)


# -- 3. the wake-up listener dies of a key name that is not UTF-8 ----------------------------------
async def test_an_expired_key_whose_name_is_not_utf8_does_not_end_the_wakeups(
        settings, store, redis, llm, chatwoot, make_service):
    """Finding: the listener decodes every message of the expired-key channel with
    bytes.decode() (strict UTF-8). That channel carries the expiry of every key of the
    database, not only the service's (KEY_PREFIX exists so that a Redis can be shared): an
    expiring key of another application whose name is binary raises UnicodeDecodeError, which
    none of _listen's handlers takes. The listener ends for good while the worker loop goes
    on: no wake-up reaches it any more, every burst waits for the periodic sweep (and the stop
    re-raises the error).
    Expected: a message the listener cannot read is skipped; the next burst is still claimed
    promptly. Fix: decode with errors="replace" (or compare bytes) and never let one message
    end the listener."""
    s = _quiet(settings)
    await make_service(s, http=False)
    # Two probes: the second is claimed only through the subscription (a wake-up or the look
    # made on subscribing), so it stands once the listener is up.
    for conv in (901, 902):
        await store.append(_msg(conv, 1, "probe"), buffered=False)
        await wait_for(lambda conv=conv: bool(chatwoot.posts_for(conv)), timeout=15)
    await redis.set(b"other-app:\xff\xfe", b"1", px=1)
    await asyncio.sleep(0.05)
    assert await redis.get(b"other-app:\xff\xfe") is None  # expired now: its event is out
    await asyncio.sleep(0.5)
    await store.append(_msg(903, 1, "still answered promptly?"), buffered=False)
    await wait_for(lambda: bool(chatwoot.posts_for(903)), timeout=5)


# -- 4. a deadline moved earlier without a wake-up ---------------------------------------------------
async def test_a_deadline_a_shorter_window_moves_earlier_is_claimed_at_that_deadline(
        settings, store, redis, llm, chatwoot, make_service, monkeypatch):
    """Finding (older than fast3; the per-shard memory of e129740 leaves it no other way out):
    append.lua publishes a wake-up only for a new due entry or one due at once. A webhook
    server whose window is shorter than the one that set the conversation's deadline (a rolling
    change of MESSAGE_BUFFER_DURATION_MS or INBOX_SETTINGS_FILE: old and new processes take
    webhooks side by side) moves that deadline earlier in silence, and the worker, which knows
    the older, later deadline, sleeps until it. Expiry events are off (a managed Redis): the TTL
    key's event is the only other hint, late or never (docs/redis-timing.md).
    Scenario: message 1 through a process with a 30 s window, message 2 through one with a 1 s
    window. Expected: the burst is claimed about 1 s after message 2, not 30 s after message 1.
    Fix: append.lua reads the score it replaces and publishes when the deadline moved earlier."""
    s = _quiet(settings)
    await _without_expiry_events(redis, monkeypatch)
    await make_service(s, http=False)
    old = BufferStore(redis, replace(s, buffer_duration_ms=30_000, max_buffer_age_ms=_MINUTE_MS))
    new = BufferStore(redis, replace(s, buffer_duration_ms=1000, max_buffer_age_ms=_MINUTE_MS))
    # The worker is subscribed once a burst due at once is answered after its start.
    await store.append(_msg(1001, 1, "probe"), buffered=False)
    await wait_for(lambda: bool(chatwoot.posts_for(1001)), timeout=15)
    await old.append(_msg(1002, 1, "hi"))
    await asyncio.sleep(0.5)  # its wake-up is in: the worker knows the 30 s deadline
    await new.append(_msg(1002, 2, "are you there?"))
    await wait_for(lambda: bool(chatwoot.posts_for(1002)), timeout=6)


# -- 5. a subscription whose connection died in silence ----------------------------------------------
class _Proxy:
    """A TCP hop between the service and Redis, like the NAT or load balancer of a cloud
    network: `drop_subscriptions` forgets the flows that subscribed (the idle ones, which a NAT
    drops after a few idle minutes), so what either side sends on them is lost without a
    reset; new connections pass as before."""

    def __init__(self, port: int) -> None:
        self.target = port
        self.port = 0
        self._links: list[dict[str, bool]] = []
        self._writers: list[asyncio.StreamWriter] = []
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for writer in self._writers:
            writer.close()

    def drop_subscriptions(self) -> int:
        dropped = [link for link in self._links if link["subscribed"]]
        for link in dropped:
            link["dead"] = True
        return len(dropped)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target)
        link = {"subscribed": False, "dead": False}
        self._links.append(link)
        self._writers += [writer, up_writer]

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter, outbound: bool) -> None:
            while data := await src.read(65536):
                if outbound and b"SUBSCRIBE" in data.upper():
                    link["subscribed"] = True
                if not link["dead"]:
                    dst.write(data)
                    await dst.drain()

        try:
            await asyncio.gather(pipe(reader, up_writer, True), pipe(up_reader, writer, False),
                                 return_exceptions=True)
        finally:
            writer.close()
            up_writer.close()


async def test_a_subscription_whose_connection_died_in_silence_is_made_again(
        settings, store, redis, llm, chatwoot, make_service):
    """Finding (older than fast3 and fix6, which re-subscribe only after an error or a clean
    end): the wake-up subscription reads without a timeout (socket_timeout=None, no health
    check, no TCP keepalive: redis_client.standalone(blocking=True)), and a listener sends
    nothing. A flow that dies without a reset (a NAT or load balancer that dropped it after
    its idle timeout, e.g. 350 s on AWS, 4 min on Azure; a Redis host gone without a word)
    leaves listen() waiting forever: no error, so no new subscription, and no wake-up or expiry
    event reaches the worker again. Every burst then waits for the periodic sweep, silently.
    Scenario: the subscription's flow is dropped in the network; a burst due at once arrives.
    Expected: the worker notices a dead subscription within seconds and subscribes again; the
    burst is claimed promptly. Fix: a heartbeat the listener expects (e.g. its own message
    on the wake channel, or a PING on the pubsub connection, every few seconds), its absence
    counted as a lost subscription; TCP keepalive as well."""
    if isinstance(redis, RedisCluster):
        pytest.skip("the proxy stands in front of one server")
    target = int(settings.redis_url.rsplit(":", 1)[1].split("/")[0])
    proxy = _Proxy(target)
    await proxy.start()
    try:
        s = _quiet(settings, redis_url=f"redis://127.0.0.1:{proxy.port}/0")
        svc = await make_service(s, http=False)
        for conv in (1101, 1102):  # the second is claimed through the subscription (see 3)
            await store.append(_msg(conv, 1, "probe"), buffered=False)
            await wait_for(lambda conv=conv: bool(chatwoot.posts_for(conv)), timeout=15)
        assert proxy.drop_subscriptions() == 1
        await asyncio.sleep(1)
        await store.append(_msg(1103, 1, "still answered promptly?"), buffered=False)
        await wait_for(lambda: bool(chatwoot.posts_for(1103)), timeout=15)
    finally:
        with contextlib.suppress(Exception):
            await svc.close()
        await proxy.stop()
