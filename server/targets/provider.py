"""Upstream OpenAI-compatible providers as targets, over one pooled aiohttp session."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

import aiohttp
import orjson
from yarl import URL

from server import sse
from server.errors import (
    UpstreamConnectError,
    UpstreamProtocolError,
    UpstreamRefusedError,
    UpstreamStatusError,
    UpstreamTimeoutError,
)
from server.failover import FailoverPolicy
from server.health import Health
from server.targets.base import Attempt, Call, Target, TargetStream


class UpstreamPool:
    """Owns the HTTP client session every provider target shares (keep-alive pools per host)."""

    def __init__(self) -> None:
        self._session: aiohttp.ClientSession | None = None

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            connector = aiohttp.TCPConnector(limit=0, limit_per_host=256, ttl_dns_cache=300)
            self._session = aiohttp.ClientSession(
                connector=connector,
                # Per-request deadlines come from each target's policy; the session has none of its own.
                timeout=aiohttp.ClientTimeout(total=None),
                skip_auto_headers=("User-Agent",),
                # Cookies an upstream sets (a CDN's, say) must never travel with another tenant's request; and
                # a jar costs a lookup and an update on every request.
                cookie_jar=aiohttp.DummyCookieJar(),
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
        health: Health,
        provider_id: str,
        name: str,
        base_url: str,
        api_keys: tuple[tuple[str, str], ...],
        upstream_model: str,
        price_in: float | None,
        price_out: float | None,
        policy: FailoverPolicy,
        prefill: str = "auto",
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
        self.prefill = prefill
        self._turn = itertools.count()
        # Built once: parsing a URL and building timeouts on every request showed in the profile.
        self._urls: dict[str, URL] = {}
        self._timeouts = {
            stream: aiohttp.ClientTimeout(
                total=None,
                sock_connect=policy.connect_timeout_s,
                # Between two reads of a stream: the stall detector. For a whole answer: the header deadline.
                sock_read=policy.idle_timeout_s if stream else policy.header_timeout_s,
            )
            for stream in (False, True)
        }

    def __repr__(self) -> str:
        return f"ProviderTarget({self.id!r}, model={self.upstream_model!r})"

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

    # -- prefill capability -----------------------------------------------------------------------

    def accepts_prefill(self) -> bool | None:
        if self.prefill != "auto":
            return self.prefill == "yes"
        return self.health.prefill.get(self.provider_id)

    def learn_prefill(self, accepted: bool) -> None:
        if self.prefill == "auto":
            self.health.prefill[self.provider_id] = accepted

    # -- requests ---------------------------------------------------------------------------------

    def _body(self, call: Call, stream: bool) -> bytes:
        body: dict[str, Any] = {**call.body, "model": self.upstream_model}
        if stream:
            # Always ask for usage so the plane can account for the stream; the relay strips the usage chunk
            # again when the client did not ask for it.
            options = body.get("stream_options")
            body["stream_options"] = {**(options if isinstance(options, dict) else {}), "include_usage": True}
        return orjson.dumps(body)

    async def _post(self, call: Call, attempt: Attempt, stream: bool) -> aiohttp.ClientResponse:
        headers = {"Content-Type": "application/json", "X-Request-Id": call.request_id}
        key = self._pick_key()
        if key is not None:
            attempt.key_id = key[0]
            headers["Authorization"] = f"Bearer {key[1]}"
        url = self._urls.get(call.endpoint)
        if url is None:
            url = self._urls[call.endpoint] = URL(f"{self.base_url}/{call.endpoint}")
        request = self.pool.session.post(
            url, data=self._body(call, stream), headers=headers, timeout=self._timeouts[stream]
        )
        try:
            if stream:
                # A stream's read timeout is the idle one, so the header deadline needs its own timer; a whole
                # answer's read timeout already is the header deadline.
                async with asyncio.timeout(self.policy.header_timeout_s):
                    response = await request
            else:
                response = await request
        except TimeoutError as exc:
            raise UpstreamTimeoutError(f"{self.id}: no response headers in time") from exc
        except aiohttp.ClientConnectorError as exc:
            raise UpstreamRefusedError(f"{self.id}: cannot connect: {exc}") from exc
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

    async def complete(self, call: Call, attempt: Attempt) -> bytes:
        response = await self._post(call, attempt, stream=False)
        try:
            return await response.read()
        except TimeoutError as exc:
            raise UpstreamTimeoutError(f"{self.id}: response body stalled") from exc
        except aiohttp.ClientError as exc:
            raise UpstreamConnectError(f"{self.id}: body cut: {exc}") from exc
        finally:
            response.release()

    async def stream(self, call: Call, attempt: Attempt) -> TargetStream:
        response = await self._post(call, attempt, stream=True)
        content_type = response.headers.get("Content-Type", "")
        if not content_type.startswith("text/event-stream"):
            response.close()
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
            async for batch in sse.iter_batches(self.response.content.iter_any()):
                for index, data in enumerate(batch):
                    if data == sse.DONE:
                        self.done = True
                        self.pending = 0
                        return
                    self.pending = len(batch) - index - 1
                    yield data
        except TimeoutError as exc:
            raise UpstreamTimeoutError(f"{self.target_id}: stream stalled") from exc
        except aiohttp.ClientError as exc:
            raise UpstreamConnectError(f"{self.target_id}: stream cut: {exc}") from exc

    async def aclose(self) -> None:
        await self._payloads.aclose()
        if not self.done:
            # An unfinished stream must not go back to the pool half-read; closing also tells the upstream
            # to stop generating.
            self.response.close()
        self.response.release()
