"""Operator endpoints: liveness, readiness and Prometheus metrics."""

from __future__ import annotations

import time

import httpx

from server.credentials import hash_key
from tests.conftest import ADMIN_KEY, MODEL, Gateway, RunningPlane, abandon_request

# /metrics takes the admin key.
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}


def test_healthz(plane: RunningPlane) -> None:
    assert httpx.get(f"{plane.url}/healthz").json() == {"status": "ok"}


def test_readyz_once_storage_and_snapshot_are_up(plane: RunningPlane) -> None:
    response = httpx.get(f"{plane.url}/readyz")
    assert response.status_code == 200 and response.json()["status"] == "ready"


def test_metrics_count_requests_latency_errors_and_in_flight(gateway: Gateway) -> None:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}
    httpx.post(f"{gateway.plane.v1}/chat/completions", json=body, headers=gateway.auth())
    gateway.upstream.fail_status = 500
    httpx.post(f"{gateway.plane.v1}/chat/completions", json=body, headers=gateway.auth())
    text = httpx.get(f"{gateway.plane.url}/metrics", headers=ADMIN).text
    assert 'hatchway_requests_total{route="/v1/chat/completions",status="200"} 1.0' in text
    assert 'hatchway_requests_total{route="/v1/chat/completions",status="502"} 1.0' in text
    assert 'hatchway_request_duration_seconds_count{route="/v1/chat/completions"} 2.0' in text
    # The 500 was retried once (max_retries=1), so two failed attempts.
    assert 'hatchway_upstream_errors_total{code="upstream_error",target="mock-a"} 2.0' in text
    assert "hatchway_requests_in_flight " in text


def test_metrics_refuse_anyone_without_the_admin_key_or_the_metrics_token(gateway: Gateway) -> None:
    anonymous = httpx.get(f"{gateway.plane.url}/metrics")
    assert anonymous.status_code == 401 and anonymous.json()["error"]["type"] == "authentication_error"
    # A tenant's API key reads no one's traffic.
    assert httpx.get(f"{gateway.plane.url}/metrics", headers=gateway.auth()).status_code == 401
    assert httpx.get(f"{gateway.plane.url}/metrics", headers=ADMIN).status_code == 200


def test_metrics_take_the_metrics_token(plane: RunningPlane) -> None:
    plane.restart(plane.server.config.replace(metrics_token="scrape-me-0123456789"))
    scraper = {"Authorization": "Bearer scrape-me-0123456789"}
    assert "hatchway_requests_in_flight" in httpx.get(f"{plane.url}/metrics", headers=scraper).text
    wrong = {"Authorization": "Bearer scrape-me-0123456780"}
    assert httpx.get(f"{plane.url}/metrics", headers=wrong).status_code == 401
    # The token opens /metrics only.
    assert httpx.get(f"{plane.url}/admin/v1/orgs", headers=scraper).status_code == 401


def test_the_metrics_token_is_kept_only_as_its_hash_and_may_be_given_as_one(plane: RunningPlane) -> None:
    config = plane.server.config.replace(metrics_token="scrape-me-0123456789")
    assert "scrape-me" not in repr(config)
    plane.restart(plane.server.config.replace(metrics_token="sha256:" + hash_key("another-token-0123")))
    scraper = {"Authorization": "Bearer another-token-0123"}
    assert httpx.get(f"{plane.url}/metrics", headers=scraper).status_code == 200


def test_metrics_public_opens_them_to_anyone(plane: RunningPlane) -> None:
    plane.restart(plane.server.config.replace(metrics_public=True))
    assert httpx.get(f"{plane.url}/metrics").status_code == 200


def metrics_once_counted(gateway: Gateway, sample: str) -> str:
    """/metrics, once `sample` shows in it (the plane counts a request when its handler ends)."""
    deadline = time.monotonic() + 10
    while sample not in (text := httpx.get(f"{gateway.plane.url}/metrics", headers=ADMIN).text):
        assert time.monotonic() < deadline, text
        time.sleep(0.05)
    return text


CLIENT_CLOSED = 'hatchway_requests_total{route="/v1/chat/completions",status="499"} 1.0'


def test_metrics_count_a_request_whose_client_left_as_a_499(gateway: Gateway) -> None:
    gateway.upstream.delay_s = 5.0  # the answer is still on its way when the client gives up
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}
    abandon_request(f"{gateway.plane.v1}/chat/completions", body, gateway.api_key, after_s=0.5)
    text = metrics_once_counted(gateway, CLIENT_CLOSED)
    assert 'hatchway_request_duration_seconds_count{route="/v1/chat/completions"} 1.0' in text
    assert "hatchway_requests_in_flight 1.0" in text  # the scrape itself


def test_metrics_count_a_stream_whose_client_left_as_a_499(gateway: Gateway) -> None:
    gateway.upstream.chunk_delay_s = 1.0  # one word a second: the client leaves in the middle
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "stream": True}
    abandon_request(f"{gateway.plane.v1}/chat/completions", body, gateway.api_key, after_s=1.5)
    text = metrics_once_counted(gateway, CLIENT_CLOSED)
    assert 'hatchway_request_duration_seconds_count{route="/v1/chat/completions"} 1.0' in text
