"""Streams (`Streams.stream`): nothing reaches the client until the first content token, then chunks are relayed
as they come.

open        (the attempt loop's `send`) open a target's stream and read it up to the batch holding its first
            content token: the pre-commit buffer, where every failure fails over invisibly
relay       committed: the buffered chunks, then the rest, each batch of events in one write. A silence long for
            the stream's own pace is a stall (server.routing.pace); a stall or a cut is rescued by a fallback that
            continues the same answer (server.relay.rescue); when nothing can rescue it, the stream ends with an
            SSE error event and no `[DONE]`, never as a success
frame       account for each chunk (what the client was sent, the usage claim, the cache's copy) and frame it;
            the usage chunk the plane asked for itself is dropped when the client did not ask for it

A /v1/responses stream takes the same steps through its dialect (server.responses.dialect), and ends a broken
stream with `response.failed` (no rescue).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass
from typing import Any

import orjson
from aiohttp import web

from server import sse
from server.errors import HatchwayError, UpstreamError, UpstreamProtocolError
from server.metrics import Metrics
from server.relay.accounting import Accounting
from server.relay.attempts import AttemptLoop
from server.relay.exchange import CLIENT_CLOSED, Exchange
from server.relay.rescue import rescue, trim_to_continuation
from server.responses.dialect import ResponsesDialect
from server.routing.continuation import Continuation, ContinuationMismatch, StreamProgress, can_rescue, choice_text
from server.routing.pace import PacedStream
from server.targets.base import Attempt, Call, Target, TargetStream

log = logging.getLogger(__name__)


@dataclass
class OpenStream:
    """A target's stream, accepted (first content token in hand) but not yet relayed."""

    target: Target
    upstream: TargetStream
    # Chunks of the batches read up to the commit point, to relay first: the raw bytes when relayed unchanged.
    buffered: list[tuple[bytes | None, dict[str, Any]]]
    # Set when this stream continues a rescued answer: its text is trimmed to what the client lacks.
    continuation: Continuation | None = None

    async def aclose(self) -> None:
        await self.upstream.aclose()


class Streams:
    """Serves a request as an SSE stream (`stream`): attempt (`_open`), commit, relay (`_relay`), rescue."""

    def __init__(self, metrics: Metrics, attempts: AttemptLoop, accounting: Accounting) -> None:
        self.metrics = metrics
        self.attempts = attempts
        self.accounting = accounting

    async def stream(self, request: web.Request, exchange: Exchange) -> web.StreamResponse:
        try:
            opened = await self.attempts.attempt(exchange, lambda t, a: self._open(t, a, exchange.call, exchange, None))
        except HatchwayError as exc:
            self.accounting.finish(exchange, exc.status, exc.code)
            raise
        except asyncio.CancelledError:
            self.accounting.finish(exchange, CLIENT_CLOSED, "client_closed")
            raise
        response = sse_response(exchange)
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
                    self.attempts.attempt_failed(
                        exchange, opened.target, exchange.attempt or Attempt(0), exc, time.monotonic()
                    )
                    if exchange.responses is not None or not can_rescue(exchange.body, progress):
                        raise
                    log.info("request %s: rescuing a broken stream from %s", exchange.request_id, opened.target.id)
                    # A rescuer that continues the answer reads what was delivered as part of its prompt.
                    exchange.delivery.rescued_bytes = exchange.delivery.bytes
                    opened = await rescue(self.attempts, self._open, exchange, progress, failed=opened.target)
                    exchange.rescues += 1
            # The row is recorded (on disk with the usage spool, server.usage.spool) before [DONE] can reach the
            # client: a plane killed once its client saw the request complete has the row to replay.
            self.accounting.finish(exchange, 200)
            recorded = True
            # The last events, [DONE] and the end of the chunked body leave in one write (a Responses stream has
            # no [DONE]: its closing event ends it).
            await response.write_eof(last + (sse.DONE_FRAME if exchange.responses is None else b""))
            capture = exchange.capture
            if capture is not None and capture.collect is not None and not exchange.rescues:
                capture.answer = capture.collect.body()
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
                self.accounting.finish(exchange, status, code)
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
            continued = trim_to_continuation(chunk, opened.continuation, exchange.chat)
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
            # Committed: a silence long for this stream's own pace is a stall (server.routing.pace), rescued as a cut
            # is.
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
                shown = self.accounting.take_usage(exchange, exchange.target, exchange.attempt, usage)
                if shown is not None:
                    chunk, payload = {**chunk, "usage": shown}, None
        if exchange.capture is not None and exchange.capture.collect is not None:
            exchange.capture.collect.observe(chunk)
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
                shown = self.accounting.take_usage(exchange, exchange.target, exchange.attempt, usage)
                if shown is not None:
                    event, payload = dialect.with_usage(event, shown), None
        return dialect.frame(payload, event)


class _SSEResponse(web.StreamResponse):
    # aiohttp sends a stream's headers at `prepare`, alone; buffered, they leave with the first events, one
    # write less per stream. `prepare` is only called once the first events are in hand, so nothing waits.
    _send_headers_immediately = False


def sse_response(exchange: Exchange) -> web.StreamResponse:
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
