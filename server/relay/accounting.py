"""What a request is billed and the usage rows it leaves (`Accounting`).

take_usage      a target's usage claim, billed within the plane's bounds (server.usage.metering)
finish          the request is over: release the serving target, bill a client that left (by a node's own count
                when one is coming, in a task owned here, else by the delivered estimate), record the final row
record          one usage row, for a failed attempt (final=False) or the request (final=True), onto the batch
                writer's queue (server.usage.writer): no database I/O while serving
settle_limits   the request's limits settled on what it was billed, now or once a node's count is in
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import orjson

from server.errors import HatchwayError
from server.metrics import Metrics
from server.policy.cache import HIT
from server.policy.limits import estimate_tokens
from server.relay.exchange import CLIENT_CLOSED, Exchange
from server.storage.models import utcnow
from server.targets.base import Attempt, Target
from server.usage.metering import (
    Delivery,
    Generated,
    Meter,
    MeteredRequest,
    bounded_usage,
    completion_allowed,
    delivered_tokens,
)
from server.usage.writer import UsageWriter


class Accounting:
    """Bills and usage rows: what `finish` records is what the usage report, the limits and `x-hatchway-cost-usd`
    agree on."""

    def __init__(self, metrics: Metrics, usage: UsageWriter) -> None:
        self.usage = usage
        self.meter = Meter(metrics.usage_claims_clamped)
        # Bills of requests whose client left, waiting for a node's own count (`_bill_node`).
        self._pending: set[asyncio.Task[None]] = set()

    def take_usage(
        self,
        exchange: Exchange,
        target: Target,
        attempt: Attempt | None,
        usage: dict[str, Any],
        delivery: Delivery | None = None,
    ) -> dict[str, Any] | None:
        """Bill a target's usage claim within the plane's bounds (set by `delivery`, else what the client was
        sent); the usage to show instead when it was clamped."""
        label = attempt.route if attempt is not None and attempt.route else target.id
        request = _metered(exchange, target, attempt)
        prompt, completion, clamped = self.meter.bill(request, delivery or exchange.delivery, usage, label)
        bill = exchange.bill
        bill.prompt_tokens, bill.completion_tokens, bill.reported = prompt, completion, True
        return bounded_usage(usage, prompt, completion) if clamped else None

    def _bill_delivered(self, exchange: Exchange) -> None:
        """Bill an answer its client left before any claim came: the prompt as estimated at admission, the
        delivered text's estimate (server.usage.metering.delivered_tokens); nothing when nothing was delivered."""
        serving, bill = exchange.serving, exchange.bill
        if bill.reported or serving is None or not exchange.delivery.bytes:
            return
        allowed = completion_allowed(_metered(exchange, serving.target, serving.attempt))
        bill.prompt_tokens = estimate_tokens(*exchange.metered, 0)[0]
        bill.completion_tokens = min(delivered_tokens(exchange.delivery), allowed)

    async def _bill_node(
        self, exchange: Exchange, generated: Callable[[], Awaitable[Generated]], code: str | None
    ) -> None:
        """Bill a node's answer its client left, by the node's own count (bounded by the text it sent) once it
        stopped, else by the delivered estimate; then record the request."""
        try:
            count = await generated()
            if count.usage is not None and exchange.serving is not None:
                sent = exchange.delivery.covering(count.text_bytes)
                self.take_usage(exchange, exchange.serving.target, exchange.serving.attempt, count.usage, sent)
        finally:
            self._bill_delivered(exchange)
            self._record_final(exchange, code)

    def settle_limits(self, exchange: Exchange, settle: Callable[[int, float], None]) -> None:
        """Settle the request's limits on what it was billed: now, or once a node's own count is in."""
        if exchange.bill.pending is None:
            settle(*exchange.billed())
        else:
            exchange.bill.pending.add_done_callback(lambda _: settle(*exchange.billed()))

    async def close(self) -> None:
        """Wait for the bills still waiting on a node's count: each within the registry's cancel timeout, and at
        once when the registry closed first (every job is released)."""
        if self._pending:
            await asyncio.wait(set(self._pending))

    def release(self, exchange: Exchange) -> None:
        serving = exchange.serving
        if serving is not None and serving.holding is not None:
            serving.holding.in_flight -= 1
            serving.holding = None

    def finish(self, exchange: Exchange, status: int, code: str | None = None) -> None:
        exchange.bill.status = status
        self.release(exchange)
        if status == CLIENT_CLOSED and not exchange.bill.reported and exchange.cache != HIT:
            generated = exchange.attempt.generated if exchange.attempt is not None else None
            if generated is not None:
                # A node generates on until it sees the cancel, then reports its count: the bill waits for it in a
                # task the relay owns (the handler is being cancelled, and the client is gone anyway).
                task = asyncio.get_running_loop().create_task(self._bill_node(exchange, generated, code))
                exchange.bill.pending = task
                self._pending.add(task)
                task.add_done_callback(self._pending.discard)
                return
            self._bill_delivered(exchange)
        self._record_final(exchange, code)

    def refuse(self, exchange: Exchange, error: HatchwayError) -> None:
        """Record a request that policy turned away before any target was tried."""
        self.finish(exchange, error.status, error.code)

    def _record_final(self, exchange: Exchange, code: str | None) -> None:
        self.record(
            exchange,
            exchange.target,
            exchange.attempt,
            status=exchange.bill.status or 0,
            code=code,
            final=True,
            began=exchange.started,
        )

    def record(
        self,
        exchange: Exchange,
        target: Target | None,
        attempt: Attempt | None,
        *,
        status: int,
        code: str | None,
        final: bool,
        began: float,
    ) -> None:
        now = time.monotonic()
        # A cache hit's row shows its cost, 0.0: free, not unpriced.
        served = final and (status == 200 or exchange.charged)
        price_in, price_out = target.price(attempt) if target else (None, None)
        # A plain dict of UsageRecord's columns: the batch writer inserts it as is, without an ORM object per row.
        self.usage.record(
            dict(
                created_at=utcnow(),
                request_id=exchange.request_id,
                org_id=exchange.key.org_id,
                key_id=exchange.key.id,
                endpoint=exchange.endpoint,
                model=exchange.model,
                target=(attempt.route if attempt and attempt.route else target.id) if target else _no_target(exchange),
                stream=exchange.streaming,
                status=status,
                attempts=exchange.attempts,
                prompt_tokens=exchange.bill.prompt_tokens if served else 0,
                completion_tokens=exchange.bill.completion_tokens if served else 0,
                cost_usd=exchange.cost() if served else None,
                latency_ms=(now - began) * 1000,
                ttft_ms=(exchange.first_byte_at - exchange.started) * 1000
                if final and exchange.first_byte_at
                else None,
                error_code=code,
                final=final,
                provider_key_id=attempt.key_id if attempt else None,
                node_id=attempt.route if attempt and target and target.kind == "node" else None,
                cache=exchange.cache,
                price_in=price_in,
                price_out=price_out,
            )
        )


def _metered(exchange: Exchange, target: Target, attempt: Attempt | None) -> MeteredRequest:
    """What bounds the request's usage (server.usage.metering)."""
    if not exchange.body_bytes:
        exchange.body_bytes = len(orjson.dumps(exchange.body))
    context = attempt.context if attempt is not None else None
    endpoint, body = exchange.metered
    return MeteredRequest(endpoint, body, exchange.body_bytes, target.kind, context)


def _no_target(exchange: Exchange) -> str:
    return "cache" if exchange.cache == HIT else ""
