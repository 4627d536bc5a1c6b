"""What each role may do on the admin API (issue 20), checked by calling every /admin/v1 endpoint with that role's
own credentials: a console session and a scoped admin token. One table says which roles each endpoint allows;
everything else must be refused with 403, and requests naming another org are refused to all but a plane admin."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest

from server.accounts import http as accounts_http
from server.accounts.roles import ROLES
from server.api import admin_api
from tests.conftest import MODEL, Gateway, RunningPlane
from tests.server.accounts.test_accounts import admin_call, make_account, sign_in
from tests.support.hostile_agent import HostileAgent
from tests.support.loop_thread import LoopThread

ALL = frozenset(ROLES)
ADMINS = frozenset({"plane_admin", "org_admin"})
PLANE = frozenset({"plane_admin"})
DEV = ADMINS | {"developer"}
PROV = ADMINS | {"provider"}

Call = tuple[str, dict[str, Any] | None]


@dataclass
class World:
    """A plane with org acme (provider mock-a, a key, an enrolled node, providers may enroll) and org other."""

    gateway: Gateway
    node_id: str
    counter: Iterator[int] = field(default_factory=itertools.count)

    @property
    def admin(self) -> Any:
        return self.gateway.plane.admin

    def unique(self, stem: str) -> str:
        return f"{stem}{next(self.counter)}"


# name -> (method, route as registered, (world -> (path, body)), roles allowed). Fresh objects are made with the
# global admin key, so they are the org's, not the caller's: a developer or provider may not touch them.
TABLE: dict[str, tuple[str, str, Callable[[World], Call], frozenset[str]]] = {
    "me": ("GET", "/admin/v1/me", lambda w: ("/me", None), ALL),
    "orgs.list": ("GET", "/admin/v1/orgs", lambda w: ("/orgs", None), ALL),
    "orgs.create": ("POST", "/admin/v1/orgs", lambda w: ("/orgs", {"name": w.unique("org")}), PLANE),
    "orgs.update": (
        "PATCH",
        "/admin/v1/orgs/{ref}",
        lambda w: ("/orgs/acme", {"providers_may_enroll": True}),
        ADMINS,
    ),
    "admin_key.rotate": ("POST", "/admin/v1/admin-key/rotate", lambda w: ("/admin-key/rotate", {}), PLANE),
    "keys.list": ("GET", "/admin/v1/keys", lambda w: ("/keys", None), DEV),
    "keys.create": ("POST", "/admin/v1/keys", lambda w: ("/keys", {"org": "acme"}), DEV),
    "keys.revoke": (
        "POST",
        "/admin/v1/keys/{id}/revoke",
        lambda w: (f"/keys/{w.admin.post('/keys', {'org': 'acme'})['id']}/revoke", {}),
        ADMINS,
    ),
    "providers.list": ("GET", "/admin/v1/providers", lambda w: ("/providers", None), ADMINS),
    "providers.add": (
        "POST",
        "/admin/v1/providers",
        lambda w: ("/providers", _provider(w, w.unique("p"))),
        ADMINS,
    ),
    "providers.update": (
        "PATCH",
        "/admin/v1/providers/{ref}",
        lambda w: ("/providers/mock-a?org=acme", {"continuation": "regenerate"}),
        ADMINS,
    ),
    "providers.remove": (
        "DELETE",
        "/admin/v1/providers/{ref}",
        lambda w: (f"/providers/{w.admin.post('/providers', _provider(w, w.unique('p')))['id']}", None),
        ADMINS,
    ),
    "routes.list": ("GET", "/admin/v1/routes", lambda w: ("/routes", None), ADMINS),
    "routes.set": (
        "PUT",
        "/admin/v1/routes",
        lambda w: ("/routes", {"org": "acme", "model": MODEL, "targets": ["mock-a"]}),
        ADMINS,
    ),
    "routes.remove": ("DELETE", "/admin/v1/routes", lambda w: _route_to_remove(w), ADMINS),
    "models.list": ("GET", "/admin/v1/models", lambda w: ("/models", None), DEV),
    "usage": ("GET", "/admin/v1/usage", lambda w: ("/usage", None), DEV),
    "audit.list": ("GET", "/admin/v1/audit", lambda w: ("/audit", None), ADMINS),
    "audit.verify": ("GET", "/admin/v1/audit/verify", lambda w: ("/audit/verify", None), ADMINS),
    "limits.list": ("GET", "/admin/v1/limits", lambda w: ("/limits", None), ADMINS),
    "limits.set": ("PUT", "/admin/v1/limits", lambda w: ("/limits", {"org": "acme", "rpm": 1000}), ADMINS),
    "limits.remove": ("DELETE", "/admin/v1/limits", lambda w: _limits_to_remove(w), ADMINS),
    "cache.list": ("GET", "/admin/v1/cache", lambda w: ("/cache", None), ADMINS),
    "cache.set": ("PUT", "/admin/v1/cache", lambda w: ("/cache", {"org": "acme", "mode": "deterministic"}), ADMINS),
    "cache.clear": ("DELETE", "/admin/v1/cache", lambda w: ("/cache?org=acme", None), ADMINS),
    "prices.list": ("GET", "/admin/v1/prices", lambda w: ("/prices", None), ADMINS),
    "prices.set": (
        "PUT",
        "/admin/v1/prices",
        lambda w: ("/prices", {"provider": "mock-a", "org": "acme", "model": MODEL, "price_in": 1, "price_out": 2}),
        ADMINS,
    ),
    "earnings": ("GET", "/admin/v1/earnings", lambda w: ("/earnings", None), PROV),
    "node_tokens.list": ("GET", "/admin/v1/node-tokens", lambda w: ("/node-tokens", None), PROV),
    "node_tokens.create": ("POST", "/admin/v1/node-tokens", lambda w: ("/node-tokens", {"org": "acme"}), PROV),
    "node_tokens.revoke": (
        "POST",
        "/admin/v1/node-tokens/{id}/revoke",
        lambda w: (f"/node-tokens/{w.admin.post('/node-tokens', {'org': 'acme'})['id']}/revoke", {}),
        ADMINS,
    ),
    "nodes.list": ("GET", "/admin/v1/nodes", lambda w: ("/nodes", None), PROV),
    "nodes.show": ("GET", "/admin/v1/nodes/{ref}", lambda w: (f"/nodes/{w.node_id}", None), ADMINS),
    "nodes.drain": ("POST", "/admin/v1/nodes/{ref}/drain", lambda w: (f"/nodes/{w.node_id}/drain", {}), ADMINS),
    "nodes.resume": ("POST", "/admin/v1/nodes/{ref}/resume", lambda w: (f"/nodes/{w.node_id}/resume", {}), ADMINS),
    "nodes.revoke": ("POST", "/admin/v1/nodes/{ref}/revoke", lambda w: (f"/nodes/{w.node_id}/revoke", {}), ADMINS),
    "accounts.list": ("GET", "/admin/v1/accounts", lambda w: ("/accounts", None), ADMINS),
    "accounts.create": ("POST", "/admin/v1/accounts", lambda w: ("/accounts", _account(w)), ADMINS),
    "accounts.update": (
        "PATCH",
        "/admin/v1/accounts/{id}",
        lambda w: (f"/accounts/{w.admin.post('/accounts', _account(w))['id']}", {"name": "renamed"}),
        ADMINS,
    ),
    "accounts.remove": (
        "DELETE",
        "/admin/v1/accounts/{id}",
        lambda w: (f"/accounts/{w.admin.post('/accounts', _account(w))['id']}", None),
        ADMINS,
    ),
    "invitations.create": (
        "POST",
        "/admin/v1/invitations",
        lambda w: ("/invitations", {"email": f"{w.unique('i')}@example.com", "role": "developer", "org_id": "acme"}),
        ADMINS,
    ),
    "admin_tokens.list": ("GET", "/admin/v1/admin-tokens", lambda w: ("/admin-tokens", None), ADMINS),
    "admin_tokens.create": (
        "POST",
        "/admin/v1/admin-tokens",
        lambda w: ("/admin-tokens", {"role": "org_admin", "org_id": "acme"}),
        ADMINS,
    ),
    "admin_tokens.revoke": (
        "POST",
        "/admin/v1/admin-tokens/{id}/revoke",
        lambda w: (
            f"/admin-tokens/{w.admin.post('/admin-tokens', {'role': 'org_admin', 'org_id': 'acme'})['id']}/revoke",
            {},
        ),
        ADMINS,
    ),
}

# The same calls naming org `other`: refused to everyone bound to acme, whatever their role holds.
OTHER_ORG: dict[str, Callable[[World], tuple[str, str, dict[str, Any] | None]]] = {
    "keys.list": lambda w: ("GET", "/keys?org=other", None),
    "keys.create": lambda w: ("POST", "/keys", {"org": "other"}),
    "keys.revoke": lambda w: ("POST", f"/keys/{w.admin.post('/keys', {'org': 'other'})['id']}/revoke", {}),
    "providers.list": lambda w: ("GET", "/providers?org=other", None),
    "providers.add": lambda w: ("POST", "/providers", _provider(w, w.unique("p"), org="other")),
    "routes.list": lambda w: ("GET", "/routes?org=other", None),
    "limits.set": lambda w: ("PUT", "/limits", {"org": "other", "rpm": 1}),
    "cache.clear": lambda w: ("DELETE", "/cache?org=other", None),
    "usage": lambda w: ("GET", "/usage?org=other", None),
    "earnings": lambda w: ("GET", "/earnings?org=other", None),
    "models.list": lambda w: ("GET", "/models?org=other", None),
    "node_tokens.create": lambda w: ("POST", "/node-tokens", {"org": "other"}),
    "nodes.list": lambda w: ("GET", "/nodes?org=other", None),
    "accounts.create": lambda w: ("POST", "/accounts", _account(w, org="other")),
    "orgs.update": lambda w: ("PATCH", "/orgs/other", {"providers_may_enroll": True}),
}


def _provider(world: World, name: str, org: str = "acme") -> dict[str, Any]:
    return {"org": org, "name": name, "base_url": world.gateway.upstream.url, "models": [MODEL]}


def _account(world: World, org: str = "acme") -> dict[str, Any]:
    email = f"{world.unique('a')}@example.com"
    return {"email": email, "role": "developer", "org_id": org, "password": "a long enough password"}


def _route_to_remove(world: World) -> Call:
    model = world.unique("m")
    world.admin.put("/routes", {"org": "acme", "model": model, "targets": ["mock-a"]})
    return f"/routes?org=acme&model={model}", None


def _limits_to_remove(world: World) -> Call:
    key = world.admin.post("/keys", {"org": "acme"})["id"]
    world.admin.put("/limits", {"key": key, "rpm": 5})
    return f"/limits?key={key}", None


@pytest.fixture
def world(gateway: Gateway) -> World:
    plane = gateway.plane
    plane.create_org("other")
    plane.admin.patch("/orgs/acme", {"providers_may_enroll": True})
    token = plane.admin.post("/node-tokens", {"org": "acme"})["token"]
    loop = LoopThread(timeout_s=60)
    try:
        enrolled = loop.run(HostileAgent(f"127.0.0.1:{plane.server.plane.grpc_port}", token).enroll(name="box"))
    finally:
        loop.close()
    return World(gateway, enrolled.node_id)


def caller(world: World, role: str, kind: str) -> Callable[[str, str, dict[str, Any] | None], httpx.Response]:
    """Call the admin API as a fresh account of `role` (org acme; a plane admin has none), by its session or by
    a scoped token acting for it."""
    plane = world.gateway.plane
    email = f"{role}@example.com"
    account = make_account(plane, email, role, org=None if role == "plane_admin" else "acme")
    if kind == "session":
        console = sign_in(plane, email)
        return lambda method, path, body: console.request(method, f"/admin/v1{path}", json=body)
    fields = {"role": role, "org_id": account["org_id"]}
    if role in ("developer", "provider"):
        fields["account_id"] = account["id"]
    token = plane.admin.post("/admin-tokens", fields)["token"]
    return lambda method, path, body: admin_call(plane, method, path, token, body)


@pytest.mark.parametrize("kind", ["session", "token"])
@pytest.mark.parametrize("role", ROLES)
def test_each_role_may_call_exactly_the_admin_endpoints_the_table_allows(world: World, role: str, kind: str) -> None:
    call = caller(world, role, kind)
    wrong = []
    for name, (method, _, build, allowed) in TABLE.items():
        path, body = build(world)
        response = call(method, path, body)
        assert response.status_code < 500, (name, response.text)
        permitted = response.status_code not in (401, 403)
        if permitted != (role in allowed) or response.status_code == 401:
            wrong.append((name, response.status_code, response.text[:160]))
    assert wrong == []


@pytest.mark.parametrize("kind", ["session", "token"])
@pytest.mark.parametrize("role", ROLES)
def test_only_a_plane_admin_reaches_another_org(world: World, role: str, kind: str) -> None:
    call = caller(world, role, kind)
    wrong = []
    for name, build in OTHER_ORG.items():
        method, path, body = build(world)
        response = call(method, path, body)
        assert response.status_code < 500, (name, response.text)
        if (response.status_code == 403) == (role == "plane_admin"):
            wrong.append((name, response.status_code, response.text[:160]))
    assert wrong == []


def test_the_table_covers_every_admin_endpoint(plane: RunningPlane) -> None:
    """A new admin_api or accounts endpoint must be given its row here (and its permission check)."""
    app = plane.server.runner.app
    routes = {
        (route.method, route.resource.canonical)
        for route in app.router.routes()
        if route.resource is not None
        and route.method != "HEAD"  # aiohttp's twin of each GET
        and route.resource.canonical.startswith("/admin/v1/")
        and getattr(route.handler, "__module__", "") in (admin_api.__name__, accounts_http.__name__)
    }
    assert routes == {(method, route) for method, route, _, _ in TABLE.values()}
