"""Who signs in and what they may do (issue 20): accounts, roles and the checks every admin endpoint makes.

    roles.py      the roles and the one permission table (which role may do what)
    passwords.py  argon2id password hashes, computed in a worker thread
    sessions.py   the console session cookie and its CSRF token
    throttle.py   login throttling per email and per client address
    store.py      accounts, sessions, invitations, scoped admin tokens, console keys in the database
    principal.py  the Principal of an admin request (global admin key, scoped token or session)
    changes.py    how admin changes are made and audited with the principal's actor
    playground.py the session credential on /v1 (the account's own console key)
    http.py       /auth/* and the accounts' /admin/v1 endpoints; `add_routes`

Other handlers use `principal = await admin_principal(request)` then `principal.require("perm", org_id=...)`.
"""

from aiohttp import web

from server.accounts.principal import Principal, admin_principal


def add_routes(app: web.Application) -> None:
    """Register /auth/* and the accounts' /admin/v1 endpoints (imported here: server.accounts.http needs
    server.api.openai_api, which needs this package for the playground's session credential)."""
    from server.accounts.http import add_routes as register

    register(app)


__all__ = ["Principal", "add_routes", "admin_principal"]
