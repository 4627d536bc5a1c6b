"""The admin HTTP API under /admin/v1/. Every call has a principal (server.accounts: the global admin key, a
scoped admin token or a console session) and each handler checks a named permission (server.accounts.roles) and
the principal's reach: a plane admin every org, anyone else their own org, developers and providers only what
they own in it. Mutations run in a worker thread, are audited with the principal's actor, commit, and then
rebuild the snapshot so the change is live for the next request without a restart."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any, TypeVar

from aiohttp import web

from proto.contract import PLANES_MAX, join_enrollment_token, plane_address_problem
from proto.hatchway.node.v1 import node_pb2 as pb
from server.accounts import Principal, admin_principal
from server.accounts.changes import mutate as _mutate
from server.accounts.principal import ACCOUNTS
from server.api.openai_api import read_body
from server.api.resources import (
    AUDIT,
    CACHE,
    CATALOG,
    CONFIG,
    ENGINE,
    LIMITER,
    NODE_STORE,
    NODE_TLS,
    POLICIES,
    REGISTRY,
    SNAPSHOTS,
    STORE,
)
from server.api.validation import bounded_int, bounded_number, only_fields
from server.credentials import ENROLLMENT_TOKEN_PREFIX, generate_key
from server.errors import ConflictError, InvalidRequestError, PermissionDeniedError
from server.nodes.registry import NodeRegistry
from server.policy.limits import LIMIT_FIELDS
from server.routing.failover import validate_overrides
from server.storage.store import parse_models, parse_price
from server.usage.reports import earnings_report, usage_report

T = TypeVar("T")


async def _allowed(request: web.Request, permission: str) -> Principal:
    """The caller, once the caller's role holds `permission` (401 without a credential, 403 else)."""
    principal = await admin_principal(request)
    principal.require(permission)
    return principal


def _org_id(request: web.Request, ref: str) -> str | None:
    """An org's id from its id or name, as the live snapshot knows it; None for none."""
    return request.app[SNAPSHOTS].current.org_id(ref)


def _org(request: web.Request, principal: Principal, ref: str | None) -> str | None:
    """The org a call is about. A plane admin's is `ref` as given (None: every org); anyone else's is their own
    org, whether they name it or not, and naming another is refused."""
    scope = principal.org_scope
    if scope is None:
        return ref
    if ref is not None and ref != scope and _org_id(request, ref) != scope:
        raise PermissionDeniedError("that belongs to another org", code="forbidden")
    return scope


def _named_org(request: web.Request, principal: Principal, ref: str) -> str:
    """The org a change names (required): as `_org`, never None."""
    return _org(request, principal, ref) or ref


def _reach(principal: Principal, found: Mapping[str, Any] | None, owner_field: str) -> None:
    """Refuse an existing object outside the principal's org, or (developers, providers) not theirs. An
    object that does not exist is left to the store's 404."""
    if found is None:
        return
    scope, owner = principal.org_scope, principal.owner_scope
    if scope is not None and found.get("org_id") != scope:
        raise PermissionDeniedError("that belongs to another org", code="forbidden")
    if owner is not None and found.get(owner_field) != owner:
        raise PermissionDeniedError("that is not yours", code="forbidden")


async def _body(request: web.Request, *fields: str) -> dict[str, Any]:
    """The JSON body, holding no field but `fields`."""
    body = await read_body(request, request.app[CONFIG].max_body_bytes)
    only_fields(body, fields)
    return body


async def _read(fn: Callable[..., T], *args: Any) -> T:
    return await asyncio.to_thread(fn, *args)


def _find(rows: list[dict[str, Any]], **match: str | None) -> dict[str, Any] | None:
    """The listed object matching every given field (the state before a change, for the audit log)."""
    return next((r for r in rows if all(r.get(k) == v for k, v in match.items())), None)


def _listing(data: list[dict[str, Any]]) -> web.Response:
    return web.json_response({"object": "list", "data": data})


def _str(body: dict[str, Any], name: str, *, required: bool = True) -> str:
    value = body.get(name)
    if value is None and not required:
        return ""
    if not isinstance(value, str) or (required and not value.strip()):
        raise InvalidRequestError(f"'{name}' must be a non-empty string", param=name)
    return value


