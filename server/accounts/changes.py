"""An admin change made by a request: `Changes.apply` (server.policy.changes) with the request principal's actor.

One function for the admin API's handlers (server.api.admin_api) and the accounts' own (server.accounts.http), so
that every change, whoever makes it and through whichever endpoint, lands in the audit log the same way.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from aiohttp import web

from server.accounts.principal import admin_principal
from server.api.middleware import REQUEST_ID
from server.api.resources import CHANGES
from server.policy.changes import Entry

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
    all under the admin lock. `before` reads the object as it was, in the same thread, just before the change."""
    actor = (await admin_principal(request)).actor

    def change() -> tuple[Any, T]:
        previous = before() if before is not None else None
        return previous, fn(*args, **kwargs)

    def entry(outcome: tuple[Any, T]) -> Entry:
        previous, result = outcome
        subject = result if isinstance(result, dict) else previous if isinstance(previous, dict) else {}
        target = str(subject.get("id") or subject.get("name") or "")
        return Entry(actor, action, target, previous, None if action.endswith(".remove") else result)

    _, result = await request.app[CHANGES].apply(change, entry, request_id=request[REQUEST_ID])
    return result
