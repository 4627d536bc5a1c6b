"""Response headers of DESIGN §3 on answers and errors alike."""

from __future__ import annotations

import httpx

from tests.conftest import MODEL, Gateway

BODY = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}


def test_request_id_is_generated_when_the_client_sends_none(gateway: Gateway) -> None:
    first = httpx.post(f"{gateway.plane.v1}/chat/completions", json=BODY, headers=gateway.auth())
    second = httpx.post(f"{gateway.plane.v1}/chat/completions", json=BODY, headers=gateway.auth())
    assert first.headers["x-request-id"] != second.headers["x-request-id"]


def test_client_request_id_is_echoed_and_forwarded_upstream(gateway: Gateway) -> None:
    headers = {**gateway.auth(), "X-Request-Id": "trace-123"}
    response = httpx.post(f"{gateway.plane.v1}/chat/completions", json=BODY, headers=headers)
    assert response.headers["x-request-id"] == "trace-123"
    assert gateway.upstream.requests[-1].headers["X-Request-Id"] == "trace-123"


def test_unsafe_client_request_id_is_replaced(gateway: Gateway) -> None:
    headers = {**gateway.auth(), "X-Request-Id": "a b<script>"}
    response = httpx.post(f"{gateway.plane.v1}/chat/completions", json=BODY, headers=headers)
    assert response.headers["x-request-id"] != "a b<script>"


def test_errors_carry_a_request_id(gateway: Gateway) -> None:
    response = httpx.post(f"{gateway.plane.v1}/chat/completions", json=BODY)
    assert response.status_code == 401
    assert response.headers["x-request-id"]


def test_answer_names_route_attempts_cache_and_cost(gateway: Gateway) -> None:
    response = httpx.post(f"{gateway.plane.v1}/chat/completions", json=BODY, headers=gateway.auth())
    assert response.headers["x-hatchway-route"] == "mock-a"
    assert response.headers["x-hatchway-attempts"] == "1"
    assert response.headers["x-hatchway-cache"] == "bypass"
    usage = response.json()["usage"]
    # The gateway fixture prices mock-a at $1 per 1M prompt tokens and $2 per 1M completion tokens.
    expected = (usage["prompt_tokens"] * 1.0 + usage["completion_tokens"] * 2.0) / 1e6
    assert float(response.headers["x-hatchway-cost-usd"]) == expected


def test_unpriced_target_sends_no_cost_header(gateway: Gateway) -> None:
    gateway.plane.add_provider("free", gateway.upstream, models=["unpriced"])
    body = {**BODY, "model": "unpriced"}
    response = httpx.post(f"{gateway.plane.v1}/chat/completions", json=body, headers=gateway.auth())
    assert response.status_code == 200
    assert "x-hatchway-cost-usd" not in response.headers


def test_cookies_an_upstream_sets_never_travel_with_a_later_request(gateway: Gateway) -> None:
    # By name, not by IP: a cookie jar keeps no cookies from IP addresses, so only a named host can show a leak.
    base_url = gateway.upstream.url.replace("127.0.0.1", "localhost")
    gateway.plane.add_provider("named", gateway.upstream, base_url=base_url, models=["named-model"])
    gateway.upstream.response_headers = {"Set-Cookie": "__cf_bm=tenant-a; Path=/"}
    for _ in range(2):
        body = {**BODY, "model": "named-model"}
        assert httpx.post(f"{gateway.plane.v1}/chat/completions", json=body, headers=gateway.auth()).is_success
    assert gateway.upstream.requests[-1].headers.get("Cookie") is None
