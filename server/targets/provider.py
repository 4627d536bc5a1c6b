"""Upstream OpenAI-compatible providers as targets, over one shared HTTP client (server.targets.http).

The client's errors become the plane's at one place, `TRANSPORT_ERRORS` (as httpx maps httpcore's): each row
names the plane's error for one class of transport error and what the tenant is told, the most specific row
winning. The attempt loop (server.relay) decides on the plane's class: a refused or broken connection and a
timeout are the target's fault (its breaker counts them); a local mistake, a base URL the client cannot use or a
header it cannot send, is a configuration error, logged once, that leaves the target's breaker alone.
"""

from __future__ import annotations

import enum
import itertools
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Iterable
from dataclasses import dataclass
from typing import Any

import orjson

from server import sse
from server.config import ConfigError
from server.errors import (
    UpstreamConfigError,
    UpstreamConnectError,
    UpstreamError,
    UpstreamProtocolError,
    UpstreamRefusedError,
    UpstreamStatusError,
    UpstreamTimeoutError,
)
from server.routing.continuation import DEFAULT_CONTINUATION, ContinuationForm
from server.routing.failover import FailoverPolicy
from server.routing.health import Health
from server.targets.base import Attempt, Call, Target, TargetStream
from server.targets.egress import Egress, EnvironmentProxies
from server.targets.http import (
    BodyTooLargeError,
    ConnectError,
    Endpoint,
    HTTPClient,
    HTTPClientError,
    InvalidHeaderError,
    InvalidURLError,
    Response,
)

log = logging.getLogger(__name__)

# An error answer is read only for its envelope: more than this is not an OpenAI error.
ERROR_BODY_BYTES = 64 * 1024
# A whole (non-stream) answer's body, at most, unless the plane is told otherwise (max_upstream_body_bytes);
# streams are consumed as they come and need none.
DEFAULT_MAX_BODY_BYTES = 64 * 1024 * 1024


class Phase(enum.Enum):
    """Where the exchange with the upstream was when a transport error struck (the operator's log says so)."""

    HEADERS = "before the answer's headers"  # connecting, sending, waiting for the status line and headers
    BODY = "reading the answer"  # a whole answer's body
    STREAM = "reading the stream"  # a stream's events


@dataclass(frozen=True)
class Row:
    """The plane's error for one class of transport error, and what the tenant is told: one text, or one per
    phase. `{name}` is the provider's name; `{reason}` a ConnectError's reason (which names no address)."""

    error: type[UpstreamError]
    message: str | dict[Phase, str]


_BROKE = {
    Phase.HEADERS: "{name}: the connection broke before the answer's headers",
    Phase.BODY: "{name}: the connection broke during the answer",
    Phase.STREAM: "{name}: the stream was cut",
}

# The most specific row for an error's class wins (its first class, in method resolution order, that has a row).
# The client wraps what fails while connecting (OSError, ssl.SSLError, a proxy's refusal) as ConnectError with a
# reason; its other errors are HTTPClientErrors, and the OSError row catches what it did not wrap.
TRANSPORT_ERRORS: dict[type[Exception], Row] = {
    # Nobody listens there, the name does not resolve, the TLS handshake or the proxy's tunnel failed.
    ConnectError: Row(UpstreamRefusedError, "{name} is unreachable ({reason})"),
    # The header timeout, or a silence between two reads of a body or a stream longer than the idle timeout.
    TimeoutError: Row(
        UpstreamTimeoutError,
        {
            Phase.HEADERS: "{name} sent no response headers in time",
            Phase.BODY: "{name}: the answer's body stalled",
            Phase.STREAM: "{name}: the stream stalled",
        },
    ),
    BodyTooLargeError: Row(UpstreamProtocolError, "{name} sent an answer larger than the plane accepts"),
    # The connection closed early, or carried bytes that are not HTTP/1.1.
    HTTPClientError: Row(UpstreamConnectError, _BROKE),
    OSError: Row(UpstreamConnectError, _BROKE),
    # Local mistakes: nothing was sent.
    InvalidURLError: Row(UpstreamConfigError, "{name} is misconfigured: its base URL is not a usable http(s) URL"),
    InvalidHeaderError: Row(
        UpstreamConfigError, "{name} is misconfigured: a header it sends (an API key?) cannot be sent as HTTP"
    ),
    ValueError: Row(UpstreamConfigError, "{name} is misconfigured"),
}
# What a provider's exchange with its upstream catches: exactly the table's classes.
TRANSPORT_FAILURES = tuple(TRANSPORT_ERRORS)


