"""The operator page in a real headless Chromium (Debian's `chromium` package, driven by Playwright
pointed at it; no browser is downloaded): sign in, watch a buffer count down and flush, retry a
failed job, switch processing off and on, and the refusals (wrong token, POST without CSRF token).

Screenshots at desktop and phone width go to artifacts/screenshots/ (not committed; CI keeps them
as artefacts). Skipped, saying why, when Chromium or Playwright is missing; the server side of
sessions and CSRF is tested without a browser in test_page.py."""

from __future__ import annotations

import asyncio
import os
import shutil
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import pytest
from helpers import ROOT, wait_for

from buffer_service import sessions
from buffer_service.flags import Flags
from devtools.payloads import message_payload

TOKEN = "admin-token-for-browser-tests-0123456789"
CHROMIUM = os.environ.get("CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
SHOTS = ROOT / "artifacts" / "screenshots"
DESKTOP = {"width": 1280, "height": 900}
PHONE = {"width": 390, "height": 844}
# Long enough to watch the page count down across a few of its 2 s refreshes.
WINDOW_MS = 6000

try:
    from playwright.async_api import Browser, Page, async_playwright, expect
except ImportError:  # pragma: no cover - the test extras install it
    async_playwright = None

pytestmark = [
    pytest.mark.skipif(async_playwright is None,
                       reason="the playwright package is missing: pip install -e '.[test]'"),
    pytest.mark.skipif(CHROMIUM is None,
                       reason="no chromium on PATH: apt-get install chromium (`make test` does it as root)"),
]


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    async with async_playwright() as pw:
        # --no-sandbox: CI runs as root, where Chromium's sandbox cannot start.
        chromium = await pw.chromium.launch(executable_path=CHROMIUM,
                                            args=["--no-sandbox", "--disable-dev-shm-usage"])
        yield chromium
        await chromium.close()


@pytest.fixture
async def svc(settings, make_service):
    return await make_service(replace(settings, admin_token=TOKEN, buffer_duration_ms=WINDOW_MS,
                                      max_buffer_age_ms=60_000, max_attempts=1))


async def open_page(browser: Browser, svc, viewport: dict[str, int] = DESKTOP) -> Page:
    page = await browser.new_page(viewport=viewport)
    page.set_default_timeout(15_000)
    # Script errors and Content Security Policy violations end up here.
    page.problems = []  # type: ignore[attr-defined]
    page.on("pageerror", lambda error: page.problems.append(str(error)))
    page.on("console", lambda msg: msg.type == "error" and page.problems.append(msg.text))
    await page.goto(svc.url + "/admin/")
    return page


async def sign_in(page: Page, token: str = TOKEN) -> None:
    await page.fill("#token", token)
    await page.click("button[type=submit]")


async def signed_in(browser: Browser, svc, viewport: dict[str, int] = DESKTOP) -> Page:
    page = await open_page(browser, svc, viewport)
    await sign_in(page)
    await expect(page.locator("#updated")).to_contain_text("updated", timeout=15_000)
    return page


async def session_cookies(page: Page) -> list[dict]:
    return [c for c in await page.context.cookies() if c["name"] == sessions.COOKIE]


def countdown_s(text: str) -> float:
    assert text.startswith("flush in "), text
    return float(text.removeprefix("flush in ").removesuffix(" s"))


async def shoot(page: Page, name: str) -> Path:
    SHOTS.mkdir(parents=True, exist_ok=True)
    path = SHOTS / f"{name}.png"
    await page.screenshot(path=str(path), full_page=True)
    return path


async def test_wrong_token_is_refused_then_sign_in_works(browser, svc):
    page = await open_page(browser, svc)
    await expect(page.locator("h1")).to_have_text("Sign in")
    await sign_in(page, "not-the-token")
    await expect(page.locator(".notice")).to_have_text("Wrong admin token.")
    assert await session_cookies(page) == []
    await shoot(page, "sign-in-refused")

    await sign_in(page)
    await expect(page.locator("#updated")).to_contain_text("updated")
    [cookie] = await session_cookies(page)
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict" and TOKEN not in cookie["value"]
    # Page scripts cannot read the session cookie.
    assert await page.evaluate("document.cookie") == ""

    await page.get_by_role("button", name="Sign out").click()
    await expect(page.locator("h1")).to_have_text("Sign in")
    assert await session_cookies(page) == []


async def test_buffer_counts_down_and_flushes(browser, svc, chatwoot):
    page = await signed_in(browser, svc)
    for i, text in enumerate(["hi", "my order is late", "order 1234"]):
        await svc.webhook(message_payload(message_id=100 + i, conversation_id=42, content=text))
    row = page.locator('#buffers .row[data-conversation="1:42"]')
    await expect(row).to_contain_text("3 messages")
    countdown = row.locator(".countdown")
    await expect(countdown).to_contain_text("flush in")
    first = countdown_s(await countdown.inner_text())
    await page.wait_for_timeout(1200)
    later = countdown_s(await countdown.inner_text())
    assert 0 < later < first <= WINDOW_MS / 1000, (first, later)
    await shoot(page, "desktop-buffer-open")

    # At its deadline the buffer leaves the list and shows up as one burst with its steps.
    await expect(row).to_have_count(0, timeout=WINDOW_MS + 10_000)
    burst = page.locator("#timeline .burst", has_text="1:42")
    await expect(burst.locator(".badge")).to_have_text("completed", timeout=10_000)
    steps = burst.locator(".steps")
    for step in ("in", "deadline", "claimed", "LLM", "posted"):
        await expect(steps).to_contain_text(step)
    assert [p.body["content"] for p in chatwoot.posts_for(42)] == [
        "Reply to: hi | my order is late | order 1234"]
    # Three messages, one LLM call: two saved.
    await expect(page.locator(".kpi", has_text="LLM calls saved").locator("strong")).to_have_text("2")

    # "Flush now" answers a buffer before its deadline.
    await svc.webhook(message_payload(message_id=200, conversation_id=43, content="now please"))
    other = page.locator('#buffers .row[data-conversation="1:43"]')
    await other.get_by_role("button", name="Flush now").click()
    await expect(page.locator("#timeline .burst", has_text="1:43").locator(".badge")).to_have_text(
        "completed")
    await wait_for(lambda: len(chatwoot.posts_for(43)) == 1, timeout=5)
    await expect(page.locator("#timeline .burst", has_text="1:43")).to_contain_text("manual")


async def test_failed_job_is_shown_and_retried(browser, svc, llm, chatwoot):
    page = await signed_in(browser, svc)
    llm.fail_next(1, status=400)  # a request the LLM refuses: no retry helps, the job fails
    await svc.webhook(message_payload(message_id=300, conversation_id=51, content="hello?"))
    await page.locator('#buffers .row[data-conversation="1:51"]').get_by_role(
        "button", name="Flush now").click()
    failed = page.locator("#failed .failed-job", has_text="1:51")
    await expect(failed.locator(".error")).to_contain_text("400")
    await expect(page.locator(".kpi", has_text="Failed jobs").locator("strong")).to_have_text("1")
    assert chatwoot.posts_for(51) == []

    await failed.get_by_role("button", name="Retry").click()
    await expect(page.locator("#toast")).to_contain_text("queued again")
    await expect(failed).to_have_count(0)
    await wait_for(lambda: len(chatwoot.posts_for(51)) == 1, timeout=10)
    await expect(page.locator("#failed")).to_contain_text("No failed jobs.")


async def test_processing_switch_off_and_on(browser, svc, redis, settings):
    flags = Flags(redis, settings)
    page = await signed_in(browser, svc)
    switch = page.locator('button[role=switch][data-flag="processing"]')
    await expect(switch).to_have_attribute("aria-checked", "true")

    page.once("dialog", lambda dialog: asyncio.ensure_future(dialog.accept()))
    await switch.click()
    await expect(switch).to_have_attribute("aria-checked", "false")
    await expect(page.locator(".kpi", has_text="Processing").locator("strong")).to_have_text("Off")
    assert {f["name"]: f["value"] for f in await flags.table()}["processing"] == "off"

    await switch.click()  # switching on asks nothing
    await expect(switch).to_have_attribute("aria-checked", "true")
    assert {f["name"]: f["value"] for f in await flags.table()}["processing"] == "on"

    # A flag that takes a value: typed and saved.
    await page.fill('input[data-flag="buffering_percent"]', "40")
    await page.locator(".flag", has_text="Buffering percent").get_by_role("button", name="Save").click()
    await expect(page.locator("#toast")).to_contain_text("Buffering percent: 40")
    assert {f["name"]: f["value"] for f in await flags.table()}["buffering_percent"] == "40"

    # Declining the confirmation changes nothing.
    page.once("dialog", lambda dialog: asyncio.ensure_future(dialog.dismiss()))
    await switch.click()
    await page.wait_for_timeout(500)
    await expect(switch).to_have_attribute("aria-checked", "true")
    assert {f["name"]: f["value"] for f in await flags.table()}["processing"] == "on"


async def test_post_without_csrf_token_is_refused_in_the_browser(browser, svc, redis, settings):
    page = await signed_in(browser, svc)
    # The signed-in browser sends its cookie, but a request without the page's CSRF token fails.
    status = await page.evaluate(
        "fetch('/admin/processing/off', {method: 'POST'}).then(r => r.status)")
    assert status == 403
    assert {f["name"]: f["value"] for f in await Flags(redis, settings).table()}["processing"] == "on"
    status = await page.evaluate("""fetch('/admin/processing/off', {method: 'POST', headers:
        {'X-CSRF-Token': document.querySelector('meta[name=csrf-token]').content}}).then(r => r.status)""")
    assert status == 200


async def test_screenshots_desktop_and_phone(browser, svc, llm, chatwoot):
    """A page with every section filled, at both widths (the README's picture is one of them)."""
    for conv, texts in ((61, ["hi", "is the shop open on sunday?"]), (62, ["hello"]),
                        (63, ["order 88", "it arrived broken", "photo attached", "what now?"])):
        for i, text in enumerate(texts):
            await svc.webhook(message_payload(message_id=conv * 100 + i, conversation_id=conv,
                                              content=text))
            await asyncio.sleep(0.3)
    page = await signed_in(browser, svc)
    await wait_for(lambda: all(chatwoot.posts_for(c) for c in (61, 62, 63)), timeout=WINDOW_MS / 1000 + 10)
    llm.fail_next(1, status=400)
    await svc.webhook(message_payload(message_id=6400, conversation_id=64, content="refund?"))
    await page.locator('#buffers .row[data-conversation="1:64"]').get_by_role(
        "button", name="Flush now").click()
    await expect(page.locator("#failed .failed-job")).to_have_count(1)
    for conv, texts in ((65, ["good morning", "do you ship to Porto?"]), (66, ["thanks!"])):
        for i, text in enumerate(texts):
            await svc.webhook(message_payload(message_id=conv * 100 + i, conversation_id=conv,
                                              content=text))
    await expect(page.locator("#buffers .row")).to_have_count(2)
    await expect(page.locator("#timeline .burst")).to_have_count(4)
    # Each burst's bar shows its steps (styles set through the CSSOM pass the CSP).
    assert await page.locator("#timeline .burst .bar span").count() >= 4 * 3
    await expect(page.locator("#toast.show")).to_have_count(0)
    await shoot(page, "desktop")
    assert page.problems == []

    # The two buffers above may have flushed by now (6 s): one more, so the phone shows one open.
    await svc.webhook(message_payload(message_id=6700, conversation_id=67, content="hola"))
    phone = await signed_in(browser, svc, PHONE)
    await expect(phone.locator("#timeline .burst").nth(3)).to_be_visible()
    # Nothing wider than the screen: the page folds to one column.
    assert await phone.evaluate("document.documentElement.scrollWidth") <= PHONE["width"]
    await shoot(phone, "phone")
    await phone.screenshot(path=str(SHOTS / "phone-top.png"))
    await phone.locator("#timeline").screenshot(path=str(SHOTS / "phone-timeline.png"))
    assert phone.problems == []
