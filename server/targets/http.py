"""The HTTP/1.1 client the plane talks to upstream providers with: keep-alive pools per origin, a request in one
write, answers parsed by llhttp (httptools, the parser uvicorn uses).

Why not aiohttp's ClientSession, which the plane used before: every relayed request went through its general
machinery (cookies, redirects, auth, tracing, multipart, compression, a CIMultiDict per request), about a quarter
of the plane's own CPU per request in the profile. An OpenAI-compatible upstream needs much less: a POST with a
JSON body, an answer delimited by Content-Length, chunks or the end of the connection, TLS, and timeouts.

Timeouts are per wait, on the connection's single timer: `connect_timeout_s` for opening a connection,
`header_timeout_s` until the status line and headers, and a caller's `idle_timeout_s` between two reads of the
body. A connection goes back to its pool only when its answer was read to the end and both sides allow
keep-alive (or, after `Response.finish`, once that end arrives); everything else (an error, a cancelled wait,
an abandoned answer) closes it.

Pools are per origin and egress settings (server.targets.egress): a provider's proxy, CA file and client
certificate, or the environment's proxies, decided when the pool is made. A pool reached through a proxy opens its
connections through a CONNECT tunnel (https) or sends absolute-form requests to the proxy (http); a direct pool's
requests cost exactly what they did before proxies existed.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import time
from collections import deque
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import NoReturn, cast
from urllib.parse import urlsplit

import httptools

from server.routing.waiters import Waiters
from server.targets.egress import (
    Egress,
    EnvironmentProxies,
    Proxy,
    TLSContexts,
    TLSSettingsError,
    TunnelRefusedError,
    authority,
    choose_proxy,
    open_tunnel,
)


class HTTPClientError(Exception):
    """The upstream could not be talked to as HTTP/1.1."""


class ConnectError(HTTPClientError):
    """No connection: refused, unreachable, a name that does not resolve, a TLS handshake that failed.

    `reason` says which in a few words and names no address: it is what a tenant may be told."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


class DisconnectedError(HTTPClientError):
    """The connection closed before the answer was complete."""


class ProtocolError(HTTPClientError):
    """The upstream's bytes are not a valid HTTP/1.1 answer."""


class BodyTooLargeError(ProtocolError):
    """The answer's body is larger than the reader allows (`Response.read`'s `limit`)."""


class LocalRequestError(ValueError):
    """A request the client cannot send as it was asked to: the caller's mistake, not the upstream's (nothing was
    sent). Its message never holds a header's value, which may be a credential."""


class InvalidURLError(LocalRequestError):
    """A URL the client cannot use: not http(s), without a host, a port that is not one, a host that is not ASCII."""


class InvalidHeaderError(LocalRequestError):
    """A header value that cannot go on the wire: a line break in it, or a character latin-1 cannot encode."""


# An answer's body is read ahead up to this much while nobody consumes it; then the socket is paused.
READ_AHEAD_BYTES = 256 * 1024
# Status line plus headers, at most: an upstream that sends more is not one we want to talk to.
MAX_HEAD_BYTES = 64 * 1024


@dataclass(frozen=True)
class Origin:
    """Where connections go, and how: requests to one origin with other egress settings use other connections."""

    scheme: str
    host: str
    port: int
    # None: the plane's (the environment's proxies, the system's CAs).
    egress: Egress | None = None


@dataclass(frozen=True)
class Endpoint:
    """A URL parsed once: its origin, and the first lines of every request to it up to the per-request headers."""

    origin: Origin
    head: bytes

    @classmethod
    def parse(cls, url: str, egress: Egress | None = None) -> Endpoint:
        """Raises InvalidURLError for a URL the client cannot use."""
        try:
            parts = urlsplit(url)
            explicit_port = parts.port  # raises for a port that is not a number or out of range
        except ValueError as exc:
            raise InvalidURLError(f"not a usable URL: {url!r} ({exc})") from None
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise InvalidURLError(f"not an http(s) URL: {url!r}")
        default_port = 443 if parts.scheme == "https" else 80
        port = explicit_port or default_port
        host = parts.hostname
        host_header = f"[{host}]" if ":" in host else host
        if port != default_port:
            host_header += f":{port}"
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        # No Accept-Encoding: the body is relayed to the client byte for byte, so it must arrive uncompressed.
        head = f"POST {target} HTTP/1.1\r\nHost: {host_header}\r\nAccept-Encoding: identity\r\n"
        try:
            encoded = head.encode("ascii")
        except UnicodeEncodeError:
            raise InvalidURLError(f"a host or path that is not ASCII (not IDNA- or percent-encoded): {url!r}") from None
        return cls(Origin(parts.scheme, host, port, egress), encoded)


