"""The API reference page: /openapi.json rendered in the browser, every operation listed, filtered by what is typed,
and an operation's parameters and answers shown when it is opened, under the page's strict policy."""

from __future__ import annotations

import httpx
from playwright.sync_api import expect

from tests.browser.conftest import Console


def test_the_reference_lists_every_documented_operation(console: Console) -> None:
    document = httpx.get(f"{console.plane.url}/openapi.json").json()
    methods = ("get", "post", "put", "patch", "delete")
    operations = sum(1 for item in document["paths"].values() for method in item if method in methods)
    page = console.new_page()
    page.goto("/api-reference")
    expect(page.locator("details.operation")).to_have_count(operations)


def test_typing_in_the_filter_leaves_only_the_matching_operations(console: Console) -> None:
    page = console.new_page()
    page.goto("/api-reference")
    page.get_by_label("Filter").fill("node-tokens revoke")
    shown = page.locator("details.operation:visible")
    expect(shown).to_have_count(1)
    expect(shown.locator("code.path")).to_have_text("/admin/v1/node-tokens/{id}/revoke")


def test_an_opened_operation_shows_its_credentials_and_answers(console: Console) -> None:
    page = console.new_page()
    page.goto("/api-reference")
    operation = page.locator("details.operation", has=page.locator("code.path", has_text="/v1/chat/completions"))
    operation.locator("summary").first.click()
    expect(operation.get_by_role("heading", name="Credentials (any one line)")).to_be_visible()
    expect(operation.locator("details.status summary").first).to_contain_text("200")
