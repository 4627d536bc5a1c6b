"""How every admin change is made: in a worker thread under one lock, audited, then made live.

The admin API (through server.accounts.changes.mutate), an invitation accepted and a console key made on first use
all change state through `Changes.apply`, so that each lands in the audit log the same way and the next request
sees it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from server.policy.snapshot import SnapshotHolder
from server.storage.audit import AuditLog

T = TypeVar("T")


@dataclass(frozen=True)
class Entry:
    """What the audit log records of one change."""

    actor: str
    action: str
    target: str
    before: Any = None
    after: Any = None


class Changes:
    def __init__(self, audit: AuditLog, snapshots: SnapshotHolder) -> None:
        self.audit = audit
        self.snapshots = snapshots
        # One change at a time: each snapshot rebuild sees every earlier commit, and the audit chain stays a line.
        self.lock = asyncio.Lock()

    async def apply(
        self,
        change: Callable[[], T],
        entry: Callable[[T], Entry | None],
        *,
        request_id: str,
        reload: bool = True,
    ) -> T:
        """Run `change`, record `entry(result)` (None: nothing was changed, nothing to record) in the same worker
        thread, then rebuild the snapshot unless the change touches nothing the snapshot holds."""

        def run() -> T:
            result = change()
            if (recorded := entry(result)) is not None:
                self.audit.append(
                    actor=recorded.actor,
                    action=recorded.action,
                    target=recorded.target,
                    before=recorded.before,
                    after=recorded.after,
                    request_id=request_id,
                )
            return result

        async with self.lock:
            result = await asyncio.to_thread(run)
            if reload:
                await self.snapshots.reload()
        return result
