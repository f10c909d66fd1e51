"""The HTTP app: Chatwoot webhooks in, a quick answer out, plus health checks, GET /metrics
(metrics.py) and the admin API mounted under /admin (admin.py). Every webhook answer is logged to
the webhook log (journal.py) and counted, by this app's own middleware.

A webhook is acknowledged as soon as its message is stored in Redis, never after the LLM:
Chatwoot waits at most 5 s and, for agent bots, hands the conversation to humans when a
delivery fails (docs/chatwoot.md). If Redis cannot store the message the answer
is 500, so nothing is acknowledged that was not stored, and Chatwoot delivers it again: an
agent bot's delivery is retried only after a 429 or a 500 (a 503 would be final).

A webhook passes, in order: the size cap (413, decided from Content-Length before reading, and
the read itself capped), authentication on the raw bytes (401, auth.py), JSON and field checks
(400). Every rejection happens before anything is stored. A customer message then goes to the
append script, which de-duplicates it first and keeps it in the conversation's history, without
buffering it, when a human is in charge by a newer snapshot or a limit refuses it (rate limits,
limits.py; the buffer's byte cap): acknowledged with 200 and `ignored` so that Chatwoot does
not retry, and counted where operators look.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from importlib import resources

import orjson
import structlog
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.typedefs import Handler, Middleware

from . import admin, metrics
from .auth import (
    NO_WEBHOOK_AUTH_WARNING,
    SETTINGS,
    admin_middleware,
    require_admin,
    webhook_auth_error,
    webhook_auth_mode,
)
from .chatwoot import ChatMessage, Handoff, PayloadError, classify
from .config import Settings
from .flags import Flags
from .journal import WebhookLog
from .keywords import keyword_in
from .limits import RATE_LIMITED
from .ops import Operations
from .redis_client import REDIS_ERRORS
from .store import BufferStore
from .transcripts import Transcripts

log = structlog.get_logger("buffer_service.app")

STORE = web.AppKey("store", BufferStore)
FLAGS = web.AppKey("flags", Flags)
TRANSCRIPTS = web.AppKey("transcripts", Transcripts)
# A webhook's answer body, for its log entry (_answered).
_ANSWER = web.RequestKey("answer", dict[str, object])
# The logger of the per-webhook line, bound once when the app is built: structlog's module-level
# proxy builds a new bound logger on every call, a quarter of the line's cost (bench/hot_path.py).
_LINE = web.AppKey("webhook_line", structlog.typing.FilteringBoundLogger)

# Chatwoot gives up after 5 s and hands the conversation to humans; a Redis that hangs (rather
# than refusing connections) would otherwise hold a webhook for the client's retries of 5 s
# socket timeouts. Past this budget the answer is 500, well before Chatwoot's 5 s. A buffered
# webhook's budget is a deadline its append carries: the round trip that the appends of one
# loop turn share has one timer for all of them (batcher.py); other answers open a scope.
_REDIS_BUDGET_S = 3.0
# Chatwoot sends its body at once; a client that trickles one must not hold a handler forever.
_BODY_TIMEOUT_S = 10.0
# What ends a webhook's store without an answer from Redis: Redis away, its slot map in a
# failover (redis_client.REDIS_ERRORS), or the budget above spent.
_NOT_STORED_ERRORS: tuple[type[Exception], ...] = (*REDIS_ERRORS, TimeoutError)
# What a readiness probe's PING can meet besides those: a refused or reset connection.
_UNREACHABLE: tuple[type[Exception], ...] = (*REDIS_ERRORS, OSError, TimeoutError)


class _QuietBadRequests(logging.Filter):
    """aiohttp logs each malformed HTTP request (a NUL in a header, a broken request line) as an
    error with a traceback: from the internet, that is any scanner filling the logs. The client
    got its 400; like aiohttp does for unknown methods, say it once at debug level, no traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if not isinstance(exc, HttpProcessingError) or exc.code >= 500:
            return True
        record.msg, record.args = f"bad HTTP request: {exc.message}", ()
        record.exc_info, record.exc_text = None, None
        record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        return logging.getLogger(record.name).isEnabledFor(logging.DEBUG)


