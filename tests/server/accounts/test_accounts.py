"""Accounts (issue 20): made by an admin or an invitation, scoped admin tokens, ownership of keys and nodes,
every change audited with who made it, the playground's session credential on /v1, and the CLI.

`Console` and `make_account` are the one way the account tests (here, test_roles.py, test_sessions.py) sign in."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
from click.testing import CliRunner, Result
from sqlalchemy import text

from server.accounts.sessions import SESSION_COOKIE
from server.cli import cli
from tests.conftest import ADMIN_KEY, MODEL, Gateway, RunningPlane, usage_report
from tests.support.hostile_agent import HostileAgent
from tests.support.loop_thread import LoopThread

PASSWORD = "correct horse battery staple"
CHAT: dict[str, Any] = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}


@dataclass
class Console:
    """A browser's view of the plane: its session cookie, and the CSRF token the page holds. Each call is a
    request of its own (no client to leave open), sending the cookie as a browser would."""

    plane: RunningPlane
    session: str
    csrf: str
    account: dict[str, Any] = field(default_factory=dict)

    def request(self, method: str, path: str, *, csrf: bool = True, **kwargs: Any) -> httpx.Response:
        headers = {"X-CSRF-Token": self.csrf} if csrf else {}
        headers |= kwargs.pop("headers", {})
        with httpx.Client(base_url=self.plane.url, cookies={SESSION_COOKIE: self.session}) as http:
            return http.request(method, path, headers=headers, **kwargs)

    def get(self, path: str, **params: str) -> httpx.Response:
        return self.request("GET", path, params=params)

    def post(self, path: str, body: Any, **kwargs: Any) -> httpx.Response:
        return self.request("POST", path, json=body, **kwargs)


def make_account(plane: RunningPlane, email: str, role: str, org: str | None = "acme", **fields: Any) -> dict[str, Any]:
    body = {"email": email, "role": role, "org_id": org, "password": PASSWORD, "name": email.split("@")[0]}
    return plane.admin.post("/accounts", body | fields)  # type: ignore[no-any-return]


def login(plane: RunningPlane, email: str, password: str = PASSWORD, **kwargs: Any) -> httpx.Response:
    return httpx.post(f"{plane.url}/auth/login", json={"email": email, "password": password}, **kwargs)


def sign_in(plane: RunningPlane, email: str, password: str = PASSWORD) -> Console:
    response = login(plane, email, password)
    assert response.status_code == 200, response.text
    doc = response.json()
    return Console(plane, response.cookies[SESSION_COOKIE], doc["csrf_token"], doc["account"])


def admin_call(plane: RunningPlane, method: str, path: str, token: str, body: Any = None) -> httpx.Response:
    return httpx.request(method, f"{plane.url}/admin/v1{path}", json=body, headers={"Authorization": f"Bearer {token}"})


# -- accounts ------------------------------------------------------------------------------------------


def test_an_account_made_by_an_admin_signs_in_and_sees_itself(gateway: Gateway) -> None:
    made = make_account(gateway.plane, "Dev@Example.com", "developer")
    assert made["email"] == "dev@example.com" and made["role"] == "developer" and made["org"] == "acme"
    console = sign_in(gateway.plane, "dev@example.com")
    me = console.get("/admin/v1/me").json()
    assert me["id"] == made["id"] and me["role"] == "developer" and me["org_id"] == made["org_id"]
    assert me["csrf_token"] == console.csrf and me["org"] == "acme"
    assert "keys.write" in me["permissions"] and "providers.read" not in me["permissions"]


def test_an_email_has_one_account_however_it_is_typed(gateway: Gateway) -> None:
    make_account(gateway.plane, "dev@example.com", "developer")
    again = admin_call(
        gateway.plane,
        "POST",
        "/accounts",
        ADMIN_KEY,
        {"email": "DEV@example.com", "role": "developer", "org_id": "acme", "password": PASSWORD},
    )
    assert again.status_code == 409


def test_passwords_are_stored_only_as_argon2id_hashes_and_never_returned(gateway: Gateway) -> None:
    made = make_account(gateway.plane, "dev@example.com", "developer")
    assert "password" not in json.dumps(made) and PASSWORD not in json.dumps(gateway.plane.admin.get("/accounts"))
    [row] = gateway.plane.sql("SELECT password_hash FROM account WHERE id = :id", id=made["id"])
    digest = row["password_hash"]
    assert digest.startswith("$argon2id$") and PASSWORD not in digest


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"email": "not-an-email", "role": "developer", "org_id": "acme"}, "email"),
        ({"email": "a\x87b@example.com", "role": "developer", "org_id": "acme"}, "email"),  # a control character
        ({"email": "a@example.com", "role": "owner", "org_id": "acme"}, "role"),
        ({"email": "a@example.com", "role": "developer"}, "org_id"),
        ({"email": "a@example.com", "role": "plane_admin", "org_id": "acme"}, "org_id"),
        ({"email": "a@example.com", "role": "developer", "org_id": "acme", "password": "short"}, "password"),
    ],
    ids=["not-an-email", "control-character", "unknown-role", "no-org", "plane-admin-in-an-org", "short-password"],
)
def test_an_invalid_account_is_refused_with_the_field_named(gateway: Gateway, body: dict[str, Any], param: str) -> None:
    response = admin_call(gateway.plane, "POST", "/accounts", ADMIN_KEY, {"password": PASSWORD} | body)
    assert response.status_code == 400 and response.json()["error"]["param"] == param


def test_a_disabled_account_cannot_sign_in_and_its_sessions_end(gateway: Gateway) -> None:
    made = make_account(gateway.plane, "dev@example.com", "developer")
    console = sign_in(gateway.plane, "dev@example.com")
    gateway.plane.admin.patch(f"/accounts/{made['id']}", {"disabled": True})
    assert console.get("/admin/v1/me").status_code == 401
    refused = login(gateway.plane, "dev@example.com")
    assert refused.status_code == 401 and refused.json()["error"]["code"] == "invalid_credentials"
    gateway.plane.admin.patch(f"/accounts/{made['id']}", {"disabled": False})
    assert sign_in(gateway.plane, "dev@example.com").get("/admin/v1/me").status_code == 200


def test_a_new_password_ends_the_accounts_sessions_and_the_old_one_no_longer_signs_in(gateway: Gateway) -> None:
    made = make_account(gateway.plane, "dev@example.com", "developer")
    console = sign_in(gateway.plane, "dev@example.com")
    gateway.plane.admin.patch(f"/accounts/{made['id']}", {"password": "another long password"})
    assert console.get("/admin/v1/me").status_code == 401
    old = login(gateway.plane, "dev@example.com")
    assert old.status_code == 401
    assert sign_in(gateway.plane, "dev@example.com", "another long password").get("/admin/v1/me").status_code == 200


def test_a_removed_account_loses_its_sessions_tokens_and_console_key(gateway: Gateway) -> None:
    made = make_account(gateway.plane, "dev@example.com", "developer")
    console = sign_in(gateway.plane, "dev@example.com")
    assert console.post("/v1/chat/completions", CHAT).status_code == 200
    token = gateway.plane.admin.post(
        "/admin-tokens", {"role": "developer", "org_id": "acme", "account_id": made["id"]}
    )["token"]
    gateway.plane.admin.delete(f"/accounts/{made['id']}")
    assert console.get("/admin/v1/me").status_code == 401
    assert admin_call(gateway.plane, "GET", "/me", token).status_code == 401
    console_keys = [k for k in gateway.plane.admin.get("/keys")["data"] if k["console"]]
    assert [k["revoked_at"] is not None for k in console_keys] == [True]


# -- invitations -----------------------------------------------------------------------------------------


def test_an_invitation_link_creates_the_account_and_signs_it_in(gateway: Gateway) -> None:
    invited = gateway.plane.admin.post(
        "/invitations", {"email": "new@example.com", "role": "provider", "org_id": "acme"}
    )
    assert invited["url"].startswith(f"{gateway.plane.url}/console/accept#token=")
    assert invited["url"].endswith(invited["token"])
    accepted = httpx.post(
        f"{gateway.plane.url}/auth/invitations/accept",
        json={"token": invited["token"], "name": "New", "password": PASSWORD},
    )
    assert accepted.status_code == 201
    assert accepted.json()["account"]["email"] == "new@example.com" and accepted.json()["account"]["role"] == "provider"
    console = Console(gateway.plane, accepted.cookies[SESSION_COOKIE], accepted.json()["csrf_token"])
    assert console.get("/admin/v1/me").json()["role"] == "provider"
    [row] = gateway.plane.sql("SELECT token_hash FROM invitation WHERE id = :id", id=invited["id"])
    assert invited["token"] not in row["token_hash"]


def test_an_invitation_works_once(gateway: Gateway) -> None:
    invited = gateway.plane.admin.post("/invitations", {"email": "new@example.com", "role": "developer", "org": "acme"})
    body = {"token": invited["token"], "name": "New", "password": PASSWORD}
    assert httpx.post(f"{gateway.plane.url}/auth/invitations/accept", json=body).status_code == 201
    again = httpx.post(f"{gateway.plane.url}/auth/invitations/accept", json=body)
    assert again.status_code == 400 and again.json()["error"]["code"] == "invalid_invitation"


def test_an_expired_invitation_is_refused(gateway: Gateway) -> None:
    invited = gateway.plane.admin.post("/invitations", {"email": "new@example.com", "role": "developer", "org": "acme"})
    with gateway.plane.server.plane.engine.begin() as conn:
        conn.execute(text("UPDATE invitation SET expires_at = created_at WHERE id = :id"), {"id": invited["id"]})
    body = {"token": invited["token"], "name": "New", "password": PASSWORD}
    refused = httpx.post(f"{gateway.plane.url}/auth/invitations/accept", json=body)
    assert refused.status_code == 400 and refused.json()["error"]["code"] == "invalid_invitation"


def test_a_made_up_invitation_token_is_refused_before_any_password_is_hashed(
    gateway: Gateway, monkeypatch: pytest.MonkeyPatch
) -> None:
    hashed: list[str] = []

    async def counting_hash(password: str) -> str:
        hashed.append(password)
        return "never stored"

    # The plane runs in this process (on the loop thread): its handler sees the patched function.
    monkeypatch.setattr("server.accounts.http.hash_password", counting_hash)
    body = {"token": "made-up", "name": "Mallory", "password": PASSWORD}
    refused = httpx.post(f"{gateway.plane.url}/auth/invitations/accept", json=body)
    assert refused.status_code == 400 and refused.json()["error"]["code"] == "invalid_invitation"
    assert hashed == []


# -- scoped admin tokens ---------------------------------------------------------------------------------


def test_a_scoped_admin_token_acts_with_its_role_and_org_and_is_stored_hashed(gateway: Gateway) -> None:
    gateway.plane.create_org("other")
    created = gateway.plane.admin.post("/admin-tokens", {"name": "ci", "role": "org_admin", "org_id": "acme"})
    token = created["token"]
    assert token.startswith("hwt_") and "token" not in gateway.plane.admin.get("/admin-tokens")["data"][0]
    me = admin_call(gateway.plane, "GET", "/me", token).json()
    assert me["kind"] == "admin_token" and me["role"] == "org_admin" and me["id"] == created["id"]
    assert [o["name"] for o in admin_call(gateway.plane, "GET", "/orgs", token).json()["data"]] == ["acme"]
    assert admin_call(gateway.plane, "GET", "/keys", token, None).status_code == 200
    assert admin_call(gateway.plane, "POST", "/keys", token, {"org": "other"}).status_code == 403
    [row] = gateway.plane.sql("SELECT token_hash FROM admin_token WHERE id = :id", id=created["id"])
    assert token not in row["token_hash"]


def test_a_revoked_or_expired_admin_token_is_refused_at_once(gateway: Gateway) -> None:
    revoked = gateway.plane.admin.post("/admin-tokens", {"role": "org_admin", "org_id": "acme"})
    assert admin_call(gateway.plane, "GET", "/me", revoked["token"]).status_code == 200
    gateway.plane.admin.post(f"/admin-tokens/{revoked['id']}/revoke", {})
    assert admin_call(gateway.plane, "GET", "/me", revoked["token"]).status_code == 401
    expired = gateway.plane.admin.post("/admin-tokens", {"role": "org_admin", "org_id": "acme", "ttl_s": 60})
    with gateway.plane.server.plane.engine.begin() as conn:
        conn.execute(text("UPDATE admin_token SET expires_at = created_at WHERE id = :id"), {"id": expired["id"]})
    assert admin_call(gateway.plane, "GET", "/me", expired["token"]).status_code == 401


def test_a_developer_or_provider_token_must_act_for_an_account(gateway: Gateway) -> None:
    response = admin_call(gateway.plane, "POST", "/admin-tokens", ADMIN_KEY, {"role": "developer", "org_id": "acme"})
    assert response.status_code == 400 and response.json()["error"]["param"] == "account_id"


def test_an_org_admin_gives_only_org_roles_in_its_own_org(gateway: Gateway) -> None:
    gateway.plane.create_org("other")
    make_account(gateway.plane, "boss@example.com", "org_admin")
    console = sign_in(gateway.plane, "boss@example.com")
    base = {"password": PASSWORD}
    assert console.post("/admin/v1/accounts", base | {"email": "d@example.com", "role": "developer"}).status_code == 400
    ok = console.post("/admin/v1/accounts", base | {"email": "d@example.com", "role": "developer", "org_id": "acme"})
    assert ok.status_code == 201
    other = console.post(
        "/admin/v1/accounts", base | {"email": "e@example.com", "role": "developer", "org_id": "other"}
    )
    assert other.status_code == 403
    root = console.post("/admin/v1/accounts", base | {"email": "r@example.com", "role": "plane_admin"})
    assert root.status_code == 403
    assert console.post("/admin/v1/admin-tokens", {"role": "plane_admin"}).status_code == 403
    assert console.post("/admin/v1/invitations", {"email": "x@example.com", "role": "plane_admin"}).status_code == 403


# -- audit -----------------------------------------------------------------------------------------------


def test_every_change_is_audited_with_the_principal_that_made_it(gateway: Gateway) -> None:
    account = make_account(gateway.plane, "boss@example.com", "org_admin")
    token = gateway.plane.admin.post("/admin-tokens", {"role": "org_admin", "org_id": "acme"})
    console = sign_in(gateway.plane, "boss@example.com")
    assert console.post("/admin/v1/keys", {"org": "acme", "name": "by-session"}).status_code == 201
    assert (
        admin_call(gateway.plane, "POST", "/keys", token["token"], {"org": "acme", "name": "by-token"}).status_code
        == 201
    )
    gateway.plane.admin.post("/keys", {"org": "acme", "name": "by-admin-key"})
    me = gateway.plane.admin.get("/me")
    actors = {
        e["after"]["name"]: e["actor"] for e in gateway.plane.admin.get("/audit")["data"] if e["action"] == "key.create"
    }
    assert actors["by-session"] == account["id"]
    assert actors["by-token"] == token["id"]
    assert actors["by-admin-key"] == me["id"] and me["id"].startswith("adm_")
    assert gateway.plane.admin.get("/audit/verify")["ok"]


def test_an_org_admin_reads_only_its_orgs_audit_entries(gateway: Gateway) -> None:
    gateway.plane.create_org("other")
    gateway.plane.create_key("other", name="theirs")
    make_account(gateway.plane, "boss@example.com", "org_admin")
    console = sign_in(gateway.plane, "boss@example.com")
    console.post("/admin/v1/keys", {"org": "acme", "name": "ours"})
    entries = console.get("/admin/v1/audit").json()["data"]
    names = {(e["after"] or {}).get("name") for e in entries}
    assert "ours" in names and "theirs" not in names and "other" not in names


# -- ownership -------------------------------------------------------------------------------------------


def test_a_developer_sees_and_revokes_only_its_own_keys(gateway: Gateway) -> None:
    make_account(gateway.plane, "dev@example.com", "developer")
    console = sign_in(gateway.plane, "dev@example.com")
    mine = console.post("/admin/v1/keys", {"org": "acme", "name": "mine"}).json()
    listed = console.get("/admin/v1/keys").json()["data"]
    assert [k["id"] for k in listed] == [mine["id"]]
    org_key = next(k for k in gateway.plane.admin.get("/keys")["data"] if k["owner_account_id"] is None)
    assert console.post(f"/admin/v1/keys/{org_key['id']}/revoke", {}).status_code == 403
    assert console.post(f"/admin/v1/keys/{mine['id']}/revoke", {}).json()["revoked_at"] is not None


def test_a_developers_usage_is_that_of_its_own_keys(gateway: Gateway) -> None:
    make_account(gateway.plane, "dev@example.com", "developer")
    console = sign_in(gateway.plane, "dev@example.com")
    assert console.post("/v1/chat/completions", CHAT).status_code == 200
    assert httpx.post(f"{gateway.plane.v1}/chat/completions", json=CHAT, headers=gateway.auth()).status_code == 200
    assert sum(r["requests"] for r in usage_report(gateway.plane, 2)) == 2
    rows = console.get("/admin/v1/usage", by="key").json()["data"]
    assert [(r["key"], r["requests"]) for r in rows] == [("console playground", 1)]


def test_a_provider_sees_and_operates_only_the_nodes_enrolled_with_its_tokens(gateway: Gateway) -> None:
    plane = gateway.plane
    plane.admin.patch("/orgs/acme", {"providers_may_enroll": True})
    make_account(plane, "prov@example.com", "provider")
    console = sign_in(plane, "prov@example.com")
    address = f"127.0.0.1:{plane.server.plane.grpc_port}"
    theirs = plane.admin.post("/node-tokens", {"org": "acme"})["token"]
    own = console.post("/admin/v1/node-tokens", {"org": "acme"})
    assert own.status_code == 201
    loop = LoopThread(timeout_s=60)
    try:
        mine = loop.run(HostileAgent(address, own.json()["token"]).enroll(name="mine", machine_id="m1"))
        other = loop.run(HostileAgent(address, theirs).enroll(name="other", machine_id="m2"))
    finally:
        loop.close()
    assert [n["id"] for n in console.get("/admin/v1/nodes").json()["data"]] == [mine.node_id]
    assert [t["id"] for t in console.get("/admin/v1/node-tokens").json()["data"]] == [own.json()["id"]]
    assert console.post(f"/admin/v1/nodes/{mine.node_id}/drain", {}).json()["drained"] is True
    assert console.post(f"/admin/v1/nodes/{mine.node_id}/resume", {}).json()["drained"] is False
    assert console.post(f"/admin/v1/nodes/{other.node_id}/drain", {}).status_code == 403
    assert console.get(f"/admin/v1/nodes/{other.node_id}").status_code == 403
    assert console.post(f"/admin/v1/nodes/{mine.node_id}/revoke", {}).status_code == 403
    assert console.get("/admin/v1/earnings").status_code == 200


def test_providers_create_enrollment_tokens_only_when_their_org_allows_it(gateway: Gateway) -> None:
    make_account(gateway.plane, "prov@example.com", "provider")
    console = sign_in(gateway.plane, "prov@example.com")
    refused = console.post("/admin/v1/node-tokens", {"org": "acme"})
    assert refused.status_code == 403 and "providers_may_enroll" in refused.json()["error"]["message"]
    assert gateway.plane.admin.patch("/orgs/acme", {"providers_may_enroll": True})["providers_may_enroll"] is True
    assert console.post("/admin/v1/node-tokens", {"org": "acme"}).status_code == 201


# -- the playground's session credential on /v1 ----------------------------------------------------------


def test_the_playground_runs_as_the_accounts_console_key_made_on_first_use(gateway: Gateway) -> None:
    made = make_account(gateway.plane, "dev@example.com", "developer")
    console = sign_in(gateway.plane, "dev@example.com")
    assert console.get("/v1/models").json()["data"][0]["id"] == MODEL
    for _ in range(2):
        assert console.post("/v1/chat/completions", CHAT).status_code == 200
    keys = [k for k in gateway.plane.admin.get("/keys")["data"] if k["console"]]
    assert [(k["owner_account_id"], k["org_id"]) for k in keys] == [(made["id"], made["org_id"])]
    rows = usage_report(gateway.plane, 2, by="key")
    assert [(r["key"], r["requests"]) for r in rows] == [("console playground", 2)]


def test_the_console_keys_limits_apply_to_the_playground(gateway: Gateway) -> None:
    make_account(gateway.plane, "dev@example.com", "developer")
    console = sign_in(gateway.plane, "dev@example.com")
    assert console.post("/v1/chat/completions", CHAT).status_code == 200
    key = next(k for k in gateway.plane.admin.get("/keys")["data"] if k["console"])
    gateway.plane.admin.put("/limits", {"key": key["id"], "rpm": 1})
    assert console.post("/v1/chat/completions", CHAT).status_code == 200
    limited = console.post("/v1/chat/completions", CHAT)
    assert limited.status_code == 429 and "retry-after" in limited.headers


def test_a_playground_post_needs_the_csrf_token(gateway: Gateway) -> None:
    make_account(gateway.plane, "dev@example.com", "developer")
    console = sign_in(gateway.plane, "dev@example.com")
    refused = console.post("/v1/chat/completions", CHAT, csrf=False)
    assert refused.status_code == 403 and refused.json()["error"]["code"] == "csrf_failed"


def test_a_plane_admin_names_the_playgrounds_org_with_a_header(gateway: Gateway) -> None:
    make_account(gateway.plane, "root@example.com", "plane_admin", org=None)
    console = sign_in(gateway.plane, "root@example.com")
    assert console.post("/v1/chat/completions", CHAT).status_code == 400
    served = console.post("/v1/chat/completions", CHAT, headers={"X-Hatchway-Org": "acme"})
    assert served.status_code == 200


def test_a_provider_has_no_playground(gateway: Gateway) -> None:
    make_account(gateway.plane, "prov@example.com", "provider")
    console = sign_in(gateway.plane, "prov@example.com")
    assert console.post("/v1/chat/completions", CHAT).status_code == 403


def test_a_bearer_key_is_used_even_when_a_session_cookie_is_sent(gateway: Gateway) -> None:
    make_account(gateway.plane, "dev@example.com", "developer")
    console = sign_in(gateway.plane, "dev@example.com")
    response = console.post("/v1/chat/completions", CHAT, csrf=False, headers=gateway.auth())
    assert response.status_code == 200
    assert not [k for k in gateway.plane.admin.get("/keys")["data"] if k["console"]]


# -- the CLI ---------------------------------------------------------------------------------------------


@pytest.fixture
def run(plane: RunningPlane):
    runner = CliRunner()

    def invoke(*args: str) -> Result:
        flags = ["admin", "--url", plane.url, "--admin-key", ADMIN_KEY, "--json"]
        return runner.invoke(cli, [*flags, *args], catch_exceptions=False)

    return invoke


def json_of(result: Result) -> Any:
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


def test_cli_creates_lists_disables_and_removes_accounts(plane: RunningPlane, run) -> None:
    plane.create_org("acme")
    made = json_of(
        run("accounts", "create", "dev@example.com", "--role", "developer", "--org", "acme", "--password", PASSWORD)
    )
    assert made["role"] == "developer"
    assert [a["email"] for a in json_of(run("accounts", "list", "--org", "acme"))["data"]] == ["dev@example.com"]
    assert json_of(run("accounts", "disable", made["id"]))["disabled"] is True
    assert json_of(run("accounts", "enable", made["id"]))["disabled"] is False
    json_of(run("accounts", "remove", made["id"]))
    assert json_of(run("accounts", "list"))["data"] == []


def test_cli_invites_with_a_link(plane: RunningPlane, run) -> None:
    plane.create_org("acme")
    invited = json_of(run("accounts", "invite", "new@example.com", "--role", "org_admin", "--org", "acme"))
    assert "#token=hwi_" in invited["url"]


def test_cli_creates_lists_and_revokes_admin_tokens(plane: RunningPlane, run) -> None:
    plane.create_org("acme")
    created = json_of(run("tokens", "create", "--role", "org_admin", "--org", "acme", "--expires", "30d"))
    assert created["token"].startswith("hwt_")
    listed = json_of(run("tokens", "list"))["data"]
    assert [t["id"] for t in listed] == [created["id"]] and "token" not in listed[0]
    assert json_of(run("tokens", "revoke", created["id"]))["revoked_at"] is not None
    # The CLI takes a scoped token where it takes the admin key.
    result = CliRunner().invoke(cli, ["admin", "--url", plane.url, "--admin-key", created["token"], "org", "list"])
    assert result.exit_code == 1 and "401" in result.output


def test_cli_lets_an_org_allow_its_providers_to_enroll(plane: RunningPlane, run) -> None:
    plane.create_org("acme")
    assert json_of(run("org", "set", "acme", "--providers-may-enroll"))["providers_may_enroll"] is True
    assert json_of(run("org", "list"))["data"][0]["providers_may_enroll"] is True
    assert json_of(run("org", "set", "acme", "--no-providers-may-enroll"))["providers_may_enroll"] is False


def test_an_admin_gives_a_key_to_a_developer_of_the_org(gateway: Gateway) -> None:
    made = make_account(gateway.plane, "dev@example.com", "developer")
    given = gateway.plane.admin.post("/keys", {"org": "acme", "name": "given", "owner_account_id": made["id"]})
    assert given["owner_account_id"] == made["id"]
    console = sign_in(gateway.plane, "dev@example.com")
    assert [k["id"] for k in console.get("/admin/v1/keys").json()["data"]] == [given["id"]]
    gateway.plane.create_org("other")
    body = {"org": "other", "owner_account_id": made["id"]}
    assert admin_call(gateway.plane, "POST", "/keys", ADMIN_KEY, body).status_code == 400
