"""The attempt loop (`AttemptLoop.attempt`): try a request's targets until one serves.

Walk the plan (the model's targets in rule order, then its fallback models'), skipping targets whose breaker is
open; after each failure `server.routing.failover.decide` says: retry the same target (after a delay), go to the next
target, skip to the fallback model, or stop. A stream whose first content token is late is hedged: the next
target starts alongside and the first to produce a content token wins (server.routing.hedge); the loser is cancelled and
recorded as a failed attempt, never billed as the answer.

What one try does is the caller's `send` (a whole answer: server.relay.whole; a stream up to its first content
token: server.relay.stream); the loop holds it to the request's deadline, or a stream's first-token limit.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TypeVar

from server.errors import (
    HatchwayError,
    ServiceUnavailableError,
    UpstreamConfigError,
    UpstreamError,
    UpstreamStatusError,
    UpstreamTimeoutError,
)
from server.metrics import Metrics
from server.relay.accounting import Accounting
from server.relay.exchange import CLIENT_CLOSED, Exchange, Serving
from server.routing.failover import Decision, Move, decide, retry_after_seconds
from server.routing.health import BreakerState, Health, TargetStats, is_target_fault
from server.routing.hedge import hedge_delay
from server.routing.rules import ModelPlan
from server.targets.base import Attempt, Target

log = logging.getLogger(__name__)

T = TypeVar("T")

# How long a provider key rests after the upstream refused it (401/403) or rate-limited it without a hint.
KEY_REST_S = 60.0
# The error code of an attempt cancelled because a hedged rival produced a content token first.
HEDGE_LOST = "hedge_lost"
FIRST = asyncio.FIRST_COMPLETED


class _OutOfBudget(Exception):
    """The request has no attempt or time left for another try."""


@dataclass
class _Try:
    """One attempt of one target, underway."""

    plan: ModelPlan
    target: Target
    stats: TargetStats
    attempt: Attempt
    # Earlier retries of this target for this request, and the wait before this one (backoff, Retry-After).
    tries: int
    delay_s: float
    began: float = field(default_factory=time.monotonic)
    # A rival was started because this try's first token was late (server.routing.hedge): it is not hedged twice.
    rivalled: bool = False


def _wait_until(tried: _Try, after_s: float) -> float:
    """Seconds from now until `tried` is `after_s` past its start, as _hedge_after counts (delay included)."""
    return max(0.0, tried.began - tried.delay_s + after_s - time.monotonic())


class _Walk:
    """The order one request's targets are tried in: each plan's targets in turn, then `last` (the target that
    just cut or stalled the stream being rescued), so that every other target of every model comes first. A
    retry goes to the front; NEXT_MODEL drops what is left of that model's targets; a node pool with no free slot
    goes behind the rest once while one of them can start at once (`defer`)."""

    def __init__(self, plans: list[ModelPlan], last: Target | None) -> None:
        entries = [(p, t) for p in plans for t in p.targets if t is not last]
        entries += [(p, t) for p in plans for t in p.targets if t is last]
        # (plan, target, earlier retries of it, delay before trying)
        self.queue: deque[tuple[ModelPlan, Target, int, float]] = deque((p, t, 0, 0.0) for p, t in entries)
        self.skipped: set[int] = set()
        self.deferred: set[int] = set()

    def next(self) -> tuple[ModelPlan, Target, int, float] | None:
        while self.queue:
            entry = self.queue.popleft()
            if id(entry[0]) not in self.skipped:
                return entry
        return None

    def has_next(self) -> bool:
        return any(id(entry[0]) not in self.skipped for entry in self.queue)

    def defer(self, entry: tuple[ModelPlan, Target, int, float], can_start: Callable[[Target], bool]) -> bool:
        """Put a target that cannot start at once (a full, draining or paused node pool) behind the rest, once,
        when a target still to be tried can (`can_start`): a pool is waited on only when nothing else can serve."""
        target = entry[1]
        if id(target) in self.deferred:
            return False
        if not any(id(p) not in self.skipped and t is not target and can_start(t) for p, t, _, _ in self.queue):
            return False
        self.deferred.add(id(target))
        self.queue.append(entry)
        return True

    def after(self, tried: _Try, decision: Decision) -> None:
        if decision.move is Move.RETRY:
            self.queue.appendleft((tried.plan, tried.target, tried.tries + 1, decision.delay_s))
        elif decision.move is Move.NEXT_MODEL:
            self.skipped.add(id(tried.plan))


async def _discard(result: object) -> None:
    """Close what a try that did not win opened: a stream with its first token already read (a whole answer's
    bytes need nothing)."""
    aclose = getattr(result, "aclose", None)
    if aclose is not None:
        await aclose()


class AttemptLoop:
    """Tries a request's targets until one serves (`attempt`), and accounts for each try that failed
    (`attempt_failed`: the breaker's verdict, a provider key's rest, a metric and a usage row)."""

    def __init__(
        self, metrics: Metrics, health: Health, accounting: Accounting, *, max_attempts: int, hedge: str
    ) -> None:
        self.metrics = metrics
        self.health = health
        self.accounting = accounting
        self.max_attempts = max_attempts
        # How a slow first token is hedged where the route does not say (server.routing.hedge).
        self.hedge = hedge

    async def attempt(
        self,
        exchange: Exchange,
        send: Callable[[Target, Attempt], Awaitable[T]],
        *,
        last: Target | None = None,
        plans: list[ModelPlan] | None = None,
    ) -> T:
        """Try the plan's targets until one serves. `last` (a target that just broke the stream) is tried after
        every other target of every plan. A stream whose first token is late is hedged (server.routing.hedge): the next
        target starts alongside, the first to produce a content token wins and the other is cancelled. `plans`
        narrows the request's plans (a rescue: the targets that may continue a stream)."""
        walk = _Walk(exchange.plans if plans is None else plans, last)
        error: HatchwayError | None = None
        resting: list[float] = []
        racing: dict[asyncio.Task[T], _Try] = {}
        try:
            while True:
                if not racing:
                    tried = self._next_try(exchange, walk, resting)
                    if tried is None:
                        break
                    after_s = self._hedge_after(exchange, tried, walk)
                    if after_s is None:
                        # Nothing to hedge with: the attempt runs in this task, as cheap as it can be.
                        try:
                            result = await self._run_try(exchange, tried, send)
                        except UpstreamError as exc:
                            error = exc
                            self._settle(exchange, walk, tried, exc)
                            continue
                        except BaseException:
                            self._abandon(tried)
                            raise
                        self._won(exchange, tried)
                        return result
                    racing[asyncio.create_task(self._run_try(exchange, tried, send))] = tried
                    # Its hedge delay, just worked out (what _hedge_timer would work out again).
                    wait_s: float | None = _wait_until(tried, after_s)
                else:
                    wait_s = self._hedge_timer(exchange, racing, walk)
                done, _ = await asyncio.wait(racing, timeout=wait_s, return_when=FIRST)
                if not done:
                    leader = next(iter(racing.values()))
                    leader.rivalled = True
                    rival = self._next_try(exchange, walk, resting, hedge=True)
                    if rival is not None:
                        log.info(
                            "request %s: no first token from %s after %.3gs; hedging with %s",
                            exchange.request_id,
                            leader.target.id,
                            time.monotonic() - leader.began,
                            rival.target.id,
                        )
                        racing[asyncio.create_task(self._run_try(exchange, rival, send))] = rival
                    continue
                for task in done:
                    tried = racing.pop(task)
                    failure = task.exception()
                    if failure is None:
                        self._won(exchange, tried)
                        await self._drop_rivals(exchange, racing)
                        return task.result()
                    if not isinstance(failure, UpstreamError):
                        self._abandon(tried)
                        raise failure
                    error = failure
                    for other in racing.values():
                        other.rivalled = False  # its rival is gone: it may be hedged again, at once
                    try:
                        self._settle(exchange, walk, tried, failure)
                    except UpstreamError:
                        await self._drop_rivals(exchange, racing)
                        raise
        except _OutOfBudget:
            raise error or UpstreamTimeoutError("no attempt left within the request's budget") from None
        finally:
            # The client left, or something unexpected: no verdict on what was still running.
            await self._cancel_racing(racing)
        if error is not None:
            raise error
        retry_in = max(1, round(min(resting))) if resting else 1
        raise ServiceUnavailableError(
            f"every target for '{exchange.model}' is failing; retry in {retry_in}s",
            headers={"Retry-After": str(retry_in)},
        )

    def _next_try(self, exchange: Exchange, walk: _Walk, resting: list[float], *, hedge: bool = False) -> _Try | None:
        """The next target whose breaker admits it, as a try underway; None when none is left. Out of attempts
        or time, raises _OutOfBudget, or returns None for a hedge (what runs already may still serve)."""
        while (entry := walk.next()) is not None:
            plan, target, tries, delay_s = entry
            if not target.has_capacity() and walk.defer(entry, self._can_start):
                continue
            stats = self.health.stats(target.key)
            if not stats.breaker.admits(self.health.clock(), target.policy.breaker_cooldown_s):
                resting.append(stats.breaker.retry_in(self.health.clock(), target.policy.breaker_cooldown_s))
                continue
            if exchange.attempts >= self.max_attempts or exchange.time_left_s <= 0:
                stats.breaker.released()
                if hedge:
                    return None
                raise _OutOfBudget
            exchange.attempts += 1
            stats.in_flight += 1
            return _Try(plan, target, stats, Attempt(number=exchange.attempts), tries, delay_s)
        return None

    def _can_start(self, target: Target) -> bool:
        """Whether an attempt of `target` would start now: it has capacity and its breaker is closed."""
        return target.has_capacity() and self.health.stats(target.key).breaker.state is BreakerState.CLOSED

    async def _run_try(self, exchange: Exchange, tried: _Try, send: Callable[[Target, Attempt], Awaitable[T]]) -> T:
        if tried.delay_s:
            self.metrics.retry_waits.labels(tried.target.id).inc(tried.delay_s)
            await asyncio.sleep(tried.delay_s)
        tried.began = time.monotonic()
        # One timer per attempt: the request's deadline, or a stream's first-token limit if sooner.
        limit_s = exchange.time_left_s
        first_token_s = tried.target.policy.ttft_timeout_s if exchange.streaming else None
        try:
            async with asyncio.timeout(min(limit_s, first_token_s or limit_s)):
                return await send(tried.target, tried.attempt)
        except TimeoutError:
            raise UpstreamTimeoutError(
                f"{tried.target.id}: no first token within {first_token_s:g}s"
                if first_token_s is not None and first_token_s < limit_s
                else f"{tried.target.id}: request deadline reached"
            ) from None

    def _hedge_after(self, exchange: Exchange, tried: _Try, walk: _Walk) -> float | None:
        """Seconds after its start at which a try is hedged; None when it is not (no stream, hedging off, no
        other target, or a delay its own first-token limit would beat)."""
        if not exchange.streaming or not walk.has_next():
            return None
        delay_s = hedge_delay(tried.plan.hedge or self.hedge, tried.target.policy, tried.stats)
        if delay_s is None or delay_s >= tried.target.policy.ttft_timeout_s:
            return None
        return delay_s + tried.delay_s

    def _hedge_timer(self, exchange: Exchange, racing: dict[asyncio.Task[T], _Try], walk: _Walk) -> float | None:
        """How long to wait for the tries underway before the lone one is hedged; None: until one ends."""
        if len(racing) != 1:
            return None
        leader = next(iter(racing.values()))
        if leader.rivalled or (after_s := self._hedge_after(exchange, leader, walk)) is None:
            return None
        return _wait_until(leader, after_s)

    def _won(self, exchange: Exchange, tried: _Try) -> None:
        tried.stats.breaker.succeeded()
        elapsed = time.monotonic() - tried.began
        tried.stats.observe(ttft_s=elapsed) if exchange.streaming else tried.stats.observe(latency_s=elapsed)
        self.accounting.release(exchange)
        exchange.serving = Serving(tried.target, tried.attempt, tried.plan.model, tried.stats)

    def _settle(self, exchange: Exchange, walk: _Walk, tried: _Try, failure: UpstreamError) -> None:
        """Account for a failed try and queue what comes next; raises the failure when nothing can do better."""
        tried.stats.in_flight -= 1
        self.attempt_failed(exchange, tried.target, tried.attempt, failure, tried.began)
        decision = decide(
            failure,
            tries=tried.tries,
            policy=tried.target.policy,
            time_left_s=exchange.time_left_s,
            other_key=tried.target.has_other_key(tried.attempt.key_id),
        )
        if decision.move is Move.STOP:
            raise failure
        walk.after(tried, decision)

    def _abandon(self, tried: _Try) -> None:
        """A try given up without a verdict on its target: the next request may probe it."""
        tried.stats.in_flight -= 1
        tried.stats.breaker.released()

    async def _drop_rivals(self, exchange: Exchange, racing: dict[asyncio.Task[T], _Try]) -> None:
        """Cancel the tries still racing the one that won (their upstream requests closed, node jobs cancelled)
        and record each as a failed attempt: what they cost upstream is theirs, never billed as the answer."""
        for tried in await self._cancel_racing(racing):
            log.info("request %s: cancelled %s, which lost the hedge", exchange.request_id, tried.target.id)
            self.accounting.record(
                exchange,
                tried.target,
                tried.attempt,
                status=CLIENT_CLOSED,
                code=HEDGE_LOST,
                final=False,
                began=tried.began,
            )

    async def _cancel_racing(self, racing: dict[asyncio.Task[T], _Try]) -> list[_Try]:
        """Cancel the tries in `racing` and wait for them, without a verdict on their targets; empties `racing`
        and returns the tries."""
        if not racing:
            return []
        for task in racing:
            task.cancel()
        await asyncio.wait(racing)
        for task, tried in racing.items():
            if not task.cancelled() and task.exception() is None:
                await _discard(task.result())  # it had its first token in the same instant as the winner
            self._abandon(tried)
        tries = list(racing.values())
        racing.clear()
        return tries

    def attempt_failed(
        self, exchange: Exchange, target: Target, attempt: Attempt, exc: UpstreamError, began: float
    ) -> None:
        now = self.health.clock()
        breaker = self.health.stats(target.key).breaker
        if is_target_fault(exc):
            breaker.failed(now, target.policy.breaker_failures)
        elif isinstance(exc, UpstreamConfigError):
            breaker.released()  # nothing reached the target: no verdict on it
        else:
            breaker.succeeded()  # it answered, about the request: the target is up (and a probe has its verdict)
        if isinstance(exc, UpstreamStatusError) and exc.upstream_status in (401, 403, 429):
            hint = retry_after_seconds(exc.headers.get("Retry-After"))
            target.rest_key(attempt.key_id, hint if hint is not None else KEY_REST_S)
        self.metrics.upstream_errors.labels(target.id, exc.code or "unknown").inc()
        if not isinstance(exc, UpstreamConfigError):  # the target logged its misconfiguration once already
            log.warning("request %s: attempt %d on %s failed: %s", exchange.request_id, attempt.number, target.id, exc)
        status = exc.upstream_status if isinstance(exc, UpstreamStatusError) else exc.status
        self.accounting.record(exchange, target, attempt, status=status, code=exc.code, final=False, began=began)
