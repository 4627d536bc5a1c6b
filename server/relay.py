"""The attempt loop and the two ways an answer goes back to the client: whole, or as an SSE stream.

attempt     walk the plan (the model's targets in rule order, then its fallback models'), skipping
            targets whose breaker is open; after each failure `failover.decide` says: retry the same
            target (after a delay), go to the next target, skip to the fallback model, or stop. A stream
            whose first content token is late is hedged: the next target starts alongside and the first
            to produce a content token wins (server.hedge)
complete    non-stream: the serving target's JSON body goes back byte for byte
stream      nothing reaches the client until the first content token (every failure before it fails
            over invisibly); then chunks are relayed as they come. A committed stream that breaks (cut, or
            silent for longer than its own pace allows: server.pace) is rescued by a fallback that
            continues the same answer (`rescue`), the target that broke it tried last of all; when
            nothing can rescue it, it ends with an SSE error event and no `[DONE]`, never as a success
responses   a /v1/responses request takes the same steps; its dialect (server.responses.dialect) sends each
            attempt in its target's form, reads answers and events back for the accounting, frames the events
            and ends a broken stream with `response.failed` (no rescue)
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

import orjson
from aiohttp import web

from server import sse
from server.cache import BYPASS, HIT, StreamAssembler, replay_chunks
from server.errors import (
    HatchwayError,
    ServiceUnavailableError,
    UpstreamError,
    UpstreamProtocolError,
    UpstreamStatusError,
    UpstreamTimeoutError,
)
from server.failover import Decision, Move, decide, is_context_length_error, retry_after_seconds
from server.health import BreakerState, Health, TargetStats, is_target_fault
from server.hedge import AUTO, hedge_delay
from server.limits import estimate_tokens
from server.metering import (
    Delivery,
    Generated,
    Meter,
    MeteredRequest,
    bounded_usage,
    completion_allowed,
    delivered_tokens,
)
from server.metrics import Metrics
from server.pace import PacedStream
from server.rescue import (
    Continuation,
    ContinuationMismatch,
    StreamProgress,
    can_rescue,
    choice_text,
    rescue_request,
)
from server.responses.dialect import CHAT_ENDPOINT, Record, ResponsesDialect
from server.routing import ModelPlan
from server.snapshot import KeyEntry
from server.storage.models import utcnow
from server.targets.base import Attempt, Call, Target, TargetStream
from server.usage import UsageWriter

log = logging.getLogger(__name__)

T = TypeVar("T")

# Status recorded for a request whose client went away before the answer was complete (nginx's convention).
CLIENT_CLOSED = 499
# How long a provider key rests after the upstream refused it (401/403) or rate-limited it without a hint.
KEY_REST_S = 60.0
# The error code of an attempt cancelled because a hedged rival produced a content token first.
HEDGE_LOST = "hedge_lost"
FIRST = asyncio.FIRST_COMPLETED


@dataclass
class Exchange:
    """One client request on its way through the plane, and what became of it."""

    request_id: str
    key: KeyEntry
    endpoint: str
    body: dict[str, Any]
    plans: list[ModelPlan]
    deadline_s: float
    # The body's size as received (0: not known, measured when a usage claim needs it).
    body_bytes: int = 0
    started: float = field(default_factory=time.monotonic)
    attempts: int = 0
    rescues: int = 0
    target: Target | None = None
    attempt: Attempt | None = None
    served_model: str | None = None
    # The tokens billed: the serving target's claim, held to the plane's bounds (server.metering), or the
    # delivered estimate when the client left before a claim came.
    prompt_tokens: int = 0
    completion_tokens: int = 0
    # Whether the serving target's claim arrived.
    usage_reported: bool = False
    # The bill of a request whose client left, while it waits for a node's own count (Relay.settle_limits waits too).
    pending: asyncio.Task[None] | None = None
    # The last try of a whole answer to start: what worked on it when the client left (`Relay.complete`).
    underway: tuple[Target, Attempt] | None = None
    # What the client was sent of the answer, counted by the plane.
    delivery: Delivery = field(default_factory=Delivery)
    first_byte_at: float | None = None
    # The serving target's in-flight count, held until the answer is complete.
    holding: TargetStats | None = None
    # What the response cache said (server.cache), and the whole answer to store on a miss.
    cache: str = BYPASS
    collect: StreamAssembler | Record | None = None
    # A /v1/responses request: how each attempt is sent and its answer read (server.responses.dialect).
    responses: ResponsesDialect | None = None
    answer: bytes | None = None
    # The final status, once the request is over.
    status: int | None = None

    @property
    def model(self) -> str:
        return str(self.body["model"])

    @property
    def streaming(self) -> bool:
        return bool(self.body.get("stream"))

    @property
    def chat(self) -> bool:
        return self.endpoint == "chat/completions"

    @property
    def wants_usage(self) -> bool:
        options = self.body.get("stream_options")
        return isinstance(options, dict) and options.get("include_usage") is True

    @property
    def call(self) -> Call:
        return Call(endpoint=self.endpoint, body=self.body, request_id=self.request_id)

    @property
    def metered(self) -> tuple[str, dict[str, Any]]:
        """The endpoint and body the request's usage is bounded and estimated by: a /v1/responses request's chat
        form, which is what a target generates from."""
        if self.responses is not None:
            return CHAT_ENDPOINT, self.responses.chat_body
        return self.endpoint, self.body

    @property
    def time_left_s(self) -> float:
        return self.started + self.deadline_s - time.monotonic()

    def cost(self) -> float | None:
        if self.cache == HIT:
            return 0.0  # a cached answer is free, not unpriced
        return self.target.cost(self.prompt_tokens, self.completion_tokens, self.attempt) if self.target else None

    @property
    def charged(self) -> bool:
        """Whether tokens are billed: an answer served upstream, or one its client left (499) after tokens were
        generated for it. A cached answer is free; a failed one is not billed."""
        if self.cache == HIT:
            return False
        return self.status == 200 or (self.status == CLIENT_CLOSED and self.prompt_tokens + self.completion_tokens > 0)

    def billed(self) -> tuple[int, float]:
        """(tokens, USD) this request consumed, to settle its limits: nothing unless it was charged."""
        if not self.charged:
            return 0, 0.0
        return self.prompt_tokens + self.completion_tokens, self.cost() or 0.0

    @property
    def route(self) -> str:
        """What served: the provider's name, or the node's id for a node pool."""
        if self.attempt is not None and self.attempt.route:
            return self.attempt.route
        return self.target.id if self.target else ""

    def headers(self) -> dict[str, str]:
        headers = {"x-hatchway-attempts": str(self.attempts), "x-hatchway-cache": self.cache}
        if self.target is not None:
            headers["x-hatchway-route"] = self.route
        if self.served_model is not None and self.served_model != self.model:
            headers["x-hatchway-model"] = self.served_model
        if self.attempt is not None and self.attempt.key_id:
            headers["x-hatchway-provider-key"] = self.attempt.key_id
        return headers


@dataclass
class OpenStream:
    """A target's stream, accepted (first content token in hand) but not yet relayed."""

    target: Target
    upstream: TargetStream
    # Chunks of the batches read up to the commit point, to relay first: the raw bytes when relayed unchanged.
    buffered: list[tuple[bytes | None, dict[str, Any]]]
    # Set when this stream continues a rescued answer: its text is trimmed to what the client lacks.
    continuation: Continuation | None = None


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
    # A rival was started because this try's first token was late (server.hedge): it is not hedged twice.
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
    """Close what a try that did not win opened: a stream with its first token already read."""
    if isinstance(result, OpenStream):
        await result.upstream.aclose()


