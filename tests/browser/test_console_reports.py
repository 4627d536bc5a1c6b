"""What the console reports: the overview's charts and figures from the usage store, the usage explorer and its
CSV, node earnings, the audit log and its chain check; and every page of an admin opens cleanly."""

from __future__ import annotations

import csv
import io
import re

from playwright.sync_api import expect

from tests.browser.conftest import Console, api_call
from tests.conftest import MODEL, Gateway, usage_report

# An SVG path with points (not the placeholder "M0,0" of a series without any).
DRAWN = re.compile(r"^M\d+\.\d")


def serve_three(gateway: Gateway) -> None:
    client = gateway.client()
    for _ in range(2):
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}])
    for _ in client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], stream=True):
        pass
    usage_report(gateway.plane, 3, org="acme")


def test_the_overview_charts_the_periods_requests_latency_and_cost(gateway: Gateway, console: Console) -> None:
    serve_three(gateway)
    page = console.sign_in("org_admin")
    expect(page.get_by_role("heading", level=1)).to_have_text("Overview")
    totals = page.get_by_test_id("totals")
    expect(totals).to_contain_text("Requests3")
    expect(totals).to_contain_text("Errors0 (0.0%)")
    # Four time series and two bar charts, drawn as SVG in the page.
    expect(page.locator("figure.chart svg")).to_have_count(6)
    expect(page.locator("figure.chart path.series-0").first).to_have_attribute("d", DRAWN)
    expect(page.get_by_role("row").filter(has_text=MODEL)).to_contain_text("3")
    page.get_by_label("Group by").select_option("route")
    expect(page.get_by_role("row").filter(has_text="mock-a")).to_contain_text("3")
    expect(page.get_by_test_id("live")).to_contain_text("Node slots busy0 / 0")


def test_a_developer_s_overview_counts_only_their_own_keys(gateway: Gateway, console: Console) -> None:
    serve_three(gateway)
    developer = console.sign_in("developer")
    mine = api_call(developer, "GET", "/admin/v1/console/stats?period=1h")
    assert mine["status"] == 200
    assert mine["body"]["totals"]["requests"] == 0
    # The plane's own counters are the whole plane's: not a tenant's business.
    assert "in_flight" not in mine["body"]["live"]
    admin = console.sign_in("org_admin")
    org = api_call(admin, "GET", "/admin/v1/console/stats?period=1h&by=key")
    assert org["body"]["totals"]["requests"] == 3
    assert [g["requests"] for g in org["body"]["groups"]] == [3]


def test_the_usage_explorer_exports_what_it_shows_as_csv(gateway: Gateway, console: Console) -> None:
    serve_three(gateway)
    page = console.sign_in("org_admin")
    console.open(page, "Usage & cost")
    expect(page.get_by_role("row").filter(has_text="mock-a")).to_contain_text("3")
    with page.expect_download() as download:
        page.get_by_role("link", name="Export CSV").click()
    rows = list(csv.DictReader(io.StringIO(download.value.path().read_text())))
    assert [(r["model"], r["route"], r["Requests"]) for r in rows] == [(MODEL, "mock-a", "3")]
    assert float(rows[0]["Cost"]) > 0


def test_the_audit_log_names_who_changed_what_and_verifies_its_chain(gateway: Gateway, console: Console) -> None:
    page = console.sign_in("org_admin")
    console.open(page, "API keys")
    form = page.get_by_role("form", name="Create API key")
    form.get_by_label("Name").fill("audited")
    form.get_by_role("button", name="Create key").click()
    expect(page.locator("[data-secret]")).to_be_visible()
    console.open(page, "Audit log")
    account_id = api_call(page, "GET", "/admin/v1/me")["body"]["id"]
    entry = page.get_by_role("row").filter(has_text="key.create").first
    expect(entry).to_contain_text(account_id)
    page.get_by_role("button", name="Verify chain").click()
    expect(page.get_by_role("status").filter(has_text="Chain")).to_contain_text("Chain intact: ")


def test_every_page_of_a_plane_admin_opens_without_an_error(gateway: Gateway, console: Console) -> None:
    serve_three(gateway)
    page = console.sign_in("plane_admin")
    page.get_by_label("Org").select_option(label="acme")
    names = page.locator("nav").get_by_role("link").all_inner_texts()
    for name in names:
        console.open(page, name)
        expect(page.locator("main [role=alert]")).to_have_count(0)