def _hedge(body: dict[str, Any]) -> str | None:
    """A route's `hedge`: off, auto or seconds (a string or a number); absent or null: the plane's default."""
    value = body.get("hedge")
    if value is None:
        return None
    if isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)
    return _str(body, "hedge")


def _str_list(body: dict[str, Any], name: str) -> list[str]:
    value = body.get(name, [])
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise InvalidRequestError(f"'{name}' must be an array of strings", param=name)
    return value


def _datetime(body: dict[str, Any], name: str) -> datetime | None:
    value = body.get(name)
    if value is None:
        return None
    try:
        parsed = datetime.fromisoformat(value) if isinstance(value, str) else None
    except ValueError:
        parsed = None
    if parsed is None:
        raise InvalidRequestError(f"'{name}' must be an ISO 8601 date-time", param=name)
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


async def create_org(request: web.Request) -> web.Response:
    await _allowed(request, "orgs.create")
    body = await _body(request, "name")
    org = await _mutate(request, "org.create", request.app[STORE].create_org, _str(body, "name"))
    return web.json_response(org, status=201)


async def list_orgs(request: web.Request) -> web.Response:
    principal = await _allowed(request, "orgs.read")
    scope = principal.org_scope
    return _listing([o for o in await _read(request.app[STORE].list_orgs) if scope in (None, o["id"])])


async def create_key(request: web.Request) -> web.Response:
    principal = await _allowed(request, "keys.write")
    body = await _body(request, "org", "name", "models", "expires_at", "owner_account_id")
    org = _named_org(request, principal, _str(body, "org"))
    # A developer's keys are their own; an admin's belong to the org, or to the account of the org it names.
    owner = principal.owner_scope or await _key_owner(request, org, _str(body, "owner_account_id", required=False))
    key = await _mutate(
        request,
        "key.create",
        request.app[STORE].create_key,
        org,
        _str(body, "name", required=False),
        _str_list(body, "models"),
        _datetime(body, "expires_at"),
        owner_account_id=owner,
    )
    return web.json_response(key, status=201)


async def _key_owner(request: web.Request, org: str, account_id: str) -> str | None:
    """The account an admin gives a new key to (it shows among that developer's keys); None: the org's."""
    if not account_id:
        return None
    account = await _read(request.app[ACCOUNTS].store.get_account, account_id)
    if account["org_id"] != _org_id(request, org):
        raise InvalidRequestError("the key's owner must be an account of the key's org", param="owner_account_id")
    return account_id


async def list_keys(request: web.Request) -> web.Response:
    principal = await _allowed(request, "keys.read")
    org = _org(request, principal, request.query.get("org"))
    return _listing(await _read(request.app[STORE].list_keys, org, principal.owner_scope))


def _key(request: web.Request, key_id: str) -> dict[str, Any] | None:
    return _find(request.app[STORE].list_keys(), id=key_id)


async def revoke_key(request: web.Request) -> web.Response:
    principal = await _allowed(request, "keys.write")
    key_id = request.match_info["id"]
    _reach(principal, await _read(_key, request, key_id), "owner_account_id")
    revoked = await _mutate(
        request, "key.revoke", request.app[STORE].revoke_key, key_id, before=lambda: _key(request, key_id)
    )
    return web.json_response(revoked)


async def rotate_admin_key(request: web.Request) -> web.Response:
    """Replace the admin key with a new one, shown once in the answer; the key that called is refused from now on."""
    await _allowed(request, "admin_key.rotate")
    if request.app[CONFIG].admin_key:
        raise ConflictError(
            "this plane's admin key comes from its configuration (HATCHWAY_ADMIN_KEY): set a new value there and "
            "restart the plane; the previous key is refused from then on"
        )
    rotated = await _mutate(request, "admin_key.rotate", request.app[STORE].rotate_admin_key)
    return web.json_response(rotated, status=201)


async def add_provider(request: web.Request) -> web.Response:
    principal = await _allowed(request, "providers.write")
    body = await _body(
        request, "org", "name", "base_url", "api_keys", "models", "price_in", "price_out", *PROVIDER_SETTINGS
    )
    org = _named_org(request, principal, _str(body, "org"))
    raw_models = body.get("models")
    if not isinstance(raw_models, list):
        raise InvalidRequestError("'models' must be an array", param="models")
    models = parse_models(
        raw_models, parse_price(body.get("price_in"), "price_in"), parse_price(body.get("price_out"), "price_out")
    )
    provider = await _mutate(
        request,
        "provider.add",
        request.app[STORE].add_provider,
        org,
        _str(body, "name"),
        _str(body, "base_url"),
        _str_list(body, "api_keys"),
        models,
        policy=_policy(body),
        continuation=_continuation(body),
        egress=_egress(body),
        responses=_responses(body),
    )
    return web.json_response(provider, status=201)


