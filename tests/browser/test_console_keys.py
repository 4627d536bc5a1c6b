"""API keys in the console: made in the page, shown once, used by the openai SDK, limited, revoked."""

from __future__ import annotations

import openai
import pytest
from playwright.sync_api import Page, expect

from tests.browser.conftest import Console
from tests.conftest import MODEL, Gateway


def create_key(page: Page, name: str, models: str = "") -> str:
    form = page.get_by_role("form", name="Create API key")
    form.get_by_label("Name").fill(name)
    form.get_by_label("Allowed models").fill(models)
    form.get_by_role("button", name="Create key").click()
    shown = page.locator("[data-secret] code")
    expect(shown).to_be_visible()
    return shown.inner_text()


def test_a_key_made_in_the_page_works_with_the_openai_sdk_until_revoked(gateway: Gateway, console: Console) -> None:
    page = console.sign_in("developer")
    console.open(page, "API keys")
    key = create_key(page, "notebook")
    assert key.startswith("hw-")
    expect(page.get_by_role("row").filter(has_text="notebook")).to_contain_text("active")

    client = openai.OpenAI(base_url=console.plane.v1, api_key=key, max_retries=0)
    answer = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}])
    assert answer.choices[0].message.content == "Hello from mock"

    page.once("dialog", lambda dialog: dialog.accept())
    page.get_by_role("row").filter(has_text="notebook").get_by_role("button", name="Revoke").click()
    expect(page.get_by_role("row").filter(has_text="notebook")).to_contain_text("revoked")
    with pytest.raises(openai.AuthenticationError):
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}])


def test_a_developer_sees_only_their_own_keys(gateway: Gateway, console: Console) -> None:
    page = console.sign_in("developer")
    console.open(page, "API keys")
    create_key(page, "mine")
    rows = page.locator("tbody tr")
    # The gateway's own key (made with the admin key) is the org's, not this developer's.
    expect(rows).to_have_count(1)
    expect(rows).to_contain_text("mine")


def test_a_key_limited_to_other_models_is_refused_for_this_one(gateway: Gateway, console: Console) -> None:
    page = console.sign_in("org_admin")
    console.open(page, "API keys")
    key = create_key(page, "narrow", models="some-other-model")
    expect(page.get_by_role("row").filter(has_text="narrow")).to_contain_text("some-other-model")
    client = openai.OpenAI(base_url=console.plane.v1, api_key=key, max_retries=0)
    with pytest.raises(openai.PermissionDeniedError):
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}])


def test_a_keys_limits_are_set_in_the_page_and_show_what_is_left(gateway: Gateway, console: Console) -> None:
    page = console.sign_in("org_admin")
    console.open(page, "API keys")
    key = create_key(page, "limited")
    page.get_by_role("row").filter(has_text="limited").get_by_role("link", name="Limits").click()
    form = page.get_by_role("form", name="Set limits")
    # 2 a minute: the bucket refills one request in 30 s, long after the page is read again.
    form.get_by_label("rpm").fill("2")
    form.get_by_role("button", name="Save limits").click()
    expect(page.locator("tbody")).to_contain_text("2 of 2 req/min")

    client = openai.OpenAI(base_url=console.plane.v1, api_key=key, max_retries=0)
    client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}])
    page.reload()
    expect(page.locator("tbody")).to_contain_text("1 of 2 req/min")
