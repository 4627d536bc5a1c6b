"""Console sessions (issue 20): the cookie's flags, CSRF on every unsafe cookie request, logout and expiry ending
the session on the server, and login throttling per email and per client address."""

from __future__ import annotations

import json
import time
from http.cookies import SimpleCookie

import httpx
import pytest

from server.accounts.sessions import SESSION_COOKIE
from server.config import Config
from tests.conftest import Gateway, Planes, RunningPlane
from tests.server.accounts.test_accounts import PASSWORD, Console, login, make_account, sign_in


@pytest.fixture
def plane_config(plane_config: Config) -> Config:
    return plane_config.replace(login_failures_per_email=3, login_failures_per_address=5)


def cookie_of(response: httpx.Response) -> dict[str, str | bool]:
    """The attributes of the session cookie the response sets (lower-case names; flags as True)."""
    header = next(v for v in response.headers.get_list("set-cookie") if v.startswith(f"{SESSION_COOKIE}="))
    morsel = SimpleCookie(header)[SESSION_COOKIE]
    return {k: v for k, v in morsel.items() if v} | {"value": morsel.value}


def test_the_session_cookie_is_httponly_samesite_strict_and_not_secure_over_plain_http(gateway: Gateway) -> None:
    make_account(gateway.plane, "dev@example.com", "developer")
    cookie = cookie_of(login(gateway.plane, "dev@example.com"))
    assert cookie["httponly"] is True and cookie["samesite"] == "Strict" and cookie["path"] == "/"
    assert "secure" not in cookie
    assert int(str(cookie["max-age"])) == int(gateway.plane.server.config.session_lifetime_s)


def test_the_session_cookie_is_secure_behind_a_tls_proxy(gateway: Gateway) -> None:
    make_account(gateway.plane, "dev@example.com", "developer")
    cookie = cookie_of(login(gateway.plane, "dev@example.com", headers={"X-Forwarded-Proto": "https"}))
    assert cookie["secure"] is True


def test_only_a_hash_of_the_session_id_is_stored(gateway: Gateway) -> None:
    make_account(gateway.plane, "dev@example.com", "developer")
    console = sign_in(gateway.plane, "dev@example.com")
    stored = [row["id_hash"] for row in gateway.plane.sql("SELECT id_hash FROM account_session")]
    assert len(stored) == 1 and console.session not in stored[0]


def test_an_unsafe_cookie_request_without_the_csrf_token_is_refused(gateway: Gateway) -> None:
    make_account(gateway.plane, "boss@example.com", "org_admin")
    console = sign_in(gateway.plane, "boss@example.com")
    missing = console.post("/admin/v1/keys", {"org": "acme"}, csrf=False)
    assert missing.status_code == 403 and missing.json()["error"]["code"] == "csrf_failed"
    wrong = console.post("/admin/v1/keys", {"org": "acme"}, csrf=False, headers={"X-CSRF-Token": "0" * 64})
    assert wrong.status_code == 403 and wrong.json()["error"]["code"] == "csrf_failed"
    assert console.get("/admin/v1/keys").status_code == 200
    assert console.post("/admin/v1/keys", {"org": "acme"}).status_code == 201


def test_each_session_has_its_own_csrf_token(gateway: Gateway) -> None:
    make_account(gateway.plane, "boss@example.com", "org_admin")
    first, second = sign_in(gateway.plane, "boss@example.com"), sign_in(gateway.plane, "boss@example.com")
    assert first.csrf != second.csrf
    crossed = Console(gateway.plane, first.session, second.csrf)
    assert crossed.post("/admin/v1/keys", {"org": "acme"}).status_code == 403


def test_logout_ends_the_session_on_the_server_and_clears_the_cookie(gateway: Gateway) -> None:
    make_account(gateway.plane, "dev@example.com", "developer")
    console = sign_in(gateway.plane, "dev@example.com")
    assert console.post("/auth/logout", {}, csrf=False).status_code == 403
    out = console.post("/auth/logout", {})
    assert out.status_code == 204
    assert cookie_of(out)["value"] == "" and str(cookie_of(out)["max-age"]) == "0"
    # A copy of the cookie kept by anyone is worth nothing now.
    assert console.get("/admin/v1/me").status_code == 401
    assert console.post("/v1/chat/completions", {"model": "gpt-4o-mini", "messages": []}).status_code == 401


def test_a_session_ends_after_its_lifetime(plane_config: Config, plane: RunningPlane) -> None:
    plane.restart(plane_config.replace(session_lifetime_s=1))
    plane.create_org("acme")
    make_account(plane, "dev@example.com", "developer")
    console = sign_in(plane, "dev@example.com")
    assert console.get("/admin/v1/me").status_code == 200
    time.sleep(1.1)
    expired = console.get("/admin/v1/me")
    assert expired.status_code == 401 and expired.json()["error"]["code"] == "session_expired"