class Response:
    """An answer whose status and headers are in; its body is read with `read` or `chunks`.

    Headers are kept by lower-case name (a repeated header keeps its last value: none that the plane reads
    is meaningful repeated)."""

    def __init__(self, connection: _Connection, status: int, headers: dict[str, str]) -> None:
        self._connection = connection
        self.status = status
        self.headers = headers
        self._done = False

    async def read(self, idle_timeout_s: float | None, limit: int | None = None) -> bytes:
        """The whole body; past `limit` bytes the connection is closed and BodyTooLargeError raised, so that an
        upstream cannot make the plane hold more than that (plus the read-ahead) for one answer."""
        connection = self._connection
        declared = self.headers.get("content-length", "")
        if limit is not None and declared.isdigit() and int(declared) > limit:
            self._too_large(f"declares {declared}", limit)
        parts: list[bytes] = []
        size = 0
        while not connection.complete:
            if connection.buffered > READ_AHEAD_BYTES:
                parts.append(connection.take())  # which resumes a socket paused for the read-ahead bound
                size += len(parts[-1])
                if limit is not None and size > limit:
                    self._too_large(f"sent more than {size}", limit)
            await connection.wait(idle_timeout_s)
        parts.append(connection.take())
        if limit is not None and size + len(parts[-1]) > limit:
            self._too_large(f"sent {size + len(parts[-1])}", limit)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def _too_large(self, how: str, limit: int) -> NoReturn:
        self.close()
        raise BodyTooLargeError(f"the answer's body {how} bytes; the limit is {limit}")

    async def chunks(self, idle_timeout_s: float | None) -> AsyncIterator[bytes]:
        """The body as it arrives: whatever was read since the last step, joined."""
        connection = self._connection
        while True:
            if connection.buffered:
                yield connection.take()
            elif connection.complete:
                return
            else:
                await connection.wait(idle_timeout_s)

    def release(self) -> None:
        """Done with this answer: its connection goes back to the pool if it was read to the end, else closes."""
        if not self._done:
            self._done = True
            self._connection.release()

    def close(self) -> None:
        """Done with this answer, and its connection closes whatever its state (it tells the upstream to stop)."""
        self._done = True
        self._connection.discard()

    def finish(self, grace_s: float) -> None:
        """Done with an answer whose content is all in though the end of its body may not be (a stream's last
        event read, its chunked body's terminator still on the way): the connection goes back to the pool if
        that end arrives within `grace_s`, and closes otherwise. Closing it at once would cost the next request
        a new connection (a TLS handshake, with a real provider)."""
        if not self._done:
            self._done = True
            self._connection.drain(grace_s)


