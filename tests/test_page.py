"""The operator page's server side, over real HTTP without a browser: the sign-in form, the session
cookie, CSRF on every state-changing call, the assets, and the bearer API left as it was.
(test_page_browser.py drives the page itself in Chromium.)"""

from __future__ import annotations

import asyncio
import re
import time
from dataclasses import replace
from http.cookies import SimpleCookie
from unittest import mock

import aiohttp
import pytest
from helpers import wait_for, with_port

from buffer_service import sessions
from devtools.payloads import message_payload

TOKEN = "admin-token-for-page-tests-0123456789"


@pytest.fixture
async def svc(settings, make_service):
    return await make_service(replace(settings, admin_token=TOKEN))


@pytest.fixture
async def browser_session():
    # unsafe=True: aiohttp's jar otherwise drops cookies set by an IP address (127.0.0.1).
    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as session:
        yield session


async def form_token(svc, session: aiohttp.ClientSession) -> str:
    """The sign-in form's own CSRF token (its cookie lands in the session's jar)."""
    async with session.get(svc.url + "/admin/") as resp:
        found = re.search(r'name="csrf" value="([^"]+)"', await resp.text())
    return found.group(1) if found else ""


async def sign_in(svc, session: aiohttp.ClientSession, token: str = TOKEN,
                  headers: dict[str, str] | None = None) -> aiohttp.ClientResponse:
    """What the browser does: load the form, post it."""
    data = {"token": token, "csrf": await form_token(svc, session)}
    async with session.post(svc.url + "/admin/session", data=data, headers=headers,
                            allow_redirects=False) as resp:
        await resp.read()
        return resp


async def csrf_of_page(svc, session: aiohttp.ClientSession) -> str:
    async with session.get(svc.url + "/admin/") as resp:
        assert resp.status == 200
        page = await resp.text()
    found = re.search(r'<meta name="csrf-token" content="([^"]+)">', page)
    assert found, "no CSRF token in the page: not signed in?"
    return found.group(1)


async def processing(svc) -> str:
    async with svc.session.get(svc.url + "/admin/flags",
                               headers={"Authorization": f"Bearer {TOKEN}"}) as resp:
        return {f["name"]: f["value"] for f in await resp.json()}["processing"]


async def test_sign_in_form_assets_and_their_headers(svc):
    async with svc.session.get(svc.url + "/admin", allow_redirects=False) as resp:
        assert resp.status == 308 and resp.headers["Location"] == "/admin/"
    async with svc.session.get(svc.url + "/admin/") as resp:
        page = await resp.text()
        assert resp.status == 200 and resp.content_type == "text/html"
        assert 'action="/admin/session"' in page and 'type="password"' in page
        assert "csrf-token" not in page  # not signed in: no page, no token
        csp = resp.headers["Content-Security-Policy"]
        assert "default-src 'none'" in csp and "script-src 'self'" in csp
        assert resp.headers["Cache-Control"] == "no-store"
    # Every asset the page uses is served from the package; nothing refers elsewhere.
    for name, kind in (("page.js", "text/javascript"), ("page.css", "text/css"),
                       ("favicon.svg", "image/svg+xml")):
        async with svc.session.get(f"{svc.url}/admin/assets/{name}") as resp:
            body = await resp.read()
            assert resp.status == 200 and resp.content_type == kind and body
            assert not re.search(rb"https?://(?!www\.w3\.org/2000/svg)", body), name
            etag = resp.headers["ETag"]
        async with svc.session.get(f"{svc.url}/admin/assets/{name}",
                                   headers={"If-None-Match": etag}) as resp:
            assert resp.status == 304
    for name in ("index.html", "signin.html", "nope.js", "..%2Fsessions.py"):
        async with svc.session.get(f"{svc.url}/admin/assets/{name}") as resp:
            assert resp.status in (401, 404) and b"import" not in await resp.read(), name


async def test_wrong_token_is_refused_and_sets_no_cookie(svc, browser_session):
    for wrong in ("", "wrong", TOKEN + "x", TOKEN[:-1]):
        resp = await sign_in(svc, browser_session, wrong)
        assert resp.status == 401
        assert sessions.COOKIE not in {c.key for c in browser_session.cookie_jar}
    async with browser_session.get(svc.url + "/admin/stats") as resp:
        assert resp.status == 401


