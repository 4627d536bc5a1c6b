"""Upstream OpenAI-compatible providers as targets, over one pooled aiohttp session."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

import aiohttp
import orjson

from server import sse
from server.errors import (
    UpstreamConnectError,
    UpstreamProtocolError,
    UpstreamStatusError,
    UpstreamTimeoutError,
)
from server.targets.base import Call, Target, TargetStream


class UpstreamPool:
    """Owns the HTTP client session every provider target shares (keep-alive pools per host)."""

    def __init__(self, connect_timeout_s: float, header_timeout_s: float, stream_idle_timeout_s: float) -> None:
        self.connect_timeout_s = connect_timeout_s
        self.header_timeout_s = header_timeout_s
        self.stream_idle_timeout_s = stream_idle_timeout_s
        self._session: aiohttp.ClientSession | None = None

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            connector = aiohttp.TCPConnector(limit=0, limit_per_host=256, ttl_dns_cache=300)
            self._session = aiohttp.ClientSession(
                connector=connector,
                # Per-request deadlines are set in `ProviderTarget._post`; the session has none of its own.
                timeout=aiohttp.ClientTimeout(total=None),
                skip_auto_headers=("User-Agent",),
            )
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


class ProviderTarget(Target):
    kind = "provider"

    def __init__(
        self,
        *,
        pool: UpstreamPool,
        provider_id: str,
        name: str,
        base_url: str,
        api_keys: tuple[str, ...],
        upstream_model: str,
        price_in: float | None,
        price_out: float | None,
    ) -> None:
        self.pool = pool
        self.provider_id = provider_id
        self.id = name
        self.base_url = base_url.rstrip("/")
        self.api_keys = api_keys
        self.upstream_model = upstream_model
        self.price_in = price_in
        self.price_out = price_out
        # Spread requests over the provider's keys in turn.
        self._key_cycle = itertools.cycle(api_keys) if api_keys else None

    def __repr__(self) -> str:
        return f"ProviderTarget({self.id!r}, model={self.upstream_model!r})"

    def _body(self, call: Call, stream: bool) -> bytes:
        body: dict[str, Any] = {**call.body, "model": self.upstream_model}
        if stream:
            # Always ask for usage so the plane can account for the stream; the relay strips the usage chunk
            # again when the client did not ask for it.
            options = body.get("stream_options")
            body["stream_options"] = {**(options if isinstance(options, dict) else {}), "include_usage": True}
        return orjson.dumps(body)

    def _headers(self, call: Call) -> dict[str, str]:
        headers = {"Content-Type": "application/json", "X-Request-Id": call.request_id}
        if self._key_cycle is not None:
            headers["Authorization"] = f"Bearer {next(self._key_cycle)}"
        return headers

    async def _post(self, call: Call, stream: bool) -> aiohttp.ClientResponse:
        url = f"{self.base_url}/{call.endpoint}"
        timeout = aiohttp.ClientTimeout(
            total=None,
            sock_connect=self.pool.connect_timeout_s,
            # Between two reads of a stream: the stall detector. For a whole answer: the header deadline.
            sock_read=self.pool.stream_idle_timeout_s if stream else self.pool.header_timeout_s,
        )
        try:
            async with asyncio.timeout(self.pool.header_timeout_s):
                response = await self.pool.session.post(
                    url, data=self._body(call, stream), headers=self._headers(call), timeout=timeout
                )
        except TimeoutError as exc:
            raise UpstreamTimeoutError(f"{self.id}: no response headers in time") from exc
        except aiohttp.ClientError as exc:
            raise UpstreamConnectError(f"{self.id}: {type(exc).__name__}: {exc}") from exc
        if response.status != 200:
            try:
                body = await response.read()
            except (aiohttp.ClientError, TimeoutError):
                body = b""
            finally:
                response.release()
            retry_after = response.headers.get("Retry-After")
            raise UpstreamStatusError(
                response.status, body, headers={"Retry-After": retry_after} if retry_after else None
            )
        return response

    async def complete(self, call: Call) -> bytes:
        response = await self._post(call, stream=False)
        try:
            body = await response.read()
        except TimeoutError as exc:
            raise UpstreamTimeoutError(f"{self.id}: response body stalled") from exc
        except aiohttp.ClientError as exc:
            raise UpstreamConnectError(f"{self.id}: body cut: {exc}") from exc
        finally:
            response.release()
        return body

    async def stream(self, call: Call) -> TargetStream:
        response = await self._post(call, stream=True)
        content_type = response.headers.get("Content-Type", "")
        if not content_type.startswith("text/event-stream"):
            response.release()
            raise UpstreamProtocolError(f"{self.id}: expected an SSE stream, got {content_type or 'no type'}")
        return ProviderStream(self.id, response)


class ProviderStream(TargetStream):
    def __init__(self, target_id: str, response: aiohttp.ClientResponse) -> None:
        self.target_id = target_id
        self.response = response
        # One generator for the stream's life: it holds the SSE parser's buffer between iterations.
        self._payloads = self._read()

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._payloads

    async def _read(self) -> AsyncGenerator[bytes, None]:
        try:
            async for data in sse.iter_data(self.response.content.iter_any()):
                if data == sse.DONE:
                    self.done = True
                    return
                yield data
        except TimeoutError as exc:
            raise UpstreamTimeoutError(f"{self.target_id}: stream stalled") from exc
        except aiohttp.ClientError as exc:
            raise UpstreamConnectError(f"{self.target_id}: stream cut: {exc}") from exc
        finally:
            self.response.release()

    async def aclose(self) -> None:
        await self._payloads.aclose()
        if not self.done:
            # An unfinished stream must not go back to the pool half-read.
            self.response.close()
        self.response.release()
