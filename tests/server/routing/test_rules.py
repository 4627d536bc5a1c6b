"""Routing rules: each strategy's order, globs, fallback chains, and the admin surface that sets them."""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Callable

import httpx
import pytest

from server.routing.failover import FailoverPolicy
from server.routing.health import Health
from server.routing.rules import Router, RouteRule, find_rule, parse_targets
from server.targets.provider import ProviderTarget, UpstreamPool
from tests.conftest import MODEL, RunningPlane
from tests.support.mock_upstream import MockUpstream


def target(name: str, price_in: float | None = None, price_out: float | None = None) -> ProviderTarget:
    return ProviderTarget(
        pool=UpstreamPool(),
        health=Health(),
        provider_id=f"prv_{name}",
        name=name,
        base_url="http://127.0.0.1:9/v1",
        api_keys=(),
        upstream_model="m",
        price_in=price_in,
        price_out=price_out,
        policy=FailoverPolicy(),
    )


A, B, C = target("a", 1.0, 2.0), target("b", 0.1, 0.2), target("c")


def names(targets: tuple[ProviderTarget, ...] | tuple[object, ...]) -> list[str]:
    return [t.id for t in targets]  # type: ignore[attr-defined]


def test_without_a_rule_targets_keep_the_order_they_were_added() -> None:
    assert names(Router(Health()).order((A, B, C), None, streaming=False)) == ["a", "b", "c"]


def test_priority_puts_listed_targets_first_in_the_listed_order() -> None:
    rule = RouteRule("m", "priority", ("c", "b"))
    assert names(Router(Health()).order((A, B, C), rule, streaming=False)) == ["c", "b", "a"]


def test_cheapest_orders_by_price_with_unpriced_last() -> None:
    rule = RouteRule("m", "cheapest")
    assert names(Router(Health()).order((C, A, B), rule, streaming=False)) == ["b", "a", "c"]


def test_fastest_prefers_the_lower_ewma_and_tries_unmeasured_targets() -> None:
    health = Health()
    health.stats(A.key).observe(ttft_s=0.5)
    health.stats(B.key).observe(ttft_s=0.1)
    rule = RouteRule("m", "fastest")
    assert names(Router(health).order((A, B, C), rule, streaming=True)) == ["c", "b", "a"]


def test_fastest_uses_latency_for_whole_answers_and_ttft_for_streams() -> None:
    health = Health()
    health.stats(A.key).observe(latency_s=0.1, ttft_s=0.9)
    health.stats(B.key).observe(latency_s=0.9, ttft_s=0.1)
    router, rule = Router(health), RouteRule("m", "fastest")
    assert names(router.order((A, B), rule, streaming=False)) == ["a", "b"]
    assert names(router.order((A, B), rule, streaming=True)) == ["b", "a"]


def test_least_busy_orders_by_requests_in_flight() -> None:
    health = Health()
    health.stats(A.key).in_flight = 3
    health.stats(B.key).in_flight = 1
    rule = RouteRule("m", "least-busy")
    assert names(Router(health).order((A, B, C), rule, streaming=False)) == ["c", "b", "a"]


def test_weighted_puts_targets_first_in_proportion_to_their_weight() -> None:
    router = Router(Health(), rng=random.Random(7))
    rule = RouteRule("m", "weighted", ("a", "b"), {"a": 3.0, "b": 1.0})
    firsts = Counter(router.order((A, B), rule, streaming=False)[0].id for _ in range(4000))
    assert 0.70 < firsts["a"] / 4000 < 0.80


def test_weight_zero_puts_a_target_last() -> None:
    router = Router(Health(), rng=random.Random(1))
    rule = RouteRule("m", "weighted", ("a",), {"a": 0.0})
    assert all(router.order((A, B), rule, streaming=False)[-1] is A for _ in range(50))


