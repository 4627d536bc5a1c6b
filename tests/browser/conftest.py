"""Browser fixtures: Debian's Chromium driven by Playwright against a real plane on loopback.

One browser for the whole session (starting Chromium is the slow part), a fresh context (cookies, storage) and
page per test. A test that fails leaves a screenshot of its page in test-results/browser/ (or
$HATCHWAY_TEST_RESULTS/browser/). Uncaught page errors and Content-Security-Policy violations fail the test that
caused them: the console must run under its own policy without a single refusal.

Playwright never downloads a browser here: it launches /usr/bin/chromium (`make installer-test-tools`).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import Browser, BrowserContext, Page, Playwright, ViewportSize, expect, sync_playwright

from tests.conftest import RunningPlane

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
RESULTS = Path(os.environ.get("HATCHWAY_TEST_RESULTS", "test-results")) / "browser"
PASSWORD = "correct horse battery staple"
# How long a page may take to show what a test waits for (Playwright's own default is 5 s; a shared CI machine
# with two cores and six jobs needs more).
EXPECT_TIMEOUT_MS = 15_000


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    """Keep each phase's report on the test item, so the page fixture knows whether the test failed."""
    report = yield
    setattr(item, f"report_{report.when}", report)
    return report


# Package scope, not session: Playwright's sync API keeps an asyncio loop running on the main thread while it is
# open, and every test after these that starts a loop of its own (asyncio.run, async tests) would fail.
@pytest.fixture(scope="package")
def playwright() -> Iterator[Playwright]:
    with sync_playwright() as driver:
        yield driver


@pytest.fixture(scope="package")
def browser(playwright: Playwright) -> Iterator[Browser]:
    if not Path(CHROMIUM).exists():
        pytest.fail(f"the browser tests drive {CHROMIUM}: run `make installer-test-tools` (Debian's chromium)")
    launched = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
    expect.set_options(timeout=EXPECT_TIMEOUT_MS)
    yield launched
    launched.close()


@dataclass
class PageProblems:
    """What went wrong inside the page: uncaught errors and refusals by the Content-Security-Policy."""

    errors: list[str] = field(default_factory=list)

    def watch(self, page: Page) -> None:
        page.on("pageerror", lambda error: self.errors.append(f"uncaught: {error}"))
        page.on(
            "console",
            lambda message: (
                self.errors.append(f"console: {message.text}")
                if re.search(r"Content Security Policy|Refused to", message.text)
                else None
            ),
        )


@dataclass
class Console:
    """A plane with its console, and what a test needs to drive it: accounts per role and a way to open pages."""

    plane: RunningPlane
    browser: Browser
    node: pytest.Item
    contexts: list[BrowserContext] = field(default_factory=list)
    problems: PageProblems = field(default_factory=PageProblems)
    emails: dict[str, str] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"{self.plane.url}/console/"

    def new_page(self, *, phone: bool = False) -> Page:
        viewport: ViewportSize = {"width": 390, "height": 844} if phone else {"width": 1280, "height": 900}
        context = self.browser.new_context(viewport=viewport, base_url=self.plane.url)
        context.set_default_timeout(EXPECT_TIMEOUT_MS)
        self.contexts.append(context)
        page = context.new_page()
        self.problems.watch(page)
        return page

    def account(self, role: str, org: str | None = "acme", email: str | None = None) -> str:
        """An account of `role` (made through the admin API), its email returned; the password is PASSWORD."""
        email = email or f"{role.replace('_', '-')}@example.com"
        body: dict[str, Any] = {"email": email, "name": role, "role": role, "password": PASSWORD}
        if org is not None and role != "plane_admin":
            body["org_id"] = org
        self.plane.admin.post("/accounts", body)
        self.emails[role] = email
        return email

    def sign_in(self, role: str, *, phone: bool = False) -> Page:
        """A page signed in as the account of `role` (made on first use), on its first page."""
        if role not in self.emails:
            self.account(role)
        page = self.new_page(phone=phone)
        page.goto(self.url)
        page.get_by_label("Email").fill(self.emails[role])
        page.get_by_label("Password").fill(PASSWORD)
        page.get_by_role("button", name="Sign in").click()
        expect(page.locator("#logout")).to_be_visible()
        return page

    def open(self, page: Page, name: str, heading: str | None = None) -> None:
        """Open a console page through the navigation, as a user would, and wait for it to show."""
        if page.locator("#menu-toggle").is_visible() and page.locator("nav").is_hidden():
            page.locator("#menu-toggle").click()
        page.locator("nav").get_by_role("link", name=name, exact=True).click()
        expect(page.get_by_role("heading", level=1)).to_have_text(heading or name)

    def screenshot(self, name: str) -> list[Path]:
        RESULTS.mkdir(parents=True, exist_ok=True)
        saved = []
        for i, context in enumerate(self.contexts):
            for j, page in enumerate(context.pages):
                path = RESULTS / f"{name}-{i}-{j}.png"
                page.screenshot(path=str(path), full_page=True)
                saved.append(path)
        return saved

    def close(self) -> None:
        for context in self.contexts:
            context.close()


@pytest.fixture
def console(plane: RunningPlane, browser: Browser, request: pytest.FixtureRequest) -> Iterator[Console]:
    """The plane (with org acme, unless a fixture before made it) and the browser; every page a test opens is
    screenshotted if the test fails."""
    if not any(org["name"] == "acme" for org in plane.admin.get("/orgs")["data"]):
        plane.create_org("acme")
    running = Console(plane, browser, request.node)
    yield running
    report = getattr(request.node, "report_call", None)
    try:
        if report is not None and report.failed:
            name = re.sub(r"[^A-Za-z0-9_.-]+", "_", request.node.name)
            for path in running.screenshot(name):
                print(f"screenshot of the failed page: {path}")
    finally:
        running.close()
    assert not running.problems.errors, running.problems.errors


def api_call(page: Page, method: str, path: str, body: Any = None, *, csrf: bool = True) -> dict[str, Any]:
    """A fetch made by the page itself, with its session cookie (and its CSRF token unless `csrf` is False): what
    a signed-in user could send by hand. Returns the status and the JSON body."""
    result: dict[str, Any] = page.evaluate(
        """async ([method, path, body, csrf]) => {
            const me = await (await fetch('/admin/v1/me')).json();
            const headers = { 'Content-Type': 'application/json' };
            if (csrf && me.csrf_token) headers['X-CSRF-Token'] = me.csrf_token;
            const response = await fetch(path, {
                method, headers, body: body === null ? undefined : JSON.stringify(body) });
            return { status: response.status, body: await response.json().catch(() => null) };
        }""",
        [method, path, body, csrf],
    )
    return result
