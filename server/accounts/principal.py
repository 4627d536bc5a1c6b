"""Who is calling the admin API: a Principal, resolved once per request from its credential.

    Authorization: Bearer <global admin key>   -> plane admin, actor = the admin key's id (as before accounts)
    Authorization: Bearer hwt_...               -> a scoped admin token: its role, org and account
    Cookie: hatchway_session=...                -> a console session: the account's role and org (+ CSRF)

The global admin key is checked against the in-memory snapshot exactly as before; tokens and sessions are looked
up in the database (in a worker thread), so revoking either takes effect at once on every plane.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from aiohttp import web

from server.accounts.roles import ORG_GRANTABLE, OWNER_SCOPED, PLANE_ADMIN, allows
from server.accounts.sessions import SESSION_COOKIE, check_csrf, csrf_token, session_hash
from server.accounts.store import AccountStore, Identity
from server.accounts.throttle import LoginThrottle
from server.api.resources import SNAPSHOTS
from server.config import Config
from server.credentials import hash_key
from server.errors import AuthenticationError, PermissionDeniedError
from server.policy.auth import authenticate_admin, bearer_token

# Prefix of scoped admin tokens (server.credentials names the other kinds of secret).
ADMIN_TOKEN_PREFIX = "hwt_"


@dataclass(frozen=True)
class Principal:
    # admin_key, admin_token or session
    kind: str
    # The credential's id: the admin key's, the token's, or (for a session) the account's. The audit actor.
    id: str
    role: str
    org_id: str | None
    account_id: str | None = None
    email: str | None = None
    name: str | None = None
    # Sessions only: what unsafe requests must send as X-CSRF-Token.
    csrf_token: str | None = None

    @property
    def actor(self) -> str:
        return self.id

    @property
    def org_scope(self) -> str | None:
        """The one org this principal may touch; None: every org (a plane admin)."""
        return None if self.role == PLANE_ADMIN else self.org_id

    @property
    def owner_scope(self) -> str | None:
        """For developers and providers, the account whose keys, usage, tokens and nodes bound what they see;
        None: the whole org (or plane)."""
        if self.role not in OWNER_SCOPED:
            return None
        # A developer's or provider's token acts for an account (the API refuses one without); never widen.
        return self.account_id or self.id

    def may(self, permission: str) -> bool:
        return allows(self.role, permission)

    def require(self, permission: str, org_id: str | None = None) -> None:
        """403 unless the role holds `permission` and, when an org is named, it is this principal's own."""
        if not self.may(permission):
            raise PermissionDeniedError(f"your role ({self.role}) may not do this ({permission})", code="forbidden")
        scope = self.org_scope
        if org_id is not None and scope is not None and org_id != scope:
            raise PermissionDeniedError("that belongs to another org", code="forbidden")

    def require_grant(self, role: str, org_id: str | None) -> None:
        """403 unless this principal may give `role` in `org_id` (accounts, invitations and tokens)."""
        if self.role == PLANE_ADMIN:
            return
        if role not in ORG_GRANTABLE or org_id != self.org_scope:
            raise PermissionDeniedError(f"you may not give the role {role} in that org", code="forbidden")

    def me(self) -> dict[str, object]:
        doc: dict[str, object] = {
            "id": self.account_id or self.id,
            "object": "principal",
            "kind": self.kind,
            "email": self.email,
            "name": self.name,
            "role": self.role,
            "org_id": self.org_id,
        }
        if self.csrf_token is not None:
            doc["csrf_token"] = self.csrf_token
        return doc


class Accounts:
    """What the accounts part of a plane holds: the store and the (per-plane, in-memory) login throttle."""

    def __init__(self, store: AccountStore, config: Config) -> None:
        self.store = store
        self.config = config
        self.throttle = LoginThrottle(
            config.login_failures_per_email, config.login_failures_per_address, config.login_throttle_window_s
        )


ACCOUNTS = web.AppKey("accounts", Accounts)
PRINCIPAL = web.RequestKey("principal", Principal)


def _from_identity(kind: str, credential_id: str, identity: Identity, csrf: str | None = None) -> Principal:
    return Principal(
        kind=kind,
        id=credential_id,
        role=identity.role,
        org_id=identity.org_id,
        account_id=identity.account_id,
        email=identity.email,
        name=identity.name,
        csrf_token=csrf,
    )


def uses_session(request: web.Request) -> bool:
    """A request authenticates with its session only when it sends no Authorization header at all."""
    return "Authorization" not in request.headers and SESSION_COOKIE in request.cookies


async def session_principal(request: web.Request) -> Principal:
    """The principal of the request's console session; 401 when it has none that is live, 403 (csrf_failed)
    when an unsafe request lacks the session's CSRF token."""
    session_id = request.cookies.get(SESSION_COOKIE, "")
    accounts = request.app[ACCOUNTS]
    identity = (
        await asyncio.to_thread(accounts.store.session_identity, session_hash(session_id)) if session_id else None
    )
    if identity is None or identity.account_id is None:
        raise AuthenticationError("Your session has ended; sign in again.", code="session_expired")
    check_csrf(request, session_id)
    return _from_identity("session", identity.account_id, identity, csrf_token(session_id))


async def admin_principal(request: web.Request) -> Principal:
    """Who calls this admin request (cached on the request); 401 when no credential is valid."""
    if PRINCIPAL in request:
        return request[PRINCIPAL]
    if uses_session(request):
        principal = await session_principal(request)
    else:
        token = bearer_token(request.headers)
        if token.startswith(ADMIN_TOKEN_PREFIX):
            found = await asyncio.to_thread(request.app[ACCOUNTS].store.token_identity, hash_key(token))
            if found is None:
                raise AuthenticationError("Incorrect, expired or revoked admin token provided.")
            principal = _from_identity("admin_token", found[0], found[1])
        else:
            admin_id = authenticate_admin(request.headers, request.app[SNAPSHOTS].current)
            principal = Principal(kind="admin_key", id=admin_id, role=PLANE_ADMIN, org_id=None)
    request[PRINCIPAL] = principal
    return principal
