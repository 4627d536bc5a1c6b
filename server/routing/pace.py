"""When a committed stream has stalled: judged by the stream's own pace, not by one fixed idle limit.

A stream that has been sending a token every 30 ms and then says nothing for five seconds has stalled; one that
has been pausing two seconds between sentences has not. So the silence a stream may keep is

    limit = min(ceiling, idle timeout, max(floor, factor x the longest gap this stream has shown))

where a gap is the time the relay waited for the upstream's next batch (never the time it spent writing to a
slow client). Before the first content token this does not apply: that wait is the time to first token, bounded
by the target's `ttft_timeout_s` and by hedging (server.routing.hedge). The numbers are per target (`FailoverPolicy`:
`stall_floor_s`, `stall_factor`, `stall_ceiling_s`), with the plane's settings as defaults.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from server.errors import UpstreamTimeoutError
from server.routing.failover import FailoverPolicy
from server.targets.base import TargetStream


class Pace:
    """The pace of one upstream stream and the silence it may keep before it counts as stalled."""

    def __init__(self, policy: FailoverPolicy) -> None:
        self.floor_s = policy.stall_floor_s
        self.factor = policy.stall_factor
        # The target's own idle timeout still holds (the target reader enforces it): never wait longer here.
        self.ceiling_s = min(policy.stall_ceiling_s, policy.idle_timeout_s)
        self.longest_gap_s = 0.0

    @property
    def limit_s(self) -> float:
        return min(self.ceiling_s, max(self.floor_s, self.factor * self.longest_gap_s))

    def observe(self, gap_s: float) -> None:
        if gap_s > self.longest_gap_s:
            self.longest_gap_s = gap_s


class PacedStream:
    """A target stream's batches, each awaited for at most the pace's limit; a longer silence raises
    UpstreamTimeoutError (a stall: the attempt loop fails over and the relay rescues the answer). The timed-out
    read is cancelled inside the target's reader, which leaves that stream finished: the caller closes it."""

    def __init__(self, stream: TargetStream, policy: FailoverPolicy, target_id: str) -> None:
        self._batches: AsyncIterator[list[bytes]] = aiter(stream)
        self.pace = Pace(policy)
        self.target_id = target_id
        self._loop = asyncio.get_running_loop()

    def __aiter__(self) -> PacedStream:
        return self

    async def __anext__(self) -> list[bytes]:
        limit_s = self.pace.limit_s
        began = self._loop.time()
        try:
            async with asyncio.timeout(limit_s):
                batch = await anext(self._batches)
        except TimeoutError:
            raise UpstreamTimeoutError(
                f"{self.target_id}: the stream stalled (silent for {limit_s:.3g}s, "
                f"its longest gap before was {self.pace.longest_gap_s:.3g}s)"
            ) from None
        self.pace.observe(self._loop.time() - began)
        return batch