class _Connection(asyncio.Protocol):
    """One keep-alive connection: parses what arrives and wakes whoever waits for it."""

    def __init__(self, pool: _Pool) -> None:
        self.pool = pool
        self.loop = pool.loop
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.closed = False
        # Lent to a request (counted in the pool's `busy`), or idle since `idle_since`.
        self.lent = False
        self.idle_since = 0.0
        self._waiter: asyncio.Future[None] | None = None
        self._reset()

    def _reset(self) -> None:
        self.headers: dict[str, str] = {}
        self.head_bytes = 0
        self.status = 0
        self.headers_done = False
        self.complete = False
        self.keep_alive = False
        self.error: HTTPClientError | None = None
        self.body: list[bytes] = []
        self.buffered = 0
        self.paused = False
        # Set while the rest of an answer nobody reads any more is awaited (see Response.finish).
        self.draining: asyncio.TimerHandle | None = None

    # -- asyncio.Protocol ---------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A stream transport (uvloop's do not subclass asyncio.Transport, so no isinstance check).
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(ProtocolError(f"malformed answer: {exc}"))
        except HTTPClientError as exc:  # raised by a callback below
            self._fail(exc)

    def eof_received(self) -> bool:
        return False  # close our side too; connection_lost settles the answer

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.pool.forget(self)
        if self.draining is not None:
            self.draining.cancel()
            self.draining = None
            self.pool.done_with(self)
        if not self.complete and self.error is None:
            if self.headers_done and self._delimited_by_close():
                self.complete = True
            else:
                reason = f": {exc}" if exc else ""
                where = "while sending the body" if self.headers_done else "before the answer's headers"
                self.error = DisconnectedError(f"the upstream closed the connection {where}{reason}")
        self._wake()

    def pause_writing(self) -> None:
        pass  # the request is one write of a bounded body; the transport buffers it

    def resume_writing(self) -> None:
        pass

    # -- httptools callbacks ------------------------------------------------------------------------

    def on_header(self, name: bytes, value: bytes) -> None:
        self.head_bytes += len(name) + len(value)
        if self.head_bytes > MAX_HEAD_BYTES:
            raise ProtocolError(f"answer headers larger than {MAX_HEAD_BYTES} bytes")
        self.headers[name.decode("latin-1").lower()] = value.decode("latin-1")

    def on_headers_complete(self) -> None:
        self.status = self.parser.get_status_code()
        self.headers_done = True
        self._wake()

    def on_body(self, body: bytes) -> None:
        if self.draining is not None:
            return  # nobody reads it
        self.body.append(body)
        self.buffered += len(body)
        if self.buffered > READ_AHEAD_BYTES and not self.paused and self.transport is not None:
            self.paused = True
            self.transport.pause_reading()
        self._wake()

    def on_message_complete(self) -> None:
        self.complete = True
        self.keep_alive = self.parser.should_keep_alive()
        if self.draining is not None:
            self.draining.cancel()
            self.draining = None
            self.release()
        self._wake()

    # -- used by the pool and the response ----------------------------------------------------------

    def _delimited_by_close(self) -> bool:
        """An answer with neither Content-Length nor chunked encoding ends where the connection does."""
        return "content-length" not in self.headers and "chunked" not in self.headers.get("transfer-encoding", "")

    def _fail(self, error: HTTPClientError) -> None:
        if self.error is None:
            self.error = error
        self.close()
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def wait(self, timeout_s: float | None) -> None:
        """Until something arrives (or the connection ends); raises the connection's error, or TimeoutError."""
        if self.error is not None:
            raise self.error
        if self.closed and not self.complete:
            raise DisconnectedError("the connection is closed")
        waiter = self._waiter = self.loop.create_future()
        timer = self.loop.call_later(timeout_s, _expire, waiter) if timeout_s is not None else None
        try:
            await waiter
        except BaseException:
            # A wait given up (timeout, cancellation) leaves the answer half-read: never reuse the connection.
            self.close()
            raise
        finally:
            self._waiter = None
            if timer is not None:
                timer.cancel()
        if self.error is not None:
            raise self.error

    def send(self, data: bytes) -> None:
        assert self.transport is not None
        self._reset()
        self.transport.write(data)

    def take(self) -> bytes:
        data = self.body[0] if len(self.body) == 1 else b"".join(self.body)
        self.body = []
        self.buffered = 0
        if self.paused and self.transport is not None:
            self.paused = False
            self.transport.resume_reading()
        return data

    def release(self) -> None:
        if self.complete and self.keep_alive and self.error is None and not self.closed and not self.buffered:
            self.pool.put_back(self)
        else:
            self.discard()

    def discard(self) -> None:
        self.close()
        self.pool.done_with(self)

    def drain(self, grace_s: float) -> None:
        self.body = []
        self.buffered = 0
        if self.complete or self.closed or self.error is not None:
            self.release()
            return
        if self.paused and self.transport is not None:
            self.paused = False
            self.transport.resume_reading()
        self.draining = self.loop.call_later(grace_s, self._drain_expired)

    def _drain_expired(self) -> None:
        self.draining = None
        self.discard()

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            if self.transport is not None:
                self.transport.close()


