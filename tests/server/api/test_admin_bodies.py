"""Every admin write takes the fields it names and no other: a misspelt setting is a 400 naming it, in the OpenAI
envelope, and nothing changes (no audit entry, the setting as it was). A 200 that ignored `ttl` for `ttl_s` would
leave the admin believing a change that never happened."""

from __future__ import annotations

import re
from typing import Any

import httpx
import pytest

from server.openapi.document import OPERATIONS
from tests.conftest import ADMIN_KEY, MODEL, Gateway
from tests.server.accounts.test_accounts import PASSWORD, make_account, sign_in

# (method, path, a body the endpoint accepts but for its last field, which it does not take)
WRITES = [
    ("POST", "/admin/v1/orgs", {"name": "beta", "title": "Beta"}),
    ("POST", "/admin/v1/keys", {"org": "acme", "name": "ci", "expires": "30d"}),
    (
        "POST",
        "/admin/v1/providers",
        {
            "org": "acme",
            "name": "p2",
            "base_url": "http://127.0.0.1:9/v1",
            "api_keys": ["sk"],
            "models": [MODEL],
            "price": 1,
        },
    ),
    ("PATCH", "/admin/v1/providers/mock-a", {"policy": {"max_retries": 0}, "max_retries": 0}),
    ("PUT", "/admin/v1/routes", {"org": "acme", "model": MODEL, "targets": ["mock-a"], "fallback": ["gpt-4o"]}),
    ("PUT", "/admin/v1/limits", {"org": "acme", "rpm": 10, "rmp": 5}),
    ("PUT", "/admin/v1/cache", {"org": "acme", "mode": "deterministic", "ttl": 5}),
    ("PUT", "/admin/v1/prices", {"provider": "mock-a", "model": MODEL, "price_in": 1.0, "currency": "EUR"}),
    ("POST", "/admin/v1/node-tokens", {"org": "acme", "ttl_s": 3600, "max_uses": 3}),
    (
        "POST",
        "/admin/v1/accounts",
        {"email": "dev@example.com", "role": "developer", "org": "acme", "password": PASSWORD, "team": "x"},
    ),
    ("POST", "/admin/v1/invitations", {"email": "dev@example.com", "role": "developer", "org": "acme", "ttl": 3600}),
    ("POST", "/admin/v1/admin-tokens", {"role": "org_admin", "org": "acme", "expires_in": "30d"}),
    ("PATCH", "/admin/v1/orgs/acme", {"providers_may_enroll": True, "public": True}),
]


def call(gateway: Gateway, method: str, path: str, body: dict[str, Any]) -> httpx.Response:
    headers = {"Authorization": f"Bearer {ADMIN_KEY}"}
    return httpx.request(method, f"{gateway.plane.url}{path}", json=body, headers=headers)


def audit_entries(gateway: Gateway) -> int:
    return len(gateway.plane.admin.get("/audit")["data"])


@pytest.mark.parametrize(("method", "path", "body"), WRITES, ids=[f"{m} {p}" for m, p, _ in WRITES])
def test_a_field_the_write_does_not_take_is_a_400_naming_it_and_changes_nothing(
    gateway: Gateway, method: str, path: str, body: dict[str, Any]
) -> None:
    before = audit_entries(gateway)
    response = call(gateway, method, path, body)
    misspelt = list(body)[-1]
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == misspelt
    assert f"unknown fields: {misspelt}" in error["message"]
    assert audit_entries(gateway) == before


@pytest.mark.parametrize(("method", "path", "body"), WRITES, ids=[f"{m} {p}" for m, p, _ in WRITES])
def test_the_same_write_without_that_field_is_taken(
    gateway: Gateway, method: str, path: str, body: dict[str, Any]
) -> None:
    taken = {name: value for name, value in body.items() if name != list(body)[-1]}
    response = call(gateway, method, path, taken)
    assert response.status_code in (200, 201), response.text


def test_a_misspelt_cache_ttl_leaves_the_policy_as_it_was(gateway: Gateway) -> None:
    (policy,) = gateway.plane.admin.get("/cache", org="acme")["data"]
    assert call(gateway, "PUT", "/admin/v1/cache", {"org": "acme", "mode": "off", "ttl": 5}).status_code == 400
    assert gateway.plane.admin.get("/cache", org="acme")["data"] == [policy]


def test_the_refusal_lists_what_the_write_takes(gateway: Gateway) -> None:
    error = call(gateway, "PUT", "/admin/v1/cache", {"org": "acme", "ttl": 5}).json()["error"]
    assert error["message"] == "unknown fields: ttl (known: org, mode, ttl_s)"


def test_the_api_document_names_exactly_the_fields_each_write_takes(gateway: Gateway) -> None:
    make_account(gateway.plane, "dev@example.com", "developer")
    console = sign_in(gateway.plane, "dev@example.com")  # /auth/password is an account's own
    # The path parameters name what exists: each write is refused for its body, not for what it points at.
    values = {"{id}": "acct_none", "{ref}": "acme"}
    checked = []
    for op in OPERATIONS:
        if op.body is None or op.path.startswith("/v1/"):
            continue
        path = re.sub(r"\{\w+\}", lambda m: values[m.group(0)], op.path)
        if path.startswith("/admin/v1/providers/"):
            path = "/admin/v1/providers/mock-a"
        body = {"not_a_field": 1}
        if op.path == "/auth/password":
            response = console.request(op.method.upper(), path, json=body)
        else:
            response = call(gateway, op.method.upper(), path, body)
        error = response.json()["error"]
        assert response.status_code == 400 and error["param"] == "not_a_field", (op.path, response.text)
        taken = re.fullmatch(r"unknown fields: not_a_field \(known: (.*)\)", error["message"])
        assert taken is not None, error["message"]
        assert set(taken.group(1).split(", ")) == set(op.body["properties"]), op.path
        assert op.body["additionalProperties"] is False, op.path
        checked.append(op.path)
    assert len(checked) == len(WRITES) + 4  # and PATCH /accounts/{id}, the three of /auth


def test_clearing_the_cache_with_a_body_is_refused_rather_than_clearing_every_org(gateway: Gateway) -> None:
    before = audit_entries(gateway)
    response = call(gateway, "DELETE", "/admin/v1/cache", {"org": "acme"})
    assert response.status_code == 400 and response.json()["error"]["param"] == "org"
    assert "?org=" in response.json()["error"]["message"]
    assert audit_entries(gateway) == before
    assert gateway.plane.admin.delete("/cache", org="acme")["id"] != "*"


def test_sign_in_takes_only_an_email_and_a_password(gateway: Gateway) -> None:
    response = httpx.post(
        f"{gateway.plane.url}/auth/login", json={"email": "a@example.com", "password": PASSWORD, "remember": True}
    )
    assert response.status_code == 400 and response.json()["error"]["param"] == "remember"
