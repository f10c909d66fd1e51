"""The HTTP app: Chatwoot webhooks in, a quick answer out, plus health checks.

A webhook is acknowledged as soon as its message is stored in Redis, never after the LLM:
Chatwoot waits at most 5 s and, for agent bots, hands the conversation to humans when a
delivery fails (shared/reference/chatwoot.md §4). If Redis cannot store the message the answer
is 503, so nothing is acknowledged that was not stored.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable

import orjson
import structlog
from aiohttp import web
from redis.exceptions import RedisError

from .chatwoot import PayloadError, classify
from .config import Settings
from .store import BufferStore

log = structlog.get_logger("buffer_service.app")

STORE = web.AppKey("store", BufferStore)
SETTINGS = web.AppKey("settings", Settings)

MAX_WEBHOOK_BYTES = 1024 * 1024


def _json(data: object, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status, headers=headers,
                        content_type="application/json")


def _unavailable(exc: Exception) -> web.Response:
    log.error("redis_unavailable", error=str(exc))
    return _json({"status": "unavailable", "error": "storage unavailable, retry later"},
                 status=503, headers={"Retry-After": "1"})


def _webhook(default_event: str | None) -> Callable[[web.Request], Awaitable[web.Response]]:
    async def handle(request: web.Request) -> web.Response:
        started = time.perf_counter()
        store, settings = request.app[STORE], request.app[SETTINGS]
        try:
            payload = orjson.loads(await request.read())
        except orjson.JSONDecodeError:
            return _json({"status": "rejected", "error": "body is not valid JSON"}, status=400)
        if not isinstance(payload, dict):
            return _json({"status": "rejected", "error": "body must be a JSON object"}, status=400)
        try:
            decision = classify(payload, settings, default_event)
        except PayloadError as exc:
            log.info("webhook_rejected", error=str(exc))
            return _json({"status": "rejected", "error": str(exc)}, status=400)

        msg = decision.message
        try:
            if decision.action == "buffer" and msg is not None:
                result = await store.append(msg)
                body: dict[str, object] = {
                    "status": "buffered" if result.buffered else "duplicate",
                    "conversation_id": msg.conversation_id,
                    "message_id": msg.message_id,
                    "buffered_messages": result.count,
                }
                if result.buffered:
                    body["flush_in_ms"] = result.deadline_ms - result.now_ms
            elif decision.action == "note" and msg is not None:
                await store.note(msg)
                body = {"status": "ignored", "reason": decision.reason}
            else:
                body = {"status": "ignored", "reason": decision.reason}
        except RedisError as exc:
            return _unavailable(exc)
        log.info("webhook", outcome=body["status"], reason=body.get("reason"),
                 conversation=msg.conv if msg else None, message_id=msg.message_id if msg else None,
                 ms=round((time.perf_counter() - started) * 1000, 2))
        return _json(body)

    return handle


async def _legacy_buffer_manager(request: web.Request) -> web.Response:
    # The old edge function took the action as a query parameter; only `handle` existed for
    # webhooks, and its test command sends a bare message without `event`.
    if request.query.get("action", "handle") != "handle":
        return _json({"status": "rejected", "error": "unsupported action; use action=handle"},
                     status=400)
    return await _bare_message(request)


_bare_message = _webhook("message_created")


async def _process_now(request: web.Request) -> web.Response:
    """The old buffer-processor function: make every worker sweep due buffers now."""
    store = request.app[STORE]
    try:
        due = await store.due_count()
        await store.wake_all()
    except RedisError as exc:
        return _unavailable(exc)
    return _json({"status": "triggered", "due_buffers": due})


async def _healthz(request: web.Request) -> web.Response:
    return _json({"status": "ok"})


async def _readyz(request: web.Request) -> web.Response:
    try:
        await request.app[STORE].redis.ping()
    except (RedisError, OSError) as exc:
        return _json({"status": "unavailable", "redis": str(exc)}, status=503)
    return _json({"status": "ready", "redis": "ok"})


def create_app(settings: Settings, store: BufferStore) -> web.Application:
    app = web.Application(client_max_size=MAX_WEBHOOK_BYTES)
    app[STORE] = store
    app[SETTINGS] = settings
    webhook = _webhook(None)
    app.router.add_post("/webhooks/chatwoot", webhook)
    app.router.add_post("/functions/v1/chatwoot-webhook-v2", webhook)
    app.router.add_post("/functions/v1/message-buffer-manager", _legacy_buffer_manager)
    app.router.add_post("/functions/v1/buffer-processor", _process_now)
    app.router.add_get("/healthz", _healthz)
    app.router.add_get("/readyz", _readyz)
    return app
