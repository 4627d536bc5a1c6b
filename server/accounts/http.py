"""The accounts' HTTP endpoints: signing in and out, invitations, the caller's own identity, accounts, scoped
admin tokens, and an org's settings.

    POST   /auth/login                      {"email","password"} -> {"account","csrf_token"} + session cookie
    POST   /auth/logout                     -> 204, session ended everywhere, cookie cleared (CSRF)
    POST   /auth/invitations/accept         {"token","name","password"} -> as /auth/login
    POST   /auth/password                   {"current_password","new_password"} -> as /auth/login (CSRF)
    GET    /admin/v1/me                     who is calling (with the CSRF token, for a session)
    GET    /admin/v1/accounts               POST (create), PATCH /{id}, DELETE /{id}
    POST   /admin/v1/invitations            {"email","role","org_id"} -> {"id","url","token","expires_at"}
    GET    /admin/v1/admin-tokens           POST (create, token shown once), POST /{id}/revoke
    PATCH  /admin/v1/orgs/{ref}             {"providers_may_enroll": bool}
"""

from __future__ import annotations

import asyncio
from datetime import datetime, timedelta
from typing import Any

from aiohttp import web

from server.accounts.changes import mutate
from server.accounts.passwords import MAX_LENGTH, check_password, hash_password, verify_password
from server.accounts.principal import (
    ACCOUNTS,
    ADMIN_TOKEN_PREFIX,
    Accounts,
    Principal,
    admin_principal,
    session_principal,
    uses_session,
)
from server.accounts.roles import OWNER_SCOPED, PERMISSIONS, PLANE_ADMIN
from server.accounts.sessions import (
    SESSION_COOKIE,
    clear_session_cookie,
    csrf_token,
    is_secure,
    new_session_id,
    session_hash,
    set_session_cookie,
)
from server.accounts.store import INVALID_INVITATION, normalize_email
from server.api.middleware import REQUEST_ID
from server.api.openai_api import read_body
from server.api.resources import CHANGES, CONFIG, ENGINE, SNAPSHOTS
from server.api.validation import bounded_number, only_fields
from server.credentials import generate_key, hash_key
from server.errors import (
    AuthenticationError,
    InvalidRequestError,
    PermissionDeniedError,
    UnsupportedMediaTypeError,
)
from server.policy.changes import Entry
from server.storage.models import utcnow

# The console's page that takes an invitation; the token rides in the fragment, which browsers never send to
# a server (no access log, no Referer holds it).
INVITATION_PAGE = "/console/accept"
INVITATION_TOKEN_PREFIX = "hwi_"
INVITATION_DEFAULT_TTL_S = 7 * 86400
INVITATION_MAX_TTL_S = 90 * 86400
NAME_MAX_CHARS = 200
# RFC 5321's limit on an address.
EMAIL_MAX_CHARS = 254


def _accounts(request: web.Request) -> Accounts:
    return request.app[ACCOUNTS]


async def _body(request: web.Request, *fields: str) -> dict[str, Any]:
    """A JSON body holding no field but `fields`, declared as such. The header is required here (elsewhere its
    absence is tolerated): a page of another site can post a body without one and no preflight, which would let it
    sign a browser in to an account of its choosing."""
    if not request.headers.get("Content-Type", "").strip():
        raise UnsupportedMediaTypeError("send the body as 'Content-Type: application/json'")
    body = await read_body(request, request.app[CONFIG].max_body_bytes)
    only_fields(body, fields)
    return body


def _name(body: dict[str, Any]) -> str:
    value = body.get("name", "")
    if not isinstance(value, str) or len(value) > NAME_MAX_CHARS:
        raise InvalidRequestError(f"'name' must be a string of at most {NAME_MAX_CHARS} characters", param="name")
    return value.strip()


def _org_ref(body: dict[str, Any]) -> str | None:
    """The org a new account, invitation or token is for: `org_id` (an id or a name), or `org`."""
    # Both checked, the one not read too: {"org_id": "acme", "org": {}} is a malformed request, not "acme".
    for name in ("org_id", "org"):
        if body.get(name) is not None and not isinstance(body[name], str):
            raise InvalidRequestError(f"'{name}' must be a string", param=name)
    value = body.get("org_id", body.get("org"))
    return value or None


def _role(body: dict[str, Any]) -> str:
    value = body.get("role")
    if not isinstance(value, str):
        raise InvalidRequestError("'role' must be a string", param="role")
    return value


