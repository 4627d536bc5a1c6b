"""Admin changes take effect on the next request, with no restart: keys, revocation, expiry, providers."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import httpx

from tests.conftest import MODEL, Gateway

BODY: dict[str, object] = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}


def post(gateway: Gateway, key: str, body: dict[str, object] = BODY) -> httpx.Response:
    return httpx.post(f"{gateway.plane.v1}/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"})


def test_new_key_works_at_once(gateway: Gateway) -> None:
    assert post(gateway, gateway.plane.create_key()).status_code == 200


def test_revoked_key_is_refused_at_once(gateway: Gateway) -> None:
    created = gateway.plane.admin.post("/keys", {"org": "acme"})
    assert post(gateway, created["key"]).status_code == 200
    gateway.plane.admin.post(f"/keys/{created['id']}/revoke", {})
    refused = post(gateway, created["key"])
    assert refused.status_code == 401
    assert refused.json()["error"]["type"] == "authentication_error"


def test_expired_key_is_refused(gateway: Gateway) -> None:
    soon = (datetime.now(UTC) + timedelta(milliseconds=300)).isoformat()
    key = gateway.plane.create_key(expires_at=soon)
    assert post(gateway, key).status_code == 200
    import time

    time.sleep(0.4)
    response = post(gateway, key)
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "expired_api_key"


def test_key_that_expires_in_the_past_cannot_be_created(gateway: Gateway) -> None:
    past = (datetime.now(UTC) - timedelta(days=1)).isoformat()
    response = httpx.post(
        f"{gateway.plane.url}/admin/v1/keys",
        json={"org": "acme", "expires_at": past},
        headers={"Authorization": "Bearer hwa-test-admin-key"},
    )
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "expires_at"


def test_new_provider_serves_at_once(gateway: Gateway) -> None:
    body = {**BODY, "model": "brand-new"}
    assert post(gateway, gateway.api_key, body).status_code == 404
    gateway.plane.add_provider("mock-b", gateway.upstream, models=["brand-new"])
    assert post(gateway, gateway.api_key, body).status_code == 200


def test_removed_provider_stops_serving_at_once(gateway: Gateway) -> None:
    gateway.plane.admin.delete("/providers/mock-a")
    response = post(gateway, gateway.api_key)
    assert response.status_code == 404


def test_keys_of_one_org_cannot_reach_another_orgs_models(gateway: Gateway) -> None:
    gateway.plane.create_org("other")
    other_key = gateway.plane.create_key("other")
    assert post(gateway, other_key).status_code == 404