_BAD_REQUESTS = _QuietBadRequests()


def _json(data: object, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status, headers=headers,
                        content_type="application/json")


def _answered(request: web.Request, body: dict[str, object]) -> web.Response:
    """A webhook's 200 answer; its log entry (_webhook_log) takes `body` as it is instead of
    parsing the answer again (the other answers, rarer, are parsed)."""
    request[_ANSWER] = body
    return _json(body)


# A webhook whose message was not stored: Chatwoot performs an agent bot's job again (3
# attempts, 3 s apart) only after a 429 or a 500 (lib/webhooks/trigger.rb). Any other failure,
# 503 included, is final: the message is never delivered again and Chatwoot moves a pending
# conversation to open. A retry of a message that was stored after all (a WAIT that timed out
# after the write) is answered `duplicate`.
_NOT_STORED = 500


def _unavailable(exc: Exception, status: int = 503) -> web.Response:
    log.error("redis_unavailable", error=str(exc) or type(exc).__name__)
    return _json({"status": "unavailable", "error": "storage unavailable, retry later"},
                 status=status, headers={"Retry-After": "1"})


def _rejected(status: int, error: str) -> web.Response:
    log.info("webhook_rejected", status=status, error=error)
    return _json({"status": "rejected", "error": error}, status=status)


async def _read_capped(request: web.Request, limit: int) -> bytes | None:
    """The body, or None as soon as it is known to be larger than `limit` bytes."""
    if request.content_length is not None and request.content_length > limit:
        return None
    chunks: list[bytes] = []
    size = 0
    while chunk := await request.content.read(limit + 1 - size):
        chunks.append(chunk)
        size += len(chunk)
        if size > limit:
            return None
    return b"".join(chunks)


def _webhook(default_event: str | None) -> Callable[[web.Request], Awaitable[web.Response]]:
    async def handle(request: web.Request) -> web.Response:
        started = time.perf_counter()
        store, settings = request.app[STORE], request.app[SETTINGS]
        if request.content.is_eof():
            # The body came with the headers (Chatwoot's always does): nothing left to wait for,
            # so no timer; one timeout scope per webhook (the Redis budget's) instead of two.
            raw = await _read_capped(request, settings.max_webhook_bytes)
        else:
            try:
                async with asyncio.timeout(_BODY_TIMEOUT_S):
                    raw = await _read_capped(request, settings.max_webhook_bytes)
            except TimeoutError:
                return _rejected(408, "the body did not arrive in time")
        if raw is None:
            return _rejected(413, f"body larger than {settings.max_webhook_bytes} bytes")
        if auth_error := webhook_auth_error(request, raw, settings):
            return _rejected(401, auth_error)
        try:
            payload = orjson.loads(raw)
        except orjson.JSONDecodeError:
            return _rejected(400, "body is not valid JSON")
        if not isinstance(payload, dict):
            return _rejected(400, "body must be a JSON object")
        try:
            decision = classify(payload, settings, default_event)
        except PayloadError as exc:
            return _rejected(400, str(exc))

        msg = decision.message
        body: dict[str, object]
        try:
            if decision.action == "buffer" and msg is not None:
                deadline = asyncio.get_running_loop().time() + _REDIS_BUDGET_S
                body = await _buffer(store, msg, request.app[FLAGS], decision.handoff, deadline)
                if body["status"] == "buffered":
                    # Voice notes are transcribed while the window runs (transcripts.py).
                    request.app[TRANSCRIPTS].start(msg)
            else:
                if decision.action == "note":  # not answered, but kept as history
                    async with asyncio.timeout(_REDIS_BUDGET_S):
                        await store.note(decision)
                body = {"status": "ignored", "reason": decision.reason}
        except _NOT_STORED_ERRORS as exc:
            return _unavailable(exc, _NOT_STORED)
        body.update(decision.extra)
        request.app[_LINE].info("webhook", outcome=body["status"], reason=body.get("reason"),
                 conversation=msg.conv if msg else None, message_id=msg.message_id if msg else None,
                 ms=round((time.perf_counter() - started) * 1000, 2))
        return _answered(request, body)

    return handle


