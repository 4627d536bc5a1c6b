"""Every bad input gets the OpenAI error envelope with the right status, a request id, and never a 500."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from tests.conftest import MODEL, Gateway

OK_MESSAGES = [{"role": "user", "content": "hi"}]


def chat(**fields: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": OK_MESSAGES, **fields}


def assert_envelope(response: httpx.Response, status: int, error_type: str, param: str | None = None) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    assert response.headers["x-request-id"]
    body = response.json()
    assert set(body) == {"error"}
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == error_type
    assert isinstance(error["message"], str) and error["message"]
    if param is not None:
        assert error["param"] == param
    return error  # type: ignore[no-any-return]


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (b"{not json", "not valid JSON"),
        (b"", "empty"),
        (b"[1, 2]", "JSON object"),
        (b'"text"', "JSON object"),
        (b"null", "JSON object"),
    ],
    ids=["malformed", "empty", "array", "string", "null"],
)
def test_unparseable_body_is_400(gateway: Gateway, raw: bytes, expected: str) -> None:
    response = httpx.post(f"{gateway.plane.v1}/chat/completions", content=raw, headers=gateway.auth())
    assert expected in assert_envelope(response, 400, "invalid_request_error")["message"]


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"messages": OK_MESSAGES}, "model"),
        ({"model": 42, "messages": OK_MESSAGES}, "model"),
        ({"model": MODEL}, "messages"),
        (chat(messages="hi"), "messages"),
        (chat(messages=[]), "messages"),
        (chat(messages=["hi"]), "messages[0]"),
        (chat(messages=[{"role": "wizard", "content": "hi"}]), "messages[0].role"),
        (chat(messages=[{"role": "user"}]), "messages[0].content"),
        (chat(messages=[{"role": "user", "content": 5}]), "messages[0].content"),
        (chat(temperature="hot"), "temperature"),
        (chat(temperature=3), "temperature"),
        (chat(top_p=1.5), "top_p"),
        (chat(n=0), "n"),
        (chat(n=1.5), "n"),
        (chat(stop=5), "stop"),
        (chat(stop=["a", "b", "c", "d", "e"]), "stop"),
        (chat(max_tokens="many"), "max_tokens"),
        (chat(max_tokens=True), "max_tokens"),
        (chat(stream="yes"), "stream"),
        (chat(tools="search"), "tools"),
        (chat(tools=[{"type": "function"}]), "tools[0].function"),
        (chat(tools=[{"type": "retrieval", "function": {"name": "f"}}]), "tools[0].type"),
    ],
)
def test_invalid_chat_field_is_400_naming_the_param(gateway: Gateway, body: dict[str, Any], param: str) -> None:
    response = httpx.post(f"{gateway.plane.v1}/chat/completions", json=body, headers=gateway.auth())
    assert_envelope(response, 400, "invalid_request_error", param=param)


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("completions", {"model": MODEL}, "prompt"),
        ("completions", {"model": MODEL, "prompt": 7}, "prompt"),
        ("embeddings", {"model": MODEL}, "input"),
        ("embeddings", {"model": MODEL, "input": []}, "input"),
        ("embeddings", {"model": MODEL, "input": [1, "a"]}, "input"),
        ("embeddings", {"model": MODEL, "input": "a", "encoding_format": "hex"}, "encoding_format"),
        ("embeddings", {"model": MODEL, "input": "a", "stream": True}, "stream"),
    ],
)
def test_invalid_completion_and_embedding_fields_are_400(
    gateway: Gateway, path: str, body: dict[str, Any], param: str
) -> None:
    response = httpx.post(f"{gateway.plane.v1}/{path}", json=body, headers=gateway.auth())
    assert_envelope(response, 400, "invalid_request_error", param=param)


def test_missing_key_is_401(gateway: Gateway) -> None:
    response = httpx.post(f"{gateway.plane.v1}/chat/completions", json=chat())
    assert assert_envelope(response, 401, "authentication_error")["code"] == "missing_api_key"


def test_wrong_key_is_401(gateway: Gateway) -> None:
    response = httpx.post(
        f"{gateway.plane.v1}/chat/completions", json=chat(), headers={"Authorization": "Bearer hw-nope"}
    )
    assert assert_envelope(response, 401, "authentication_error")["code"] == "invalid_api_key"


def test_non_bearer_authorization_is_401(gateway: Gateway) -> None:
    response = httpx.post(
        f"{gateway.plane.v1}/chat/completions", json=chat(), headers={"Authorization": f"Basic {gateway.api_key}"}
    )
    assert_envelope(response, 401, "authentication_error")


def test_unknown_model_is_404(gateway: Gateway) -> None:
    response = httpx.post(f"{gateway.plane.v1}/chat/completions", json=chat(model="gpt-9"), headers=gateway.auth())
    assert assert_envelope(response, 404, "invalid_request_error", param="model")["code"] == "model_not_found"


def test_model_outside_the_keys_allow_list_is_403(gateway: Gateway) -> None:
    gateway.plane.add_provider("mock-b", gateway.upstream, models=["other"])
    key = gateway.plane.create_key(models=["other"])
    response = httpx.post(
        f"{gateway.plane.v1}/chat/completions", json=chat(), headers={"Authorization": f"Bearer {key}"}
    )
    assert_envelope(response, 403, "permission_error", param="model")


def test_body_over_the_limit_is_413_by_content_length(gateway: Gateway) -> None:
    big = chat(messages=[{"role": "user", "content": "x" * 100_000}])
    response = httpx.post(f"{gateway.plane.v1}/chat/completions", json=big, headers=gateway.auth())
    assert_envelope(response, 413, "invalid_request_error")


def test_body_over_the_limit_is_413_when_chunked(gateway: Gateway) -> None:
    def chunks():  # no Content-Length: the limit must hold while reading
        for _ in range(100):
            yield b"x" * 1024

    response = httpx.post(f"{gateway.plane.v1}/chat/completions", content=chunks(), headers=gateway.auth())
    assert_envelope(response, 413, "invalid_request_error")


def test_unknown_route_is_404_in_the_envelope(gateway: Gateway) -> None:
    response = httpx.get(f"{gateway.plane.v1}/nothing-here", headers=gateway.auth())
    assert_envelope(response, 404, "invalid_request_error")


def test_wrong_method_is_405_in_the_envelope(gateway: Gateway) -> None:
    response = httpx.get(f"{gateway.plane.v1}/chat/completions", headers=gateway.auth())
    assert_envelope(response, 405, "invalid_request_error")
    assert "POST" in response.headers["allow"]


def test_admin_api_refuses_an_api_key(gateway: Gateway) -> None:
    response = httpx.get(f"{gateway.plane.url}/admin/v1/orgs", headers=gateway.auth())
    assert_envelope(response, 401, "authentication_error")


def test_upstream_rejection_passes_its_reason_through(gateway: Gateway) -> None:
    gateway.upstream.fail_status = 400
    response = httpx.post(f"{gateway.plane.v1}/chat/completions", json=chat(), headers=gateway.auth())
    assert_envelope(response, 400, "invalid_request_error")


def test_upstream_server_error_is_502_not_500(gateway: Gateway) -> None:
    gateway.upstream.fail_status = 500
    response = httpx.post(f"{gateway.plane.v1}/chat/completions", json=chat(), headers=gateway.auth())
    assert_envelope(response, 502, "api_error")


def test_upstream_rejecting_the_provider_key_is_502_not_401(gateway: Gateway) -> None:
    # A 401 from the provider is about *our* provider key; the client's key was fine.
    gateway.upstream.fail_status = 401
    response = httpx.post(f"{gateway.plane.v1}/chat/completions", json=chat(), headers=gateway.auth())
    assert "401" in assert_envelope(response, 502, "api_error")["message"]
