"""The relay: from a request the front end admitted to the answer the client gets, and the rows it leaves.

A request's way through the package (server.api.openai_api calls the `Relay`'s entry points):

    Exchange                the request, and each step's own result on it: what serves it (`Serving`), what
                            it is billed (`Bill`), what the cache keeps of it (`Capture`) (exchange.py)
    -> complete | stream    a whole answer (whole.py) or an SSE stream (stream.py); a cached answer takes
       | replay             `replay` (replay.py) instead, a refused one `refuse`
    -> attempt              the attempt loop (attempts.py): the plan's targets in rule order, failover after
                            each failure (server.routing.failover), a late first token hedged (server.routing.hedge);
                            each try is the caller's `send`: a whole answer, or a stream read up to its first content
                            token (the pre-commit buffer, where every failure fails over invisibly)
    -> relay                a committed stream's chunks, as they come (stream.py); one that breaks (cut, or a
                            stall by its own pace, server.routing.pace) is rescued by a fallback that continues the
                            same answer (rescue.py), else ends with an SSE error event and no `[DONE]`
    -> finish               what the request is billed and its usage row (accounting.py), recorded before the
                            answer's end can reach the client; `settle_limits` settles its limits on that bill

A /v1/responses request takes the same steps; its dialect (server.responses.dialect) sends each attempt in its
target's form, reads answers and events back for the accounting, frames the events and ends a broken stream
with `response.failed` (no rescue).

Each module imports only those before it in this order: exchange, accounting, attempts, rescue, stream, whole,
replay.
"""

from __future__ import annotations

from server.metrics import Metrics
from server.relay.accounting import Accounting
from server.relay.attempts import AttemptLoop
from server.relay.exchange import CLIENT_CLOSED, Capture, Exchange
from server.relay.replay import CacheReplay
from server.relay.stream import Streams
from server.relay.whole import WholeAnswers
from server.routing.health import Health
from server.routing.hedge import AUTO
from server.usage.writer import UsageWriter

__all__ = ["CLIENT_CLOSED", "Capture", "Exchange", "Relay"]


class Relay:
    """The relay's steps, wired once per plane. Its entry points are the steps' own methods, bound here: a call
    goes straight to the step that owns it, through no wrapper.

        complete(exchange)                  a whole answer (WholeAnswers.complete)
        stream(request, exchange)           an SSE stream (Streams.stream)
        replay(request, exchange, cached)   an answer from the response cache (CacheReplay.replay)
        refuse(exchange, error)             a request policy turned away, recorded (Accounting.refuse)
        settle_limits(exchange, settle)     the request's limits settled on its bill (Accounting.settle_limits)
        close()                             wait for the bills still waiting on a node's count (Accounting.close)
    """

    def __init__(
        self, metrics: Metrics, usage: UsageWriter, health: Health, *, max_attempts: int, hedge: str = AUTO
    ) -> None:
        self.accounting = accounting = Accounting(metrics, usage)
        self.attempts = attempts = AttemptLoop(metrics, health, accounting, max_attempts=max_attempts, hedge=hedge)
        self.complete = WholeAnswers(attempts, accounting).complete
        self.stream = Streams(metrics, attempts, accounting).stream
        self.replay = CacheReplay(accounting).replay
        self.refuse = accounting.refuse
        self.settle_limits = accounting.settle_limits
        self.close = accounting.close