def _expires_at(body: dict[str, Any]) -> datetime | None:
    value = body.get("expires_at")
    if value is None:
        ttl = bounded_number(body, "ttl_s", 1, 10 * 365 * 86400)
        return utcnow() + timedelta(seconds=ttl) if ttl is not None else None
    try:
        parsed = datetime.fromisoformat(value) if isinstance(value, str) else None
    except ValueError:
        parsed = None
    if parsed is None:
        raise InvalidRequestError("'expires_at' must be an ISO 8601 date-time", param="expires_at")
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=utcnow().tzinfo)


async def _granted_org(request: web.Request, principal: Principal, role: str, org_ref: str | None) -> str | None:
    """The org id for something given `role`, once the principal is known to be allowed to give it there."""
    org_id = await asyncio.to_thread(_accounts(request).store.resolve_org, role, org_ref)
    principal.require_grant(role, org_id)
    return org_id


def _org_of(request: web.Request, ref: str) -> str:
    """An org's id from its id or name, as the live snapshot knows it (an unknown one stays as given)."""
    return request.app[SNAPSHOTS].current.org_id(ref) or ref


def _check_reach(principal: Principal, org_id: str | None) -> None:
    """A principal bound to an org reaches nothing outside it, plane-level objects (org None) included."""
    if principal.org_scope is not None and org_id != principal.org_scope:
        raise PermissionDeniedError("that belongs to another org", code="forbidden")


# -- signing in ------------------------------------------------------------------------------------


async def _signed_in(request: web.Request, account: dict[str, Any], status: int = 200) -> web.Response:
    """Start a session for `account`: its row, the cookie, and the CSRF token the page sends back."""
    accounts = _accounts(request)
    session_id = new_session_id()
    lifetime = accounts.config.session_lifetime_s
    expires = utcnow() + timedelta(seconds=lifetime)
    await asyncio.to_thread(accounts.store.start_session, account["id"], session_hash(session_id), expires)
    response = web.json_response({"account": account, "csrf_token": csrf_token(session_id)}, status=status)
    set_session_cookie(response, request, session_id, lifetime)
    response.headers["Cache-Control"] = "no-store"
    return response


async def login(request: web.Request) -> web.Response:
    accounts = _accounts(request)
    body = await _body(request, "email", "password")
    password = body.get("password")
    email = body.get("email")
    if not isinstance(email, str) or not isinstance(password, str):
        raise InvalidRequestError("send 'email' and 'password' as strings", param="email")
    email = email.strip().lower()
    if len(email) > EMAIL_MAX_CHARS:
        # No account has such an address; refused before it becomes a throttle entry of that size.
        raise InvalidRequestError("'email' is too long", param="email")
    address = request.remote or ""
    accounts.throttle.check(email, address)
    # A password longer than any account may have is wrong without hashing it.
    found = await asyncio.to_thread(accounts.store.password_of, email) if len(password) <= MAX_LENGTH else None
    # An unknown email is checked against a dummy hash: the same work, the same answer, as a wrong password.
    if not await verify_password(found[1] if found else None, password[:MAX_LENGTH]) or found is None:
        accounts.throttle.failed(email, address)
        raise AuthenticationError("Incorrect email or password.", code="invalid_credentials")
    accounts.throttle.succeeded(email)
    account = await asyncio.to_thread(accounts.store.get_account, found[0])
    return await _signed_in(request, account)


async def logout(request: web.Request) -> web.Response:
    """End the session everywhere. Without a live session there is nothing to end: the cookie is cleared all the
    same (and no CSRF token can be asked of a session that is gone)."""
    if uses_session(request):
        try:
            await session_principal(request)
        except AuthenticationError:
            pass
        else:
            await asyncio.to_thread(_accounts(request).store.end_session, session_hash(request.cookies[SESSION_COOKIE]))
    response = web.Response(status=204)
    clear_session_cookie(response, request)
    return response


async def accept_invitation(request: web.Request) -> web.Response:
    body = await _body(request, "token", "password", "name")
    token = body.get("token")
    if not isinstance(token, str) or not token:
        raise InvalidRequestError("'token' must be the invitation's token", param="token")
    password = check_password(body.get("password"))
    name = _name(body)
    store = _accounts(request).store
    if not await asyncio.to_thread(store.invitation_open, hash_key(token)):
        raise InvalidRequestError(INVALID_INVITATION, param="token", code="invalid_invitation")
    digest = await hash_password(password)

    def accept() -> dict[str, Any]:
        return store.accept_invitation(hash_key(token), name, digest)

    # The new account is its own actor: the invitation's creator is in the invitation's audit entry. Accounts are
    # not in the snapshot: nothing to reload.
    def entry(account: dict[str, Any]) -> Entry:
        return Entry(account["id"], "account.create", account["id"], None, {**account, "via": "invitation"})

    account = await request.app[CHANGES].apply(accept, entry, request_id=request[REQUEST_ID], reload=False)
    return await _signed_in(request, account, status=201)


