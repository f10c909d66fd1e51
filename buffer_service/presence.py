"""What the customer sees while the bot writes: a typing indicator from the moment a burst's
reply starts being generated until it is posted, skipped, superseded or given up.

Chatwoot's `toggle_typing_status` shows it to agents and on channels that relay it; WhatsApp
gets it through Evolution API's `sendPresence` when Evolution is configured. Every call runs in
a task of its own with a short timeout: a slow or failing indicator never holds a reply back,
it is only logged and counted (`buffer_service_typing_calls`). Each burst's indicator is one
task per target that turns it on, renews it, and turns it off once told to stop, so an `off`
is never sent before the `on` it ends has been answered (or timed out).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable

import aiohttp
import structlog

from . import metrics
from .chatwoot import ChatwootClient, ChatwootError
from .config import Settings
from .store import Batch

log = structlog.get_logger("buffer_service.presence")

# A reply that takes longer than this has its indicator renewed: a Chatwoot client that joined
# after the first toggle, and WhatsApp's presence (which Evolution ends after `delay`), see it.
RENEW_S = 10.0
# Each indicator call's own bound: typing that arrives late is worthless.
CALL_TIMEOUT_S = 5.0
# How long shutdown waits for the last `off` calls before it closes the HTTP session.
CLOSE_WAIT_S = 3.0


class Typing:
    """The indicator of one burst: `start()` before the reply is generated, `stop()` always."""

    def __init__(self, presence: Presence, batch: Batch) -> None:
        self._presence = presence
        self._batch = batch
        self._stopped = asyncio.Event()
        self._started = False

    def start(self) -> None:
        if self._started or self._stopped.is_set() or not self._presence.enabled:
            return
        self._started = True
        batch = self._batch
        chatwoot = self._presence.chatwoot
        if "chatwoot" not in self._presence.refused:
            self._presence.spawn(self._loop(
                "chatwoot",
                lambda on: chatwoot.toggle_typing(batch.account_id, batch.conversation_id, on,
                                                  timeout_s=CALL_TIMEOUT_S), holds=False))
        number = next((m["ph"] for m in reversed(batch.messages) if m.get("ph")), "")
        if self._presence.evolution is not None and number:
            evolution = self._presence.evolution
            self._presence.spawn(self._loop("evolution", lambda on: evolution.presence(number, on),
                                            holds=True))

    def stop(self) -> None:
        """Synchronous, so that it runs in any `finally`, cancelled or not."""
        self._stopped.set()

    async def _loop(self, target: str, call: Callable[[bool], Awaitable[None]], *,
                    holds: bool) -> None:
        """On, renewed every RENEW_S, then off. `holds`: the target keeps an `on` request open
        while it shows the indicator (Evolution, for `delay`), so a stop cancels that request
        instead of waiting for it. Otherwise the `on` is awaited (bounded), so that the `off`
        cannot overtake it; only shutdown (Presence.close) cuts that wait short, and the `off`
        still goes then, bounded by its own call's timeout."""
        loop = asyncio.get_running_loop()
        try:
            while not self._stopped.is_set():
                began = loop.time()
                on = asyncio.ensure_future(self._call(target, call, True))
                if holds:
                    stopped = asyncio.ensure_future(self._stopped.wait())
                    await asyncio.wait([on, stopped], return_when=asyncio.FIRST_COMPLETED)
                    stopped.cancel()
                    on.cancel()
                    await asyncio.gather(on, stopped, return_exceptions=True)
                else:
                    await on
                if target in self._presence.refused:
                    return
                # Renewed on a fixed period from the last `on`, so a target that answers errors
                # at once is not called in a tight loop.
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stopped.wait(),
                                           max(0.0, RENEW_S - (loop.time() - began)))
        finally:
            if target not in self._presence.refused:
                await self._call(target, call, False)

    async def _call(self, target: str, call: Callable[[bool], Awaitable[None]], on: bool) -> None:
        state = "on" if on else "off"
        try:
            await call(on)
        except (ChatwootError, EvolutionError) as exc:
            metrics.TYPING_CALLS.labels(target, state, "error").inc()
            if target == "chatwoot" and isinstance(exc, ChatwootError) and exc.status == 401 \
                    and target not in self._presence.refused:
                # An agent bot's token may not toggle typing (Chatwoot's
                # BOT_ACCESSIBLE_ENDPOINTS): stop asking for the life of the process.
                self._presence.refused.add(target)
                log.info("typing_not_allowed", target=target, error=str(exc))
                return
            log.info("typing_call_failed", target=target, state=state, error=str(exc))
            return
        metrics.TYPING_CALLS.labels(target, state, "ok").inc()


class EvolutionError(Exception):
    """A presence call to Evolution API failed."""


class EvolutionClient:
    """WhatsApp presence through Evolution API: `POST /chat/sendPresence/{instance}` with the
    `apikey` header. Evolution answers only after `delay` ms, having shown `composing` to the
    contact for that long, then `paused`; `paused` ends it at once."""

    def __init__(self, settings: Settings, session: aiohttp.ClientSession) -> None:
        self._url = f"{settings.evolution_api_url}/chat/sendPresence/{settings.evolution_instance}"
        self._headers = {"apikey": settings.evolution_api_key}
        self._session = session

    async def presence(self, number: str, on: bool) -> None:
        delay_ms = int(RENEW_S * 1000) if on else 0
        body = {"number": number, "presence": "composing" if on else "paused", "delay": delay_ms}
        timeout = aiohttp.ClientTimeout(total=delay_ms / 1000 + CALL_TIMEOUT_S)
        try:
            async with self._session.post(self._url, json=body, headers=self._headers,
                                          timeout=timeout) as resp:
                detail = (await resp.content.read(300)).decode("utf-8", "replace")
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise EvolutionError(f"Evolution API did not answer: {type(exc).__name__}: {exc}") from exc
        if resp.status >= 300:
            raise EvolutionError(f"Evolution API answered HTTP {resp.status}: {detail}")


class Presence:
    """Starts and ends the typing indicators of the bursts this worker answers."""

    def __init__(self, settings: Settings, chatwoot: ChatwootClient,
                 evolution: EvolutionClient | None) -> None:
        self.enabled = settings.typing_indicator
        self.chatwoot = chatwoot
        self.evolution = evolution  # None: Evolution API is not configured
        self._tasks: set[asyncio.Task[None]] = set()
        # Targets that refuse our token: not called again until restart.
        self.refused: set[str] = set()

    def typing(self, batch: Batch) -> Typing:
        return Typing(self, batch)

    def spawn(self, coro: Awaitable[None]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def close(self) -> None:
        """Let the last `off` calls go out before the HTTP session closes: CLOSE_WAIT_S for the
        indicators to end on their own, then those still waiting on a slow `on` are cancelled,
        which sends their `off` at once (CALL_TIMEOUT_S at most)."""
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=CLOSE_WAIT_S)
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
