"""The session credential on /v1: the console's playground calls the OpenAI endpoints with the signed-in
account's cookie instead of a key.

Such a request runs as the account's own console key in its org (an api_key row owned by the account, made on
first use, whose secret nobody ever sees), so the org's and that key's limits, usage and cost apply as to any key.
A plane admin belongs to no org and names the one to play in with X-Hatchway-Org (its id or name).
Only requests without an Authorization header come here (server.api.openai_api): the Bearer path is untouched.
"""

from __future__ import annotations

import asyncio
from typing import Any

from aiohttp import web

from server.accounts.principal import ACCOUNTS, session_principal, uses_session
from server.accounts.roles import PLANE_ADMIN
from server.api.middleware import REQUEST_ID
from server.api.resources import CHANGES, SNAPSHOTS
from server.errors import AuthenticationError, InvalidRequestError, NotFoundError
from server.policy.auth import authenticate
from server.policy.changes import Entry
from server.policy.snapshot import KeyEntry, Snapshot

ORG_HEADER = "X-Hatchway-Org"


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
        org_id = snapshot.org_id(ref)
        if org_id is None:
            raise NotFoundError(f"no org {ref[:100]!r}", param=ORG_HEADER)
    assert org_id is not None and principal.account_id is not None
    store, snapshots = request.app[ACCOUNTS].store, request.app[SNAPSHOTS]
    account_id, actor = principal.account_id, principal.actor
    key_hash, _ = await asyncio.to_thread(store.console_key, account_id, org_id, False)
    if not key_hash:
        # First use: made as an admin change (two first requests make one key), audited, then made live.
        def entry(made: tuple[str, dict[str, Any] | None]) -> Entry | None:
            created = made[1]
            return None if created is None else Entry(actor, "key.create", created["id"], None, created)

        key_hash, _ = await request.app[CHANGES].apply(
            lambda: store.console_key(account_id, org_id, True), entry, request_id=request[REQUEST_ID]
        )
    key = snapshots.current.keys.get(key_hash)
    if key is None:
        # Made through another plane a moment ago and not yet in this one's snapshot.
        key = (await snapshots.reload()).keys.get(key_hash)
    if key is None:
        raise AuthenticationError("Your console key is not available; sign in again.")
    return key
