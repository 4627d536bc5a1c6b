"""How a provider's transport errors become the plane's (server/targets/provider.py TRANSPORT_ERRORS): one row per
error of the HTTP client, the most specific row winning; and a local mistake (a base URL the client cannot use, a
header value it cannot send) is a configuration error, which says nothing about the target's health."""

from __future__ import annotations

import logging
import ssl
from collections.abc import Callable

import httpx
import pytest

from server.errors import (
    UpstreamConfigError,
    UpstreamConnectError,
    UpstreamError,
    UpstreamProtocolError,
    UpstreamRefusedError,
    UpstreamTimeoutError,
)
from server.routing.health import is_target_fault
from server.targets.http import (
    BodyTooLargeError,
    ConnectError,
    DisconnectedError,
    Endpoint,
    HTTPClientError,
    InvalidHeaderError,
    InvalidURLError,
    ProtocolError,
)
from server.targets.provider import TRANSPORT_ERRORS, Phase, transport_error
from tests.conftest import MODEL, RunningPlane, free_port
from tests.support.mock_upstream import MockUpstream

HEADERS, BODY, STREAM = Phase.HEADERS, Phase.BODY, Phase.STREAM
NAME = "provider 'p'"
SECRET = "sk-secret-0123456789"
# A provider address the admin API takes (http, a host) that no client can send: its host is not ASCII.
BAD_BASE_URL = "http://bad-höst.invalid/v1"


def invalid_url() -> InvalidURLError:
    """What the client raises for a base URL whose port is not one (which an admin's URL check lets through)."""
    try:
        Endpoint.parse("http://127.0.0.1:99999/v1/chat/completions")
    except InvalidURLError as exc:
        return exc
    raise AssertionError("the URL was accepted")


# (what the transport raised, where, the plane's error, what the tenant is told)
CASES: list[tuple[Exception, Phase, type[UpstreamError], str]] = [
    (ConnectError("cannot connect to 10.1.2.3:443: refused", "connection refused"), HEADERS, UpstreamRefusedError,
     f"{NAME} is unreachable (connection refused)"),
    (TimeoutError(), HEADERS, UpstreamTimeoutError, f"{NAME} sent no response headers in time"),
    (TimeoutError(), BODY, UpstreamTimeoutError, f"{NAME}: the answer's body stalled"),
    (TimeoutError(), STREAM, UpstreamTimeoutError, f"{NAME}: the stream stalled"),
    (BodyTooLargeError("the answer's body declares 99 bytes; the limit is 9"), BODY, UpstreamProtocolError,
     f"{NAME} sent an answer larger than the plane accepts"),
    (DisconnectedError("the upstream closed the connection"), HEADERS, UpstreamConnectError,
     f"{NAME}: the connection broke before the answer's headers"),
    (ProtocolError("malformed answer"), BODY, UpstreamConnectError, f"{NAME}: the connection broke during the answer"),
    (DisconnectedError("the connection is closed"), STREAM, UpstreamConnectError, f"{NAME}: the stream was cut"),
    (ssl.SSLError("bad record mac"), STREAM, UpstreamConnectError, f"{NAME}: the stream was cut"),
    (ConnectionResetError("reset by peer"), HEADERS, UpstreamConnectError,
     f"{NAME}: the connection broke before the answer's headers"),
    (invalid_url(), HEADERS, UpstreamConfigError, f"{NAME} is misconfigured: its base URL is not a usable http(s) URL"),
    (InvalidHeaderError("header Authorization holds a line break"), HEADERS, UpstreamConfigError,
     f"{NAME} is misconfigured: a header it sends (an API key?) cannot be sent as HTTP"),
    (UnicodeEncodeError("latin-1", "é", 0, 1, "ordinal not in range"), HEADERS, UpstreamConfigError,
     f"{NAME} is misconfigured"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("raised", "phase", "expected", "message"), CASES, ids=[f"{type(c[0]).__name__}-{c[1].name}" for c in CASES]
)
def test_a_transport_error_becomes_the_planes_error_its_row_names(
    raised: Exception, phase: Phase, expected: type[UpstreamError], message: str
) -> None:
    error = transport_error(raised, phase, "p", (SECRET,))
    assert type(error) is expected
    assert error.message == message
    assert str(raised) in str(error)  # the operator's log has the transport's own words


def test_every_row_of_the_table_is_exercised() -> None:
    covered = {row for raised, *_ in CASES for row in type(raised).__mro__ if row in TRANSPORT_ERRORS}
    assert covered == set(TRANSPORT_ERRORS)
    assert HTTPClientError in TRANSPORT_ERRORS  # the client's own errors all have a row, whatever comes next


def test_a_tenant_is_told_neither_the_address_nor_a_key_and_the_log_no_key() -> None:
    raised = ConnectError(f"cannot connect to 10.1.2.3:443 with {SECRET}: refused", "connection refused")
    error = transport_error(raised, HEADERS, "p", (SECRET,))
    assert "10.1.2.3" not in error.message and "10.1.2.3" in str(error)
    assert SECRET not in error.message and SECRET not in str(error)


def test_a_configuration_error_is_the_planes_500_and_no_fault_of_the_target() -> None:
    error = transport_error(invalid_url(), HEADERS, "p", ())
    assert (error.status, error.type, error.code) == (500, "api_error", "upstream_misconfigured")
    assert not is_target_fault(error)
    assert is_target_fault(transport_error(ConnectionRefusedError(), HEADERS, "p", ()))


# -- through the plane ---------------------------------------------------------------------------------------------


def add_provider(plane: RunningPlane, org: str, name: str, base_url: str) -> None:
    """A provider whose breaker opens after two failures, never retried."""
    body = {"org": org, "name": name, "base_url": base_url, "api_keys": ["sk-x"], "models": [MODEL]}
    plane.admin.post("/providers", body | {"policy": {"breaker_failures": 2, "max_retries": 0}})


def chat(plane: RunningPlane, key: str) -> httpx.Response:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}
    return httpx.post(f"{plane.v1}/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"})


