"""The bounds a usage claim is held to (server.usage.metering), one rule each."""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter

from server.nodes.bounds import MAX_PRICE
from server.targets.node import bounded_price
from server.usage.metering import (
    CHOICE_SLACK_TOKENS,
    IMAGE_TOKENS,
    PLANE_MAX_COMPLETION_TOKENS,
    PLANE_MAX_PROMPT_TOKENS,
    PROMPT_SLACK_TOKENS,
    TOOL_CALL_SLACK_TOKENS,
    Delivery,
    Meter,
    MeteredRequest,
)

CHAT = "chat/completions"


def meter() -> Meter:
    return Meter(Counter("clamped", "test", ("target_kind",), registry=CollectorRegistry()))


def delivered(*texts: str, **delta: Any) -> Delivery:
    delivery = Delivery()
    for text in texts:
        delivery.observe({"choices": [{"index": 0, "delta": {"content": text}}]})
    if delta:
        delivery.observe({"choices": [{"index": 0, "delta": delta}]})
    return delivery


def bill(usage: dict[str, Any], delivery: Delivery, *, kind: str = "provider", **body: Any) -> tuple[int, int, bool]:
    request = MeteredRequest(CHAT, {"model": "m", "messages": [], **body}, 200, kind, body.pop("context", None))
    return meter().bill(request, delivery, usage, "t")


def test_a_claim_within_every_bound_is_billed_as_claimed() -> None:
    assert bill({"prompt_tokens": 50, "completion_tokens": 3}, delivered("Hello", " there")) == (50, 3, False)


def test_completion_is_bounded_by_the_delivered_utf8_bytes_plus_slack() -> None:
    # "héllo" is 6 bytes in UTF-8: no tokenizer makes more than 6 tokens of it.
    assert bill({"completion_tokens": 10**9}, delivered("héllo"))[1] == 6 + CHOICE_SLACK_TOKENS


def test_a_stop_string_adds_its_bytes_to_each_choice() -> None:
    claim = {"completion_tokens": 10**9}
    assert bill(claim, delivered("ab"), stop=["\n\nUser:", "x"])[1] == 2 + CHOICE_SLACK_TOKENS + 7


def test_tool_calls_count_their_name_arguments_and_framing() -> None:
    call = {"index": 0, "id": "call_1", "function": {"name": "get", "arguments": '{"a":1}'}}
    delivery = delivered(tool_calls=[call])
    assert delivery.tool_calls == 1
    bound = 3 + 7 + CHOICE_SLACK_TOKENS + TOOL_CALL_SLACK_TOKENS
    assert bill({"completion_tokens": 10**9}, delivery)[1] == bound


def test_completion_is_bounded_by_max_tokens_times_n() -> None:
    text = "x" * 1000
    assert bill({"completion_tokens": 10**9}, delivered(text), max_tokens=50, n=2)[1] == 100
    assert bill({"completion_tokens": 10**9}, delivered(text), max_completion_tokens=40)[1] == 40


def test_hidden_tokens_are_allowed_to_a_provider_but_never_to_a_node() -> None:
    claim = {"completion_tokens": 700, "completion_tokens_details": {"reasoning_tokens": 698}}
    assert bill(claim, delivered("ok")) == (0, 700, False)
    assert bill(claim, delivered("ok"), kind="node")[1] == 2 + CHOICE_SLACK_TOKENS


def test_hidden_tokens_without_max_tokens_stop_at_the_plane_bound() -> None:
    claim = {"completion_tokens": 2**40, "completion_tokens_details": {"reasoning_tokens": 2**40}}
    assert bill(claim, delivered("ok"))[1] == PLANE_MAX_COMPLETION_TOKENS


def test_best_of_candidates_nobody_sees_are_allowed_within_max_tokens() -> None:
    request = MeteredRequest("completions", {"prompt": "p", "max_tokens": 10, "best_of": 3}, 40, "provider")
    delivery = Delivery()
    delivery.observe({"choices": [{"index": 0, "text": "abc"}]})
    # The one delivered choice is at most its max_tokens (10); the two unseen ones 10 each.
    assert meter().bill(request, delivery, {"completion_tokens": 25}, "t") == (0, 25, False)
    assert meter().bill(request, delivery, {"completion_tokens": 40}, "t") == (0, 30, True)


def test_negative_and_non_integer_figures_bill_zero_and_count_as_clamped() -> None:
    assert bill({"prompt_tokens": -5, "completion_tokens": 2}, delivered("ab")) == (0, 2, True)
    assert bill({"prompt_tokens": "12", "completion_tokens": 1.5}, delivered("ab")) == (0, 0, True)
    assert bill({"prompt_tokens": True}, delivered("ab")) == (0, 0, True)


def test_prompt_is_bounded_by_the_body_bytes_and_the_template_slack() -> None:
    assert bill({"prompt_tokens": 2**64 - 1}, delivered("a"))[0] == 200 + PROMPT_SLACK_TOKENS


def test_prompt_is_bounded_by_the_context_when_known() -> None:
    assert bill({"prompt_tokens": 1000}, delivered("a"), context=512)[0] == 512


def test_each_image_part_allows_its_tokens_and_a_file_part_leaves_only_the_context() -> None:
    image = {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}
    messages = [{"role": "user", "content": [{"type": "text", "text": "what is it"}, image, image]}]
    claim = {"prompt_tokens": 10**9}
    assert bill(claim, delivered("a"), messages=messages)[0] == 200 + PROMPT_SLACK_TOKENS + 2 * IMAGE_TOKENS
    by_id = [{"role": "user", "content": [{"type": "file", "file": {"file_id": "file-1"}}]}]
    assert bill(claim, delivered("a"), messages=by_id)[0] == PLANE_MAX_PROMPT_TOKENS
    assert bill(claim, delivered("a"), messages=by_id, context=8192)[0] == 8192


def test_a_rescue_adds_the_delivered_text_to_the_prompt_bound() -> None:
    delivery = delivered("x" * 300)
    delivery.rescued_bytes = 300
    assert bill({"prompt_tokens": 10**9}, delivery)[0] == 200 + 300 + PROMPT_SLACK_TOKENS


def test_embeddings_have_no_completion_tokens() -> None:
    request = MeteredRequest("embeddings", {"input": "abc"}, 30, "provider")
    assert meter().bill(request, Delivery(), {"prompt_tokens": 2, "completion_tokens": 5}, "t") == (2, 0, True)


def test_a_node_price_is_held_between_zero_and_the_bound() -> None:
    assert bounded_price(2.5) == 2.5
    assert bounded_price(-1.0) == 0.0
    assert bounded_price(float("inf")) == MAX_PRICE
    assert bounded_price(float("nan")) is None
    assert bounded_price(None) is None