def _continuation(body: dict[str, Any]) -> str | None:
    return _str(body, "continuation", required=False) or None


def _responses(body: dict[str, Any]) -> bool | None:
    """Whether the provider serves /v1/responses itself (server.responses); None: not given."""
    value = body.get("responses")
    if value is not None and not isinstance(value, bool):
        raise InvalidRequestError("'responses' must be true or false", param="responses")
    return value


# A provider's egress settings (server.targets.egress), each a string: given ones change, "" removes one.
EGRESS_FIELDS = ("proxy", "ca_file", "client_cert", "client_key")
# What adding a provider and changing one both take.
PROVIDER_SETTINGS = ("policy", "continuation", "responses", *EGRESS_FIELDS)


def _egress(body: dict[str, Any]) -> dict[str, str]:
    return {name: _str(body, name, required=False) for name in EGRESS_FIELDS if body.get(name) is not None}


def _policy(body: dict[str, Any]) -> dict[str, float | int]:
    try:
        return validate_overrides(body.get("policy"))
    except ValueError as exc:
        raise InvalidRequestError(str(exc), param="policy") from exc


async def update_provider(request: web.Request) -> web.Response:
    principal = await _allowed(request, "providers.write")
    body = await _body(request, *PROVIDER_SETTINGS)
    ref, org = request.match_info["ref"], _org(request, principal, request.query.get("org"))
    provider = await _mutate(
        request,
        "provider.update",
        request.app[STORE].update_provider,
        ref,
        org,
        before=lambda: request.app[STORE].listed_provider(ref, org),
        policy=_policy(body),
        continuation=_continuation(body),
        egress=_egress(body),
        responses=_responses(body),
    )
    return web.json_response(provider)


async def list_providers(request: web.Request) -> web.Response:
    principal = await _allowed(request, "providers.read")
    return _listing(await _read(request.app[STORE].list_providers, _org(request, principal, request.query.get("org"))))


async def remove_provider(request: web.Request) -> web.Response:
    principal = await _allowed(request, "providers.write")
    ref, org = request.match_info["ref"], _org(request, principal, request.query.get("org"))
    removed = await _mutate(
        request,
        "provider.remove",
        request.app[STORE].remove_provider,
        ref,
        org,
        before=lambda: request.app[STORE].listed_provider(ref, org),
    )
    return web.json_response(removed)


async def set_route(request: web.Request) -> web.Response:
    principal = await _allowed(request, "routes.write")
    body = await _body(request, "org", "model", "strategy", "targets", "fallbacks", "hedge")
    org, model = _named_org(request, principal, _str(body, "org")), _str(body, "model")
    route = await _mutate(
        request,
        "route.set",
        request.app[STORE].set_route,
        org,
        model,
        _str(body, "strategy", required=False) or "priority",
        _str_list(body, "targets"),
        _str_list(body, "fallbacks"),
        _hedge(body),
        before=lambda: _find(request.app[STORE].list_routes(org), model=model),
    )
    return web.json_response(route)


async def list_routes(request: web.Request) -> web.Response:
    principal = await _allowed(request, "routes.read")
    return _listing(await _read(request.app[STORE].list_routes, _org(request, principal, request.query.get("org"))))


async def remove_route(request: web.Request) -> web.Response:
    principal = await _allowed(request, "routes.write")
    org, model = _org(request, principal, request.query.get("org")), request.query.get("model")
    if not org or not model:
        raise InvalidRequestError("pass the rule's org and model as query parameters", param="model")
    removed = await _mutate(
        request,
        "route.remove",
        request.app[STORE].remove_route,
        org,
        model,
        before=lambda: _find(request.app[STORE].list_routes(org), model=model),
    )
    return web.json_response(removed)