def transport_error(exc: Exception, phase: Phase, target_id: str, secrets: Iterable[str]) -> UpstreamError:
    """The plane's error for a transport error, by its most specific row; the caller raises it `from exc`. The
    tenant's message names the provider and what happened; the operator's detail adds the transport's own words
    (an address, the upstream's bytes), secrets masked."""
    row = next(TRANSPORT_ERRORS[cls] for cls in type(exc).__mro__ if cls in TRANSPORT_ERRORS)
    template = row.message if isinstance(row.message, str) else row.message[phase]
    message = template.format(name=f"provider '{target_id}'", reason=getattr(exc, "reason", ""))
    return row.error(message, detail=f"{target_id} ({phase.value}): {type(exc).__name__}: {exc}", secrets=secrets)


class UpstreamPool:
    """Owns the HTTP client every provider target shares (keep-alive pools per origin and egress settings)."""

    def __init__(self, *, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES) -> None:
        self._client: HTTPClient | None = None
        self.max_body_bytes = max_body_bytes
        # Misconfigurations logged already (provider, base URL, what is wrong): logged once, not per request.
        self._misconfigured: set[tuple[str, str, str]] = set()
        # Read when the plane starts, so that a proxy variable it cannot use stops the start, not a request.
        try:
            self.proxies = EnvironmentProxies.from_environ()
        except ValueError as exc:
            raise ConfigError(str(exc)) from None

    @property
    def client(self) -> HTTPClient:
        if self._client is None:
            # No cookie jar, no redirects: an upstream's cookies must never travel with another tenant's request.
            self._client = HTTPClient(limit_per_origin=256, proxies=self.proxies)
        return self._client

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()
            self._client = None

    def misconfigured(self, provider_id: str, base_url: str, error: UpstreamError) -> None:
        """Log a provider's misconfiguration the first time a request meets it; the requests after it fail over
        to the other targets, each recorded in its usage row (error code upstream_misconfigured)."""
        seen = (provider_id, base_url, error.message)
        if seen not in self._misconfigured:
            self._misconfigured.add(seen)
            log.error("%s (until an admin fixes it, its requests go to other targets): %s", error.message, error)


