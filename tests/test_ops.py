"""Operator endpoints: liveness, readiness and Prometheus metrics."""

from __future__ import annotations

import httpx

from tests.conftest import MODEL, Gateway, RunningPlane


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
    text = httpx.get(f"{gateway.plane.url}/metrics").text
    assert 'hatchway_requests_total{route="/v1/chat/completions",status="200"} 1.0' in text
    assert 'hatchway_requests_total{route="/v1/chat/completions",status="502"} 1.0' in text
    assert 'hatchway_request_duration_seconds_count{route="/v1/chat/completions"} 2.0' in text
    # The 500 was retried once (max_retries=1), so two failed attempts.
    assert 'hatchway_upstream_errors_total{code="upstream_error",target="mock-a"} 2.0' in text
    assert "hatchway_requests_in_flight " in text
