"""Usage a target reports is a claim: the plane bills it only within bounds it computes itself (server.usage.metering).

From outside: a real plane, a lying upstream (tests/support/mock_upstream.py `forged_usage`) and a lying node
(tests/support/hostile_node_usage.py) on loopback sockets; what the client is charged, what the usage table and the
earnings report hold, and what /metrics counts.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import openai
import pytest

from server.usage.metering import CHOICE_SLACK_TOKENS, PROMPT_SLACK_TOKENS
from tests.conftest import MODEL, Gateway, RunningPlane, usage_report
from tests.support.hostile_node_usage import LyingNode
from tests.support.mock_upstream import MockUpstream

MESSAGES = [{"role": "user", "content": "Say hello"}]
REPLY = "Hello from mock"
# What an answer of REPLY may be billed for at most: one token per delivered byte, plus the per-choice slack.
REPLY_BOUND = len(REPLY.encode()) + CHOICE_SLACK_TOKENS


def clamped(plane: RunningPlane, kind: str) -> float:
    return plane.metric("hatchway_usage_claims_clamped_total", target_kind=kind)


def post(gateway: Gateway, body: dict[str, Any] | None = None) -> httpx.Response:
    return httpx.post(
        f"{gateway.plane.v1}/chat/completions",
        json=body or {"model": MODEL, "messages": MESSAGES},
        headers=gateway.auth(),
        timeout=30,
    )


def test_an_upstream_claiming_a_trillion_completion_tokens_is_billed_for_what_it_delivered(gateway: Gateway) -> None:
    gateway.upstream.forged_usage = {"prompt_tokens": 9, "completion_tokens": 10**12, "total_tokens": 10**12 + 9}
    response = post(gateway)
    assert response.status_code == 200
    usage = response.json()["usage"]
    assert 0 < usage["completion_tokens"] <= REPLY_BOUND
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    # mock-a costs 1 USD in, 2 USD out per 1M tokens: the client pays for the bound, not for the claim.
    cost = float(response.headers["x-hatchway-cost-usd"])
    assert cost == pytest.approx((9 * 1.0 + usage["completion_tokens"] * 2.0) / 1e6)
    (row,) = usage_report(gateway.plane, 1, by="route")
    assert (row["prompt_tokens"], row["completion_tokens"]) == (9, usage["completion_tokens"])
    assert row["cost_usd"] == pytest.approx(cost)
    assert clamped(gateway.plane, "provider") == 1


def test_a_streamed_usage_claim_is_held_to_the_same_bound(gateway: Gateway) -> None:
    gateway.upstream.forged_usage = {"prompt_tokens": 9, "completion_tokens": 10**12, "total_tokens": 10**12 + 9}
    with gateway.client() as client:
        chunks = list(
            client.chat.completions.create(
                model=MODEL, messages=MESSAGES, stream=True, stream_options={"include_usage": True}
            )
        )
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == REPLY
    final = chunks[-1].usage
    assert final is not None and 0 < final.completion_tokens <= REPLY_BOUND
    (row,) = usage_report(gateway.plane, 1, by="route")
    assert row["completion_tokens"] == final.completion_tokens
    assert clamped(gateway.plane, "provider") == 1


def test_negative_usage_bills_nothing_for_it_and_a_daily_token_quota_still_runs_out(gateway: Gateway) -> None:
    gateway.upstream.forged_usage = {"prompt_tokens": 30, "completion_tokens": -2 * 10**12, "total_tokens": 0}
    gateway.plane.admin.put("/limits", {"org": "acme", "tokens_per_day": 100})
    body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 1}
    statuses = [post(gateway, body).status_code for _ in range(8)]
    # Each request is billed its 30 prompt tokens and 0 completion tokens: the quota is used up after three.
    assert statuses[:3] == [200, 200, 200] and set(statuses[3:]) == {429}
    used = gateway.plane.admin.get("/limits", org="acme")["data"][0]["usage"]["tokens_per_day_used"]
    assert used == 90
    rows = usage_report(gateway.plane, 8, by="route")
    served = next(r for r in rows if r["route"] == "mock-a")
    assert (served["prompt_tokens"], served["completion_tokens"]) == (90, 0)
    assert served["cost_usd"] >= 0


@pytest.fixture
def two_models(gateway: Gateway, make_upstream: Callable[..., MockUpstream]) -> MockUpstream:
    """A second model, `liar`, served by an upstream that claims 2^64-1 completion tokens."""
    liar = make_upstream("liar")
    liar.models = ["liar"]
    liar.forged_usage = {"prompt_tokens": 2**64 - 1, "completion_tokens": 2**64 - 1, "total_tokens": 2**64 - 1}
    gateway.plane.add_provider("liar", liar, models=["liar"], price_in=1.0, price_out=2.0)
    return liar


async def test_a_claim_of_2_to_the_64_is_clamped_and_costs_no_other_request_its_usage_row(
    gateway: Gateway, two_models: MockUpstream
) -> None:
    async with gateway.async_client(timeout=30) as client:
        honest = [client.chat.completions.create(model=MODEL, messages=MESSAGES) for _ in range(20)]
        lying = client.chat.completions.create(model="liar", messages=MESSAGES)
        results = await asyncio.gather(lying, *honest)
    assert results[0].usage is not None and results[0].usage.completion_tokens <= REPLY_BOUND
    rows = {r["route"]: r for r in usage_report(gateway.plane, 21, by="route")}
    assert rows["mock-a"]["requests"] == 20 and rows["liar"]["requests"] == 1
    assert rows["liar"]["completion_tokens"] <= REPLY_BOUND
    assert rows["liar"]["prompt_tokens"] <= 1024 + PROMPT_SLACK_TOKENS
    assert gateway.plane.metric("hatchway_usage_rows_dropped_total") == 0


def test_hidden_reasoning_tokens_are_billed_within_what_the_request_allowed(gateway: Gateway) -> None:
    reasoning = {"completion_tokens_details": {"reasoning_tokens": 5_000}}
    gateway.upstream.forged_usage = {"prompt_tokens": 9, "completion_tokens": 5_003, **reasoning}
    # An o-series model thinks in tokens nobody sees: within max_completion_tokens, they are billed as claimed.
    unbounded = post(gateway, {"model": MODEL, "messages": MESSAGES, "max_completion_tokens": 10_000})
    assert unbounded.json()["usage"]["completion_tokens"] == 5_003
    assert clamped(gateway.plane, "provider") == 0
    # Beyond it, the claim is clamped to what the request allowed.
    limited = post(gateway, {"model": MODEL, "messages": MESSAGES, "max_completion_tokens": 100})
    assert limited.json()["usage"]["completion_tokens"] == 100
    assert limited.json()["usage"]["completion_tokens_details"]["reasoning_tokens"] == 100
    assert clamped(gateway.plane, "provider") == 1


def test_truthful_usage_is_billed_as_reported(gateway: Gateway) -> None:
    for stream in (False, True):
        body = {"model": MODEL, "messages": MESSAGES, "stream": stream, "stream_options": {"include_usage": True}}
        if not stream:
            del body["stream_options"]
        assert post(gateway, body).status_code == 200
    rows = usage_report(gateway.plane, 2, by="route")
    # The mock counts words: 2 in the prompt, 3 in the reply, each time.
    assert (rows[0]["prompt_tokens"], rows[0]["completion_tokens"]) == (4, 6)
    assert clamped(gateway.plane, "provider") == 0


# -- nodes ---------------------------------------------------------------------------------------------------


@pytest.fixture
def liar_node(plane: RunningPlane) -> Iterator[LyingNode]:
    plane.create_org("acme")
    token = plane.admin.post("/node-tokens", {"org": "acme"})["token"]
    node = LyingNode(f"127.0.0.1:{plane.server.plane.grpc_port}", prompt_tokens=2**32 - 1)
    plane.loop_thread.run(node.enroll(token))
    plane.loop_thread.run(node.connect())
    deadline = time.monotonic() + 10
    while not plane.server.plane.registry.sessions and time.monotonic() < deadline:
        time.sleep(0.05)
    assert plane.server.plane.registry.sessions, "the lying node never got a session"
    yield node
    plane.loop_thread.run(node.close())


def test_a_node_claiming_uint32_max_tokens_is_billed_its_delivered_text_and_earns_no_more(
    plane: RunningPlane, liar_node: LyingNode, caplog: pytest.LogCaptureFixture
) -> None:
    key = plane.create_key("acme")
    body = {"model": liar_node.model, "messages": MESSAGES}
    with openai.OpenAI(base_url=plane.v1, api_key=key, max_retries=0) as client, caplog.at_level(logging.WARNING):
        whole = client.chat.completions.create(**body)
        streamed = list(client.chat.completions.create(**body, stream=True, stream_options={"include_usage": True}))
    bound = len(liar_node.text.encode()) + CHOICE_SLACK_TOKENS
    assert whole.choices[0].message.content == liar_node.text
    assert whole.usage is not None and whole.usage.completion_tokens <= bound
    # The prompt is bounded by the request's size and the node's own context.
    assert whole.usage.prompt_tokens <= liar_node.context
    final = streamed[-1].usage
    assert final is not None and final.completion_tokens <= bound and final.prompt_tokens <= liar_node.context
    (earned,) = _earnings(plane, 2)
    assert earned["node_id"] == liar_node.node_id and earned["requests"] == 2
    assert earned["completion_tokens"] <= 2 * bound and earned["prompt_tokens"] <= 2 * liar_node.context
    most = 2 * (liar_node.context * liar_node.price_in + bound * liar_node.price_out) / 1e6
    assert 0 < earned["earned_usd"] <= most
    assert clamped(plane, "node") == 2
    # Logged once per node and interval, however often it lies.
    lines = [r for r in caplog.records if "usage claim from node" in r.getMessage()]
    assert len(lines) == 1 and len(lines[0].getMessage()) < 400


def _earnings(plane: RunningPlane, requests: int) -> list[dict[str, Any]]:
    deadline = time.monotonic() + 5
    while True:
        rows: list[dict[str, Any]] = plane.admin.get("/earnings")["data"]
        if sum(r["requests"] for r in rows) >= requests or time.monotonic() > deadline:
            return rows
        time.sleep(0.05)
