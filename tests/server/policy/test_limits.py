"""Rate limits and quotas: exact under real concurrency (asyncio fan-out through the openai SDK), reserved at
admission and settled with the real usage, refused with the OpenAI 429s, and reset by the calendar."""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from typing import Any

import httpx
import openai
import pytest
from click.testing import CliRunner, Result

from server.cli import cli
from server.cli.client import AdminAPIError
from server.config import Config
from server.credentials import DISPLAY_PREFIX_LEN
from server.plane import Plane
from server.policy.limits import estimate_tokens
from tests.conftest import ADMIN_KEY, MODEL, Gateway, abandon_request, usage_report

DAY_S = 86_400.0
MESSAGES = [{"role": "user", "content": "Say hello"}]


@pytest.fixture
def plane_config(plane_config: Config) -> Config:
    # Fifty clients share this process's GIL with the plane: on a busy host a delayed answer can take seconds to
    # come through. Counting slots must not depend on an answer beating the header timeout (a 504 gives its slot
    # back early and lets one more in).
    return plane_config.replace(upstream_header_timeout_s=60)


class FrozenClock:
    """Wall-clock time that only moves when the test says so: windows are crossed without sleeping."""

    def __init__(self, start: float = 1_800_000_000.0) -> None:  # 2027-01-15, mid-month and mid-day
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def plane_of(gateway: Gateway) -> Plane:
    return gateway.plane.server.plane


def freeze(gateway: Gateway) -> FrozenClock:
    clock = FrozenClock()
    plane_of(gateway).limiter.clock = clock
    return clock


def set_limits(gateway: Gateway, **limits: Any) -> dict[str, Any]:
    return gateway.plane.admin.put("/limits", {"org": "acme", **limits})  # type: ignore[no-any-return]


def key_id(gateway: Gateway) -> str:
    prefix = gateway.api_key[:DISPLAY_PREFIX_LEN]
    return str(next(k["id"] for k in gateway.plane.admin.get("/keys")["data"] if k["prefix"] == prefix))


def live_usage(gateway: Gateway) -> dict[str, Any]:
    """What `limits show` reports for org acme right now."""
    return gateway.plane.admin.get("/limits", org="acme")["data"][0]["usage"]  # type: ignore[no-any-return]


async def fan_out(client: openai.AsyncOpenAI, count: int, **request: Any) -> list[Any]:
    """`count` requests at once through a client (closed afterwards); each result is the response or the
    exception it raised."""
    body = {"model": MODEL, "messages": MESSAGES, **request}
    async with client:
        return await asyncio.gather(
            *(client.chat.completions.with_raw_response.create(**body) for _ in range(count)), return_exceptions=True
        )


def outcomes(results: list[Any]) -> Counter[int | str]:
    return Counter(
        r.http_response.status_code if not isinstance(r, Exception) else getattr(r, "status_code", type(r).__name__)
        for r in results
    )


def post(gateway: Gateway, body: dict[str, Any] | None = None, **headers: str) -> httpx.Response:
    return httpx.post(
        f"{gateway.plane.v1}/chat/completions",
        json=body or {"model": MODEL, "messages": MESSAGES, "max_tokens": 20},
        headers={**gateway.auth(), **headers},
        timeout=30,
    )


# -- requests per minute, concurrency -----------------------------------------------------------------


async def test_fifty_concurrent_requests_against_rpm_10_let_exactly_10_through(gateway: Gateway) -> None:
    freeze(gateway)
    set_limits(gateway, rpm=10)
    results = await fan_out(gateway.async_client(), 50)
    assert outcomes(results) == {200: 10, 429: 40}
    refused = next(r for r in results if isinstance(r, openai.RateLimitError))
    assert refused.body["type"] == "rate_limit_error"
    assert refused.body["code"] == "rate_limit_exceeded"
    assert int(refused.response.headers["Retry-After"]) >= 1


