"""Hostile and careless clients at the plane's edge: every body is judged by OpenAI's published request schema
(no stricter, no looser), nothing a client sends makes a 500, and what the plane refuses never reaches an
upstream. Bodies and headers go over real HTTP to a real plane in front of the mock upstream."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest

from server.api.validation import MAX_JSON_DEPTH
from server.config import Config
from tests.conftest import ADMIN_KEY, MODEL, Gateway, RunningPlane
from tests.server.api.test_error_shape import assert_envelope

OK_MESSAGES = [{"role": "user", "content": "hi"}]


@pytest.fixture
def plane_config(plane_config: Config) -> Config:
    # Room for a 100 KB org name: the refusal under test is the name rule's, not the body limit's.
    return plane_config.replace(max_body_bytes=1024 * 1024)


def chat(**fields: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": OK_MESSAGES, **fields}


def post(gateway: Gateway, path: str, body: Any) -> httpx.Response:
    return httpx.post(f"{gateway.plane.v1}/{path}", json=body, headers=gateway.auth())


def nested(depth: int) -> Any:
    """`depth` containers, alternating arrays and objects, around a string."""
    value: Any = "x"
    for level in range(depth):
        value = {"k": value} if level % 2 else [value]
    return value


def deep_body(make: Any, depth: int) -> bytes:
    """The body `make` builds around a value nested `depth` deep, written out by hand: JSON encoders refuse to
    nest that deep, which is the point."""
    opening = "".join('{"k":' if level % 2 else "[" for level in reversed(range(depth)))
    closing = "".join("}" if level % 2 else "]" for level in range(depth))
    return json.dumps(make("DEEP")).replace('"DEEP"', f'{opening}"x"{closing}').encode()


ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}


# -- shapes that used to be a 500 ----------------------------------------------------------------------


@pytest.mark.parametrize("role", [{"name": "user"}, ["user"]], ids=["object", "array"])
def test_role_that_is_not_a_string_is_400_naming_it(gateway: Gateway, role: Any) -> None:
    response = post(gateway, "chat/completions", chat(messages=[{"role": role, "content": "hi"}]))
    error = assert_envelope(response, 400, "invalid_request_error", param="messages[0].role")
    assert "'user'" in error["message"]
    assert gateway.upstream.requests == []


@pytest.mark.parametrize("depth", [MAX_JSON_DEPTH, 254, 600, 1023])
@pytest.mark.parametrize(
    ("path", "field", "make"),
    [
        ("chat/completions", "metadata", lambda deep: chat(metadata={"k": deep})),
        ("chat/completions", "messages", lambda deep: chat(messages=[{"role": "user", "content": [deep]}])),
        (
            "chat/completions",
            "tools",
            lambda deep: chat(tools=[{"type": "function", "function": {"name": "f", "parameters": {"p": deep}}}]),
        ),
        ("chat/completions", "vendor_extra", lambda deep: chat(vendor_extra=deep)),
        ("completions", "prompt", lambda deep: {"model": MODEL, "prompt": deep}),
        ("embeddings", "input", lambda deep: {"model": MODEL, "input": deep}),
    ],
    ids=["metadata", "messages", "tools", "unknown-field", "prompt", "input"],
)
def test_json_nested_deeper_than_the_limit_is_400_naming_the_field(
    gateway: Gateway, depth: int, path: str, field: str, make: Any
) -> None:
    raw = deep_body(make, depth)
    headers = gateway.auth() | {"Content-Type": "application/json"}
    response = httpx.post(f"{gateway.plane.v1}/{path}", content=raw, headers=headers)
    error = assert_envelope(response, 400, "invalid_request_error", param=field)
    assert str(MAX_JSON_DEPTH) in error["message"]
    assert gateway.upstream.requests == []


def test_json_nested_within_the_limit_reaches_the_upstream(gateway: Gateway) -> None:
    # The body, tools, tools[0], function and parameters are five levels; p's value takes the rest, exactly.
    deep = nested(MAX_JSON_DEPTH - 5)
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"p": deep}}}]
    response = post(gateway, "chat/completions", chat(tools=tools))
    assert response.status_code == 200, response.text
    assert gateway.upstream.requests[-1].json["tools"] == tools


NOT_UTF8 = [b"\xff\xfe", b"\xc3\x28", b"\xed\xa0\x80", b"caf\xe9", b"\x80" * 40]


@pytest.mark.parametrize("raw", NOT_UTF8, ids=["ff-fe", "bad-continuation", "surrogate", "latin-1", "continuations"])
def test_authorization_that_is_not_utf8_is_401_on_the_api(gateway: Gateway, raw: bytes) -> None:
    headers = {"Authorization": b"Bearer hw-" + raw}
    response = httpx.post(f"{gateway.plane.v1}/chat/completions", json=chat(), headers=headers)
    assert_envelope(response, 401, "authentication_error")


@pytest.mark.parametrize("raw", NOT_UTF8, ids=["ff-fe", "bad-continuation", "surrogate", "latin-1", "continuations"])
def test_authorization_that_is_not_utf8_is_401_on_the_admin_api(plane: RunningPlane, raw: bytes) -> None:
    headers = {"Authorization": b"Bearer " + ADMIN_KEY.encode() + raw}
    for response in (
        httpx.get(f"{plane.url}/admin/v1/orgs", headers=headers),
        httpx.post(f"{plane.url}/admin/v1/orgs", json={"name": "acme"}, headers=headers),
    ):
        assert_envelope(response, 401, "authentication_error")


def test_authorization_with_non_ascii_text_is_401(gateway: Gateway) -> None:
    headers = {"Authorization": "Bearer hw-clé".encode()}
    response = httpx.get(f"{gateway.plane.v1}/models", headers=headers)
    assert_envelope(response, 401, "authentication_error")


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"ttl_s": 1e300}, "ttl_s"),
        ({"ttl_s": -1}, "ttl_s"),
        ({"ttl_s": "1h"}, "ttl_s"),
        ({"uses": 2**63}, "uses"),
        ({"uses": 0}, "uses"),
        ({"uses": 1.5}, "uses"),
    ],
    ids=["ttl-1e300", "ttl-negative", "ttl-text", "uses-2^63", "uses-0", "uses-fraction"],
)
def test_node_token_with_ttl_or_uses_out_of_range_is_400_naming_it(
    plane: RunningPlane, fields: dict[str, Any], param: str
) -> None:
    plane.create_org("acme")
    body = {"org": "acme", **fields}
    response = httpx.post(f"{plane.url}/admin/v1/node-tokens", json=body, headers=ADMIN)
    assert_envelope(response, 400, "invalid_request_error", param=param)


# -- exactly as strict as the schema -------------------------------------------------------------------


def test_legacy_scoring_completion_reaches_the_upstream(gateway: Gateway) -> None:
    # What evaluation harnesses send to score a prompt: no new tokens, the prompt's own logprobs echoed.
    body = {"model": MODEL, "prompt": "The capital of France is Paris", "max_tokens": 0, "echo": True, "logprobs": 1}
    response = post(gateway, "completions", body)
    assert response.status_code == 200, response.text
    assert gateway.upstream.requests[-1].json == body


@pytest.mark.parametrize(
    "fields",
    [
        {"max_tokens": 0},
        {"stream_options": {"include_usage": True}},
        {"top_k": 40, "repetition_penalty": 1.1},
    ],
    ids=["max-tokens-0", "stream-options-without-stream", "vendor-extras"],
)
def test_schema_valid_chat_reaches_the_upstream_which_judges_it(gateway: Gateway, fields: dict[str, Any]) -> None:
    response = post(gateway, "chat/completions", chat(**fields))
    assert response.status_code == 200, response.text
    sent = gateway.upstream.requests[-1].json
    assert sent is not None and all(sent[k] == v for k, v in fields.items())


def test_nulls_for_optional_parameters_pass(gateway: Gateway) -> None:
    # OpenAI's document marks these `nullable`; clients that set a parameter to None send null.
    nulls = dict.fromkeys(
        ["temperature", "top_p", "n", "max_tokens", "max_completion_tokens", "stop", "seed", "stream", "logprobs"]
    )
    response = post(gateway, "chat/completions", chat(**nulls, stream_options=None))
    assert response.status_code == 200, response.text


def test_upstream_refusal_of_a_schema_valid_body_reaches_the_client(gateway: Gateway) -> None:
    gateway.upstream.fail_status = 400
    body = {"model": MODEL, "prompt": "x", "max_tokens": 0, "echo": True, "logprobs": 1}
    assert_envelope(post(gateway, "completions", body), 400, "invalid_request_error")
    assert len(gateway.upstream.requests) == 1


def test_embeddings_user_that_is_not_a_string_is_400(gateway: Gateway) -> None:
    response = post(gateway, "embeddings", {"model": MODEL, "input": "a", "user": {}})
    assert_envelope(response, 400, "invalid_request_error", param="user")
    assert gateway.upstream.requests == []


def test_embeddings_unknown_parameter_is_400_naming_it(gateway: Gateway) -> None:
    # The embeddings schema, unlike the chat one, says additionalProperties: false.
    response = post(gateway, "embeddings", {"model": MODEL, "input": "a", "truncate": 5})
    error = assert_envelope(response, 400, "invalid_request_error", param="truncate")
    assert "Unrecognized request argument" in error["message"]


def test_tool_choice_without_tools_is_400(gateway: Gateway) -> None:
    response = post(gateway, "chat/completions", chat(tool_choice="auto"))
    assert_envelope(response, 400, "invalid_request_error", param="tool_choice")
    assert gateway.upstream.requests == []


def test_content_part_of_an_unknown_type_is_400_naming_it(gateway: Gateway) -> None:
    messages = [{"role": "user", "content": [{"type": "video", "url": "x"}]}]
    response = post(gateway, "chat/completions", chat(messages=messages))
    error = assert_envelope(response, 400, "invalid_request_error", param="messages[0].content[0].type")
    assert "'text'" in error["message"]


def test_empty_model_is_400(gateway: Gateway) -> None:
    # The schema takes any string; the plane routes on the name, so it refuses an empty one itself.
    assert_envelope(post(gateway, "chat/completions", chat(model=" ")), 400, "invalid_request_error", param="model")


def test_refusal_quotes_a_long_value_only_in_part(gateway: Gateway) -> None:
    response = post(gateway, "embeddings", {"model": MODEL, "input": "a", "encoding_format": "z" * 50_000})
    error = assert_envelope(response, 400, "invalid_request_error", param="encoding_format")
    assert len(error["message"]) < 300


# -- content type --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "content_type",
    ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", "application/jsonp"],
)
@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/embeddings", "/admin/v1/orgs"])
def test_body_that_is_not_declared_json_is_415(gateway: Gateway, path: str, content_type: str) -> None:
    token = ADMIN_KEY if path.startswith("/admin") else gateway.api_key
    headers = {"Authorization": f"Bearer {token}", "Content-Type": content_type}
    body = b'{"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], "input": "a", "name": "x"}'
    response = httpx.post(f"{gateway.plane.url}{path}", content=body, headers=headers)
    assert assert_envelope(response, 415, "invalid_request_error")["code"] == "unsupported_media_type"
    assert gateway.upstream.requests == []


@pytest.mark.parametrize("content_type", ["application/json; charset=utf-8", "Application/JSON", None])
def test_json_with_parameters_or_no_content_type_is_served(gateway: Gateway, content_type: str | None) -> None:
    headers = gateway.auth() | ({"Content-Type": content_type} if content_type else {})
    body = b'{"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}'
    response = httpx.post(f"{gateway.plane.v1}/chat/completions", content=body, headers=headers)
    assert response.status_code == 200, response.text


# -- org names -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    ["a\x00b", "x" * 100_000, "x" * 65, "two words", "a/b", "héllo", ""],
    ids=["nul", "100-kb", "65-chars", "space", "slash", "non-ascii", "empty"],
)
def test_org_name_outside_the_charset_or_length_is_400_naming_it(plane: RunningPlane, name: str) -> None:
    response = httpx.post(f"{plane.url}/admin/v1/orgs", json={"name": name}, headers=ADMIN)
    error = assert_envelope(response, 400, "invalid_request_error", param="name")
    assert len(error["message"]) < 300
    assert plane.admin.get("/orgs")["data"] == []


def test_org_name_of_64_safe_characters_is_accepted(plane: RunningPlane) -> None:
    name = "Acme-corp_2.eu" + "x" * 50
    assert plane.create_org(name)["name"] == name