async def list_models(request: web.Request) -> web.Response:
    """What keys of an org can call, read from the live snapshot, with the targets in routing order."""
    principal = await _allowed(request, "models.read")
    catalog = request.app[CATALOG]()
    snapshot = catalog.snapshot
    org_ref = _org(request, principal, request.query.get("org"))
    org_ids = [i for i, name in snapshot.org_names.items() if org_ref in (None, i, name)]
    if org_ref and not org_ids:
        orgs = await _read(request.app[STORE].list_orgs)
        raise InvalidRequestError(f"no org {org_ref!r} (known: {', '.join(o['name'] for o in orgs)})", param="org")
    data = [
        {
            "model": model,
            "org": snapshot.org_names[org_id],
            "targets": [
                {
                    "id": t.id,
                    "kind": t.kind,
                    "upstream_model": t.upstream_model,
                    "price_in": t.price_in,
                    "price_out": t.price_out,
                }
                for t in catalog.targets_for(org_id, model)
            ],
        }
        for org_id in org_ids
        for model in catalog.models(org_id)
    ]
    return _listing(data)


async def list_audit(request: web.Request) -> web.Response:
    principal = await _allowed(request, "audit.read")
    since = _datetime(dict(request.query), "since")
    entries = await _read(request.app[AUDIT].list, since)
    scope = principal.org_scope
    if scope is not None:
        actors = await _read(request.app[ACCOUNTS].store.org_actors, scope)
        entries = [e for e in entries if _about_org(e, scope, actors)]
    return _listing(entries)


def _about_org(entry: dict[str, Any], org_id: str, actors: set[str]) -> bool:
    """Whether an org admin sees an audit entry: made by one of the org's accounts or tokens, or about an object
    of the org (its before or after names the org)."""
    if entry["actor"] in actors or entry["target"] == org_id:
        return True
    return any(isinstance(side, dict) and side.get("org_id") == org_id for side in (entry["before"], entry["after"]))


async def verify_audit(request: web.Request) -> web.Response:
    await _allowed(request, "audit.read")
    return web.json_response((await _read(request.app[AUDIT].verify)).to_dict())


async def usage(request: web.Request) -> web.Response:
    """GET /admin/v1/usage?org=&since=ISO&by=model,route (a developer's: of their own keys only)"""
    principal = await _allowed(request, "usage.read")
    by = [g for g in request.query.get("by", "model").split(",") if g]
    since = _datetime(dict(request.query), "since")
    org = _org(request, principal, request.query.get("org"))
    owner = principal.owner_scope

    def report() -> list[dict[str, Any]]:
        key_ids = request.app[ACCOUNTS].store.owned_key_ids(owner) if owner is not None else None
        return usage_report(request.app[ENGINE], org_ref=org, since=since, by=by, key_ids=key_ids)

    return _listing(await _read(report))


# -- nodes ---------------------------------------------------------------------------------------------


# Tokens that expire within a second are for tests of expiry; nothing shorter could be used at all.
NODE_TOKEN_MIN_TTL_S = 0.1
NODE_TOKEN_MAX_TTL_S = 10 * 365 * 86400
NODE_TOKEN_MAX_USES = 1_000_000


async def create_node_token(request: web.Request) -> web.Response:
    principal = await _allowed(request, "node_tokens.create")
    body = await _body(request, "org", "ttl_s", "uses", "labels", "replace", "planes")
    org = _named_org(request, principal, _str(body, "org"))
    if principal.owner_scope is not None and not await _read(
        request.app[ACCOUNTS].store.providers_may_enroll, _org_id(request, org) or org
    ):
        raise PermissionDeniedError(
            "this org does not let providers create enrollment tokens (an org admin can allow it: "
            "providers_may_enroll)",
            code="forbidden",
        )
    # Bounded so that storage can hold them (a timedelta, a 32-bit column on PostgreSQL): 1e300 seconds or
    # 2**63 uses were a 500.
    ttl = bounded_number(body, "ttl_s", NODE_TOKEN_MIN_TTL_S, NODE_TOKEN_MAX_TTL_S)
    uses = bounded_int(body, "uses", 1, NODE_TOKEN_MAX_USES, default=1)
    labels = body.get("labels") or {}
    if not isinstance(labels, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in labels.items()):
        raise InvalidRequestError("'labels' must be an object of strings", param="labels")
    # A node (id or name) the enrolling machine takes over, keeping its id; its earlier credential stops working.
    replace = _str(body, "replace", required=False) or None
    planes = _plane_addresses(body)
    secret = generate_key(ENROLLMENT_TOKEN_PREFIX)
    created = await _mutate(
        request,
        "node_token.create",
        request.app[NODE_STORE].create_token,
        org,
        secret,
        ttl_s=ttl,
        uses=uses,
        labels=labels,
        replace=replace,
        # The nodes enrolled with it are this account's (what a provider sees as their own).
        created_by=principal.owner_scope or principal.account_id,
    )
    token = join_enrollment_token(secret, request.app[NODE_TLS].fingerprint, planes)
    return web.json_response({**created, "token": token}, status=201)