def test_a_bad_base_url_does_not_open_the_breaker_while_a_refused_connection_does(plane: RunningPlane) -> None:
    plane.create_org("misconfigured")
    plane.create_org("refusing")
    add_provider(plane, "misconfigured", "bad-url", BAD_BASE_URL)
    add_provider(plane, "refusing", "gone", f"http://127.0.0.1:{free_port()}/v1")
    misconfigured, refusing = plane.create_key("misconfigured"), plane.create_key("refusing")
    refused = [chat(plane, refusing) for _ in range(3)]
    assert [r.status_code for r in refused] == [502, 502, 503]  # the third finds the breaker open
    assert refused[2].json()["error"]["code"] == "service_unavailable"
    answers = [chat(plane, misconfigured) for _ in range(3)]
    assert [a.status_code for a in answers] == [500, 500, 500]  # every one reaches the target: its breaker is closed
    assert {a.json()["error"]["code"] for a in answers} == {"upstream_misconfigured"}


def test_a_misconfigured_provider_is_named_to_the_tenant_logged_once_and_passed_over(
    plane: RunningPlane, make_upstream: Callable[..., MockUpstream], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    plane.create_org()
    add_provider(plane, "acme", "bad-url", BAD_BASE_URL)
    key = plane.create_key()
    alone = chat(plane, key)
    assert alone.status_code == 500
    assert alone.json()["error"]["message"] == (
        "provider 'bad-url' is misconfigured: its base URL is not a usable http(s) URL"
    )
    assert "höst" not in alone.text  # the address is the operator's to read, in the log
    plane.add_provider("backup", make_upstream("backup"))
    for _ in range(3):
        served = chat(plane, key)
        assert served.status_code == 200
        assert served.headers["x-hatchway-route"] == "backup"
    said = [r for r in caplog.records if "misconfigured" in r.getMessage()]
    assert len(said) == 1 and said[0].levelno == logging.ERROR
    assert "höst" in said[0].getMessage()