def test_an_unknown_email_and_a_wrong_password_get_the_same_answer(gateway: Gateway) -> None:
    make_account(gateway.plane, "dev@example.com", "developer")
    unknown = login(gateway.plane, "nobody@example.com")
    wrong = login(gateway.plane, "dev@example.com", "not the password at all")
    assert unknown.status_code == wrong.status_code == 401
    assert unknown.json() == wrong.json()
    assert wrong.json()["error"]["code"] == "invalid_credentials"


def test_failed_sign_ins_for_one_email_are_throttled_even_with_the_right_password(gateway: Gateway) -> None:
    make_account(gateway.plane, "dev@example.com", "developer")
    make_account(gateway.plane, "other@example.com", "developer")
    for _ in range(3):
        assert login(gateway.plane, "dev@example.com", "wrong password!").status_code == 401
    throttled = login(gateway.plane, "dev@example.com")
    assert throttled.status_code == 429 and throttled.json()["error"]["code"] == "login_throttled"
    assert int(throttled.headers["retry-after"]) >= 1
    # Another email from the same address is not locked out by it.
    assert login(gateway.plane, "other@example.com").status_code == 200


def test_failed_sign_ins_from_one_address_are_throttled_across_emails(gateway: Gateway) -> None:
    make_account(gateway.plane, "dev@example.com", "developer")
    for i in range(5):
        assert login(gateway.plane, f"guess{i}@example.com").status_code == 401
    throttled = login(gateway.plane, "dev@example.com")
    assert throttled.status_code == 429 and "retry-after" in throttled.headers


def test_a_successful_sign_in_clears_the_emails_failures(gateway: Gateway) -> None:
    make_account(gateway.plane, "dev@example.com", "developer")
    for _ in range(2):
        login(gateway.plane, "dev@example.com", "wrong password!")
    assert login(gateway.plane, "dev@example.com").status_code == 200
    for _ in range(2):
        login(gateway.plane, "dev@example.com", "wrong password!")
    assert login(gateway.plane, "dev@example.com").status_code == 200


def test_an_invitation_starts_a_session_with_the_same_cookie_flags(gateway: Gateway) -> None:
    invited = gateway.plane.admin.post("/invitations", {"email": "new@example.com", "role": "developer", "org": "acme"})
    accepted = httpx.post(
        f"{gateway.plane.url}/auth/invitations/accept",
        json={"token": invited["token"], "name": "New", "password": PASSWORD},
    )
    cookie = cookie_of(accepted)
    assert cookie["httponly"] is True and cookie["samesite"] == "Strict"
    console = Console(gateway.plane, str(cookie["value"]), accepted.json()["csrf_token"])
    assert console.get("/admin/v1/me").json()["email"] == "new@example.com"


def test_a_session_and_the_admin_key_are_never_mixed(gateway: Gateway) -> None:
    """An Authorization header decides alone: a wrong key with a good session cookie is refused."""
    make_account(gateway.plane, "dev@example.com", "developer")
    console = sign_in(gateway.plane, "dev@example.com")
    refused = console.request("GET", "/admin/v1/me", headers={"Authorization": "Bearer hwa-wrong"})
    assert refused.status_code == 401


def test_changing_ones_password_needs_the_current_one_and_ends_every_other_session(gateway: Gateway) -> None:
    make_account(gateway.plane, "dev@example.com", "developer")
    other, console = sign_in(gateway.plane, "dev@example.com"), sign_in(gateway.plane, "dev@example.com")
    body = {"current_password": "not the password", "new_password": "a brand new password"}
    assert console.post("/auth/password", body).status_code == 403
    changed = console.post("/auth/password", body | {"current_password": PASSWORD})
    assert changed.status_code == 200
    renewed = Console(gateway.plane, str(cookie_of(changed)["value"]), changed.json()["csrf_token"])
    assert renewed.get("/admin/v1/me").status_code == 200
    assert other.get("/admin/v1/me").status_code == 401 and console.get("/admin/v1/me").status_code == 401
    assert login(gateway.plane, "dev@example.com", "a brand new password").status_code == 200


def test_logging_out_on_one_plane_ends_the_session_on_every_plane(planes: Planes) -> None:
    first, second = planes.start(), planes.start()
    first.create_org("acme")
    make_account(first, "dev@example.com", "developer")
    console = sign_in(first, "dev@example.com")
    on_second = Console(second, console.session, console.csrf)
    assert on_second.get("/admin/v1/me").status_code == 200
    assert console.post("/auth/logout", {}).status_code == 204
    assert on_second.get("/admin/v1/me").status_code == 401


def test_a_sign_in_body_must_be_declared_as_json(gateway: Gateway) -> None:
    """A page of another site can post a body with no Content-Type and no preflight: it must sign nobody in."""
    make_account(gateway.plane, "dev@example.com", "developer")
    body = json.dumps({"email": "dev@example.com", "password": PASSWORD}).encode()
    undeclared = httpx.post(f"{gateway.plane.url}/auth/login", content=body)
    assert undeclared.status_code == 415 and SESSION_COOKIE not in undeclared.cookies
    as_text = httpx.post(f"{gateway.plane.url}/auth/login", content=body, headers={"Content-Type": "text/plain"})
    assert as_text.status_code == 415