async def change_password(request: web.Request) -> web.Response:
    """An account changes its own password, proving the current one. Every session of the account ends (a thief's
    included) and this one is replaced by a new session, answered as /auth/login answers."""
    principal = await admin_principal(request)
    if principal.account_id is None:
        raise PermissionDeniedError("only an account has a password to change", code="forbidden")
    body = await _body(request, "current_password", "new_password")
    current, new = body.get("current_password"), check_password(body.get("new_password"))
    accounts = _accounts(request)
    store = accounts.store
    account = await asyncio.to_thread(store.get_account, principal.account_id)
    # Guessing the current password through a stolen session is throttled like guessing it at sign-in.
    address = request.remote or ""
    accounts.throttle.check(account["email"], address)
    found = await asyncio.to_thread(store.password_of, account["email"])
    if not isinstance(current, str) or found is None or not await verify_password(found[1], current):
        accounts.throttle.failed(account["email"], address)
        raise PermissionDeniedError("the current password is not right", param="current_password", code="forbidden")
    digest = await hash_password(new)
    await mutate(
        request, "account.password", store.update_account, account["id"], before=lambda: account, password_hash=digest
    )
    return await _signed_in(request, account)


async def me(request: web.Request) -> web.Response:
    principal = await admin_principal(request)
    org_names = request.app[SNAPSHOTS].current.org_names
    doc = principal.me() | {
        "org": org_names.get(principal.org_id) if principal.org_id else None,
        # What the console may offer this principal (server.accounts.roles); the API checks each call anyway.
        "permissions": sorted(p for p in PERMISSIONS if principal.may(p)),
    }
    response = web.json_response(doc)
    response.headers["Cache-Control"] = "no-store"
    return response


# -- accounts --------------------------------------------------------------------------------------


async def list_accounts(request: web.Request) -> web.Response:
    principal = await admin_principal(request)
    principal.require("accounts.read")
    org_id = principal.org_scope
    if org_id is None and request.query.get("org"):
        org_id = _org_of(request, request.query["org"])
    elif request.query.get("org") and _org_of(request, request.query["org"]) != org_id:
        raise PermissionDeniedError("that belongs to another org", code="forbidden")
    rows = await asyncio.to_thread(_accounts(request).store.list_accounts, org_id)
    return web.json_response({"object": "list", "data": rows})


async def create_account(request: web.Request) -> web.Response:
    principal = await admin_principal(request)
    principal.require("accounts.write")
    body = await _body(request, "email", "password", "role", "org", "org_id", "name")
    email = normalize_email(body.get("email"))
    role = _role(body)
    org_id = await _granted_org(request, principal, role, _org_ref(body))
    digest = await hash_password(check_password(body.get("password")))
    account = await mutate(
        request, "account.create", _accounts(request).store.create_account, email, _name(body), role, org_id, digest
    )
    return web.json_response(account, status=201)


async def _target_account(request: web.Request, principal: Principal) -> dict[str, Any]:
    account = await asyncio.to_thread(_accounts(request).store.get_account, request.match_info["id"])
    _check_reach(principal, account["org_id"])
    return account


async def update_account(request: web.Request) -> web.Response:
    principal = await admin_principal(request)
    principal.require("accounts.write")
    body = await _body(request, "name", "role", "org_id", "org", "disabled", "password")
    current = await _target_account(request, principal)
    changes: dict[str, Any] = {}
    if "name" in body:
        changes["name"] = _name(body)
    if "role" in body or "org_id" in body or "org" in body:
        role = _role(body) if "role" in body else current["role"]
        org_ref = _org_ref(body) if ("org_id" in body or "org" in body) else current["org_id"]
        changes["role"], changes["org_id"] = role, await _granted_org(request, principal, role, org_ref)
    if "disabled" in body:
        if not isinstance(body["disabled"], bool):
            raise InvalidRequestError("'disabled' must be true or false", param="disabled")
        changes["disabled"] = body["disabled"]
    if "password" in body:
        changes["password_hash"] = await hash_password(check_password(body["password"]))
    store = _accounts(request).store
    account = await mutate(
        request, "account.update", store.update_account, current["id"], before=lambda: current, **changes
    )
    return web.json_response(account)


async def remove_account(request: web.Request) -> web.Response:
    principal = await admin_principal(request)
    principal.require("accounts.write")
    current = await _target_account(request, principal)
    store = _accounts(request).store
    removed = await mutate(request, "account.remove", store.remove_account, current["id"], before=lambda: current)
    return web.json_response(removed)