async def _buffer(store: BufferStore, msg: ChatMessage, flags: Flags,
                  snapshot: Handoff | None, deadline: float) -> dict[str, object]:
    # A customer asking for a human (HANDOFF_KEYWORDS) is handed over at once, not after the window.
    asks_human = bool(keyword_in(msg.typed, store.settings.for_inbox(msg.inbox_id).handoff_keywords))
    buffered = (await flags.current(deadline)).buffers(msg.conv, msg.inbox_id) and not asks_human
    result = await store.append(msg, buffered=buffered, snapshot=snapshot, deadline=deadline)
    if not result.buffered and not result.duplicate:
        reason, _, scope = result.trigger.partition(":")
        if reason != "rate_limited":
            return {"status": "ignored", "reason": reason}
        RATE_LIMITED.labels(scope).inc()
        return {"status": "ignored", "reason": reason, "limit": scope}
    body: dict[str, object] = {
        "status": "buffered" if result.buffered else "duplicate",
        "conversation_id": msg.conversation_id,
        "message_id": msg.message_id,
        "buffered_messages": result.count,
    }
    if result.buffered:
        body["flush_in_ms"] = result.deadline_ms - result.now_ms
    return body


async def _legacy_buffer_manager(request: web.Request) -> web.Response:
    # The old edge function took the action as a query parameter; only `handle` existed for
    # webhooks, and its test command sends a bare message without `event`.
    if request.query.get("action", "handle") != "handle":
        return _rejected(400, "unsupported action; use action=handle")
    return await _bare_message(request)


_bare_message = _webhook("message_created")


@require_admin
async def _process_now(request: web.Request) -> web.Response:
    """The old buffer-processor function: make every worker sweep due buffers now."""
    store = request.app[STORE]
    try:
        due = await store.due_count()
        await store.wake_all()
    except REDIS_ERRORS as exc:
        return _unavailable(exc)
    return _json({"status": "triggered", "due_buffers": due})


async def _healthz(request: web.Request) -> web.Response:
    return _json({"status": "ok"})


async def _readyz(request: web.Request) -> web.Response:
    settings = request.app[SETTINGS]
    mode = webhook_auth_mode(settings)
    body: dict[str, object] = {"status": "ready", "redis": "ok", "webhook_auth": mode,
                               "admin_api": "on" if settings.admin_token else "off (ADMIN_TOKEN unset)"}
    if mode == "none":
        body["warnings"] = [NO_WEBHOOK_AUTH_WARNING]
    try:
        async with asyncio.timeout(_REDIS_BUDGET_S):
            await request.app[STORE].redis.ping()
    except _UNREACHABLE as exc:
        body.update(status="unavailable", redis=str(exc) or type(exc).__name__)
        return _json(body, status=503)
    return _json(body)


def _openapi() -> Callable[[web.Request], Awaitable[web.Response]]:
    document = resources.files(__package__).joinpath("openapi_public.json").read_bytes()

    async def serve(request: web.Request) -> web.Response:
        return web.Response(body=document, content_type="application/json")

    return serve


async def _announce_auth(app: web.Application) -> None:
    settings = app[SETTINGS]
    mode = webhook_auth_mode(settings)
    if mode == "none":
        log.warning("WEBHOOK_AUTHENTICATION_OFF", warning=NO_WEBHOOK_AUTH_WARNING)
    else:
        log.info("webhook_auth", mode=mode)
    if not settings.admin_token:
        log.info("admin_api_disabled", note="set ADMIN_TOKEN to enable /admin and buffer-processor")