class ProviderTarget(Target):
    kind = "provider"

    def __init__(
        self,
        *,
        pool: UpstreamPool,
        health: Health,
        provider_id: str,
        name: str,
        base_url: str,
        api_keys: tuple[tuple[str, str], ...],
        upstream_model: str,
        price_in: float | None,
        price_out: float | None,
        policy: FailoverPolicy,
        continuation: ContinuationForm = DEFAULT_CONTINUATION,
        egress: Egress | None = None,
        responses: bool = False,
    ) -> None:
        self.pool = pool
        self.health = health
        self.provider_id = provider_id
        self.id = name
        self.key = f"{provider_id}/{upstream_model}"
        self.base_url = base_url.rstrip("/")
        self.api_keys = api_keys
        self.upstream_model = upstream_model
        self.price_in = price_in
        self.price_out = price_out
        self.policy = policy
        # Declared by the operator (`--continuation`): whether and how this provider continues a broken stream.
        self.continuation = continuation
        # Declared by the operator (`--responses`): /v1/responses requests are relayed to it as they are.
        self.speaks_responses = responses
        self._turn = itertools.count()
        # The provider's own proxy, CA file and client certificate; None (also for settings that set nothing)
        # shares the plane's pools.
        self.egress = egress if egress != Egress() else None
        # Parsed once: parsing a URL on every request showed in the profile.
        self._endpoints: dict[str, Endpoint] = {}

    def __repr__(self) -> str:
        return f"ProviderTarget({self.id!r}, model={self.upstream_model!r})"

    @property
    def name(self) -> str:
        """How tenants' error messages name this target: never by its address."""
        return f"provider '{self.id}'"

    @property
    def secrets(self) -> tuple[str, ...]:
        """What an upstream's text must never carry on to a tenant or a log: this provider's keys."""
        return tuple(secret for _, secret in self.api_keys)

    # -- credentials ------------------------------------------------------------------------------

    def _pick_key(self) -> tuple[str, str] | None:
        """The provider's keys in turn, skipping those resting after a 429 or 401 (unless all are)."""
        keys = self.api_keys
        if len(keys) <= 1:
            return keys[0] if keys else None
        start = next(self._turn)
        ring = [keys[(start + i) % len(keys)] for i in range(len(keys))]
        return next((k for k in ring if self.health.key_usable(k[0])), ring[0])

    def has_other_key(self, key_id: str | None) -> bool:
        return any(k != key_id and self.health.key_usable(k) for k, _ in self.api_keys)

    def rest_key(self, key_id: str | None, seconds: float) -> None:
        if key_id is not None:
            self.health.rest_key(key_id, seconds)

    # -- requests ---------------------------------------------------------------------------------

    def _body(self, call: Call, stream: bool) -> bytes:
        body: dict[str, Any] = {**call.body, "model": self.upstream_model}
        # A Responses stream always ends with its usage (in `response.completed`), and has no include_usage.
        if stream and call.endpoint != "responses":
            # Always ask for usage so the plane can account for the stream; the relay strips the usage chunk
            # again when the client did not ask for it.
            options = body.get("stream_options")
            body["stream_options"] = {**(options if isinstance(options, dict) else {}), "include_usage": True}
        return orjson.dumps(body)

    async def _post(self, call: Call, attempt: Attempt, stream: bool) -> Response:
        headers = [("Content-Type", "application/json"), ("X-Request-Id", call.request_id)]
        key = self._pick_key()
        if key is not None:
            attempt.key_id = key[0]
            headers.append(("Authorization", f"Bearer {key[1]}"))
        try:
            endpoint = self._endpoints.get(call.endpoint)
            if endpoint is None:
                endpoint = self._endpoints[call.endpoint] = Endpoint.parse(
                    f"{self.base_url}/{call.endpoint}", self.egress
                )
            response = await self.pool.client.post(
                endpoint,
                headers,
                self._body(call, stream),
                connect_timeout_s=self.policy.connect_timeout_s,
                header_timeout_s=self.policy.header_timeout_s,
            )
        except TRANSPORT_FAILURES as exc:
            error = transport_error(exc, Phase.HEADERS, self.id, self.secrets)
            if isinstance(error, UpstreamConfigError):
                self.pool.misconfigured(self.provider_id, self.base_url, error)
            raise error from exc
        if response.status != 200:
            try:
                body = await response.read(self.policy.header_timeout_s, limit=ERROR_BODY_BYTES)
            except (HTTPClientError, TimeoutError):
                body = b""
            finally:
                response.release()
            retry_after = response.headers.get("retry-after")
            raise UpstreamStatusError(
                response.status,
                body,
                headers={"Retry-After": retry_after} if retry_after else None,
                target=self.name,
                secrets=self.secrets,
            )
        return response

    async def complete(self, call: Call, attempt: Attempt) -> bytes:
        response = await self._post(call, attempt, stream=False)
        try:
            # A whole answer's body may pause for as long as its headers could take.
            return await response.read(self.policy.header_timeout_s, limit=self.pool.max_body_bytes)
        except TRANSPORT_FAILURES as exc:
            raise transport_error(exc, Phase.BODY, self.id, self.secrets) from exc
        finally:
            response.release()

    async def stream(self, call: Call, attempt: Attempt) -> TargetStream:
        response = await self._post(call, attempt, stream=True)
        content_type = response.headers.get("content-type", "")
        if not content_type.startswith("text/event-stream"):
            response.close()
            raise UpstreamProtocolError(
                f"{self.name} answered a stream request with no SSE stream",
                detail=f"{self.id}: expected an SSE stream, got {content_type or 'no type'}",
            )
        return ProviderStream(self.id, response, self.policy.idle_timeout_s, self.secrets)


# After a stream's [DONE], how long the end of its chunked body may take to arrive for its connection to be kept.
DRAIN_GRACE_S = 1.0


class ProviderStream(TargetStream):
    def __init__(
        self, target_id: str, response: Response, idle_timeout_s: float, secrets: tuple[str, ...] = ()
    ) -> None:
        self.target_id = target_id
        self.secrets = secrets
        self.response = response
        self.idle_timeout_s = idle_timeout_s
        # Whether the body ended cleanly: a Responses stream ends so, with no [DONE] (its closing event ends it).
        self.ended = False
        # One generator for the stream's life: it holds the SSE parser's buffer between iterations.
        self._batches = self._read()

    def __aiter__(self) -> AsyncIterator[list[bytes]]:
        return self._batches

    async def _read(self) -> AsyncGenerator[list[bytes], None]:
        events = sse.EventSplitter()
        try:
            async for data in self.response.chunks(self.idle_timeout_s):
                batch = events.feed(data)
                if batch and (batch := self._until_done(batch)):
                    yield batch
                if self.done:
                    return
            self.ended = True
            batch = self._until_done(events.end())
            if batch:
                yield batch
        except TRANSPORT_FAILURES as exc:
            raise transport_error(exc, Phase.STREAM, self.target_id, self.secrets) from exc

    def _until_done(self, batch: list[bytes]) -> list[bytes]:
        """The batch up to the upstream's `[DONE]`, if it holds it (nothing after it counts)."""
        if sse.DONE in batch:
            self.done = True
            return batch[: batch.index(sse.DONE)]
        return batch

    async def aclose(self) -> None:
        await self._batches.aclose()
        if self.done or self.ended:
            self.response.finish(DRAIN_GRACE_S)
        else:
            # An unfinished stream must not go back to the pool half-read; closing also tells the upstream
            # to stop generating.
            self.response.close()