async def test_concurrency_limit_lets_exactly_that_many_in_flight(gateway: Gateway) -> None:
    gateway.upstream.delay_s = 1.5  # long enough for all 50 to arrive while the first ones are in flight
    set_limits(gateway, concurrency=10)
    results = await fan_out(gateway.async_client(timeout=30), 50)
    assert outcomes(results) == {200: 10, 429: 40}
    # Their slots were given back: the next wave gets the same share.
    assert outcomes(await fan_out(gateway.async_client(timeout=30), 20)) == {200: 10, 429: 10}


def test_a_client_that_leaves_mid_stream_gives_its_concurrency_slot_back(gateway: Gateway) -> None:
    gateway.upstream.chunk_delay_s = 0.2
    set_limits(gateway, concurrency=1)
    body = {"model": MODEL, "messages": MESSAGES, "stream": True}
    abandon_request(f"{gateway.plane.v1}/chat/completions", body, gateway.api_key, after_s=0.5)
    deadline = time.monotonic() + 10
    while live_usage(gateway)["in_flight"]:
        assert time.monotonic() < deadline, "the slot was never released"
        time.sleep(0.05)
    gateway.upstream.chunk_delay_s = 0
    assert post(gateway).status_code == 200


async def test_key_and_org_limits_both_apply(gateway: Gateway) -> None:
    freeze(gateway)
    second = gateway.plane.create_key("acme")
    set_limits(gateway, rpm=6)
    gateway.plane.admin.put("/limits", {"key": key_id(gateway), "rpm": 4})
    first_results = await fan_out(gateway.async_client(), 10)
    assert outcomes(first_results) == {200: 4, 429: 6}  # the key's own limit
    other = openai.AsyncOpenAI(base_url=gateway.plane.v1, api_key=second, max_retries=0)
    assert outcomes(await fan_out(other, 10)) == {200: 2, 429: 8}  # what the org has left


def test_requests_per_minute_refill_as_the_minute_passes(gateway: Gateway) -> None:
    clock = freeze(gateway)
    set_limits(gateway, rpm=2)
    assert [post(gateway).status_code for _ in range(3)] == [200, 200, 429]
    clock.advance(30)  # half a minute gives back one request of two
    assert [post(gateway).status_code for _ in range(2)] == [200, 429]


# -- headers -----------------------------------------------------------------------------------------------


def test_every_response_carries_x_ratelimit_headers(gateway: Gateway) -> None:
    freeze(gateway)
    set_limits(gateway, rpm=3, tpm=100_000)
    served = post(gateway)
    streamed = post(gateway, {"model": MODEL, "messages": MESSAGES, "stream": True, "max_tokens": 20})
    failed = post(gateway, {"model": "no-such-model", "messages": MESSAGES})  # refused before admission
    post(gateway)
    refused = post(gateway)
    assert served.status_code == streamed.status_code == 200 and refused.status_code == 429
    for response in (served, streamed, refused):
        for kind in ("requests", "tokens"):
            assert response.headers[f"x-ratelimit-limit-{kind}"]
            assert response.headers[f"x-ratelimit-remaining-{kind}"]
            assert response.headers[f"x-ratelimit-reset-{kind}"]
    assert served.headers["x-ratelimit-limit-requests"] == "3"
    assert served.headers["x-ratelimit-remaining-requests"] == "2"
    assert streamed.headers["x-ratelimit-remaining-requests"] == "1"
    assert refused.headers["x-ratelimit-remaining-requests"] == "0"
    assert refused.headers["x-ratelimit-reset-requests"] == "1m0s"
    assert failed.status_code == 404


def test_responses_of_an_unlimited_key_carry_no_ratelimit_headers(gateway: Gateway) -> None:
    response = post(gateway)
    assert response.status_code == 200
    assert not [name for name in response.headers if name.lower().startswith("x-ratelimit")]


# -- tokens: reservation and settlement ----------------------------------------------------------------


