"""The attempt loop and the two ways an answer goes back to the client: whole, or as an SSE stream.

attempt(targets)      try each target in turn until one serves; a non-retryable error stops the loop
complete(exchange)    non-stream: the target's JSON body goes back byte for byte
stream(exchange)      stream: nothing is sent to the client until the first chunk has arrived (failures
                      before it fail over invisibly); afterwards chunks are relayed as they come, and a
                      stream that breaks ends with an SSE error event and no `[DONE]`, never as a success
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import orjson
from aiohttp import web

from server import sse
from server.errors import HatchwayError, ServiceUnavailableError, UpstreamError, UpstreamProtocolError
from server.metrics import Metrics
from server.snapshot import KeyEntry
from server.storage.models import UsageRecord
from server.targets.base import Call, Target, TargetStream
from server.usage import UsageWriter

log = logging.getLogger(__name__)

T = TypeVar("T")

# Status recorded for a request whose client went away before the answer was complete (nginx's convention).
CLIENT_CLOSED = 499


@dataclass
class Exchange:
    """One client request on its way through the plane, and what became of it."""

    request_id: str
    key: KeyEntry
    endpoint: str
    body: dict[str, Any]
    started: float = field(default_factory=time.perf_counter)
    attempts: int = 0
    target: Target | None = None
    status: int = 200
    error_code: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    first_byte_at: float | None = None

    @property
    def model(self) -> str:
        return str(self.body["model"])

    @property
    def streaming(self) -> bool:
        return bool(self.body.get("stream"))

    @property
    def wants_usage(self) -> bool:
        options = self.body.get("stream_options")
        return isinstance(options, dict) and options.get("include_usage") is True

    @property
    def call(self) -> Call:
        return Call(endpoint=self.endpoint, body=self.body, request_id=self.request_id)

    def take_usage(self, usage: Any) -> None:
        if isinstance(usage, dict):
            self.prompt_tokens = _int(usage.get("prompt_tokens"))
            self.completion_tokens = _int(usage.get("completion_tokens"))

    def cost(self) -> float | None:
        return self.target.cost(self.prompt_tokens, self.completion_tokens) if self.target else None

    def headers(self) -> dict[str, str]:
        headers = {"x-hatchway-attempts": str(self.attempts), "x-hatchway-cache": "bypass"}
        if self.target is not None:
            headers["x-hatchway-route"] = self.target.id
        return headers


def _int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


class Relay:
    def __init__(self, metrics: Metrics, usage: UsageWriter) -> None:
        self.metrics = metrics
        self.usage = usage

    async def attempt(
        self, exchange: Exchange, targets: tuple[Target, ...], send: Callable[[Target], Awaitable[T]]
    ) -> T:
        last: HatchwayError = ServiceUnavailableError(f"no target can serve '{exchange.model}' right now")
        for target in targets:
            exchange.attempts += 1
            try:
                result = await send(target)
            except UpstreamError as exc:
                self.metrics.upstream_errors.labels(target.id, exc.code or "unknown").inc()
                log.warning("request %s: %s failed: %s", exchange.request_id, target.id, exc.message)
                last = exc
                if not exc.retryable:
                    break
                continue
            exchange.target = target
            return result
        raise last

    async def complete(self, exchange: Exchange, targets: tuple[Target, ...]) -> web.Response:
        try:
            body = await self.attempt(exchange, targets, lambda t: self._complete_one(t, exchange))
        except HatchwayError as exc:
            self._finish(exchange, exc.status, exc.code)
            raise
        cost = exchange.cost()
        headers = exchange.headers()
        if cost is not None:
            headers["x-hatchway-cost-usd"] = f"{cost:.8f}"
        self._finish(exchange, 200)
        return web.Response(body=body, content_type="application/json", headers=headers)

    async def _complete_one(self, target: Target, exchange: Exchange) -> bytes:
        body = await target.complete(exchange.call)
        try:
            doc = orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            raise UpstreamProtocolError(f"{target.id}: answer is not JSON") from exc
        if not isinstance(doc, dict):
            raise UpstreamProtocolError(f"{target.id}: answer is not a JSON object")
        exchange.take_usage(doc.get("usage"))
        return body

    async def stream(self, request: web.Request, exchange: Exchange, targets: tuple[Target, ...]) -> web.StreamResponse:
        try:
            upstream, first = await self.attempt(exchange, targets, self._open_stream(exchange))
        except HatchwayError as exc:
            self._finish(exchange, exc.status, exc.code)
            raise
        response = web.StreamResponse(
            headers={
                "Content-Type": "text/event-stream",
                "Cache-Control": "no-cache",
                # Tell buffering proxies (nginx) to pass chunks straight through.
                "X-Accel-Buffering": "no",
                **exchange.headers(),
            }
        )
        status, code = 200, None
        try:
            await response.prepare(request)
            exchange.first_byte_at = time.perf_counter()
            if first is not None:
                await self._relay_chunk(response, exchange, first)
            async for payload in upstream:
                await self._relay_chunk(response, exchange, payload)
            if upstream.done:
                await response.write(sse.DONE_FRAME)
            else:
                raise UpstreamProtocolError(f"{exchange.target.id if exchange.target else '?'}: stream ended early")
        except UpstreamError as exc:
            # Committed already: the only honest thing left is an error event and no [DONE].
            status, code = exc.status, exc.code
            self.metrics.upstream_errors.labels(exchange.target.id if exchange.target else "?", code or "").inc()
            await self._try_write(response, sse.error_frame(exc.envelope()))
        except ConnectionResetError:
            status, code = CLIENT_CLOSED, "client_closed"
        finally:
            await upstream.aclose()
            self._finish(exchange, status, code)
        return response

    def _open_stream(self, exchange: Exchange) -> Callable[[Target], Awaitable[tuple[TargetStream, bytes | None]]]:
        async def open_one(target: Target) -> tuple[TargetStream, bytes | None]:
            upstream = await target.stream(exchange.call)
            try:
                # The pre-commit buffer: a target that fails before its first chunk never reaches the client.
                async for payload in upstream:
                    return upstream, payload
            except BaseException:
                await upstream.aclose()
                raise
            if not upstream.done:
                await upstream.aclose()
                raise UpstreamProtocolError(f"{target.id}: stream ended before its first chunk")
            return upstream, None

        return open_one

    async def _relay_chunk(self, response: web.StreamResponse, exchange: Exchange, payload: bytes) -> None:
        # Only chunks that mention usage are parsed; everything else is relayed as bytes.
        if b'"usage"' in payload:
            try:
                doc = orjson.loads(payload)
            except orjson.JSONDecodeError:
                target = exchange.target.id if exchange.target else "?"
                self.metrics.malformed_chunks.labels(target).inc()
                log.warning("request %s: skipped a malformed chunk from %s", exchange.request_id, target)
                return
            if isinstance(doc, dict):
                exchange.take_usage(doc.get("usage"))
                if not exchange.wants_usage and doc.get("choices") == []:
                    return
        await response.write(sse.frame(payload))

    @staticmethod
    async def _try_write(response: web.StreamResponse, data: bytes) -> None:
        with contextlib.suppress(ConnectionResetError):
            await response.write(data)

    def _finish(self, exchange: Exchange, status: int, code: str | None = None) -> None:
        exchange.status, exchange.error_code = status, code
        now = time.perf_counter()
        self.usage.record(
            UsageRecord(
                request_id=exchange.request_id,
                org_id=exchange.key.org_id,
                key_id=exchange.key.id,
                endpoint=exchange.endpoint,
                model=exchange.model,
                target=exchange.target.id if exchange.target else "",
                stream=exchange.streaming,
                status=status,
                attempts=exchange.attempts,
                prompt_tokens=exchange.prompt_tokens,
                completion_tokens=exchange.completion_tokens,
                cost_usd=exchange.cost() if status == 200 else None,
                latency_ms=(now - exchange.started) * 1000,
                ttft_ms=(exchange.first_byte_at - exchange.started) * 1000 if exchange.first_byte_at else None,
                error_code=code,
            )
        )
