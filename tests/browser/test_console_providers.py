"""Providers and routing rules in the console: add a provider, test its connection, edit its failover limits,
route a model to it."""

from __future__ import annotations

import re
from collections.abc import Callable

from playwright.sync_api import Page, expect

from tests.browser.conftest import Console
from tests.support.mock_upstream import MockUpstream


def add_provider(page: Page, name: str, upstream: MockUpstream, models: str) -> None:
    form = page.get_by_role("form", name="Add provider")
    form.get_by_label("Name").fill(name)
    form.get_by_label("Base URL").fill(upstream.url)
    form.get_by_label("API keys").fill(f"sk-{name}-secret")
    form.get_by_label("Models").fill(models)
    form.get_by_label("Price in").fill("1")
    form.get_by_label("Price out").fill("2")
    form.get_by_role("button", name="Add provider").click()
    expect(page.get_by_role("row").filter(has_text=name)).to_be_visible()


def test_a_provider_added_in_the_page_answers_its_connection_test(
    console: Console, make_upstream: Callable[..., MockUpstream]
) -> None:
    upstream = make_upstream("mock-a")
    page = console.sign_in("org_admin")
    console.open(page, "Providers")
    add_provider(page, "alpha", upstream, "gpt-4o-mini")
    row = page.get_by_role("row").filter(has_text="alpha")
    # The key is stored, never shown again: only its last characters.
    expect(row).not_to_contain_text("sk-alpha-secret")
    row.get_by_role("button", name="Test connection").click()
    expect(row.get_by_role("status")).to_contain_text("OK: gpt-4o-mini answered")
    assert upstream.requests[-1].headers["Authorization"] == "Bearer sk-alpha-secret"

    upstream.fail_status = 503
    row.get_by_role("button", name="Test connection").click()
    expect(row.get_by_role("alert")).to_contain_text("Failed (503)")


def test_a_providers_failover_limits_are_edited_in_the_page(
    console: Console, make_upstream: Callable[..., MockUpstream]
) -> None:
    page = console.sign_in("org_admin")
    console.open(page, "Providers")
    add_provider(page, "alpha", make_upstream("mock-a"), "gpt-4o-mini")
    page.get_by_role("row").filter(has_text="alpha").get_by_role("button", name="Edit limits").click()
    editor = page.get_by_role("form", name="Failover limits of alpha")
    editor.get_by_label("max retries").fill("0")
    editor.get_by_label("connect timeout s").fill("3")
    editor.get_by_role("button", name="Save limits").click()
    expect(page.get_by_role("row").filter(has_text="alpha")).to_contain_text("connect_timeout_s=3")
    provider = console.plane.admin.get("/providers", org="acme")["data"][0]
    assert provider["policy"] == {"connect_timeout_s": 3.0, "max_retries": 0}


def test_a_route_set_in_the_page_orders_the_targets(
    console: Console, make_upstream: Callable[..., MockUpstream]
) -> None:
    page = console.sign_in("org_admin")
    console.open(page, "Providers")
    add_provider(page, "alpha", make_upstream("mock-a", reply="from alpha"), "gpt-4o-mini")
    add_provider(page, "beta", make_upstream("mock-b", reply="from beta"), "gpt-4o-mini")
    console.open(page, "Routing rules")
    form = page.get_by_role("form", name="Set a routing rule")
    form.get_by_label("Model (or glob)").fill("gpt-4o-mini")
    form.get_by_label("Strategy").select_option("priority")
    form.get_by_label("Targets").fill("beta, alpha")
    form.get_by_label("Hedge").fill("off")
    form.get_by_role("button", name="Save rule").click()
    expect(page.locator("tbody").first).to_contain_text("beta, alpha")
    route = console.plane.admin.get("/routes", org="acme")["data"][0]
    assert (route["strategy"], route["targets"], route["hedge"]) == ("priority", ["beta", "alpha"], "off")


def test_a_new_price_version_and_a_cache_policy_are_set_in_the_page(
    console: Console, make_upstream: Callable[..., MockUpstream]
) -> None:
    console.plane.add_provider("alpha", make_upstream("mock-a"), price_in=1.0, price_out=2.0)
    page = console.sign_in("org_admin")
    console.open(page, "Prices")
    form = page.get_by_role("form", name="Set a price")
    form.get_by_label("Provider").select_option("alpha")
    form.get_by_label("Model").fill("gpt-4o-mini")
    form.get_by_label("Price in").fill("3")
    form.get_by_label("Price out").fill("4")
    form.get_by_role("button", name="Set price").click()
    current = page.get_by_role("row").filter(has_text="in force")
    expect(current.get_by_role("cell")).to_have_text(
        ["alpha", "gpt-4o-mini", "3", "4", re.compile("."), "in force", "acme"]
    )
    expect(page.get_by_role("row").filter(has_text="replaced")).to_contain_text("alphagpt-4o-mini12")
    assert console.plane.admin.get("/providers", org="acme")["data"][0]["models"][0]["price_in"] == 3.0

    console.open(page, "Cache policy")
    form = page.get_by_role("form", name="Cache policy")
    form.get_by_label("Mode").select_option("all")
    form.get_by_label("TTL (seconds)").fill("60")
    form.get_by_role("button", name="Save policy").click()
    expect(page.get_by_role("row").filter(has_text="acme")).to_contain_text("all")
    policy = console.plane.admin.get("/cache", org="acme")["data"][0]
    assert (policy["mode"], policy["ttl_s"]) == ("all", 60)