def _plane_addresses(body: dict[str, Any]) -> list[str]:
    """`planes`: the node service addresses the token carries to the agent (not stored: they are only in it)."""
    planes = list(dict.fromkeys(_str_list(body, "planes")))
    if len(planes) > PLANES_MAX:
        raise InvalidRequestError(f"'planes' holds at most {PLANES_MAX} addresses", param="planes")
    for address in planes:
        if problem := plane_address_problem(address):
            raise InvalidRequestError(problem, param="planes")
    return planes


async def list_node_tokens(request: web.Request) -> web.Response:
    principal = await _allowed(request, "node_tokens.read")
    tokens = await _read(request.app[NODE_STORE].list_tokens, _org(request, principal, request.query.get("org")))
    owner = principal.owner_scope
    return _listing([t for t in tokens if owner in (None, t["created_by"])])


async def revoke_node_token(request: web.Request) -> web.Response:
    principal = await _allowed(request, "node_tokens.revoke")
    token_id = request.match_info["id"]

    def before() -> dict[str, Any] | None:
        return _find(request.app[NODE_STORE].list_tokens(), id=token_id)

    _reach(principal, await _read(before), "created_by")
    revoked = await _mutate(request, "node_token.revoke", request.app[NODE_STORE].revoke_token, token_id, before=before)
    return web.json_response(revoked)


def _with_live_state(registry: NodeRegistry, node: dict[str, Any]) -> dict[str, Any]:
    """A node's stored facts plus what its live session says (or offline)."""
    session = registry.session(node["id"])
    if node["revoked_at"]:
        return {**node, "state": "revoked"}
    if session is None:
        return {**node, "state": "offline"}
    hello, status = session.hello, session.status
    hardware = hello.hardware
    infos = {info.name: info for info in hello.models}
    return {
        **node,
        "state": session.state,
        "plane": session.plane,
        "agent_version": hello.agent_version,
        "os": hello.os,
        "mode": "idle-only" if hello.mode == pb.MODE_IDLE_ONLY else "always-on",
        "backend": hello.backend or None,
        "gpu_offload": hello.gpu_offload,
        "connected_at": datetime.fromtimestamp(session.connected_at, UTC).isoformat(),
        "last_heartbeat_s": round(time.monotonic() - session.last_seen, 1),
        "status_version": status.version,
        "hardware": {
            "hostname": hardware.hostname,
            "cpu_model": hardware.cpu_model,
            "cpu_count": hardware.cpu_count,
            "ram_total_bytes": hardware.ram_total_bytes,
            "nvml_status": hardware.nvml_status,
            "gpus": [
                {"name": g.name, "vram_total_bytes": g.vram_total_bytes, "vram_free_bytes": g.vram_free_bytes}
                for g in (status.gpus or hardware.gpus)
            ],
        },
        "models": [
            {
                "name": m.name,
                "slots_total": m.slots_total,
                "slots_busy": m.busy,
                "context": m.context,
                "price_in": m.price_in,
                "price_out": m.price_out,
                # Measured on the node's own jobs (agent.speed); null until one was.
                "tokens_per_s": round(m.tokens_per_s, 1) if m.tokens_per_s else None,
                "jobs_measured": m.jobs_measured,
                **_gpu_layers(infos.get(m.name)),
            }
            for m in session.models.values()
        ],
        "issues": [{"code": i.code, "message": i.message, "model": i.model} for i in (status.issues or hello.issues)],
    }


def _gpu_layers(info: pb.ModelInfo | None) -> dict[str, Any]:
    """Where the node put a model's layers (`--gpu-layers`), as its Hello said; nulls from an older agent."""
    if info is None or not info.layers_total:
        return {"gpu_layers": None, "layers_total": None, "gpu_layers_reason": None}
    return {
        "gpu_layers": info.gpu_layers,
        "layers_total": info.layers_total,
        "gpu_layers_reason": info.gpu_layers_reason,
    }


