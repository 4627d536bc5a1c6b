"""The playground: streamed chat as the signed-in account (its console key, so usage and cost are recorded), and
compare mode, one prompt to two routes side by side."""

from __future__ import annotations

from collections.abc import Callable

from playwright.sync_api import expect

from tests.browser.conftest import Console
from tests.conftest import MODEL, RunningPlane
from tests.support.mock_upstream import MockUpstream


def two_routes(plane: RunningPlane, make_upstream: Callable[..., MockUpstream]) -> MockUpstream:
    """gpt-4o-mini served by provider alpha, gpt-4o by provider beta, each at its own price; returns alpha's."""
    alpha = make_upstream("mock-a", reply="cheap answer")
    plane.add_provider("alpha", alpha, price_in=1.0, price_out=2.0)
    plane.add_provider(
        "beta", make_upstream("mock-b", reply="dear answer"), models=["gpt-4o"], price_in=10.0, price_out=20.0
    )
    return alpha


def test_a_developer_chats_streamed_and_sees_route_attempts_and_cost(
    console: Console, make_upstream: Callable[..., MockUpstream]
) -> None:
    alpha = two_routes(console.plane, make_upstream)
    page = console.sign_in("developer")
    console.open(page, "Playground")
    page.get_by_label("Model").select_option(MODEL)
    page.get_by_label("Message").fill("hello there")
    page.get_by_label("Message").press("Enter")
    facts = page.get_by_test_id("facts")
    # 2 prompt and 2 completion tokens (the mock counts words) at $1 and $2 per 1M: as billed in its usage row.
    expect(facts.locator('[data-fact="cost"]')).to_have_text("cost $0.000006")
    expect(page.get_by_test_id("answer")).to_have_text("cheap answer")
    expect(facts.locator('[data-fact="route"]')).to_have_text("route alpha")
    expect(facts.locator('[data-fact="attempts"]')).to_have_text("attempts 1")
    expect(facts.locator('[data-fact="tokens"]')).to_have_text("tokens 2 in / 2 out")
    # The request ran as the developer's console key: it is in their usage, at the price of what served.
    rows = console.plane.admin.get("/usage", org="acme", by="key")["data"]
    assert [(r["key"], r["requests"]) for r in rows] == [("console playground", 1)]

    # A second turn carries the conversation.
    page.get_by_label("Message").fill("and again")
    page.get_by_role("button", name="Send").click()
    expect(page.get_by_test_id("answer")).to_have_count(2)
    expect(page.get_by_test_id("answer").last).to_have_text("cheap answer")
    assert [m["content"] for m in alpha.requests[-1].json["messages"]] == ["hello there", "cheap answer", "and again"]


def test_compare_sends_one_prompt_to_two_routes_side_by_side(
    console: Console, make_upstream: Callable[..., MockUpstream]
) -> None:
    two_routes(console.plane, make_upstream)
    page = console.sign_in("org_admin")
    console.open(page, "Playground")
    page.get_by_role("button", name="Compare").click()
    # Within the compare form: until it replaces the chat form, the chat's model <select> (whose label holds every
    # model's name) also answers to a model's name.
    form = page.get_by_role("form", name="Compare")
    form.get_by_label(MODEL).check()
    form.get_by_label("gpt-4o", exact=True).check()
    form.get_by_label("Prompt", exact=True).fill("what does this cost?")
    form.get_by_role("button", name="Compare").click()
    results = page.get_by_test_id("compare-results")
    cheap, dear = results.locator(f'[data-model="{MODEL}"]'), results.locator('[data-model="gpt-4o"]')
    expect(cheap.get_by_test_id("answer")).to_have_text("cheap answer")
    expect(dear.get_by_test_id("answer")).to_have_text("dear answer")
    expect(cheap.locator('[data-fact="route"]')).to_have_text("route alpha")
    expect(dear.locator('[data-fact="route"]')).to_have_text("route beta")
    # 4 prompt and 2 completion tokens (the mock counts words), at each route's own price.
    expect(cheap.locator('[data-fact="cost"]')).to_have_text("cost $0.000008")
    expect(dear.locator('[data-fact="cost"]')).to_have_text("cost $0.000080")
    for panel in (cheap, dear):
        expect(panel.locator('[data-fact="latency"]')).to_contain_text("total")


def test_a_plane_admin_picks_the_org_the_playground_runs_in(
    console: Console, make_upstream: Callable[..., MockUpstream]
) -> None:
    two_routes(console.plane, make_upstream)
    page = console.sign_in("plane_admin")
    console.open(page, "Playground")
    expect(page.get_by_role("alert")).to_contain_text("Pick an org above")
    page.get_by_label("Org").select_option(label="acme")
    page.get_by_label("Model").select_option(MODEL)
    page.get_by_label("Message").fill("hi")
    page.get_by_role("button", name="Send").click()
    expect(page.get_by_test_id("answer")).to_have_text("cheap answer")
