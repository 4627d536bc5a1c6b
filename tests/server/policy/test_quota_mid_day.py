"""A quota set in the middle of its window starts from what the window used so far, read from the usage table
when the quota is set, not from 0 until the next restart."""

from __future__ import annotations

from typing import Any

import httpx

from tests.conftest import MODEL, Gateway

MESSAGES = [{"role": "user", "content": "Say hello"}]


def post(gateway: Gateway) -> httpx.Response:
    body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 5}
    return httpx.post(f"{gateway.plane.v1}/chat/completions", json=body, headers=gateway.auth(), timeout=30)


def tokens(response: httpx.Response) -> int:
    usage: dict[str, Any] = response.json()["usage"]
    return int(usage["prompt_tokens"]) + int(usage["completion_tokens"])


def test_a_day_quota_set_mid_day_counts_the_tokens_already_used_today(gateway: Gateway) -> None:
    used = sum(tokens(post(gateway)) for _ in range(3))
    # Set at once: the last rows may still be on their way to the table.
    limits = gateway.plane.admin.put("/limits", {"org": "acme", "tokens_per_day": used + 1})
    assert limits["usage"]["tokens_per_day_used"] == used
    refused = post(gateway)
    assert refused.status_code == 429 and refused.json()["error"]["type"] == "insufficient_quota"


def test_a_month_spend_quota_set_on_a_key_counts_what_the_key_spent_this_month(gateway: Gateway) -> None:
    spent = sum(float(post(gateway).headers["x-hatchway-cost-usd"]) for _ in range(2))
    key_id = next(k["id"] for k in gateway.plane.admin.get("/keys")["data"] if gateway.api_key.startswith(k["prefix"]))
    limits = gateway.plane.admin.put("/limits", {"key": key_id, "usd_per_month": 1.0})
    assert abs(limits["usage"]["usd_per_month_used"] - spent) < 1e-6


def test_a_quota_raised_later_keeps_counting_from_where_it_was(gateway: Gateway) -> None:
    gateway.plane.admin.put("/limits", {"org": "acme", "tokens_per_day": 1_000_000})
    first = tokens(post(gateway))
    raised = gateway.plane.admin.put("/limits", {"org": "acme", "tokens_per_day": 2_000_000})
    assert raised["usage"]["tokens_per_day_used"] == first
