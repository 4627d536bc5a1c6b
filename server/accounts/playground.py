"""The session credential on /v1: the console's playground calls the OpenAI endpoints with the signed-in
account's cookie instead of a key.

Such a request runs as the account's own console key in its org (an api_key row owned by the account, made on
first use, whose secret nobody ever sees), so the org's and that key's limits, usage and cost apply as to any key.
A plane admin belongs to no org and names the one to play in with X-Hatchway-Org (its id or name).
Only requests without an Authorization header come here (server.openai_api): the Bearer path is untouched.
"""

from __future__ import annotations

import asyncio

from aiohttp import web

from server.accounts.principal import ACCOUNTS, session_principal, uses_session
from server.accounts.roles import PLANE_ADMIN
from server.auth import authenticate
from server.errors import AuthenticationError, InvalidRequestError, NotFoundError
from server.middleware import REQUEST_ID
from server.plane import PLANE
from server.snapshot import KeyEntry, Snapshot

ORG_HEADER = "X-Hatchway-Org"


def _org_of(snapshot: Snapshot, ref: str) -> str | None:
    if ref in snapshot.org_names:
        return ref
    return next((org_id for org_id, name in snapshot.org_names.items() if name == ref), None)


async def playground_key(request: web.Request, snapshot: Snapshot) -> KeyEntry:
    """The key a request without an Authorization header runs as: its session's console key; without a
    session, the usual 401 for a missing key."""
    if not uses_session(request):
        return authenticate(request.headers, snapshot)
    principal = await session_principal(request)
    principal.require("playground.use")
    org_id = principal.org_id
    if principal.role == PLANE_ADMIN:
        ref = request.headers.get(ORG_HEADER, "")
        if not ref:
            raise InvalidRequestError(f"a plane admin names the org to call as with the {ORG_HEADER} header")
        org_id = _org_of(snapshot, ref)
        if org_id is None:
            raise NotFoundError(f"no org {ref[:100]!r}", param=ORG_HEADER)
    assert org_id is not None and principal.account_id is not None
    plane = request.app[PLANE]
    store = request.app[ACCOUNTS].store
    key_hash, _ = await asyncio.to_thread(store.console_key, principal.account_id, org_id, False)
    if not key_hash:
        # First use: made under the admin lock (two first requests make one key), audited, then made live.
        async with plane.admin_lock:
            key_hash, created = await asyncio.to_thread(store.console_key, principal.account_id, org_id, True)
            if created is not None:
                await asyncio.to_thread(
                    plane.audit.append,
                    actor=principal.actor,
                    action="key.create",
                    target=created["id"],
                    before=None,
                    after=created,
                    request_id=request[REQUEST_ID],
                )
            await plane.snapshots.reload()
    key = plane.snapshots.current.keys.get(key_hash)
    if key is None:
        # Made through another plane a moment ago and not yet in this one's snapshot.
        key = (await plane.snapshots.reload()).keys.get(key_hash)
    if key is None:
        raise AuthenticationError("Your console key is not available; sign in again.")
    return key