async def create_invitation(request: web.Request) -> web.Response:
    principal = await admin_principal(request)
    principal.require("accounts.write")
    body = await _body(request, "email", "role", "org", "org_id", "ttl_s")
    email = normalize_email(body.get("email"))
    role = _role(body)
    org_id = await _granted_org(request, principal, role, _org_ref(body))
    ttl = bounded_number(body, "ttl_s", 60, INVITATION_MAX_TTL_S) or INVITATION_DEFAULT_TTL_S
    token = generate_key(INVITATION_TOKEN_PREFIX)
    store = _accounts(request).store
    created = await mutate(
        request,
        "invitation.create",
        store.create_invitation,
        email,
        role,
        org_id,
        principal.actor,
        hash_key(token),
        utcnow() + timedelta(seconds=ttl),
    )
    scheme = "https" if is_secure(request) else "http"
    url = f"{scheme}://{request.host}{INVITATION_PAGE}#token={token}"
    return web.json_response({**created, "url": url, "token": token}, status=201)


# -- scoped admin tokens ---------------------------------------------------------------------------


async def list_admin_tokens(request: web.Request) -> web.Response:
    principal = await admin_principal(request)
    principal.require("admin_tokens.read")
    rows = await asyncio.to_thread(_accounts(request).store.list_tokens, principal.org_scope)
    return web.json_response({"object": "list", "data": rows})


async def create_admin_token(request: web.Request) -> web.Response:
    principal = await admin_principal(request)
    principal.require("admin_tokens.write")
    body = await _body(request, "name", "role", "org", "org_id", "account_id", "expires_at", "ttl_s")
    role = _role(body)
    org_id = await _granted_org(request, principal, role, _org_ref(body))
    account_id = body.get("account_id")
    if account_id is not None and not isinstance(account_id, str):
        raise InvalidRequestError("'account_id' must be a string", param="account_id")
    if role in OWNER_SCOPED and not account_id:
        raise InvalidRequestError(
            f"a {role} token acts for an account (whose keys or nodes it sees): pass 'account_id'", param="account_id"
        )
    if role == PLANE_ADMIN and account_id:
        raise InvalidRequestError("a plane admin token acts for no account", param="account_id")
    token = generate_key(ADMIN_TOKEN_PREFIX)
    created = await mutate(
        request,
        "admin_token.create",
        _accounts(request).store.create_token,
        _name(body),
        role,
        org_id,
        account_id or None,
        principal.actor,
        _expires_at(body),
        hash_key(token),
    )
    return web.json_response({**created, "token": token}, status=201)


async def revoke_admin_token(request: web.Request) -> web.Response:
    principal = await admin_principal(request)
    principal.require("admin_tokens.write")
    store = _accounts(request).store
    current = await asyncio.to_thread(store.get_token, request.match_info["id"])
    _check_reach(principal, current["org_id"])
    revoked = await mutate(request, "admin_token.revoke", store.revoke_token, current["id"], before=lambda: current)
    return web.json_response(revoked)


# -- org settings ----------------------------------------------------------------------------------


async def update_org(request: web.Request) -> web.Response:
    principal = await admin_principal(request)
    principal.require("orgs.settings")
    body = await _body(request, "providers_may_enroll")
    allowed = body.get("providers_may_enroll")
    if not isinstance(allowed, bool):
        raise InvalidRequestError("send {'providers_may_enroll': true|false}", param="providers_may_enroll")
    org_id = _org_of(request, request.match_info["ref"])
    principal.require("orgs.settings", org_id)
    store = _accounts(request).store
    org = await mutate(request, "org.update", store.set_providers_may_enroll, org_id, allowed)
    return web.json_response(org)


def add_routes(app: web.Application) -> None:
    from server.accounts.store import AccountStore  # here, so that importing the package stays light

    app[ACCOUNTS] = Accounts(AccountStore(app[ENGINE]), app[CONFIG])
    app.router.add_post("/auth/login", login)
    app.router.add_post("/auth/logout", logout)
    app.router.add_post("/auth/invitations/accept", accept_invitation)
    app.router.add_post("/auth/password", change_password)
    app.router.add_get("/admin/v1/me", me)
    app.router.add_get("/admin/v1/accounts", list_accounts)
    app.router.add_post("/admin/v1/accounts", create_account)
    app.router.add_patch("/admin/v1/accounts/{id}", update_account)
    app.router.add_delete("/admin/v1/accounts/{id}", remove_account)
    app.router.add_post("/admin/v1/invitations", create_invitation)
    app.router.add_get("/admin/v1/admin-tokens", list_admin_tokens)
    app.router.add_post("/admin/v1/admin-tokens", create_admin_token)
    app.router.add_post("/admin/v1/admin-tokens/{id}/revoke", revoke_admin_token)
    app.router.add_patch("/admin/v1/orgs/{ref}", update_org)
