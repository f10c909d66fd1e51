"""The operator page at /admin/: a sign-in form, then one page that refreshes itself.

Everything it shows comes from the admin JSON API (admin.py, i.e. ops.py, the code the CLI
uses); the page only lays it out. Its HTML, script, style sheet and icon are files of this
package (static/), served from here: no CDN, nothing fetched from elsewhere, and a Content
Security Policy that allows nothing else.

Signing in posts ADMIN_TOKEN through the form once; the browser then holds a session cookie
(sessions.py), and the page calls the same /admin endpoints as scripts do, with the session's
CSRF token on every state-changing call (auth.py checks both).
"""

from __future__ import annotations

import hashlib
import html
from functools import cache
from importlib import resources
from string import Template

import structlog
from aiohttp import web

from . import sessions
from .auth import SETTINGS, _same, public

log = structlog.get_logger("buffer_service.page")

PAGE_PATH = "/admin/"
_ASSET_TYPES = {"page.js": "text/javascript", "page.css": "text/css", "favicon.svg": "image/svg+xml"}
_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; "
                               "img-src 'self' data:; connect-src 'self'; form-action 'self'; "
                               "base-uri 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
}


@cache
def _file(name: str) -> bytes:
    return resources.files(__package__).joinpath("static", name).read_bytes()


def _html(body: str, status: int = 200) -> web.Response:
    return web.Response(text=body, status=status, content_type="text/html", charset="utf-8",
                        headers={**_HEADERS, "Cache-Control": "no-store"})


def _sign_in_form(request: web.Request, error: str = "", status: int = 200) -> web.Response:
    notice = f'<p class="notice" role="alert">{html.escape(error)}</p>' if error else ""
    response = _html("", status)
    csrf = sessions.new_sign_in_token(response, request)
    response.text = Template(_file("signin.html").decode()).substitute(
        notice=notice, field=sessions.SIGN_IN_FIELD, csrf=csrf)
    return response


@public
async def view(request: web.Request) -> web.Response:
    """The page for a signed-in browser, else the sign-in form."""
    # Public only while ADMIN_TOKEN is set (auth.admin_middleware): `token` is never empty here.
    token = request.config_dict[SETTINGS].admin_token
    csrf = sessions.csrf_of(request, token)
    if csrf is None:
        return _sign_in_form(request)
    return _html(Template(_file("index.html").decode()).substitute(csrf=html.escape(csrf)))


@public
async def to_page(request: web.Request) -> web.Response:
    raise web.HTTPPermanentRedirect(PAGE_PATH)


@public
async def sign_in(request: web.Request) -> web.Response:
    token = request.config_dict[SETTINGS].admin_token
    # A form on another site must not sign this browser in: current browsers say where a request
    # comes from; every browser must bring the form's own token.
    form = await request.post()
    if (request.headers.get("Sec-Fetch-Site", "same-origin") not in ("same-origin", "none")
            or not sessions.sign_in_token_matches(request, form.get(sessions.SIGN_IN_FIELD))):
        return _sign_in_form(request, "The sign-in form was not sent from this page; try again.", 403)
    given = form.get("token")
    if not isinstance(given, str) or not _same(given.strip(), token):
        log.warning("admin_sign_in_refused", remote=request.remote)
        return _sign_in_form(request, "Wrong admin token.", 401)
    value, _ = sessions.issue(token)
    response = web.Response(status=303, headers={"Location": PAGE_PATH, "Cache-Control": "no-store"})
    sessions.set_cookie(response, request, value)
    sessions.clear_cookie(response, sessions.SIGN_IN_COOKIE)
    log.info("admin_signed_in", remote=request.remote)
    return response


async def sign_out(request: web.Request) -> web.Response:
    """DELETE /admin/session: behind the admin check, so it needs the session's CSRF token."""
    response = web.Response(status=204)
    sessions.clear_cookie(response)
    return response


@public
async def asset(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    if name not in _ASSET_TYPES:
        raise web.HTTPNotFound()
    body = _file(name)
    etag = '"' + hashlib.sha256(body).hexdigest()[:20] + '"'
    headers = {**_HEADERS, "ETag": etag, "Cache-Control": "no-cache"}
    if request.headers.get("If-None-Match") == etag:
        return web.Response(status=304, headers=headers)
    return web.Response(body=body, content_type=_ASSET_TYPES[name], headers=headers)


def add_routes(router: web.UrlDispatcher) -> None:
    """The page's routes inside the /admin sub-application."""
    router.add_get("/", view)
    router.add_post("/session", sign_in)
    router.add_delete("/session", sign_out)
    router.add_get("/assets/{name}", asset)
