"""Requests aiohttp cannot parse, sent as raw bytes: each is answered in the OpenAI envelope
(server/serving/connections.py), and the connection is closed after it."""

from __future__ import annotations

import socket
import time
from urllib.parse import urlsplit

import httpx
import orjson
import pytest

from tests.conftest import Gateway, RunningPlane


def exchange(url: str, data: bytes, timeout_s: float = 10.0) -> bytes:
    """Send `data` on a new connection and read until the plane closes it (a socket timeout if it does not)."""
    parts = urlsplit(url)
    with socket.create_connection((parts.hostname or "127.0.0.1", parts.port or 80), timeout=timeout_s) as sock:
        sock.sendall(data)
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
        return received


def parse(response: bytes) -> tuple[int, dict[str, str], dict[str, object]]:
    head, _, body = response.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ")[1])
    headers = {name.lower(): value.strip() for name, _, value in (line.partition(":") for line in lines[1:])}
    return status, headers, orjson.loads(body)


def assert_envelope(response: bytes, status: int, code: str) -> str:
    got, headers, body = parse(response)
    assert got == status, response[:300]
    assert headers["content-type"].startswith("application/json")
    assert headers["x-request-id"]
    error = body["error"]
    assert isinstance(error, dict) and error["type"] == "invalid_request_error" and error["code"] == code
    assert set(error) == {"message", "type", "param", "code"}
    return str(error["message"])


HOST = b"Host: plane\r\n"


@pytest.mark.parametrize(
    ("request_bytes", "status", "code"),
    [
        pytest.param(b"G\x01T /v1/models HTTP/1.1\r\n" + HOST + b"\r\n", 400, "bad_request_line", id="bad-method"),
        pytest.param(b"GET /v1/models HTTP/9.9\r\n" + HOST + b"\r\n", 400, "bad_request_line", id="bad-version"),
        pytest.param(b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\n" + HOST + b"\r\n", 414, "uri_too_long", id="long-url"),
        pytest.param(
            b"GET /v1/models HTTP/1.1\r\n" + HOST + b"X-Big: " + b"b" * 9000 + b"\r\n\r\n",
            431,
            "request_header_fields_too_large",
            id="long-header",
        ),
        pytest.param(
            b"GET /v1/models HTTP/1.1\r\n" + HOST + b"".join(b"X-H%d: v\r\n" % i for i in range(200)) + b"\r\n",
            431,
            "request_header_fields_too_large",
            id="too-many-headers",
        ),
        pytest.param(
            b"GET /v1/models HTTP/1.1\r\n" + HOST + b"Bad\x01Name: v\r\n\r\n", 400, "bad_request", id="bad-header"
        ),
        pytest.param(
            b"POST /v1/chat/completions HTTP/1.1\r\n"
            + HOST
            + b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            400,
            "bad_request",
            id="smuggling-cl-and-te",
        ),
        pytest.param(
            b"POST /v1/chat/completions HTTP/1.1\r\n" + HOST + b"Content-Length: 5\r\nContent-Length: 6\r\n\r\nhello",
            400,
            "bad_request",
            id="smuggling-two-lengths",
        ),
    ],
)
def test_a_request_aiohttp_cannot_parse_is_answered_in_the_envelope(
    plane: RunningPlane, request_bytes: bytes, status: int, code: str
) -> None:
    assert_envelope(exchange(plane.url, request_bytes), status, code)


def chunked_head(gateway: Gateway) -> bytes:
    return (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: plane\r\nAuthorization: Bearer {gateway.api_key}\r\n"
        "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
    ).encode()


BAD_CHUNK = b"zz\r\nnot a chunk\r\n"


def test_a_body_with_invalid_chunked_framing_is_a_400_in_the_envelope(gateway: Gateway) -> None:
    response = exchange(gateway.plane.url, chunked_head(gateway) + b'5\r\n{"mod\r\n' + BAD_CHUNK)
    assert_envelope(response, 400, "bad_request")


def test_a_body_whose_framing_breaks_while_the_handler_reads_it_is_a_400_at_once(gateway: Gateway) -> None:
    # The body timeout (30 s) is longer than this socket's: an answer at all means it came at once.
    port = urlsplit(gateway.plane.url).port or 80
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(chunked_head(gateway) + b'5\r\n{"mod\r\n')
        time.sleep(0.5)  # the handler is now waiting for the rest of the body
        sock.sendall(BAD_CHUNK)
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
    assert_envelope(received, 400, "bad_framing")


def test_the_plane_serves_on_after_protocol_errors(gateway: Gateway) -> None:
    for _ in range(20):
        exchange(gateway.plane.url, b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 64)  # a TLS hello
    models = httpx.get(f"{gateway.plane.v1}/models", headers=gateway.auth())
    assert models.status_code == 200
