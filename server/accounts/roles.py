"""Roles and what each may do: the one permission table every /admin/v1 handler checks against.

A permission names an action on a kind of object (`keys.write`). Whether a role holds it is this table; *which*
objects it may touch is the principal's scope (server.accounts.principal): a plane admin every org, anyone else
their own org, and developers and providers only what they own within it (their keys and usage; the nodes
enrolled with their tokens and what those earned).
"""

from __future__ import annotations

PLANE_ADMIN = "plane_admin"
ORG_ADMIN = "org_admin"
DEVELOPER = "developer"
PROVIDER = "provider"
ROLES = (PLANE_ADMIN, ORG_ADMIN, DEVELOPER, PROVIDER)
# Roles whose reach inside their org is what they own, not the whole org.
OWNER_SCOPED = frozenset({DEVELOPER, PROVIDER})

# Every permission, with what it allows (docs/console-access.md is written from this).
PERMISSIONS: dict[str, str] = {
    "orgs.read": "list orgs (others than the plane admin: their own)",
    "orgs.create": "create orgs",
    "orgs.settings": "change an org's settings (providers_may_enroll)",
    "admin_key.rotate": "rotate the plane's global admin key",
    "accounts.read": "list accounts",
    "accounts.write": "create, change, disable and remove accounts, and invite people",
    "admin_tokens.read": "list scoped admin tokens",
    "admin_tokens.write": "create and revoke scoped admin tokens",
    "keys.read": "list API keys (developers: their own)",
    "keys.write": "create and revoke API keys (developers: their own)",
    "providers.read": "list providers",
    "providers.write": "add, change and remove providers",
    "routes.read": "list routing rules",
    "routes.write": "set and remove routing rules",
    "models.read": "list the models an org serves and their targets",
    "limits.read": "read limits and quotas with their live usage",
    "limits.write": "set and remove limits and quotas",
    "cache.read": "read cache policies",
    "cache.write": "set cache policies and clear cached answers",
    "prices.read": "read price history",
    "prices.write": "set prices",
    "usage.read": "read usage and cost (developers: of their own keys)",
    "audit.read": "read and verify the audit log (org admins: their org's entries)",
    "earnings.read": "read node earnings (providers: of their own nodes)",
    "node_tokens.read": "list enrollment tokens (providers: their own)",
    "node_tokens.create": "create enrollment tokens (providers: when their org allows it)",
    "node_tokens.revoke": "revoke enrollment tokens (providers: their own)",
    "nodes.read": "list and show nodes (providers: their own)",
    "nodes.operate": "drain and resume nodes (providers: their own)",
    "nodes.revoke": "revoke nodes",
    "playground.use": "call /v1 from the console with the session (as the account's own console key)",
}

_ORG_ADMIN = frozenset(PERMISSIONS) - {"orgs.create", "admin_key.rotate"}
_DEVELOPER = frozenset({"orgs.read", "keys.read", "keys.write", "models.read", "usage.read", "playground.use"})
_PROVIDER = frozenset(
    {
        "orgs.read",
        "nodes.read",
        "nodes.operate",
        "earnings.read",
        "node_tokens.read",
        "node_tokens.create",
        "node_tokens.revoke",
    }
)

ROLE_PERMISSIONS: dict[str, frozenset[str]] = {
    PLANE_ADMIN: frozenset(PERMISSIONS),
    ORG_ADMIN: _ORG_ADMIN,
    DEVELOPER: _DEVELOPER,
    PROVIDER: _PROVIDER,
}

# Roles an org admin may give (accounts, invitations, tokens): any but the plane's own.
ORG_GRANTABLE = frozenset({ORG_ADMIN, DEVELOPER, PROVIDER})


def allows(role: str, permission: str) -> bool:
    if permission not in PERMISSIONS:
        # A handler asking for a permission nobody defined is a bug: fail loudly rather than allow or deny quietly.
        raise KeyError(f"unknown permission {permission!r}")
    return permission in ROLE_PERMISSIONS.get(role, frozenset())
