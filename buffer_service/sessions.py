"""Browser sessions of the operator page (page.py): a signed cookie and its CSRF token.

Signing in with ADMIN_TOKEN gives the browser a cookie that holds a random CSRF token and the
time it was issued, signed (itsdangerous, HMAC) with a key derived from ADMIN_TOKEN. It never
holds the token itself. Consequences an operator can rely on:
- every process of the service accepts a session any of them issued (same ADMIN_TOKEN, no shared
  session store needed), and nothing is written to Redis;
- a session ends after SESSION_TTL_S, when the browser forgets the cookie (sign out), or for
  every browser at once when ADMIN_TOKEN changes;
- the cookie is HttpOnly (page scripts cannot read it) and SameSite=Strict (another site cannot
  make the browser send it); state-changing requests must also repeat the session's CSRF token
  in the X-CSRF-Token header, which the page reads from its own HTML.

The sign-in form has a CSRF token of its own (double submit): a random value in a short-lived
cookie and in a hidden field of the form; a sign-in must bring both, equal.
"""

from __future__ import annotations

import secrets

from aiohttp import web
from itsdangerous import BadSignature, URLSafeTimedSerializer

COOKIE = "bs_admin_session"
SIGN_IN_COOKIE = "bs_admin_sign_in"
SIGN_IN_FIELD = "csrf"
_SIGN_IN_TTL_S = 3600
CSRF_HEADER = "X-CSRF-Token"
SESSION_TTL_S = 12 * 3600
# Scoped to the admin paths: the webhook paths never see the cookie.
_COOKIE_PATH = "/admin"
_SALT = "buffer-service operator page session"


def _serializer(admin_token: str) -> URLSafeTimedSerializer:
    return URLSafeTimedSerializer(admin_token, salt=_SALT)


def issue(admin_token: str) -> tuple[str, str]:
    """A new session: (cookie value, its CSRF token)."""
    csrf = secrets.token_urlsafe(32)
    return _serializer(admin_token).dumps({"csrf": csrf}), csrf


def csrf_of(request: web.Request, admin_token: str) -> str | None:
    """The CSRF token of the request's session; None without a valid, unexpired session."""
    value = request.cookies.get(COOKIE)
    if not value or not admin_token:
        return None
    try:
        data = _serializer(admin_token).loads(value, max_age=SESSION_TTL_S)
    except BadSignature:  # also SignatureExpired, its subclass
        return None
    csrf = data.get("csrf") if isinstance(data, dict) else None
    return csrf if isinstance(csrf, str) and csrf else None


def _secure(request: web.Request) -> bool:
    # Behind a TLS-terminating proxy the service itself sees plain HTTP.
    return request.secure or request.headers.get("X-Forwarded-Proto", "").lower() == "https"


def set_cookie(response: web.StreamResponse, request: web.Request, value: str) -> None:
    response.set_cookie(COOKIE, value, max_age=SESSION_TTL_S, path=_COOKIE_PATH, httponly=True,
                        samesite="Strict", secure=_secure(request))


def clear_cookie(response: web.StreamResponse, name: str = COOKIE) -> None:
    response.del_cookie(name, path=_COOKIE_PATH)


def new_sign_in_token(response: web.StreamResponse, request: web.Request) -> str:
    """The sign-in form's CSRF token, also set as a cookie on `response`."""
    token = secrets.token_urlsafe(24)
    response.set_cookie(SIGN_IN_COOKIE, token, max_age=_SIGN_IN_TTL_S, path=_COOKIE_PATH,
                        httponly=True, samesite="Strict", secure=_secure(request))
    return token


def sign_in_token_matches(request: web.Request, given: object) -> bool:
    expected = request.cookies.get(SIGN_IN_COOKIE, "")
    return (isinstance(given, str) and bool(expected)
            and secrets.compare_digest(given.encode(), expected.encode()))