async def test_tokens_per_minute_reserve_the_estimate_then_refund_what_was_not_used(gateway: Gateway) -> None:
    freeze(gateway)
    gateway.upstream.delay_s = 1.0  # every request is admitted before any settles
    body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 50}
    prompt, completion = estimate_tokens("chat/completions", body, 1024)
    reservation = prompt + completion
    set_limits(gateway, tpm=3 * reservation + reservation // 2)  # room for three reservations, not four
    results = await fan_out(gateway.async_client(timeout=30), 8, max_tokens=50)
    assert outcomes(results) == {200: 3, 429: 5}
    used = sum(r.parse().usage.total_tokens for r in results if not isinstance(r, Exception))
    assert 0 < used < 3 * reservation
    # Settled: what was reserved but not used went back, exactly (the clock is frozen, so nothing refilled).
    live = live_usage(gateway)
    assert live["tokens_remaining"] == 3 * reservation + reservation // 2 - used
    assert live["in_flight"] == 0


def test_a_request_whose_estimate_exceeds_the_tpm_limit_is_told_to_lower_max_tokens(gateway: Gateway) -> None:
    set_limits(gateway, tpm=100)
    response = post(gateway, {"model": MODEL, "messages": MESSAGES, "max_tokens": 500})
    assert response.status_code == 429
    assert response.json()["error"]["code"] == "tokens_exceed_limit"
    assert "max_tokens" in response.json()["error"]["message"]
    assert response.headers["x-should-retry"] == "false"


# -- quotas ------------------------------------------------------------------------------------------------


def test_a_used_up_token_quota_is_insufficient_quota_and_says_do_not_retry(gateway: Gateway) -> None:
    freeze(gateway)
    body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 20}
    prompt, completion = estimate_tokens("chat/completions", body, 1024)
    set_limits(gateway, tokens_per_day=prompt + completion)
    assert post(gateway, body).status_code == 200
    refused = post(gateway, body)
    assert refused.status_code == 429
    assert refused.json()["error"]["type"] == "insufficient_quota"
    assert refused.json()["error"]["code"] == "insufficient_quota"
    assert refused.headers["x-should-retry"] == "false"
    assert "Retry-After" not in refused.headers


def test_the_sdk_does_not_retry_an_insufficient_quota(gateway: Gateway) -> None:
    freeze(gateway)
    set_limits(gateway, tokens_per_month=10)
    client = gateway.client(max_retries=3)
    started = len(gateway.upstream.requests)
    with pytest.raises(openai.RateLimitError) as refused:
        client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=20)
    assert refused.value.code == "insufficient_quota"
    assert len(gateway.upstream.requests) == started


def test_a_day_quota_resets_at_the_next_utc_day(gateway: Gateway) -> None:
    clock = freeze(gateway)
    set_limits(gateway, tokens_per_day=200, tokens_per_month=10_000)
    body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 150}
    served = 0
    while (response := post(gateway, body)).status_code == 200:
        served += 1
    assert served > 0 and response.json()["error"]["type"] == "insufficient_quota"
    clock.advance(DAY_S)
    assert post(gateway, body).status_code == 200
    usage = live_usage(gateway)
    # The month went on counting across the day boundary.
    assert usage["tokens_per_month_used"] > usage["tokens_per_day_used"] > 0


def test_a_month_spend_quota_resets_at_the_next_month(gateway: Gateway) -> None:
    clock = freeze(gateway)
    # mock-a costs 1 USD / 2 USD per 1M tokens: one request with max_tokens 100 reserves about 0.0002 USD.
    set_limits(gateway, usd_per_month=0.0003)
    body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 100}
    first = post(gateway, body)
    assert first.status_code == 200
    spent = float(first.headers["x-hatchway-cost-usd"])
    assert live_usage(gateway)["usd_per_month_used"] == round(spent, 6)
    assert post(gateway, body).status_code == 200  # settled at the real (small) cost, so there is room
    while (response := post(gateway, body)).status_code == 200:
        pass
    assert response.json()["error"]["type"] == "insufficient_quota"
    clock.advance(31 * DAY_S)
    assert post(gateway, body).status_code == 200


