"""Usage reports: the seed's check that the same prompt's cost can be compared across routes."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import httpx
import pytest
from click.testing import CliRunner

from server.cli import cli
from server.cli.client import AdminAPIError
from tests.conftest import ADMIN_KEY, MODEL, RunningPlane, usage_report
from tests.support.mock_upstream import Fault, MockUpstream

PROMPT = {"model": MODEL, "messages": [{"role": "user", "content": "the same prompt"}]}


@pytest.fixture
def routes(plane: RunningPlane, make_upstream: Callable[..., MockUpstream]) -> tuple[RunningPlane, str]:
    plane.create_org()
    plane.add_provider("provider-a", make_upstream("a"), price_in=1.0, price_out=1.0)
    plane.add_provider("provider-b", make_upstream("b"), price_in=3.0, price_out=3.0)
    plane.add_provider("free", make_upstream("free"), models=["free-model"])
    return plane, plane.create_key()


def ask(plane: RunningPlane, key: str, body: dict[str, Any] = PROMPT) -> httpx.Response:
    return httpx.post(f"{plane.v1}/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"})


def test_the_same_prompt_costs_are_compared_side_by_side_by_route(routes: tuple[RunningPlane, str]) -> None:
    plane, key = routes
    for first in ("provider-a", "provider-b"):
        plane.admin.put("/routes", {"org": "acme", "model": MODEL, "targets": [first]})
        for _ in range(2):
            assert ask(plane, key).headers["x-hatchway-route"] == first
    rows = {r["route"]: r for r in usage_report(plane, 4, by="route", org="acme")}
    a, b = rows["provider-a"], rows["provider-b"]
    assert a["requests"] == b["requests"] == 2
    assert a["prompt_tokens"] == b["prompt_tokens"] and a["completion_tokens"] == b["completion_tokens"]
    assert b["cost_usd"] == pytest.approx(3 * a["cost_usd"])
    assert a["latency_p50_ms"] is not None


def test_an_unpriced_route_reports_no_cost_rather_than_zero(routes: tuple[RunningPlane, str]) -> None:
    plane, key = routes
    ask(plane, key, {**PROMPT, "model": "free-model"})
    (row,) = usage_report(plane, 1, by="route")
    assert row["route"] == "free" and row["cost_usd"] is None and row["unpriced_requests"] == 1


def test_failed_attempts_are_counted_apart_from_requests(
    routes: tuple[RunningPlane, str], make_upstream: Callable[..., MockUpstream]
) -> None:
    plane, key = routes
    broken = make_upstream("broken")
    broken.always = Fault("status", status=503)
    plane.add_provider("broken", broken, models=["flaky"])
    plane.add_provider("steady", make_upstream("steady"), models=["flaky"])
    assert ask(plane, key, {**PROMPT, "model": "flaky"}).status_code == 200
    rows = {r["route"]: r for r in usage_report(plane, 1, by="route")}
    assert rows["steady"]["requests"] == 1
    assert rows["broken"]["requests"] == 0 and rows["broken"]["failed_attempts"] == 2


def test_usage_cli_prints_a_table_grouped_as_asked(routes: tuple[RunningPlane, str]) -> None:
    plane, key = routes
    ask(plane, key)
    usage_report(plane, 1)
    result = CliRunner().invoke(
        cli, ["admin", "--url", plane.url, "--admin-key", ADMIN_KEY, "usage", "--by", "model", "--by", "day"]
    )
    assert result.exit_code == 0, result.output
    assert MODEL in result.output and "COST_USD" in result.output


def test_grouping_by_something_unknown_is_a_400(plane: RunningPlane) -> None:
    response = httpx.get(
        f"{plane.url}/admin/v1/usage", params={"by": "colour"}, headers={"Authorization": f"Bearer {ADMIN_KEY}"}
    )
    assert response.status_code == 400 and response.json()["error"]["param"] == "by"


def test_a_price_change_applies_from_then_on_and_never_rewrites_past_costs(routes: tuple[RunningPlane, str]) -> None:
    plane, key = routes
    plane.admin.put("/routes", {"org": "acme", "model": MODEL, "targets": ["provider-a"]})
    before = float(ask(plane, key).headers["x-hatchway-cost-usd"])
    (first,) = usage_report(plane, 1, by="route")
    plane.admin.put("/prices", {"provider": "provider-a", "model": MODEL, "price_in": 10.0, "price_out": 10.0})
    after = float(ask(plane, key).headers["x-hatchway-cost-usd"])
    assert after == pytest.approx(10 * before)
    (both,) = usage_report(plane, 2, by="route")
    assert both["cost_usd"] == pytest.approx(first["cost_usd"] + after)
    history = plane.admin.get("/prices", provider="provider-a")["data"]
    assert [(p["price_in"], p["price_out"]) for p in history] == [(1.0, 1.0), (10.0, 10.0)]
    assert history[0]["effective_from"] < history[1]["effective_from"]


def test_setting_a_price_on_an_unknown_model_is_a_404(routes: tuple[RunningPlane, str]) -> None:
    plane, _ = routes
    with pytest.raises(AdminAPIError) as refused:
        plane.admin.put("/prices", {"provider": "provider-a", "model": "nope", "price_in": 1})
    assert refused.value.status == 404


def test_a_negative_price_is_a_400(routes: tuple[RunningPlane, str]) -> None:
    plane, _ = routes
    with pytest.raises(AdminAPIError) as refused:
        plane.admin.put("/prices", {"provider": "provider-a", "model": MODEL, "price_in": -1})
    assert refused.value.status == 400


def test_prices_cli_sets_and_lists_versions(routes: tuple[RunningPlane, str]) -> None:
    plane, _ = routes
    base = ["admin", "--url", plane.url, "--admin-key", ADMIN_KEY, "prices"]
    result = CliRunner().invoke(cli, [*base, "set", "provider-b", "--model", MODEL, "--in", "2", "--out", "4"])
    assert result.exit_code == 0, result.output
    listing = CliRunner().invoke(cli, [*base, "list", "--provider", "provider-b"])
    assert listing.exit_code == 0, listing.output
    lines = listing.output.strip().splitlines()
    assert lines[0].split()[:5] == ["ORG", "PROVIDER", "MODEL", "PRICE_IN", "PRICE_OUT"]
    assert [line.split()[3:5] for line in lines[1:]] == [["3.0", "3.0"], ["2.0", "4.0"]]


def test_a_group_of_unpriced_requests_and_free_cache_hits_reports_no_cost_rather_than_zero(
    routes: tuple[RunningPlane, str],
) -> None:
    plane, key = routes
    deterministic = {**PROMPT, "model": "free-model", "temperature": 0}
    assert [ask(plane, key, deterministic).headers["x-hatchway-cache"] for _ in range(2)] == ["miss", "hit"]
    (row,) = usage_report(plane, 2, by="model")
    assert row["model"] == "free-model" and row["cache_hits"] == 1
    assert row["cost_usd"] is None and row["unpriced_requests"] == 1


def test_a_group_of_priced_requests_and_free_cache_hits_costs_what_the_priced_ones_cost(
    routes: tuple[RunningPlane, str],
) -> None:
    plane, key = routes
    plane.admin.put("/routes", {"org": "acme", "model": MODEL, "targets": ["provider-a"]})
    deterministic = {**PROMPT, "temperature": 0}
    paid = float(ask(plane, key, deterministic).headers["x-hatchway-cost-usd"])
    assert ask(plane, key, deterministic).headers["x-hatchway-cache"] == "hit"
    (row,) = usage_report(plane, 2, by="model")
    assert row["cost_usd"] == pytest.approx(paid) and row["unpriced_requests"] == 0 and row["cache_hits"] == 1
