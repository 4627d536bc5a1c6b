"""The bytes of a stream, read with a raw HTTP client: framing, [DONE], and the usage chunk."""

from __future__ import annotations

import json
from typing import Any

import httpx

from tests.conftest import MODEL, Gateway


def stream_events(gateway: Gateway, **fields: Any) -> tuple[httpx.Response, list[bytes]]:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "stream": True, **fields}
    with httpx.stream("POST", f"{gateway.plane.v1}/chat/completions", json=body, headers=gateway.auth()) as response:
        raw = response.read()
    assert raw.endswith(b"\n\n")
    return response, raw[:-2].split(b"\n\n")


def test_every_event_is_one_data_line_and_the_last_is_done(gateway: Gateway) -> None:
    response, events = stream_events(gateway)
    assert response.headers["content-type"].startswith("text/event-stream")
    assert all(e.startswith(b"data: ") and b"\n" not in e for e in events)
    assert events[-1] == b"data: [DONE]"
    chunks = [json.loads(e[6:]) for e in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)


def test_usage_chunk_is_stripped_when_the_client_did_not_ask(gateway: Gateway) -> None:
    _, events = stream_events(gateway)
    chunks = [json.loads(e[6:]) for e in events[:-1]]
    assert all(c["choices"] for c in chunks)
    # ...although the plane always asks the upstream for it, to account for the request.
    assert gateway.upstream.requests[-1].json["stream_options"] == {"include_usage": True}


def test_include_usage_ends_with_a_usage_chunk_without_choices(gateway: Gateway) -> None:
    _, events = stream_events(gateway, stream_options={"include_usage": True})
    last = json.loads(events[-2][6:])
    assert last["choices"] == []
    assert last["usage"]["completion_tokens"] == 3
    assert last["usage"]["total_tokens"] == last["usage"]["prompt_tokens"] + 3


def test_stream_headers_name_the_route_and_request_id(gateway: Gateway) -> None:
    response, _ = stream_events(gateway)
    assert response.headers["x-hatchway-route"] == "mock-a"
    assert response.headers["x-hatchway-attempts"] == "1"
    assert response.headers["x-request-id"]


def test_stream_refused_before_commit_is_an_ordinary_error_response(gateway: Gateway) -> None:
    gateway.upstream.fail_status = 503
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "stream": True}
    response = httpx.post(f"{gateway.plane.v1}/chat/completions", json=body, headers=gateway.auth())
    assert response.status_code == 502
    assert response.json()["error"]["type"] == "api_error"
