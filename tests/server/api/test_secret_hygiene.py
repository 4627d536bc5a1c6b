"""Secrets and internals stay inside: what a malformed request makes the plane log, and what a tenant learns of an
upstream's failure (server/serving/connections.py, server/errors.py, server/redact.py)."""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from server.redact import mask
from tests.conftest import MODEL, Gateway, RunningPlane
from tests.server.serving.test_protocol_errors import exchange
from tests.support.mock_upstream import MockUpstream

SECRET = "hw-0123456789abcdefSECRETSECRET"
BODY = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}
# Each carries SECRET where aiohttp's own error message would quote it: the offending line.
MALFORMED = [
    f"GET /v1/models HTTP/1.1\r\nHost: p\r\nAuthorization: Bearer {SECRET}\x01\r\n\r\n".encode(),
    f"GET /v1/models HTTP/1.1\r\nHost: p\r\nAuthorization: Bearer {SECRET}{'x' * 9000}\r\n\r\n".encode(),
    f"G\x01T /v1/models?key={SECRET} HTTP/1.1\r\nHost: p\r\n\r\n".encode(),
    f"POST /v1/chat/completions HTTP/1.1\r\nHost: p\r\nAuthorization: Bearer {SECRET}\r\n"
    "Content-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n".encode(),
]


def test_malformed_requests_never_put_their_bytes_in_the_log_and_the_log_stays_small(
    plane: RunningPlane, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda i: exchange(plane.url, MALFORMED[i % len(MALFORMED)]), range(500)))
    assert all(answer.startswith((b"HTTP/1.0 4", b"HTTP/1.1 4")) for answer in answers)
    assert not any(SECRET.encode() in answer for answer in answers)
    assert SECRET not in caplog.text
    # aiohttp alone logged a traceback quoting up to ~4 KB of each request: 2.3 MB for 500 of them.
    assert len(caplog.text) < 20_000, caplog.text[:2000]
    assert "malformed HTTP request from 127.0.0.1" in caplog.text


def test_an_upstream_401_that_echoes_the_provider_key_reaches_the_tenant_without_it(
    gateway: Gateway, caplog: pytest.LogCaptureFixture
) -> None:
    gateway.upstream.fail_status = 401
    gateway.upstream.fail_message = "Incorrect API key provided: {key}. You can find your API key at ..."
    response = httpx.post(f"{gateway.plane.v1}/chat/completions", json=BODY, headers=gateway.auth())
    assert response.status_code == 502
    error = response.json()["error"]
    assert error["message"] == (
        "provider 'mock-a' answered HTTP 401 (authentication failed upstream); the plane's log has the details"
    )
    assert error["type"] == "api_error"
    assert "sk-mock-a" not in response.text
    # The operator's log has the upstream's words, with the key masked.
    assert "Incorrect API key provided: ***" in caplog.text
    assert "sk-mock-a" not in caplog.text


def test_an_upstream_5xx_text_stays_in_the_log(gateway: Gateway, caplog: pytest.LogCaptureFixture) -> None:
    gateway.upstream.fail_status = 500
    gateway.upstream.fail_message = "database at 10.0.3.7:5432 is down"
    response = httpx.post(f"{gateway.plane.v1}/chat/completions", json=BODY, headers=gateway.auth())
    assert response.status_code == 502
    assert "10.0.3.7" not in response.text
    assert "provider 'mock-a' answered HTTP 500 (internal server error)" in response.json()["error"]["message"]
    assert "database at 10.0.3.7:5432 is down" in caplog.text


def test_a_client_error_from_upstream_passes_through_with_secrets_masked(gateway: Gateway) -> None:
    # OpenAI's own words are what a developer needs to fix the request; a credential in them is not.
    gateway.upstream.fail_status = 400
    gateway.upstream.fail_message = "Invalid 'messages': sent with key {key}; see sk-proj-abcdefghijklmnop"
    response = httpx.post(f"{gateway.plane.v1}/chat/completions", json=BODY, headers=gateway.auth())
    assert response.status_code == 400
    assert response.json()["error"]["message"] == "Invalid 'messages': sent with key ***; see sk-***"


def test_a_refused_connection_names_the_provider_never_its_address(
    plane: RunningPlane, make_upstream: Callable[..., MockUpstream], caplog: pytest.LogCaptureFixture
) -> None:
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]  # nothing listens there once this socket closes
    plane.create_org()
    plane.admin.post(
        "/providers",
        {
            "org": "acme",
            "name": "gone",
            "base_url": f"http://127.0.0.1:{port}/v1",
            "api_keys": ["sk-x"],
            "models": [MODEL],
        },
    )
    key = plane.create_key()
    response = httpx.post(f"{plane.v1}/chat/completions", json=BODY, headers={"Authorization": f"Bearer {key}"})
    assert response.status_code == 502
    assert response.json()["error"]["message"] == "provider 'gone' is unreachable (connection refused)"
    assert str(port) not in response.text and "127.0.0.1" not in response.text
    assert f"cannot connect to 127.0.0.1:{port}" in caplog.text  # the operator's log says where


@pytest.mark.parametrize(
    ("text", "masked"),
    [
        ("Authorization: Bearer abc.def-ghi", "Authorization: Bearer ***"),
        ("key sk-proj-********abcd refused", "key sk-*** refused"),
        ("url https://x/v1?api_key=s3cr3tvalue&a=1", "url https://x/v1?api_key=***&a=1"),
        ("hwa-0123456789 and hw-abcdefghij", "hwa-*** and hw-***"),
        ("This model's maximum context length is 128 tokens.", "This model's maximum context length is 128 tokens."),
        ("the provider key is my-own-provider-key-42", "the provider key is ***"),
    ],
)
def test_mask_hides_known_secrets_and_credential_shaped_text(text: str, masked: str) -> None:
    assert mask(text, known=["my-own-provider-key-42"]) == masked
