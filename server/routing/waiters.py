"""Tasks queued for something that frees up one at a time (a node slot, an upstream connection), woken in
arrival order."""

from __future__ import annotations

import asyncio
from collections import deque


class Waiters:
    def __init__(self) -> None:
        self._queue: deque[asyncio.Future[None]] = deque()

    def __len__(self) -> int:
        return len(self._queue)

    async def wait(self) -> None:
        """Until `wake_one` picks this task. Whoever calls it checks again what it waited for: a wake-up is a
        hint, not a reservation."""
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._queue.append(waiter)
        try:
            await waiter
        except asyncio.CancelledError:
            # Woken, then cancelled (or timed out) before it could act: the wake-up goes to the next in line.
            if waiter.done() and not waiter.cancelled():
                self.wake_one()
            raise
        finally:
            if waiter in self._queue:
                self._queue.remove(waiter)

    def wake_one(self) -> None:
        while self._queue:
            waiter = self._queue.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return