async def test_concurrent_requests_cannot_overshoot_a_token_quota_together(gateway: Gateway) -> None:
    freeze(gateway)
    gateway.upstream.delay_s = 0.5
    body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 40}
    prompt, completion = estimate_tokens("chat/completions", body, 1024)
    set_limits(gateway, tokens_per_day=5 * (prompt + completion))
    results = await fan_out(gateway.async_client(timeout=30), 30, max_tokens=40)
    assert outcomes(results) == {200: 5, 429: 25}


def test_quota_use_survives_a_restart(gateway: Gateway) -> None:
    set_limits(gateway, tokens_per_day=1_000_000)
    assert post(gateway).status_code == 200
    used = live_usage(gateway)["tokens_per_day_used"]
    assert used > 0
    gateway.plane.restart()
    assert live_usage(gateway)["tokens_per_day_used"] == used


# -- admin -------------------------------------------------------------------------------------------------


def test_limits_are_set_lifted_and_removed_from_the_admin_api(gateway: Gateway) -> None:
    set_limits(gateway, rpm=5, usd_per_month=20)
    changed = set_limits(gateway, rpm=None, tpm=1000)
    assert (changed["rpm"], changed["tpm"], changed["usd_per_month"]) == (None, 1000, 20.0)
    gateway.plane.admin.delete("/limits", org="acme")
    assert gateway.plane.admin.get("/limits", org="acme")["data"] == []
    assert [post(gateway).status_code for _ in range(6)] == [200] * 6


@pytest.mark.parametrize(
    "body",
    [
        {"org": "acme", "rpm": -1},
        {"org": "acme", "rpm": 1.5},
        {"org": "acme", "usd_per_day": "ten"},
        {"org": "acme", "rps": 3},
        {"org": "acme", "key": "key_x", "rpm": 3},
        {"rpm": 3},
        {"org": "acme"},
    ],
)
def test_malformed_limits_are_refused_with_a_400(gateway: Gateway, body: dict[str, Any]) -> None:
    with pytest.raises(AdminAPIError) as refused:
        gateway.plane.admin.put("/limits", body)
    assert refused.value.status == 400


def test_limits_on_an_unknown_key_are_a_404(gateway: Gateway) -> None:
    with pytest.raises(AdminAPIError) as refused:
        gateway.plane.admin.put("/limits", {"key": "key_nope", "rpm": 3})
    assert refused.value.status == 404


def test_a_refused_request_is_recorded_as_a_429_usage_row(gateway: Gateway) -> None:
    freeze(gateway)
    set_limits(gateway, rpm=1)
    post(gateway)
    refused = post(gateway)
    assert refused.status_code == 429
    (report,) = usage_report(gateway.plane, 2, org="acme")
    assert (report["requests"], report["errors"]) == (2, 1)


def admin_cli(gateway: Gateway, *args: str) -> Result:
    return CliRunner().invoke(cli, ["admin", "--url", gateway.plane.url, "--admin-key", ADMIN_KEY, *args])


def test_limits_cli_sets_shows_and_lifts(gateway: Gateway) -> None:
    assert admin_cli(gateway, "limits", "set", "--org", "acme", "--rpm", "5", "--usd-per-month", "2.5").exit_code == 0
    shown = admin_cli(gateway, "limits", "show", "--org", "acme", "--json")
    (limits,) = json.loads(shown.output)["data"]
    assert (limits["rpm"], limits["usd_per_month"], limits["usage"]["requests_remaining"]) == (5, 2.5, 5)
    assert admin_cli(gateway, "limits", "set", "--org", "acme", "--rpm", "off").exit_code == 0
    (lifted,) = json.loads(admin_cli(gateway, "limits", "show", "--json").output)["data"]
    assert (lifted["rpm"], lifted["usd_per_month"]) == (None, 2.5)


def test_limits_cli_wants_exactly_one_of_org_or_key(gateway: Gateway) -> None:
    both = admin_cli(gateway, "limits", "set", "--org", "acme", "--key", key_id(gateway), "--rpm", "5")
    assert both.exit_code == 2 and "exactly one of --org or --key" in both.output
    bad = admin_cli(gateway, "limits", "set", "--org", "acme", "--rpm", "lots")
    assert bad.exit_code == 2 and "'lots' is not a whole number or 'off'" in bad.output