async def test_session_cookie_is_httponly_strict_scoped_and_never_the_token(svc, browser_session):
    resp = await sign_in(svc, browser_session)
    assert resp.status == 303 and resp.headers["Location"] == "/admin/"
    [header] = [h for h in resp.headers.getall("Set-Cookie") if h.startswith(sessions.COOKIE + "=")]
    morsel = SimpleCookie(header)[sessions.COOKIE]
    assert morsel["httponly"] and morsel["samesite"] == "Strict" and morsel["path"] == "/admin"
    assert int(morsel["max-age"]) == sessions.SESSION_TTL_S
    assert TOKEN not in header
    async with browser_session.get(svc.url + "/admin/stats") as resp:
        assert resp.status == 200 and "totals" in await resp.json()


async def test_cookie_is_secure_behind_a_tls_proxy(svc, browser_session):
    resp = await sign_in(svc, browser_session, headers={"X-Forwarded-Proto": "https"})
    assert resp.status == 303
    assert SimpleCookie(resp.headers.getall("Set-Cookie")[0])[sessions.COOKIE]["secure"]


async def test_state_changes_need_the_csrf_token_of_the_session(svc, browser_session):
    await sign_in(svc, browser_session)
    csrf = await csrf_of_page(svc, browser_session)
    for headers in ({}, {"X-CSRF-Token": "forged"}, {"X-CSRF-Token": csrf[:-1]}):
        async with browser_session.post(svc.url + "/admin/processing/off", headers=headers) as resp:
            assert resp.status == 403 and "CSRF" in (await resp.json())["error"]
        async with browser_session.put(svc.url + "/admin/flags/processing", json={"value": "off"},
                                       headers=headers) as resp:
            assert resp.status == 403
    assert await processing(svc) == "on"

    async with browser_session.post(svc.url + "/admin/processing/off",
                                    headers={"X-CSRF-Token": csrf}) as resp:
        assert resp.status == 200 and await resp.json() == {"processing": "off"}
    assert await processing(svc) == "off"
    async with browser_session.put(svc.url + "/admin/flags/processing", json={"value": "on"},
                                   headers={"X-CSRF-Token": csrf}) as resp:
        assert resp.status == 200
    assert await processing(svc) == "on"

    # Another browser's session has its own CSRF token: one session's token is no good in another.
    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as other:
        await sign_in(svc, other)
        other_csrf = await csrf_of_page(svc, other)
        assert other_csrf != csrf
        async with other.post(svc.url + "/admin/processing/off",
                              headers={"X-CSRF-Token": csrf}) as resp:
            assert resp.status == 403


async def test_forged_foreign_and_expired_sessions_are_refused(svc, settings, make_service):
    good, csrf = sessions.issue(TOKEN)
    foreign, _ = sessions.issue("another-admin-token-0123456789")  # e.g. before ADMIN_TOKEN rotated
    with mock.patch("time.time", return_value=time.time() - sessions.SESSION_TTL_S - 5):
        expired, _ = sessions.issue(TOKEN)
    tampered = good[:-2] + ("AA" if not good.endswith("AA") else "BB")
    for value in (foreign, expired, tampered, "garbage"):
        cookies = {sessions.COOKIE: value}
        async with svc.session.get(svc.url + "/admin/stats", cookies=cookies) as resp:
            assert resp.status == 401, value
        async with svc.session.get(svc.url + "/admin/", cookies=cookies) as resp:
            assert "csrf-token" not in await resp.text()  # the sign-in form again
    async with svc.session.get(svc.url + "/admin/stats", cookies={sessions.COOKIE: good}) as resp:
        assert resp.status == 200
    # Any process with the same ADMIN_TOKEN accepts the session: no shared session store.
    other = await make_service(with_port(replace(settings, admin_token=TOKEN)))
    async with other.session.post(other.url + "/admin/processing/on", cookies={sessions.COOKIE: good},
                                  headers={"X-CSRF-Token": csrf}) as resp:
        assert resp.status == 200


