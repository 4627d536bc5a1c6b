"""Properties of the plane's edge under generated input (Hypothesis), over real HTTP to a real plane:

- no body, header or nesting a client can send makes a 5xx;
- a body that OpenAI's vendored request schema refuses never reaches the upstream, and one it accepts is not
  refused by the plane for its shape (only for what the plane itself rules: model, tool_choice, depth).

The verdict is taken from the vendored schema file directly, not through the plane's code. Examples are
derandomized so that a run is reproducible; the budget keeps the file to a few seconds of `make test`.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import jsonschema_rs
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from server.api.schema import SCHEMA_FILE
from server.api.validation import MAX_JSON_DEPTH
from tests.conftest import ADMIN_KEY, MODEL, Gateway

COMPONENTS = {
    "chat/completions": "CreateChatCompletionRequest",
    "completions": "CreateCompletionRequest",
    "embeddings": "CreateEmbeddingRequest",
}
_document = json.loads(SCHEMA_FILE.read_text())
SCHEMAS = {
    path: jsonschema_rs.Draft202012Validator({"$ref": f"#/components/schemas/{name}", **_document})
    for path, name in COMPONENTS.items()
}

PROPERTIES = settings(
    max_examples=200,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

# -- strategies ----------------------------------------------------------------------------------------

scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20)
)
json_values = st.recursive(
    scalars,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=12,
)
roles = st.sampled_from(["system", "developer", "user", "assistant", "tool", "function", "wizard"])
content_parts = st.lists(
    st.fixed_dictionaries({"type": st.sampled_from(["text", "image_url", "video"])}, optional={"text": st.text()}),
    max_size=2,
)
messages = st.fixed_dictionaries(
    {"role": roles | json_values},
    optional={
        "content": st.text(max_size=30) | content_parts | json_values,
        "name": st.text(max_size=8),
        "tool_call_id": st.text(max_size=8),
    },
)
# Each known parameter: a value of about the right shape, or anything at all.
sampling = {
    "temperature": st.floats(-1, 3) | json_values,
    "top_p": st.floats(-0.5, 1.5) | json_values,
    "n": st.integers(-1, 200) | json_values,
    "max_tokens": st.integers(-5, 10**6) | json_values,
    "stop": st.text(max_size=5) | st.lists(st.text(max_size=5), max_size=6) | json_values,
    "stream": st.booleans() | json_values,
    "stream_options": st.fixed_dictionaries({}, optional={"include_usage": st.booleans() | json_values}),
    "seed": st.integers() | json_values,
    "user": st.text(max_size=8) | json_values,
    "logit_bias": st.dictionaries(st.text(max_size=4), st.integers(-200, 200)) | json_values,
}
tools = st.lists(
    st.fixed_dictionaries(
        {"type": st.sampled_from(["function", "custom", "retrieval"])},
        optional={
            "function": st.fixed_dictionaries({"name": st.text(max_size=8)}, optional={"parameters": json_values})
        },
    ),
    max_size=2,
)
models = st.just(MODEL) | json_values
chat_bodies = st.fixed_dictionaries(
    {"model": models, "messages": st.lists(messages, max_size=3) | json_values},
    optional={
        **sampling,
        "max_completion_tokens": st.integers(-5, 10**6) | json_values,
        "tools": tools | json_values,
        "tool_choice": st.sampled_from(["auto", "none", "required"]) | json_values,
        "response_format": st.fixed_dictionaries({"type": st.sampled_from(["text", "json_object", "xml"])}),
        "metadata": json_values,
        "vendor_extra": json_values,
    },
)
completion_bodies = st.fixed_dictionaries(
    {"model": models},
    optional={
        **sampling,
        "prompt": st.text(max_size=30) | st.lists(st.integers(0, 50_000), max_size=4) | json_values,
        "echo": st.booleans() | json_values,
        "logprobs": st.integers(-1, 7) | json_values,
        "suffix": st.text(max_size=5) | json_values,
    },
)
embedding_bodies = st.fixed_dictionaries(
    {"model": models},
    optional={
        "input": st.text(max_size=30) | st.lists(st.text(max_size=8), max_size=3) | json_values,
        "encoding_format": st.sampled_from(["float", "base64", "hex"]) | json_values,
        "dimensions": st.integers(-1, 5000) | json_values,
        "user": st.text(max_size=8) | json_values,
        "stream": st.booleans(),
    },
)
bodies = (
    st.tuples(st.just("chat/completions"), chat_bodies | st.dictionaries(st.text(max_size=10), json_values))
    | st.tuples(st.just("completions"), completion_bodies)
    | st.tuples(st.just("embeddings"), embedding_bodies)
)
# Header values as bytes: anything HTTP/1.1 can carry in a field (no CR, LF or NUL), non-UTF-8 included.
_field_bytes = st.binary(max_size=40) | st.text(max_size=20).map(str.encode)
header_bytes = _field_bytes.map(lambda raw: bytes(b for b in raw if b >= 0x20 and b != 0x7F).strip())
# The cache directives header has a grammar of its own: mostly near-misses of it.
cache_directives = header_bytes | st.builds(
    lambda name, value: f"{name}={value}".encode(),
    st.sampled_from(["ttl", "TTL", "bypass", "no-store"]),
    st.integers(-5, 10**30) | st.text(alphabet="0123456789²³¹٣૩", max_size=8) | st.just("9" * 5000),
)


# -- helpers -------------------------------------------------------------------------------------------


@pytest.fixture
def http(gateway: Gateway) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=gateway.plane.v1, timeout=30) as client:
        yield client


def with_deep_field(body: dict[str, Any], depth: int) -> bytes:
    """The body as JSON, with a value nested `depth` arrays deep under an extra field (written by hand: JSON
    encoders stop long before the depths worth trying)."""
    text = json.dumps({**body, "deep": "DEEP"})
    return text.replace('"DEEP"', "[" * depth + "1" + "]" * depth).encode()


def send(gateway: Gateway, http: httpx.Client, path: str, raw: bytes, headers: dict[str, Any]) -> tuple[int, bool]:
    """POST; returns the status and whether the upstream received the request."""
    before = len(gateway.upstream.requests)
    response = http.post(f"/{path}", content=raw, headers=headers)
    assert response.status_code < 500, response.text
    assert response.headers["content-type"].startswith(("application/json", "text/event-stream")), response.text
    return response.status_code, len(gateway.upstream.requests) > before


# -- properties ----------------------------------------------------------------------------------------


@PROPERTIES
@given(case=bodies)
def test_generated_bodies_never_5xx_and_schema_violations_never_reach_the_upstream(
    gateway: Gateway, http: httpx.Client, case: tuple[str, dict[str, Any]]
) -> None:
    path, body = case
    headers = gateway.auth() | {"Content-Type": "application/json", "X-Hatchway-Cache": "bypass"}
    status, forwarded = send(gateway, http, path, json.dumps(body).encode(), headers)
    valid = SCHEMAS[path].is_valid(body)
    if forwarded or status == 200:
        assert valid, f"{path} forwarded a body its schema refuses: {body!r}"
    if valid and body.get("model") == MODEL:
        # Schema-valid and routable: only the plane's own rules may refuse it.
        own_rule = path == "chat/completions" and body.get("tool_choice") is not None and not body.get("tools")
        assert forwarded or own_rule or (path == "embeddings" and body.get("stream")), (status, body)


@PROPERTIES
@given(case=bodies, depth=st.integers(min_value=1, max_value=1100))
def test_deep_nesting_never_5xx_and_past_the_limit_never_reaches_the_upstream(
    gateway: Gateway, http: httpx.Client, case: tuple[str, dict[str, Any]], depth: int
) -> None:
    path, body = case
    headers = gateway.auth() | {"Content-Type": "application/json"}
    _, forwarded = send(gateway, http, path, with_deep_field(body, depth), headers)
    if depth + 1 > MAX_JSON_DEPTH:
        assert not forwarded


@PROPERTIES
# Found by hand: a digit that int() refuses, and more digits than int() converts.
@example(content_type=b"application/json", authorization="good", cache="ttl=²".encode(), request_id=b"")
@example(content_type=b"application/json", authorization="good", cache=b"ttl=" + b"9" * 5000, request_id=b"")
@given(
    content_type=st.sampled_from([b"application/json", b"application/json; charset=utf-8", b"text/plain"])
    | header_bytes,
    authorization=st.sampled_from(["good", "missing"]) | header_bytes,
    cache=cache_directives,
    request_id=header_bytes,
)
def test_odd_headers_never_5xx(
    gateway: Gateway, http: httpx.Client, content_type: bytes, authorization: Any, cache: bytes, request_id: bytes
) -> None:
    headers: dict[str, Any] = {"Content-Type": content_type, "X-Hatchway-Cache": cache, "X-Request-Id": request_id}
    if authorization == "good":
        headers["Authorization"] = f"Bearer {gateway.api_key}"
    elif authorization != "missing":
        headers["Authorization"] = (b"Bearer " + authorization).strip()
    body = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}).encode()
    _, forwarded = send(gateway, http, "chat/completions", body, headers)
    if forwarded:
        assert authorization == "good"
        media_type = content_type.partition(b";")[0].strip().lower()
        assert media_type in (b"", b"application/json")
    # The admin API reads the same headers the same way.
    admin_headers = {**headers, "Authorization": f"Bearer {ADMIN_KEY}"}
    response = http.post(f"{gateway.plane.url}/admin/v1/orgs", content=b'{"name": "x"}', headers=admin_headers)
    assert response.status_code < 500, response.text
