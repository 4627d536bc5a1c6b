"""Whether a store the plane depends on answers, for /readyz: asked with a short timeout, at most once a second.

A load balancer probes every plane every few seconds and Kubernetes may probe faster: each probe must not cost
a round trip, and a store that hangs (rather than refuses) must not pile up one stuck check per probe. So one
check at a time runs, callers in the meantime join it, and its answer holds for `ttl_s`. The database's check
is a blocking query run in a worker thread (`StorageProbe`); Redis's is a coroutine on the loop (`Probe`).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable


class Probe:
    """Parameters: `check` (one round trip to the store, a coroutine raising when it fails), `timeout_s` (how
    long a caller waits for it), `ttl_s` (how long an answer is reused), `clock`."""

    def __init__(
        self,
        check: Callable[[], Awaitable[object]],
        *,
        timeout_s: float = 1.0,
        ttl_s: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.check = check
        self.timeout_s = timeout_s
        self.ttl_s = ttl_s
        self.clock = clock
        self.checks = 0
        self._answer: tuple[float, str | None] | None = None
        self._running: asyncio.Future[object] | None = None

    async def failure(self) -> str | None:
        """Why the store is unreachable, or None when it answered within the last `ttl_s`."""
        if self._answer is not None and self.clock() - self._answer[0] < self.ttl_s:
            return self._answer[1]
        if self._running is None:
            self.checks += 1
            self._running = asyncio.ensure_future(self.check())
            self._running.add_done_callback(self._finished)
        try:
            await asyncio.wait_for(asyncio.shield(self._running), self.timeout_s)
            failure = None
        except TimeoutError:
            # The check goes on; the next caller waits on it again rather than starting another.
            failure = f"no answer within {self.timeout_s:g}s"
        except Exception as exc:
            failure = type(exc).__name__
        self._answer = (self.clock(), failure)
        return failure

    def _finished(self, running: asyncio.Future[object]) -> None:
        self._running = None
        if not running.cancelled():
            running.exception()  # retrieved here too: a check nobody waited for any more is not an error to log


class StorageProbe(Probe):
    """The database's probe. Parameters: `ping` (a blocking round trip, raising when it fails: run in a worker
    thread, so a database that hangs holds one thread, never the loop), and Probe's options."""

    def __init__(
        self,
        ping: Callable[[], None],
        *,
        timeout_s: float = 1.0,
        ttl_s: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(lambda: asyncio.to_thread(ping), timeout_s=timeout_s, ttl_s=ttl_s, clock=clock)
        self.ping = ping