def test_an_exact_rule_wins_over_a_glob() -> None:
    rules = [RouteRule("gpt-*", "cheapest"), RouteRule("gpt-4o", "fastest")]
    assert find_rule(rules, "gpt-4o") is rules[1]
    assert find_rule(rules, "gpt-4.1") is rules[0]
    assert find_rule(rules, "llama") is None


def test_plan_appends_fallback_models_after_the_first_models_targets() -> None:
    rules = [RouteRule("small", "priority", fallbacks=("large",))]
    table = {"small": (A,), "large": (B, C)}
    plans = Router(Health()).plan(rules, lambda m: table.get(m, ()), "small", streaming=False)
    assert [(p.model, names(p.targets)) for p in plans] == [("small", ["a"]), ("large", ["b", "c"])]


def test_parse_targets_reads_weights() -> None:
    assert parse_targets(["a=3", "b"]) == (("a", "b"), {"a": 3.0})
    with pytest.raises(ValueError, match="must be a number"):
        parse_targets(["a=x"])


# -- through the plane ------------------------------------------------------------------------------


def ask(plane: RunningPlane, key: str, model: str = MODEL) -> httpx.Response:
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}]}
    return httpx.post(f"{plane.v1}/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"})


def test_seed_rule_prefer_the_cheapest_and_switch_to_the_other_on_failure(
    plane: RunningPlane, make_upstream: Callable[..., MockUpstream]
) -> None:
    plane.create_org()
    expensive, cheap = make_upstream("expensive"), make_upstream("cheap")
    plane.add_provider("expensive", expensive, price_in=5.0, price_out=15.0)
    plane.add_provider("cheap", cheap, price_in=0.15, price_out=0.6)
    plane.admin.put("/routes", {"org": "acme", "model": MODEL, "strategy": "cheapest"})
    key = plane.create_key()
    assert ask(plane, key).headers["x-hatchway-route"] == "cheap"
    cheap.fail_status = 503
    response = ask(plane, key)
    assert response.status_code == 200
    assert response.headers["x-hatchway-route"] == "expensive"


def test_priority_rule_through_the_plane(plane: RunningPlane, make_upstream: Callable[..., MockUpstream]) -> None:
    plane.create_org()
    plane.add_provider("a", make_upstream("a"))
    plane.add_provider("b", make_upstream("b"))
    plane.admin.put("/routes", {"org": "acme", "model": MODEL, "strategy": "priority", "targets": ["b", "a"]})
    assert ask(plane, plane.create_key()).headers["x-hatchway-route"] == "b"


def test_fallback_model_serves_when_the_first_models_targets_fail(
    plane: RunningPlane, make_upstream: Callable[..., MockUpstream]
) -> None:
    plane.create_org()
    plane.add_provider("small-host", make_upstream("small", fail_status=503), models=["small"])
    plane.add_provider("large-host", make_upstream("large", reply="from large"), models=["large"])
    plane.admin.put("/routes", {"org": "acme", "model": "small", "fallbacks": ["large"]})
    response = ask(plane, plane.create_key(), model="small")
    assert response.status_code == 200
    assert response.headers["x-hatchway-route"] == "large-host"
    assert response.headers["x-hatchway-model"] == "large"


def test_route_rule_naming_an_unknown_provider_is_refused(plane: RunningPlane) -> None:
    plane.create_org()
    response = httpx.put(
        f"{plane.url}/admin/v1/routes",
        json={"org": "acme", "model": MODEL, "targets": ["ghost"]},
        headers={"Authorization": "Bearer hwa-test-admin-key"},
    )
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "targets"


def test_route_rule_with_an_unknown_strategy_is_refused(plane: RunningPlane) -> None:
    plane.create_org()
    response = httpx.put(
        f"{plane.url}/admin/v1/routes",
        json={"org": "acme", "model": MODEL, "strategy": "random"},
        headers={"Authorization": "Bearer hwa-test-admin-key"},
    )
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "strategy"
