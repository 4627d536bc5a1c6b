"""Load shedding: when the plane is past what it can serve, say so at once instead of letting requests queue.

Two signals, either of which turns new API requests away with a 503 and `Retry-After`:

    in flight    more requests being served than `max_in_flight` (a hard bound on memory and sockets)
    loop lag     the event loop runs late: a watcher that should wake every `TICK_S` (less often while few
                 requests are in flight) measures how late it wakes, smoothed; past `lag_limit_s`, requests
                 are already waiting for the CPU, and each one admitted makes every other one later. Refusing
                 costs a fraction of serving, so the loop catches up and the requests it does take keep their
                 latency. Only with at least `lag_floor` requests in flight: a fixed pool of clients (a closed
                 loop of 128, say) keeps a busy loop late without its queue growing, and is served; a queue
                 that grows, which is what overload is, passes the floor within moments.

Only `/v1/` requests are shed: health checks, metrics and the admin API stay reachable under overload.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable

from server.errors import ServiceUnavailableError

TICK_S = 0.02
# Below half the floor the lag decides nothing, and the watcher looks 4 times a second instead of 50 (the gauge
# in /metrics stays live): a plane beside a node's llama.cpp, whose threads want every core and wait for each
# other, takes a core from them at every wakeup, so an idle plane should wake rarely (bench/README.md). Requests
# reaching half the floor wake the watcher at once, so it has several ticks before the floor is reached.
IDLE_TICK_S = 0.25
# Weight of the newest lag sample in the running average: about the last 3 ticks (60 ms). A slower average (0.1,
# about 200 ms) let a queue of hundreds of ms build up at twice the plane's capacity before the first refusal
# (the served p99 of both: bench/README.md).
SMOOTHING = 0.3


class LoadShedder:
    def __init__(
        self,
        *,
        max_in_flight: int,
        lag_limit_s: float,
        lag_floor: int = 0,
        on_shed: Callable[[], None] = lambda: None,
    ) -> None:
        self.max_in_flight = max_in_flight
        self.lag_limit_s = lag_limit_s
        self.lag_floor = lag_floor
        self.on_shed = on_shed
        self.in_flight = 0
        self.lag_s = 0.0
        self._busy_from = lag_floor // 2
        self._busy = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self.lag_limit_s > 0:
            self._task = asyncio.create_task(self._watch(), name="loop-lag-watcher")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _watch(self) -> None:
        while True:
            busy = self.in_flight >= self._busy_from
            tick = TICK_S if busy else IDLE_TICK_S
            expected = time.monotonic() + tick
            if busy:
                await asyncio.sleep(tick)
            else:
                self._busy.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(tick):
                        await self._busy.wait()
                    continue  # woken early by a rising load: no lag sample, tick fast from now on
            late = max(0.0, time.monotonic() - expected)
            self.lag_s += SMOOTHING * (late - self.lag_s)

    def overload(
        self, loop_wait_s: float = 0.0, connections: Callable[[], int] | None = None
    ) -> ServiceUnavailableError | None:
        """The refusal for a new API request now, or None when the plane can take it. Also read by the acceptor
        thread (server.serving.acceptor): it only reads numbers the loop writes. `loop_wait_s`: how long the loop took
        to take the acceptor's last connection, which shows a late loop at once where the watcher's smoothed lag
        shows it only after a few ticks; the same limit applies, and the same floor, reached by the requests
        in flight or by the `connections` the loop holds (counted only when the loop is late)."""
        if self.in_flight >= self.max_in_flight:
            return overloaded(f"{self.in_flight} requests in flight, the most this plane takes")
        if self.lag_limit_s <= 0:
            return None
        late = self.lag_s > self.lag_limit_s
        if not (late or loop_wait_s > self.lag_limit_s):
            return None
        if max(self.in_flight, connections() if connections else 0) < self.lag_floor:
            return None
        if late:
            return overloaded(f"the plane's event loop runs {self.lag_s * 1000:.0f} ms late")
        return overloaded(f"the plane's event loop takes {loop_wait_s * 1000:.0f} ms to take a connection")

    def admit(self) -> None:
        """Count a request in, or raise 503 when the plane is overloaded; pair with `release`."""
        refusal = self.overload()
        if refusal is not None:
            self.on_shed()
            raise refusal
        self.in_flight += 1
        if self.in_flight == self._busy_from:
            self._busy.set()

    def release(self) -> None:
        self.in_flight -= 1


def overloaded(why: str) -> ServiceUnavailableError:
    return ServiceUnavailableError(
        f"The plane is overloaded ({why}); retry shortly.", code="overloaded", headers={"Retry-After": "1"}
    )
