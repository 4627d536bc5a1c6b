"""Who sees what: each role signs in and finds only its pages, and the API refuses what the role may not do even
when the page is bypassed; the console's own protections (CSP and other headers, CSRF, sign-out)."""

from __future__ import annotations

import re
from typing import Any

import httpx
import pytest
from playwright.sync_api import expect

from server.console.pages import CONTENT_SECURITY_POLICY
from tests.browser.conftest import PASSWORD, Console, api_call

NAV = {
    "plane_admin": [
        "Overview", "Orgs & members", "API keys", "Providers", "Routing rules", "Limits & quotas", "Cache policy",
        "Prices", "Nodes", "Usage & cost", "Node earnings", "Audit log", "Playground",
    ],
    "org_admin": [
        "Overview", "Orgs & members", "API keys", "Providers", "Routing rules", "Limits & quotas", "Cache policy",
        "Prices", "Nodes", "Usage & cost", "Node earnings", "Audit log", "Playground",
    ],
    "developer": ["Overview", "API keys", "Usage & cost", "Playground"],
    "provider": ["Nodes", "Node earnings"],
}  # fmt: skip

# (method, path, body) each role may not call, and must be refused with 403 however it is sent.
REFUSED: dict[str, list[tuple[str, str, dict[str, Any] | None]]] = {
    "org_admin": [("POST", "/admin/v1/orgs", {"name": "other"}), ("POST", "/admin/v1/admin-key/rotate", {})],
    "developer": [
        ("GET", "/admin/v1/providers", None),
        ("PUT", "/admin/v1/routes", {"org": "acme", "model": "x", "targets": []}),
        ("GET", "/admin/v1/audit", None),
        ("GET", "/admin/v1/nodes", None),
    ],
    "provider": [
        ("GET", "/admin/v1/keys", None),
        ("GET", "/admin/v1/console/stats", None),
        ("POST", "/admin/v1/providers", {"org": "acme", "name": "p", "base_url": "http://x", "models": ["m"]}),
    ],
}


@pytest.mark.parametrize("role", sorted(NAV))
def test_each_role_sees_only_its_pages(console: Console, role: str) -> None:
    page = console.sign_in(role)
    links = page.locator("nav").get_by_role("link")
    expect(links).to_have_text(NAV[role])
    # A page outside the role is not opened by its address either: the first allowed page is shown instead.
    page.goto(console.url + "#/audit")
    expect(page.get_by_role("heading", level=1)).to_have_text("Audit log" if "Audit log" in NAV[role] else NAV[role][0])


@pytest.mark.parametrize("role", sorted(REFUSED))
def test_the_api_refuses_what_the_role_may_not_do_even_from_its_own_session(console: Console, role: str) -> None:
    page = console.sign_in(role)
    for method, path, body in REFUSED[role]:
        answer = api_call(page, method, path, body)
        assert answer["status"] == 403, (method, path, answer)
        assert answer["body"]["error"]["type"] == "permission_error"


def test_an_unsafe_call_without_the_csrf_token_is_refused(console: Console) -> None:
    page = console.sign_in("org_admin")
    answer = api_call(page, "POST", "/admin/v1/keys", {"org": "acme", "name": "forged"}, csrf=False)
    assert answer["status"] == 403
    assert answer["body"]["error"]["code"] == "csrf_failed"
    assert console.plane.admin.get("/keys", org="acme")["data"] == []


def test_signing_out_ends_the_session(console: Console) -> None:
    page = console.sign_in("developer")
    page.get_by_role("button", name="Sign out").click()
    expect(page.get_by_role("button", name="Sign in")).to_be_visible()
    assert api_call(page, "GET", "/admin/v1/keys")["status"] == 401


def test_a_wrong_password_is_refused_with_a_message(console: Console) -> None:
    console.account("developer")
    page = console.new_page()
    page.goto(console.url)
    page.get_by_label("Email").fill(console.emails["developer"])
    page.get_by_label("Password").fill("not the password")
    page.get_by_role("button", name="Sign in").click()
    expect(page.get_by_role("alert")).to_have_text("Incorrect email or password.")
    expect(page.locator("nav")).to_be_hidden()