class Relay:
    def __init__(
        self, metrics: Metrics, usage: UsageWriter, health: Health, *, max_attempts: int, hedge: str = AUTO
    ) -> None:
        self.metrics = metrics
        self.usage = usage
        self.health = health
        self.max_attempts = max_attempts
        # How a slow first token is hedged where the route does not say (server.hedge).
        self.hedge = hedge
        self.meter = Meter(metrics.usage_claims_clamped)
        # Bills of requests whose client left, waiting for a node's own count (`_bill_node`).
        self._pending: set[asyncio.Task[None]] = set()

    # -- the attempt loop -------------------------------------------------------------------------

    async def attempt(
        self,
        exchange: Exchange,
        send: Callable[[Target, Attempt], Awaitable[T]],
        *,
        last: Target | None = None,
        plans: list[ModelPlan] | None = None,
    ) -> T:
        """Try the plan's targets until one serves. `last` (a target that just broke the stream) is tried after
        every other target of every plan. A stream whose first token is late is hedged (server.hedge): the next
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
        self._release(exchange)
        exchange.target, exchange.attempt, exchange.holding = tried.target, tried.attempt, tried.stats
        exchange.served_model = tried.plan.model

    def _settle(self, exchange: Exchange, walk: _Walk, tried: _Try, failure: UpstreamError) -> None:
        """Account for a failed try and queue what comes next; raises the failure when nothing can do better."""
        tried.stats.in_flight -= 1
        self._attempt_failed(exchange, tried.target, tried.attempt, failure, tried.began)
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
            self._record(
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

    def _attempt_failed(
        self, exchange: Exchange, target: Target, attempt: Attempt, exc: UpstreamError, began: float
    ) -> None:
        now = self.health.clock()
        breaker = self.health.stats(target.key).breaker
        if is_target_fault(exc):
            breaker.failed(now, target.policy.breaker_failures)
        else:
            breaker.succeeded()  # it answered, about the request: the target is up (and a probe has its verdict)
        if isinstance(exc, UpstreamStatusError) and exc.upstream_status in (401, 403, 429):
            hint = retry_after_seconds(exc.headers.get("Retry-After"))
            target.rest_key(attempt.key_id, hint if hint is not None else KEY_REST_S)
        self.metrics.upstream_errors.labels(target.id, exc.code or "unknown").inc()
        log.warning("request %s: attempt %d on %s failed: %s", exchange.request_id, attempt.number, target.id, exc)
        status = exc.upstream_status if isinstance(exc, UpstreamStatusError) else exc.status
        self._record(exchange, target, attempt, status=status, code=exc.code, final=False, began=began)

    # -- whole answers ----------------------------------------------------------------------------

    async def complete(self, exchange: Exchange) -> web.Response:
        try:
            body = await self.attempt(exchange, lambda t, a: self._complete_one(t, a, exchange))
        except HatchwayError as exc:
            self._finish(exchange, exc.status, exc.code)
            raise
        except asyncio.CancelledError:
            underway = exchange.underway
            if exchange.target is None and underway is not None and underway[1].number == exchange.attempts:
                # The client left while this target worked on the answer (not in a pause between tries): the row
                # names it, and what it generated by its own count (a node's) is billed.
                exchange.target, exchange.attempt = underway
            self._finish(exchange, CLIENT_CLOSED, "client_closed")
            raise
        exchange.answer = body
        self._finish(exchange, 200)
        return web.Response(body=body, content_type="application/json", headers=self._answer_headers(exchange))

    def _answer_headers(self, exchange: Exchange) -> dict[str, str]:
        headers = exchange.headers()
        cost = exchange.cost()
        if cost is not None:
            headers["x-hatchway-cost-usd"] = f"{cost:.8f}"
        return headers

    # -- answers from the cache -------------------------------------------------------------------

    async def replay(self, request: web.Request, exchange: Exchange, cached: bytes) -> web.StreamResponse:
        """Serve a cached answer: the stored body, or replayed as a stream when the client asked for one."""
        if not exchange.streaming:
            self._finish(exchange, 200)
            return web.Response(body=cached, content_type="application/json", headers=self._answer_headers(exchange))
        response = _sse_response(exchange)
        status, code = 200, None
        recorded = False
        try:
            await response.prepare(request)
            exchange.first_byte_at = time.monotonic()
            if exchange.responses is not None:
                frames = exchange.responses.replay(cached)
            else:
                payloads = replay_chunks(cached, chat=exchange.chat, include_usage=exchange.wants_usage)
                frames = b"".join(map(sse.frame, payloads)) + sse.DONE_FRAME
            self._finish(exchange, 200)  # before [DONE] can reach the client (see `stream`)
            recorded = True
            await response.write_eof(frames)
        except ConnectionResetError:
            status, code = CLIENT_CLOSED, "client_closed"
        except asyncio.CancelledError:
            status, code = CLIENT_CLOSED, "client_closed"
            raise
        finally:
            if not recorded:
                self._finish(exchange, status, code)
        return response

    def refuse(self, exchange: Exchange, error: HatchwayError) -> None:
        """Record a request that policy turned away before any target was tried."""
        self._finish(exchange, error.status, error.code)

    async def _complete_one(self, target: Target, attempt: Attempt, exchange: Exchange) -> bytes:
        exchange.underway = (target, attempt)
        dialect = exchange.responses
        if dialect is None:
            body = await target.complete(exchange.call, attempt)
        else:
            body = await dialect.complete(target, attempt, exchange.request_id)
        try:
            doc = orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            raise UpstreamProtocolError(f"{target.id}: answer is not JSON") from exc
        if not isinstance(doc, dict) or ("error" in doc if dialect is None else dialect.failure(doc) is not None):
            raise UpstreamProtocolError(f"{target.id}: answer is not an OpenAI object")
        # A Response is metered as the chat answer it stands for (server.responses.dialect).
        view = doc if dialect is None else dialect.answer_view(doc)
        exchange.delivery = Delivery()
        exchange.delivery.observe_whole(view)
        usage = view.get("usage")
        if isinstance(usage, dict) and (shown := self._take_usage(exchange, target, attempt, usage)) is not None:
            # The client sees what it is billed, not the claim.
            return orjson.dumps({**doc, "usage": shown} if dialect is None else dialect.with_usage(doc, shown))
        return body

    # -- streams ----------------------------------------------------------------------------------

    async def stream(self, request: web.Request, exchange: Exchange) -> web.StreamResponse:
        try:
            opened = await self.attempt(exchange, lambda t, a: self._open(t, a, exchange.call, exchange, None))
        except HatchwayError as exc:
            self._finish(exchange, exc.status, exc.code)
            raise
        except asyncio.CancelledError:
            self._finish(exchange, CLIENT_CLOSED, "client_closed")
            raise
        response = _sse_response(exchange)
        progress = StreamProgress(chat=exchange.chat)
        status, code = 200, None
        recorded = False
        try:
            await response.prepare(request)
            exchange.first_byte_at = time.monotonic()
            while True:
                try:
                    last = await self._relay(response, exchange, opened, progress)
                    break
                except UpstreamError as exc:
                    await opened.upstream.aclose()
                    self._attempt_failed(exchange, opened.target, exchange.attempt or Attempt(0), exc, time.monotonic())
                    if exchange.responses is not None or not can_rescue(exchange.body, progress):
                        raise
                    log.info("request %s: rescuing a broken stream from %s", exchange.request_id, opened.target.id)
                    # A rescuer that continues the answer reads what was delivered as part of its prompt.
                    exchange.delivery.rescued_bytes = exchange.delivery.bytes
                    opened = await self._rescue(exchange, progress, failed=opened.target)
                    exchange.rescues += 1
            # The row is recorded (on disk with the usage spool, server.spool) before [DONE] can reach the client: a
            # plane killed once its client saw the request complete has the row to replay.
            self._finish(exchange, 200)
            recorded = True
            # The last events, [DONE] and the end of the chunked body leave in one write (a Responses stream has
            # no [DONE]: its closing event ends it).
            await response.write_eof(last + (sse.DONE_FRAME if exchange.responses is None else b""))
            if exchange.collect is not None and not exchange.rescues:
                exchange.answer = exchange.collect.body()
        except HatchwayError as exc:
            # Committed already: the only honest thing left is an error event and no [DONE].
            status, code = exc.status, exc.code
            message = f"The stream broke and could not be continued: {exc.message}"
            if exchange.responses is not None:
                ending = exchange.responses.failed(message)
            else:
                ending = sse.error_frame(
                    {"error": {"message": message, "type": exc.type, "param": None, "code": exc.code}}
                )
            with contextlib.suppress(ConnectionResetError):
                await response.write(ending)
        except ConnectionResetError:
            status, code = CLIENT_CLOSED, "client_closed"
        except asyncio.CancelledError:
            status, code = CLIENT_CLOSED, "client_closed"
            raise
        finally:
            await opened.upstream.aclose()
            if not recorded:
                self._finish(exchange, status, code)
        return response

    async def _open(
        self,
        target: Target,
        attempt: Attempt,
        call: Call,
        exchange: Exchange,
        continuation: Continuation | None,
    ) -> OpenStream:
        """Open a stream and read it up to the batch holding its first content token (the pre-commit buffer).
        Runs inside `attempt`, whose timer holds it to the target's time-to-first-token limit."""
        dialect = exchange.responses
        if dialect is None:
            upstream = await target.stream(call, attempt)
        else:
            upstream = await dialect.stream(target, attempt, call.request_id)
        commits = _substantive if dialect is None else dialect.substantive
        opened = OpenStream(target, upstream, [], continuation)
        try:
            async for batch in upstream:
                committed = False
                for payload in batch:
                    item = self._prepare(exchange, opened, payload)
                    if item is not None:
                        opened.buffered.append(item)
                        committed = committed or commits(item[1])
                if committed:
                    return opened
        except BaseException:
            await upstream.aclose()
            raise
        if upstream.done:
            return opened  # an empty answer is still an answer
        await upstream.aclose()
        raise UpstreamProtocolError(f"{target.id}: stream ended before its first token")

    def _prepare(
        self, exchange: Exchange, opened: OpenStream, payload: bytes
    ) -> tuple[bytes | None, dict[str, Any]] | None:
        """Parse one payload; None when there is nothing to relay. Raises when the target reports an error."""
        try:
            chunk = orjson.loads(payload)
        except orjson.JSONDecodeError:
            chunk = None
        if not isinstance(chunk, dict):
            # One bad chunk does not condemn the stream: skip it, count it, keep going.
            self.metrics.malformed_chunks.labels(opened.target.id).inc()
            log.warning("request %s: skipped a malformed chunk from %s", exchange.request_id, opened.target.id)
            return None
        if exchange.responses is not None:
            problem = exchange.responses.failure(chunk)
            if problem is not None:
                raise UpstreamProtocolError(f"{opened.target.id}: error event in the stream: {problem}")
            return payload, chunk
        if "error" in chunk:
            error = chunk["error"]
            message = error.get("message") if isinstance(error, dict) else error
            raise UpstreamProtocolError(f"{opened.target.id}: error event in the stream: {message}")
        if opened.continuation is None:
            return payload, chunk
        try:
            continued = _continue(chunk, opened.continuation, exchange.chat)
        except ContinuationMismatch as exc:
            raise UpstreamProtocolError(f"{opened.target.id}: {exc}") from exc
        return None if continued is None else (None, continued)

    async def _relay(
        self, response: web.StreamResponse, exchange: Exchange, opened: OpenStream, progress: StreamProgress
    ) -> bytes:
        """Relay the buffered chunks, then the rest; return when the answer is complete, raise when it broke.

        A batch (the events that arrived together) leaves in one write, one chunk of the response rather than
        one per event; an event is never held back waiting for the upstream. The last batch is returned
        unwritten, for the caller to send with the end of the stream."""
        upstream = opened.upstream
        frames = [f for payload, chunk in opened.buffered if (f := self._frame(exchange, progress, payload, chunk))]
        opened.buffered.clear()
        try:
            if not upstream.done:
                await self._write(response, frames)
            # Committed: a silence long for this stream's own pace is a stall (server.pace), rescued as a cut is.
            async for batch in PacedStream(upstream, opened.target.policy, opened.target.id):
                for raw in batch:
                    item = self._prepare(exchange, opened, raw)
                    if item is not None and (frame := self._frame(exchange, progress, *item)):
                        frames.append(frame)
                if not upstream.done:
                    await self._write(response, frames)
        except UpstreamError:
            # What the client was counted as having must reach it before the stream is given up or rescued.
            await self._write(response, frames)
            raise
        problem = None
        if opened.continuation is not None and not opened.continuation.passing:
            problem = "the regenerated answer is shorter than the delivered one"
        elif not (upstream.done or progress.finished):
            problem = "stream ended before the answer finished"
        if problem is not None:
            await self._write(response, frames)
            raise UpstreamProtocolError(f"{opened.target.id}: {problem}")
        return b"".join(frames)

    @staticmethod
    async def _write(response: web.StreamResponse, frames: list[bytes]) -> None:
        if frames:
            data = b"".join(frames)
            frames.clear()
            await response.write(data)

    def _frame(
        self, exchange: Exchange, progress: StreamProgress, payload: bytes | None, chunk: dict[str, Any]
    ) -> bytes | None:
        """Account for one chunk and return its SSE frame, or None when the client is not to see it."""
        if exchange.responses is not None:
            return self._frame_event(exchange, exchange.responses, progress, payload, chunk)
        progress.observe(chunk)
        exchange.delivery.observe(chunk)
        if "usage" in chunk:
            usage = chunk["usage"]
            if isinstance(usage, dict) and exchange.target is not None:
                shown = self._take_usage(exchange, exchange.target, exchange.attempt, usage)
                if shown is not None:
                    chunk, payload = {**chunk, "usage": shown}, None
        if exchange.collect is not None:
            exchange.collect.observe(chunk)
        if "usage" in chunk and chunk.get("choices") == [] and not exchange.wants_usage:
            return None  # the plane asked for usage for itself; the client did not
        if payload is None:
            if progress.first_id is not None:
                chunk = {**chunk, "id": progress.first_id, "created": progress.first_created or chunk.get("created")}
            payload = orjson.dumps(chunk)
        return sse.frame(payload)

    def _frame_event(
        self,
        exchange: Exchange,
        dialect: ResponsesDialect,
        progress: StreamProgress,
        payload: bytes | None,
        event: dict[str, Any],
    ) -> bytes:
        """Account for one Responses event, through the chat chunk it stands for, and return its frame."""
        view = dialect.event_view(event)
        if view is not None:
            progress.observe(view)
            exchange.delivery.observe(view)
            usage = view.get("usage")
            if isinstance(usage, dict) and exchange.target is not None:
                shown = self._take_usage(exchange, exchange.target, exchange.attempt, usage)
                if shown is not None:
                    event, payload = dialect.with_usage(event, shown), None
        return dialect.frame(payload, event)

    async def _rescue(self, exchange: Exchange, progress: StreamProgress, *, failed: Target) -> OpenStream:
        """Find a target that continues the delivered answer, each in its declared form (server.rescue)."""

        async def open_rescue(target: Target, attempt: Attempt) -> OpenStream:
            body, continuation = rescue_request(exchange.body, progress, target.continuation)
            try:
                return await self._open(
                    target, attempt, Call(exchange.endpoint, body, exchange.request_id), exchange, continuation
                )
            except UpstreamStatusError as exc:
                if not continuation.prefilled or exc.upstream_status not in (400, 422) or is_context_length_error(exc):
                    raise
            # Declared wrongly, or the model's template refuses it: a new answer can still be checked.
            log.warning(
                "request %s: %s refused a continuation by prefill; regenerating (declare it --continuation regenerate)",
                exchange.request_id,
                target.id,
            )
            _, continuation = rescue_request(exchange.body, progress, "regenerate")
            return await self._open(target, attempt, exchange.call, exchange, continuation)

        rescuers = [
            replace(plan, targets=tuple(t for t in plan.targets if t.continuation != "none")) for plan in exchange.plans
        ]
        if not any(plan.targets for plan in rescuers):
            raise UpstreamError(f"no target for '{exchange.model}' may continue a broken stream")
        return await self.attempt(exchange, open_rescue, last=failed, plans=rescuers)

    # -- accounting -------------------------------------------------------------------------------

    def _take_usage(
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
        exchange.prompt_tokens, exchange.completion_tokens = prompt, completion
        exchange.usage_reported = True
        return bounded_usage(usage, prompt, completion) if clamped else None

    def _bill_delivered(self, exchange: Exchange) -> None:
        """Bill an answer its client left before any claim came: the prompt as estimated at admission, the
        delivered text's estimate (server.metering.delivered_tokens); nothing when nothing was delivered."""
        if exchange.usage_reported or exchange.target is None or not exchange.delivery.bytes:
            return
        allowed = completion_allowed(_metered(exchange, exchange.target, exchange.attempt))
        exchange.prompt_tokens = estimate_tokens(*exchange.metered, 0)[0]
        exchange.completion_tokens = min(delivered_tokens(exchange.delivery), allowed)

    async def _bill_node(
        self, exchange: Exchange, generated: Callable[[], Awaitable[Generated]], code: str | None
    ) -> None:
        """Bill a node's answer its client left, by the node's own count (bounded by the text it sent) once it
        stopped, else by the delivered estimate; then record the request."""
        try:
            count = await generated()
            if count.usage is not None and exchange.target is not None:
                sent = exchange.delivery.covering(count.text_bytes)
                self._take_usage(exchange, exchange.target, exchange.attempt, count.usage, sent)
        finally:
            self._bill_delivered(exchange)
            self._record_final(exchange, code)

    def settle_limits(self, exchange: Exchange, settle: Callable[[int, float], None]) -> None:
        """Settle the request's limits on what it was billed: now, or once a node's own count is in."""
        if exchange.pending is None:
            settle(*exchange.billed())
        else:
            exchange.pending.add_done_callback(lambda _: settle(*exchange.billed()))

    async def close(self) -> None:
        """Wait for the bills still waiting on a node's count: each within the registry's cancel timeout, and at
        once when the registry closed first (every job is released)."""
        if self._pending:
            await asyncio.wait(set(self._pending))

    def _release(self, exchange: Exchange) -> None:
        if exchange.holding is not None:
            exchange.holding.in_flight -= 1
            exchange.holding = None

    def _finish(self, exchange: Exchange, status: int, code: str | None = None) -> None:
        exchange.status = status
        self._release(exchange)
        if status == CLIENT_CLOSED and not exchange.usage_reported and exchange.cache != HIT:
            generated = exchange.attempt.generated if exchange.attempt is not None else None
            if generated is not None:
                # A node generates on until it sees the cancel, then reports its count: the bill waits for it in a
                # task the relay owns (the handler is being cancelled, and the client is gone anyway).
                task = asyncio.get_running_loop().create_task(self._bill_node(exchange, generated, code))
                exchange.pending = task
                self._pending.add(task)
                task.add_done_callback(self._pending.discard)
                return
            self._bill_delivered(exchange)
        self._record_final(exchange, code)

    def _record_final(self, exchange: Exchange, code: str | None) -> None:
        self._record(
            exchange,
            exchange.target,
            exchange.attempt,
            status=exchange.status or 0,
            code=code,
            final=True,
            began=exchange.started,
        )

    def _record(
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
                prompt_tokens=exchange.prompt_tokens if served else 0,
                completion_tokens=exchange.completion_tokens if served else 0,
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
    """What bounds the request's usage (server.metering)."""
    if not exchange.body_bytes:
        exchange.body_bytes = len(orjson.dumps(exchange.body))
    context = attempt.context if attempt is not None else None
    endpoint, body = exchange.metered
    return MeteredRequest(endpoint, body, exchange.body_bytes, target.kind, context)


def _no_target(exchange: Exchange) -> str:
    return "cache" if exchange.cache == HIT else ""


class _SSEResponse(web.StreamResponse):
    # aiohttp sends a stream's headers at `prepare`, alone; buffered, they leave with the first events, one
    # write less per stream. `prepare` is only called once the first events are in hand, so nothing waits.
    _send_headers_immediately = False


def _sse_response(exchange: Exchange) -> web.StreamResponse:
    return _SSEResponse(
        headers={
            "Content-Type": "text/event-stream",
            "Cache-Control": "no-cache",
            # Tell buffering proxies (nginx) to pass chunks straight through.
            "X-Accel-Buffering": "no",
            **exchange.headers(),
        }
    )


def _substantive(chunk: dict[str, Any]) -> bool:
    """Whether a chunk carries the answer itself: content, a tool call, or a finish (the commit point)."""
    choices = chunk.get("choices")
    if not isinstance(choices, list):
        return False
    for choice in choices:
        if not isinstance(choice, dict):
            continue
        if choice.get("finish_reason") or choice_text(choice):
            return True
        delta = choice.get("delta")
        if isinstance(delta, dict) and (delta.get("tool_calls") or delta.get("function_call")):
            return True
    return False


def _continue(chunk: dict[str, Any], continuation: Continuation, chat: bool) -> dict[str, Any] | None:
    """A rescuing target's chunk, trimmed to what the client lacks; None when nothing of it is to be relayed."""
    choices = chunk.get("choices")
    if not isinstance(choices, list) or not choices:
        return chunk if "usage" in chunk else None
    kept = []
    for choice in choices:
        if not isinstance(choice, dict):
            continue
        rest = continuation.feed(choice_text(choice))
        finish = choice.get("finish_reason")
        if finish:
            rest += continuation.finish()
        if not rest and not finish:
            continue  # the role chunk, or text the client already has
        if chat:
            kept.append({**choice, "delta": {"content": rest} if rest else {}})
        else:
            kept.append({**choice, "text": rest})
    return {**chunk, "choices": kept} if kept else None