async def _warm_transcripts(app: web.Application) -> None:
    app[TRANSCRIPTS].warm()


async def _stop_transcripts(app: web.Application) -> None:
    # Running transcriptions get a moment to finish; the rest are redone by the burst's worker.
    await app[TRANSCRIPTS].stop(grace_s=app[SETTINGS].shutdown_grace_s / 2)


def _outcome(request: web.Request, resp: web.StreamResponse) -> tuple[str, dict[str, object]]:
    body: dict[str, object] = request.get(_ANSWER) or {}
    if not body and isinstance(resp, web.Response) and isinstance(resp.body, bytes | bytearray):
        try:
            parsed = orjson.loads(resp.body)
            if isinstance(parsed, dict):
                body = parsed
        except orjson.JSONDecodeError:
            pass
    status = body.get("status")
    if status in ("buffered", "duplicate", "ignored", "rejected", "unavailable"):
        return str(status), body
    return ("unavailable" if resp.status >= 500 else
            "rejected" if resp.status >= 400 else "ignored"), body


def _webhook_log(webhook_log: WebhookLog, paths: Iterable[str]) -> Middleware:
    """Log (journal.py) and count every answer of the webhook paths, whichever check produced it."""
    watched = frozenset(paths)

    def record(request: web.Request, resp: web.StreamResponse) -> None:
        outcome, body = _outcome(request, resp)
        reason = str(body.get("reason") or body.get("error") or "")[:200]
        metrics.webhook(outcome, reason, resp.status)
        webhook_log.record(request.path, outcome, resp.status, reason, body)

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path not in watched:
            return await handler(request)
        try:
            resp = await handler(request)
        except web.HTTPException as exc:  # e.g. 413 from aiohttp's body size limit
            record(request, exc)
            raise
        record(request, resp)
        return resp

    return middleware


_chatwoot_webhook = _webhook(None)
# The paths Chatwoot (or the old edge functions' callers) deliver webhooks to; each answer is logged.
_WEBHOOKS: dict[str, Handler] = {
    "/webhooks/chatwoot": _chatwoot_webhook,
    "/functions/v1/chatwoot-webhook-v2": _chatwoot_webhook,
    "/functions/v1/message-buffer-manager": _legacy_buffer_manager,
}


def create_app(settings: Settings, store: BufferStore, *, flags: Flags, operations: Operations,
               webhook_log: WebhookLog, transcripts: Transcripts) -> web.Application:
    """The service's HTTP app; its parts are built (and closed) by the caller (service.py)."""
    app = web.Application(client_max_size=settings.max_webhook_bytes,
                          middlewares=[admin_middleware, _webhook_log(webhook_log, _WEBHOOKS)])
    app[STORE] = store
    app[SETTINGS] = settings
    app[FLAGS] = flags
    app[TRANSCRIPTS] = transcripts
    app[_LINE] = log.bind()
    app.on_startup.append(_announce_auth)
    app.on_startup.append(_warm_transcripts)
    app.on_shutdown.append(_stop_transcripts)
    logging.getLogger("aiohttp.server").addFilter(_BAD_REQUESTS)
    for path, handler in _WEBHOOKS.items():
        app.router.add_post(path, handler)
    app.router.add_post("/functions/v1/buffer-processor", _process_now)
    app.router.add_get("/healthz", _healthz)
    app.router.add_get("/readyz", _readyz)
    app.router.add_get("/openapi.json", _openapi())
    app.router.add_get("/metrics", metrics.handler(operations))
    admin.setup(app, operations)
    return app


def metrics_app(operations: Operations) -> web.Application:
    """/metrics alone, for a worker-only process (METRICS_PORT)."""
    app = web.Application()
    app.router.add_get("/metrics", metrics.handler(operations))
    return app
