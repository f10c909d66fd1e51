"""Who may call what: Chatwoot's signed (or token-carrying) webhooks, and the admin token.

Webhooks (docs/security.md):
- `CHATWOOT_WEBHOOK_SECRET`: Chatwoot 4.12+ signs each delivery with
  `X-Chatwoot-Signature: sha256=hex(HMAC_SHA256(secret, "{X-Chatwoot-Timestamp}.{raw body}"))`
  (docs/chatwoot.md). Checked on the raw bytes before any parsing, and the
  timestamp must lie within `WEBHOOK_MAX_SKEW_S`, so a captured delivery cannot be replayed later.
- `WEBHOOK_TOKEN`: for Chatwoot versions that do not sign, a shared token in the webhook URL
  (`?token=`, the only thing Chatwoot's webhook form lets you set) or an `X-Webhook-Token` header.
- With both set, either proof is enough. With neither, webhooks are open: the service still
  starts, for a first trial, but says so loudly at start-up and on `/readyz`.

Admin paths (`/admin/*` and the old `/functions/v1/buffer-processor`) need
`Authorization: Bearer <ADMIN_TOKEN>`. Without a configured token they answer 403: closed, not open.
A browser signed in on the operator page (page.py) may use them with its session cookie instead
(sessions.py), and must then send the session's CSRF token with every state-changing request.
The page itself (the sign-in form until signed in), the form's target and the page's static
assets are the only /admin handlers open without either, and only while ADMIN_TOKEN is set.

Every comparison of a secret is constant-time (`hmac.compare_digest`).
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import time
from collections.abc import Awaitable, Callable

import orjson
from aiohttp import web

from . import sessions
from .config import Settings

# The app's settings; read through `request.config_dict` so that handlers of a sub-application
# mounted under /admin find them too.
SETTINGS = web.AppKey("settings", Settings)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

ADMIN_PREFIX = "/admin"
# Methods that change nothing, so a session needs no CSRF token for them.
_SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
NO_WEBHOOK_AUTH_WARNING = ("webhook authentication is off: anyone who finds the webhook URL can make "
                           "the bot spend LLM calls; set CHATWOOT_WEBHOOK_SECRET or WEBHOOK_TOKEN")


def _reject(status: int, error: str, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(body=orjson.dumps({"status": "rejected", "error": error}), status=status,
                        headers=headers, content_type="application/json")


def _same(given: str, expected: str) -> bool:
    # Bytes, because compare_digest refuses non-ASCII str, and a header can hold anything.
    return hmac.compare_digest(given.encode("utf-8", "surrogateescape"), expected.encode())


# -- webhooks ------------------------------------------------------------------------------------
def webhook_auth_mode(settings: Settings) -> str:
    """'signature', 'token', 'signature or token', or 'none' (for logs and /readyz)."""
    modes = [name for name, on in (("signature", settings.chatwoot_webhook_secret),
                                   ("token", settings.webhook_token)) if on]
    return " or ".join(modes) or "none"


def signature_error(raw: bytes, timestamp: str | None, signature: str | None, secret: str,
                    max_skew_s: int, now: float | None = None) -> str:
    """'' when `signature` is Chatwoot's signature of `raw` at a recent `timestamp`, else why not."""
    if not timestamp or not signature:
        return "missing X-Chatwoot-Signature or X-Chatwoot-Timestamp header"
    if not (timestamp.isascii() and timestamp.isdigit()) or len(timestamp) > 12:
        return "X-Chatwoot-Timestamp must be unix seconds"
    now = time.time() if now is None else now
    if abs(now - int(timestamp)) > max_skew_s:
        return f"X-Chatwoot-Timestamp is more than {max_skew_s} s away from this server's clock"
    mac = hmac.new(secret.encode(), timestamp.encode() + b"." + raw, hashlib.sha256).hexdigest()
    if not _same(signature.strip(), "sha256=" + mac):
        return "X-Chatwoot-Signature does not match the body (check CHATWOOT_WEBHOOK_SECRET)"
    return ""


def webhook_auth_error(request: web.Request, raw: bytes, settings: Settings) -> str:
    """'' when the delivery is authentic (or authentication is off), else why it is not."""
    secret, token = settings.chatwoot_webhook_secret, settings.webhook_token
    if not secret and not token:
        return ""
    if token:
        given = request.headers.get("X-Webhook-Token") or request.query.get("token")
        if given is not None and _same(given, token):
            return ""
        if not secret:
            return "missing or wrong webhook token (?token= or X-Webhook-Token)"
    return signature_error(raw, request.headers.get("X-Chatwoot-Timestamp"),
                           request.headers.get("X-Chatwoot-Signature"), secret,
                           settings.webhook_max_skew_s)


# -- admin ---------------------------------------------------------------------------------------
def admin_error(request: web.Request) -> web.Response | None:
    """None when the request carries the admin token or a page session (with its CSRF token if
    it changes something); else the 403 (no token configured, or no CSRF token) or 401."""
    token = request.config_dict[SETTINGS].admin_token
    if not token:
        return _reject(403, "the admin API is disabled: set ADMIN_TOKEN to enable it")
    # A bearer token, right or wrong, decides alone: scripts never depend on a stray cookie.
    if "Authorization" not in request.headers and (csrf := sessions.csrf_of(request, token)):
        if request.method in _SAFE_METHODS or _same(request.headers.get(sessions.CSRF_HEADER, ""), csrf):
            return None
        return _reject(403, f"missing or wrong CSRF token ({sessions.CSRF_HEADER} header)")
    scheme, _, given = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not _same(given.strip(), token):
        return _reject(401, "missing or wrong admin token (Authorization: Bearer <ADMIN_TOKEN>)",
                       headers={"WWW-Authenticate": 'Bearer realm="buffer-service admin"'})
    return None


def public(handler: Handler) -> Handler:
    """Mark a handler under /admin that anyone may call (the sign-in form, the page's assets)."""
    # A mark on the function itself, read by admin_middleware from the matched route; Callable
    # declares no attributes, so the checker is told this one is set on purpose.
    handler.admin_public = True  # type: ignore[attr-defined]
    return handler


def require_admin(handler: Handler) -> Handler:
    """Decorator for a handler outside /admin that only an operator may call."""

    @functools.wraps(handler)
    async def guarded(request: web.Request) -> web.StreamResponse:
        return admin_error(request) or await handler(request)

    return guarded


def _under_admin(request: web.Request) -> bool:
    # The matched resource too, not only the path: a route is found by its decoded path, and
    # this way no spelling of a path that reaches an admin handler gets around the check.
    resource = request.match_info.route.resource
    paths = (request.path, resource.canonical if resource is not None else "")
    return any(p == ADMIN_PREFIX or p.startswith(ADMIN_PREFIX + "/") for p in paths)


@web.middleware
async def admin_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Everything under /admin needs the admin token, whether its handler says so or not."""
    # Without ADMIN_TOKEN nothing under /admin is open, the page's sign-in form included.
    public = (getattr(request.match_info.handler, "admin_public", False)
              and request.config_dict[SETTINGS].admin_token)
    if _under_admin(request) and not public:
        return admin_error(request) or await handler(request)
    return await handler(request)