def _reason(exc: Exception, proxy: Proxy | None) -> str:
    """What kept a connection from opening, in words that name no address."""
    if isinstance(exc, TLSSettingsError):
        return "TLS settings unusable"
    if isinstance(exc, TunnelRefusedError):
        return f"the proxy refused the tunnel: {exc.status}"
    if isinstance(exc, ssl.SSLError):
        return "TLS handshake failed"
    # Through a proxy, only the proxy's own address is resolved and connected to here.
    where = "proxy: " if proxy is not None else ""
    if isinstance(exc, socket.gaierror):
        return f"{where}name does not resolve"
    if isinstance(exc, ConnectionRefusedError):
        return f"{where}connection refused"
    return f"{where}cannot connect"


def _expire(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_exception(TimeoutError())


class _Pool:
    """The connections to one origin (with one set of egress settings): idle ones newest first, and how many are
    lent out."""

    def __init__(self, client: HTTPClient, origin: Origin) -> None:
        self.client = client
        self.origin = origin
        self.loop = asyncio.get_running_loop()
        self.idle: deque[_Connection] = deque()
        self.busy = 0
        self.waiting = Waiters()
        self.proxy = choose_proxy(client.proxies, origin.egress, origin.scheme, origin.host, origin.port)
        # Set for an http origin reached through a proxy: each request names the origin in full (absolute form)
        # and carries the proxy's credentials; None keeps a direct or tunnelled request as its endpoint made it.
        self.forward: dict[bytes, bytes] | None = {} if self.proxy is not None and origin.scheme == "http" else None

    def forwarded(self, head: bytes) -> bytes:
        """An endpoint's first lines in absolute form, made once per endpoint."""
        assert self.forward is not None and self.proxy is not None
        rewritten = self.forward.get(head)
        if rewritten is None:
            origin = self.origin
            host = authority(origin.host, origin.port).removesuffix(":80")
            credentials = self.proxy.authorization
            # The endpoint's head starts with `POST /`: the origin goes between the two.
            rewritten = b"POST http://" + host.encode("ascii") + head[5:]
            if credentials:
                rewritten += f"Proxy-Authorization: {credentials}\r\n".encode("latin-1")
            self.forward[head] = rewritten
        return rewritten

    async def acquire(self, connect_timeout_s: float | None) -> _Connection:
        while True:
            now = time.monotonic()
            while self.idle:
                connection = self.idle.pop()
                if connection.closed or now - connection.idle_since > self.client.keepalive_s:
                    connection.close()
                    continue
                return self._lend(connection)
            if self.busy < self.client.limit_per_origin:
                break
            # Every connection is lent out: wait for one to come back (or to close, freeing its place).
            await self.waiting.wait()
        self.busy += 1
        try:
            connection = await self._connect(connect_timeout_s)
        except BaseException:
            self.busy -= 1
            self.waiting.wake_one()
            raise
        connection.lent = True
        return connection

    def _lend(self, connection: _Connection) -> _Connection:
        self.busy += 1
        connection.lent = True
        return connection

    async def _connect(self, timeout_s: float | None) -> _Connection:
        origin, proxy = self.origin, self.proxy
        try:
            tls = self.client.tls.get(origin.egress) if origin.scheme == "https" else None
            # One timeout for all of it: the proxy's CONNECT answer and the TLS handshake are part of connecting.
            async with asyncio.timeout(timeout_s):
                if proxy is None:
                    _, connection = await self.loop.create_connection(
                        lambda: _Connection(self),
                        origin.host,
                        origin.port,
                        ssl=tls,
                        server_hostname=origin.host if tls else None,
                    )
                elif tls is None:
                    _, connection = await self.loop.create_connection(lambda: _Connection(self), proxy.host, proxy.port)
                else:
                    connection = await self._tunnel(proxy, tls)
        except TimeoutError:
            raise  # an OSError too, but the caller tells a timeout from a refusal
        except (OSError, ssl.SSLError, TLSSettingsError) as exc:
            via = f" through the proxy {proxy.address}" if proxy is not None else ""
            raise ConnectError(
                f"cannot connect to {origin.host}:{origin.port}{via}: {exc}", _reason(exc, proxy)
            ) from exc
        return connection

    async def _tunnel(self, proxy: Proxy, tls: ssl.SSLContext) -> _Connection:
        """A connection through the proxy's CONNECT tunnel, TLS end to end with the origin inside it."""
        raw = await open_tunnel(self.loop, proxy, self.origin.host, self.origin.port)
        connection = _Connection(self)
        try:
            transport = await self.loop.start_tls(raw, connection, tls, server_hostname=self.origin.host)
        except BaseException:
            raw.close()
            raise
        if transport is None:  # the loop says so when the connection closed during the handshake
            raise ConnectionResetError("the connection closed during the TLS handshake")
        # start_tls hands the protocol its new transport without calling connection_made.
        connection.connection_made(transport)
        return connection

    def put_back(self, connection: _Connection) -> None:
        connection.idle_since = time.monotonic()
        self.idle.append(connection)
        self.done_with(connection)

    def done_with(self, connection: _Connection) -> None:
        """A lent connection came back (to the idle list, or closed): its place is free."""
        if connection.lent:
            connection.lent = False
            self.busy -= 1
            self.waiting.wake_one()

    def forget(self, connection: _Connection) -> None:
        """A connection closed: drop it from the idle list (a lent one is accounted when released)."""
        if connection in self.idle:
            self.idle.remove(connection)

    def close(self) -> None:
        while self.idle:
            self.idle.pop().close()


class HTTPClient:
    """Pools of keep-alive connections per origin, shared by every provider target."""

    def __init__(
        self,
        *,
        limit_per_origin: int = 256,
        keepalive_s: float = 15.0,
        tls: ssl.SSLContext | None = None,
        proxies: EnvironmentProxies | None = None,
    ) -> None:
        self.limit_per_origin = limit_per_origin
        # Idle connections older than this are not reused: servers close theirs after 5 to 75 s of quiet, and a
        # request written on a connection the server is closing fails for nothing.
        self.keepalive_s = keepalive_s
        self._pools: dict[Origin, _Pool] = {}
        # Certificates are verified against the system's CAs (SSL_CERT_FILE / SSL_CERT_DIR apply) unless a context
        # is given or a provider names its own CA file; built on first use, as a plane that serves only from nodes
        # never needs one.
        self.tls = TLSContexts(tls)
        # Read once: HTTPS_PROXY, HTTP_PROXY, ALL_PROXY and NO_PROXY (raises ValueError naming a bad variable).
        self.proxies = EnvironmentProxies.from_environ() if proxies is None else proxies

    async def post(
        self,
        endpoint: Endpoint,
        headers: Sequence[tuple[str, str]],
        body: bytes,
        *,
        connect_timeout_s: float | None,
        header_timeout_s: float | None,
    ) -> Response:
        """Send a POST and wait for the answer's status and headers."""
        pool = self._pools.get(endpoint.origin)
        if pool is None:
            pool = self._pools[endpoint.origin] = _Pool(self, endpoint.origin)
        head = [endpoint.head if pool.forward is None else pool.forwarded(endpoint.head)]
        for name, value in headers:
            if "\r" in value or "\n" in value:
                raise InvalidHeaderError(f"header {name} holds a line break")
            try:
                head.append(f"{name}: {value}\r\n".encode("latin-1"))
            except UnicodeEncodeError:
                raise InvalidHeaderError(f"header {name} holds a character latin-1 cannot encode") from None
        head.append(b"Content-Length: %d\r\n\r\n" % len(body))
        connection = await pool.acquire(connect_timeout_s)
        try:
            connection.send(b"".join(head) + body)
            # The first wait covers the status line and headers: one timer for all of them.
            deadline = None if header_timeout_s is None else time.monotonic() + header_timeout_s
            while not connection.headers_done:
                left = None if deadline is None else max(0.0, deadline - time.monotonic())
                await connection.wait(left)
        except BaseException:
            connection.discard()
            raise
        return Response(connection, connection.status, connection.headers)

    async def close(self) -> None:
        for pool in self._pools.values():
            pool.close()
        self._pools.clear()