async def list_nodes(request: web.Request) -> web.Response:
    principal = await _allowed(request, "nodes.read")
    nodes = await _read(request.app[NODE_STORE].list_nodes, _org(request, principal, request.query.get("org")))
    owner = principal.owner_scope
    return _listing(
        [_with_live_state(request.app[REGISTRY], n) for n in nodes if owner in (None, n["owner_account_id"])]
    )


async def _node(request: web.Request, permission: str) -> str:
    """The node's ref, once the caller may act on that node with `permission`."""
    principal = await _allowed(request, permission)
    ref = request.match_info["ref"]
    _reach(principal, await _read(request.app[NODE_STORE].get_node, ref), "owner_account_id")
    return ref


async def show_node(request: web.Request) -> web.Response:
    ref = await _node(request, "nodes.read")
    return web.json_response(
        _with_live_state(request.app[REGISTRY], await _read(request.app[NODE_STORE].get_node, ref))
    )


async def _set_drained(request: web.Request, drained: bool) -> web.Response:
    """Persist the flag (it holds across reconnects), then tell the live session."""
    ref = await _node(request, "nodes.operate")
    action = "node.drain" if drained else "node.resume"
    node = await _mutate(
        request,
        action,
        request.app[NODE_STORE].set_drained,
        ref,
        drained,
        before=lambda: request.app[NODE_STORE].get_node(ref),
    )
    request.app[REGISTRY].set_drained(node["id"], drained)
    return web.json_response(_with_live_state(request.app[REGISTRY], node))


async def drain_node(request: web.Request) -> web.Response:
    return await _set_drained(request, True)


async def resume_node(request: web.Request) -> web.Response:
    return await _set_drained(request, False)


async def revoke_node(request: web.Request) -> web.Response:
    ref = await _node(request, "nodes.revoke")
    node = await _mutate(
        request,
        "node.revoke",
        request.app[NODE_STORE].revoke,
        ref,
        before=lambda: request.app[NODE_STORE].get_node(ref),
    )
    request.app[REGISTRY].disconnect(node["id"])
    return web.json_response(_with_live_state(request.app[REGISTRY], node))


# -- policy: limits, cache, prices -----------------------------------------------------------------------


def _subject(source: Mapping[str, Any]) -> tuple[str | None, str | None]:
    """The org or the key a limit applies to (exactly one of them)."""
    org, key = source.get("org") or None, source.get("key") or None
    if bool(org) == bool(key) or not isinstance(org or key, str):
        raise InvalidRequestError("name exactly one of 'org' or 'key'", param="org")
    return org, key


async def _with_live_usage(request: web.Request, limits: dict[str, Any]) -> dict[str, Any]:
    """Stored limits plus what the plane's counters (or the shared ones) say right now."""
    live = request.app[SNAPSHOTS].current.limits.get(limits["scope"])
    return {**limits, "usage": await request.app[LIMITER].live_usage(limits["scope"], live) if live else {}}


async def _limit_subject(
    request: web.Request, permission: str, source: Mapping[str, Any]
) -> tuple[str | None, str | None]:
    """The org or key a limit is about, once the caller may touch it: a key of their org, or their org."""
    principal = await _allowed(request, permission)
    org, key = _subject(source)
    if key is not None:
        _reach(principal, await _read(_key, request, key), "owner_account_id")
    else:
        org = _org(request, principal, org)
    return org, key


async def set_limits(request: web.Request) -> web.Response:
    await _allowed(request, "limits.write")
    body = await _body(request, "org", "key", *LIMIT_FIELDS)
    org, key = await _limit_subject(request, "limits.write", body)
    values = {name: body[name] for name in LIMIT_FIELDS if name in body}
    limits = await _mutate(
        request,
        "limits.set",
        request.app[POLICIES].set_limits,
        org,
        key,
        values,
        before=lambda: request.app[POLICIES].get_limits(org, key),
    )
    return web.json_response(await _with_live_usage(request, limits))


async def list_limits(request: web.Request) -> web.Response:
    principal = await _allowed(request, "limits.read")
    if request.query.get("key"):
        _reach(principal, await _read(_key, request, request.query["key"]), "owner_account_id")
        found = await _read(request.app[POLICIES].get_limits, None, request.query["key"])
        rows = [found] if found else []
    else:
        rows = await _read(request.app[POLICIES].list_limits, _org(request, principal, request.query.get("org")))
    return _listing([await _with_live_usage(request, r) for r in rows])


