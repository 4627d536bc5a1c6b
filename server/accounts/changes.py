"""How every admin change is made: in a worker thread, audited with the principal's actor, then made live.

One function for the admin API's handlers (server.admin_api) and the accounts' own (server.accounts.http), so
that every change, whoever makes it and through whichever endpoint, lands in the audit log the same way.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, TypeVar

from aiohttp import web

from server.accounts.principal import admin_principal
from server.middleware import REQUEST_ID
from server.plane import PLANE

T = TypeVar("T")


async def mutate(
    request: web.Request,
    action: str,
    fn: Callable[..., T],
    *args: Any,
    before: Callable[[], Any] | None = None,
    **kwargs: Any,
) -> T:
    """Run an admin change, write its audit entry with the request principal's actor, and rebuild the snapshot,
    all under the admin lock."""
    plane = request.app[PLANE]
    actor = (await admin_principal(request)).actor

    def change() -> T:
        previous = before() if before is not None else None
        result = fn(*args, **kwargs)
        subject = result if isinstance(result, dict) else previous if isinstance(previous, dict) else {}
        target = str(subject.get("id") or subject.get("name") or "")
        after = None if action.endswith(".remove") else result
        plane.audit.append(
            actor=actor, action=action, target=target, before=previous, after=after, request_id=request[REQUEST_ID]
        )
        return result

    async with plane.admin_lock:
        result = await asyncio.to_thread(change)
        await plane.snapshots.reload()
    return result
