"""The attempt loop and the two ways an answer goes back to the client: whole, or as an SSE stream.

attempt     walk the plan (the model's targets in rule order, then its fallback models'), skipping
            targets whose breaker is open; after each failure `failover.decide` says: retry the same
            target (after a delay), go to the next target, skip to the fallback model, or stop
complete    non-stream: the serving target's JSON body goes back byte for byte
stream      nothing reaches the client until the first content token (every failure before it fails
            over invisibly); then chunks are relayed as they come. A committed stream that breaks is
            rescued by a fallback that continues the same answer (`rescue`); when nothing can rescue
            it, it ends with an SSE error event and no `[DONE]`, never as a success
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
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
from server.failover import Move, decide, is_context_length_error, retry_after_seconds
from server.health import Health, TargetStats, is_target_fault
from server.metering import Delivery, Meter, MeteredRequest, bounded_usage
from server.metrics import Metrics
from server.rescue import (
    Continuation,
    ContinuationMismatch,
    StreamProgress,
    can_rescue,
    choice_text,
    prefill_body,
)
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
    # The tokens billed: the serving target's claim, held to the plane's bounds (server.metering).
    prompt_tokens: int = 0
    completion_tokens: int = 0
    # What the client was sent of the answer, counted by the plane.
    delivery: Delivery = field(default_factory=Delivery)
    first_byte_at: float | None = None
    # The serving target's in-flight count, held until the answer is complete.
    holding: TargetStats | None = None
    # What the response cache said (server.cache), and the whole answer to store on a miss.
    cache: str = BYPASS
    collect: StreamAssembler | None = None
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
    def time_left_s(self) -> float:
        return self.started + self.deadline_s - time.monotonic()

    def cost(self) -> float | None:
        if self.cache == HIT:
            return 0.0  # a cached answer is free, not unpriced
        return self.target.cost(self.prompt_tokens, self.completion_tokens, self.attempt) if self.target else None

    def billed(self) -> tuple[int, float]:
        """(tokens, USD) this request consumed, to settle its limits: nothing unless it was served upstream."""
        if self.status != 200 or self.cache == HIT:
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


class Relay:
    def __init__(self, metrics: Metrics, usage: UsageWriter, health: Health, *, max_attempts: int) -> None:
        self.metrics = metrics
        self.usage = usage
        self.health = health
        self.max_attempts = max_attempts
        self.meter = Meter(metrics.usage_claims_clamped)

    # -- the attempt loop -------------------------------------------------------------------------

    async def attempt(
        self,
        exchange: Exchange,
        send: Callable[[Target, Attempt], Awaitable[T]],
        *,
        last: Target | None = None,
    ) -> T:
        """Try the plan's targets until one serves. `last` (a target that just failed) is tried after the rest."""
        error: HatchwayError | None = None
        resting: list[float] = []
        for plan in exchange.plans:
            targets = [t for t in plan.targets if t is not last] + [t for t in plan.targets if t is last]
            skip_model = False
            for target in targets:
                stats = self.health.stats(target.key)
                breaker = stats.breaker
                if not breaker.admits(self.health.clock(), target.policy.breaker_cooldown_s):
                    resting.append(breaker.retry_in(self.health.clock(), target.policy.breaker_cooldown_s))
                    continue
                tries = 0
                while True:
                    if exchange.attempts >= self.max_attempts or exchange.time_left_s <= 0:
                        breaker.released()
                        raise error or UpstreamTimeoutError("no attempt left within the request's budget")
                    exchange.attempts += 1
                    attempt = Attempt(number=exchange.attempts)
                    stats.in_flight += 1
                    began = time.monotonic()
                    # One timer per attempt: the request's deadline, or a stream's first-token limit if sooner.
                    limit_s = exchange.time_left_s
                    first_token_s = target.policy.ttft_timeout_s if exchange.streaming else None
                    try:
                        async with asyncio.timeout(min(limit_s, first_token_s or limit_s)):
                            result = await send(target, attempt)
                    except TimeoutError:
                        failure: UpstreamError = UpstreamTimeoutError(
                            f"{target.id}: no first token within {first_token_s:g}s"
                            if first_token_s is not None and first_token_s < limit_s
                            else f"{target.id}: request deadline reached"
                        )
                    except UpstreamError as exc:
                        failure = exc
                    except BaseException:
                        stats.in_flight -= 1
                        breaker.released()
                        raise
                    else:
                        breaker.succeeded()
                        elapsed = time.monotonic() - began
                        stats.observe(ttft_s=elapsed) if exchange.streaming else stats.observe(latency_s=elapsed)
                        self._release(exchange)
                        exchange.target, exchange.attempt, exchange.holding = target, attempt, stats
                        exchange.served_model = plan.model
                        return result
                    stats.in_flight -= 1
                    error = failure
                    self._attempt_failed(exchange, target, attempt, failure, began)
                    decision = decide(
                        failure,
                        tries=tries,
                        policy=target.policy,
                        time_left_s=exchange.time_left_s,
                        other_key=target.has_other_key(attempt.key_id),
                    )
                    if decision.move is Move.RETRY:
                        tries += 1
                        if decision.delay_s:
                            await asyncio.sleep(decision.delay_s)
                        if not breaker.admits(self.health.clock(), target.policy.breaker_cooldown_s):
                            break
                        continue
                    if decision.move is Move.STOP:
                        raise failure
                    skip_model = decision.move is Move.NEXT_MODEL
                    break
                if skip_model:
                    break
        if error is not None:
            raise error
        retry_in = max(1, round(min(resting))) if resting else 1
        raise ServiceUnavailableError(
            f"every target for '{exchange.model}' is failing; retry in {retry_in}s",
            headers={"Retry-After": str(retry_in)},
        )

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
        try:
            await response.prepare(request)
            exchange.first_byte_at = time.monotonic()
            payloads = replay_chunks(cached, chat=exchange.chat, include_usage=exchange.wants_usage)
            await response.write_eof(b"".join(map(sse.frame, payloads)) + sse.DONE_FRAME)
        except ConnectionResetError:
            status, code = CLIENT_CLOSED, "client_closed"
        except asyncio.CancelledError:
            status, code = CLIENT_CLOSED, "client_closed"
            raise
        finally:
            self._finish(exchange, status, code)
        return response

    def refuse(self, exchange: Exchange, error: HatchwayError) -> None:
        """Record a request that policy turned away before any target was tried."""
        self._finish(exchange, error.status, error.code)

    async def _complete_one(self, target: Target, attempt: Attempt, exchange: Exchange) -> bytes:
        body = await target.complete(exchange.call, attempt)
        try:
            doc = orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            raise UpstreamProtocolError(f"{target.id}: answer is not JSON") from exc
        if not isinstance(doc, dict) or "error" in doc:
            raise UpstreamProtocolError(f"{target.id}: answer is not an OpenAI object")
        exchange.delivery = Delivery()
        exchange.delivery.observe_whole(doc)
        usage = doc.get("usage")
        if isinstance(usage, dict) and (shown := self._take_usage(exchange, target, attempt, usage)) is not None:
            # The client sees what it is billed, not the claim.
            return orjson.dumps({**doc, "usage": shown})
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
                    if not can_rescue(exchange.body, progress):
                        raise
                    log.info("request %s: rescuing a broken stream from %s", exchange.request_id, opened.target.id)
                    # A rescuer that continues the answer reads what was delivered as part of its prompt.
                    exchange.delivery.rescued_bytes = exchange.delivery.bytes
                    opened = await self._rescue(exchange, progress, failed=opened.target)
                    exchange.rescues += 1
            # The last events, [DONE] and the end of the chunked body leave in one write.
            await response.write_eof(last + sse.DONE_FRAME)
            if exchange.collect is not None and not exchange.rescues:
                exchange.answer = exchange.collect.body()
        except HatchwayError as exc:
            # Committed already: the only honest thing left is an error event and no [DONE].
            status, code = exc.status, exc.code
            message = f"The stream broke and could not be continued: {exc.message}"
            envelope = {"error": {"message": message, "type": exc.type, "param": None, "code": exc.code}}
            with contextlib.suppress(ConnectionResetError):
                await response.write(sse.error_frame(envelope))
        except ConnectionResetError:
            status, code = CLIENT_CLOSED, "client_closed"
        except asyncio.CancelledError:
            status, code = CLIENT_CLOSED, "client_closed"
            raise
        finally:
            await opened.upstream.aclose()
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
        upstream = await target.stream(call, attempt)
        opened = OpenStream(target, upstream, [], continuation)
        try:
            async for batch in upstream:
                committed = False
                for payload in batch:
                    item = self._prepare(exchange, opened, payload)
                    if item is not None:
                        opened.buffered.append(item)
                        committed = committed or _substantive(item[1])
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
            async for batch in upstream:
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

    async def _rescue(self, exchange: Exchange, progress: StreamProgress, *, failed: Target) -> OpenStream:
        """Find a target that continues the delivered answer (prefill, else regeneration)."""
        delivered = progress.delivered

        async def open_rescue(target: Target, attempt: Attempt) -> OpenStream:
            body = prefill_body(exchange.body, progress) if target.accepts_prefill() is not False else None
            if body is not None:
                call = Call(exchange.endpoint, body, exchange.request_id)
                try:
                    opened = await self._open(
                        target, attempt, call, exchange, Continuation(delivered, regenerate=False)
                    )
                except UpstreamStatusError as exc:
                    if exc.upstream_status not in (400, 422) or is_context_length_error(exc):
                        raise
                    log.info("%s rejected an assistant prefill; regenerating instead", target.id)
                    target.learn_prefill(False)
                else:
                    target.learn_prefill(True)
                    return opened
            return await self._open(target, attempt, exchange.call, exchange, Continuation(delivered, regenerate=True))

        return await self.attempt(exchange, open_rescue, last=failed)

    # -- accounting -------------------------------------------------------------------------------

    def _take_usage(
        self, exchange: Exchange, target: Target, attempt: Attempt | None, usage: dict[str, Any]
    ) -> dict[str, Any] | None:
        """Bill a target's usage claim within the plane's bounds; the usage to show instead when it was clamped."""
        if not exchange.body_bytes:
            exchange.body_bytes = len(orjson.dumps(exchange.body))
        request = MeteredRequest(
            exchange.endpoint,
            exchange.body,
            exchange.body_bytes,
            target.kind,
            attempt.context if attempt is not None else None,
        )
        label = attempt.route if attempt is not None and attempt.route else target.id
        prompt, completion, clamped = self.meter.bill(request, exchange.delivery, usage, label)
        exchange.prompt_tokens, exchange.completion_tokens = prompt, completion
        return bounded_usage(usage, prompt, completion) if clamped else None

    def _release(self, exchange: Exchange) -> None:
        if exchange.holding is not None:
            exchange.holding.in_flight -= 1
            exchange.holding = None

    def _finish(self, exchange: Exchange, status: int, code: str | None = None) -> None:
        exchange.status = status
        self._release(exchange)
        self._record(
            exchange, exchange.target, exchange.attempt, status=status, code=code, final=True, began=exchange.started
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
        served = final and status == 200
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
            continuation.finish()
        if not rest and not finish:
            continue  # the role chunk, or text the client already has
        if chat:
            kept.append({**choice, "delta": {"content": rest} if rest else {}})
        else:
            kept.append({**choice, "text": rest})
    return {**chunk, "choices": kept} if kept else None