async def test_bearer_api_is_unchanged_and_decides_alone(svc, browser_session):
    bearer = {"Authorization": f"Bearer {TOKEN}"}
    async with svc.session.post(svc.url + "/admin/processing/off", headers=bearer) as resp:
        assert resp.status == 200  # scripts need no CSRF token: they hold no ambient cookie
    async with svc.session.post(svc.url + "/admin/processing/on", headers=bearer) as resp:
        assert resp.status == 200
    await sign_in(svc, browser_session)
    csrf = await csrf_of_page(svc, browser_session)
    # A wrong bearer token is refused even with a valid session next to it.
    async with browser_session.post(svc.url + "/admin/processing/off",
                                    headers={"Authorization": "Bearer wrong", "X-CSRF-Token": csrf}) as resp:
        assert resp.status == 401
    assert await processing(svc) == "on"


async def test_sign_in_needs_the_forms_own_token_and_this_site(svc, browser_session):
    def session_cookie(resp: aiohttp.ClientResponse) -> bool:
        return any(h.startswith(sessions.COOKIE + "=") for h in resp.headers.getall("Set-Cookie", []))

    resp = await sign_in(svc, browser_session, headers={"Sec-Fetch-Site": "cross-site"})
    assert resp.status == 403 and not session_cookie(resp)
    # A form that did not come from this page: no token, a made-up one, or another browser's.
    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as other:
        others = await form_token(svc, other)
    await form_token(svc, browser_session)  # this browser has a form cookie of its own
    for data in ({"token": TOKEN}, {"token": TOKEN, "csrf": "made-up"}, {"token": TOKEN, "csrf": others}):
        async with browser_session.post(svc.url + "/admin/session", data=data,
                                        allow_redirects=False) as resp:
            assert resp.status == 403 and not session_cookie(resp), data
    async with aiohttp.ClientSession() as bare:  # no form cookie at all
        async with bare.post(svc.url + "/admin/session", data={"token": TOKEN, "csrf": others},
                             allow_redirects=False) as resp:
            assert resp.status == 403 and not session_cookie(resp)
    assert (await sign_in(svc, browser_session)).status == 303


async def test_sign_out_needs_csrf_and_ends_the_session(svc, browser_session):
    await sign_in(svc, browser_session)
    csrf = await csrf_of_page(svc, browser_session)
    async with browser_session.delete(svc.url + "/admin/session") as resp:
        assert resp.status == 403
    async with browser_session.delete(svc.url + "/admin/session", headers={"X-CSRF-Token": csrf}) as resp:
        assert resp.status == 204
    async with browser_session.get(svc.url + "/admin/stats") as resp:
        assert resp.status == 401


async def test_page_is_closed_without_admin_token(settings, make_service, browser_session):
    closed = await make_service(settings)
    # Closed like the rest of /admin: the same 403 for the page, its form and its assets.
    for method, path in (("GET", "/admin/"), ("GET", "/admin"), ("GET", "/admin/assets/page.js")):
        async with browser_session.request(method, closed.url + path) as resp:
            assert resp.status == 403 and "ADMIN_TOKEN" in (await resp.json())["error"]
    for token in ("", TOKEN):
        resp = await sign_in(closed, browser_session, token)
        assert resp.status == 403 and len(browser_session.cookie_jar) == 0


async def test_what_the_page_reads_timeline_steps_and_calls_saved(settings, make_service, chatwoot):
    """The page draws a burst from its job record's times and shows stats' llm_calls_saved;
    both come from ops.py, as the CLI's."""
    svc = await make_service(replace(settings, admin_token=TOKEN, buffer_duration_ms=300))
    for i in range(3):
        await svc.webhook(message_payload(message_id=i + 1, conversation_id=90, content=f"m{i}"))
    await wait_for(lambda: len(chatwoot.posts_for(90)) == 1, timeout=10)
    bearer = {"Authorization": f"Bearer {TOKEN}"}
    for _ in range(100):
        async with svc.session.get(svc.url + "/admin/jobs", headers=bearer) as resp:
            [job] = await resp.json()
        if job["status"] == "completed":
            break
        await asyncio.sleep(0.05)
    steps = [job[k] for k in ("first_message_at", "deadline_at", "claimed_at", "posting_at",
                              "processed_at")]
    assert all(steps) and steps == sorted(steps), job
    async with svc.session.get(svc.url + "/admin/stats", headers=bearer) as resp:
        totals = (await resp.json())["totals"]
    assert (totals["messages"], totals["bursts"], totals["llm_calls_saved"]) == (3, 1, 2)