async def remove_limits(request: web.Request) -> web.Response:
    org, key = await _limit_subject(request, "limits.write", request.query)
    removed = await _mutate(
        request,
        "limits.remove",
        request.app[POLICIES].remove_limits,
        org,
        key,
        before=lambda: request.app[POLICIES].get_limits(org, key),
    )
    return web.json_response(removed)


async def set_cache_policy(request: web.Request) -> web.Response:
    principal = await _allowed(request, "cache.write")
    body = await _body(request, "org", "mode", "ttl_s")
    org = _named_org(request, principal, _str(body, "org"))
    ttl = body.get("ttl_s")
    policy = await _mutate(
        request,
        "cache.set",
        request.app[POLICIES].set_cache_policy,
        org,
        _str(body, "mode", required=False) or None,
        ttl,
        before=lambda: request.app[POLICIES].list_cache_policies(org)[0],
    )
    return web.json_response((await _with_cache_stats(request, [policy]))[0])


async def _with_cache_stats(request: web.Request, policies: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each org's policy with the entries and bytes it holds (null when a shared cache cannot say now)."""
    held = await request.app[CACHE].held(p["org_id"] for p in policies)
    return [{**p, **_figures(held.get(p["org_id"]))} for p in policies]


def _figures(held: tuple[int, int] | None) -> dict[str, int | None]:
    entries, size = held if held is not None else (None, None)
    return {"entries": entries, "bytes": size}


async def list_cache_policies(request: web.Request) -> web.Response:
    principal = await _allowed(request, "cache.read")
    rows = await _read(request.app[POLICIES].list_cache_policies, _org(request, principal, request.query.get("org")))
    return _listing(await _with_cache_stats(request, rows))


async def clear_cache(request: web.Request) -> web.Response:
    """Drop cached answers: one org's, or all of them. Audited, like every admin change."""
    principal = await _allowed(request, "cache.write")
    if request.body_exists:
        # The org is a query parameter: a body naming one would be left unread, and every org's answers cleared.
        raise InvalidRequestError("this request takes no body: name the org as ?org=ORG (none: every org)", param="org")
    org_ref = _org(request, principal, request.query.get("org"))
    org_id = None
    if org_ref:
        org_id = (await _read(request.app[POLICIES].list_cache_policies, org_ref))[0]["org_id"]

    # On the loop, which is what stores and evicts entries: a worker thread would race it over the dict.
    cleared = {"object": "cache_clear", "id": org_id or "*", "removed": await request.app[CACHE].remove(org_id)}
    return web.json_response(await _mutate(request, "cache.clear", lambda: cleared))


async def set_price(request: web.Request) -> web.Response:
    principal = await _allowed(request, "prices.write")
    body = await _body(request, "provider", "org", "model", "price_in", "price_out")
    price = await _mutate(
        request,
        "price.set",
        request.app[POLICIES].set_price,
        _str(body, "provider"),
        _org(request, principal, _str(body, "org", required=False) or None),
        _str(body, "model"),
        body.get("price_in"),
        body.get("price_out"),
    )
    return web.json_response(price)


async def list_prices(request: web.Request) -> web.Response:
    principal = await _allowed(request, "prices.read")
    org = _org(request, principal, request.query.get("org"))
    rows = await _read(request.app[POLICIES].price_history, org, request.query.get("provider"))
    return _listing(rows)


async def node_earnings(request: web.Request) -> web.Response:
    """GET /admin/v1/earnings?org=&since=ISO&by=node|org (a provider's: of their own nodes only)"""
    principal = await _allowed(request, "earnings.read")
    since = _datetime(dict(request.query), "since")
    by = request.query.get("by", "node")
    org = _org(request, principal, request.query.get("org"))
    owner = principal.owner_scope

    def report() -> list[dict[str, Any]]:
        node_ids = None
        if owner is not None:
            node_ids = [n["id"] for n in request.app[NODE_STORE].list_nodes(org) if n["owner_account_id"] == owner]
        return earnings_report(request.app[ENGINE], org_ref=org, since=since, by=by, node_ids=node_ids)

    return _listing(await _read(report))