def test_signing_in_works_with_the_keyboard_alone(console: Console) -> None:
    console.account("org_admin")
    page = console.new_page()
    page.goto(console.url)
    page.get_by_label("Email").focus()
    page.keyboard.type(console.emails["org_admin"])
    page.keyboard.press("Tab")
    page.keyboard.type(PASSWORD)
    page.keyboard.press("Enter")
    expect(page.get_by_role("heading", level=1)).to_have_text("Overview")
    # Every page is a link in the navigation, reachable by Tab and opened by Enter.
    page.locator("nav").get_by_role("link", name="API keys").focus()
    page.keyboard.press("Enter")
    expect(page.get_by_role("heading", level=1)).to_have_text("API keys")


def test_an_invitation_link_creates_the_account_and_signs_it_in(console: Console) -> None:
    admin = console.sign_in("org_admin")
    console.open(admin, "Orgs & members")
    invite = admin.get_by_role("form", name="Invite")
    invite.get_by_label("Email").fill("newcomer@example.com")
    invite.get_by_label("Role").select_option("developer")
    invite.get_by_role("button", name="Create invitation link").click()
    link = admin.locator("[data-secret] code").inner_text()
    assert "/console/accept#token=" in link

    page = console.new_page()
    page.goto(link)
    # The token leaves the address bar (and the history) as soon as the page has read it.
    expect(page).not_to_have_url(link)
    page.get_by_label("Name").fill("Newcomer")
    page.get_by_label("Password").fill(PASSWORD)
    page.get_by_role("button", name="Create account").click()
    expect(page.locator("#whoami")).to_contain_text("newcomer@example.com")
    expect(page.locator("nav").get_by_role("link")).to_have_text(NAV["developer"])


def test_console_responses_carry_the_strict_policy_and_assets_are_cached(console: Console) -> None:
    shell = httpx.get(console.url)
    assert shell.status_code == 200
    assert shell.headers["content-security-policy"] == CONTENT_SECURITY_POLICY
    assert shell.headers["x-content-type-options"] == "nosniff"
    assert shell.headers["referrer-policy"] == "no-referrer"
    assert shell.headers["cache-control"] == "no-cache"
    assets = re.findall(r'(?:src|href)="(/console/assets/[^"]+)"', shell.text)
    assert len(assets) == 4  # the stylesheet, the entry module and the two it preloads
    for asset in assets:
        answer = httpx.get(console.plane.url + asset)
        assert answer.status_code == 200, asset
        assert answer.headers["cache-control"] == "public, max-age=31536000, immutable"
        assert answer.headers["content-security-policy"] == CONTENT_SECURITY_POLICY
        assert answer.headers["content-type"].split(";")[0] in ("text/javascript", "text/css")
    assert httpx.get(console.plane.url + "/").headers["location"] == "/console/"
    for outside in ("%2e%2e/%2e%2e/pages.py", "..%2f..%2fpages.py", "index.html", ".hidden.js"):
        assert httpx.get(f"{console.plane.url}/console/assets/x/{outside}").status_code == 404, outside


def test_the_console_works_on_a_phone_sized_screen(console: Console) -> None:
    page = console.sign_in("org_admin", phone=True)
    expect(page.locator("nav")).to_be_hidden()
    console.open(page, "API keys")
    expect(page.locator("nav")).to_be_hidden()
    # Nothing is wider than the screen: wide tables scroll inside their own box.
    width = page.evaluate("document.documentElement.scrollWidth - document.documentElement.clientWidth")
    assert width <= 0


def test_an_org_admin_changes_a_members_role_and_the_member_sees_the_new_pages(console: Console) -> None:
    member = console.sign_in("developer")
    admin = console.sign_in("org_admin")
    console.open(admin, "Orgs & members")
    admin.get_by_label(f"Role of {console.emails['developer']}").select_option("provider")
    expect(admin.get_by_role("status").filter(has_text="Saved")).to_be_visible()
    # A new role ends the member's sessions: they sign in again, and find the pages of their new role.
    member.reload()
    member.get_by_label("Email").fill(console.emails["developer"])
    member.get_by_label("Password").fill(PASSWORD)
    member.get_by_role("button", name="Sign in").click()
    expect(member.locator("nav").get_by_role("link")).to_have_text(NAV["provider"])
