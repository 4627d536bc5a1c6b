"""Client connections: what one may cost the plane, and what a malformed one is told.

`Connection` is aiohttp's request handler (the protocol of one client connection) with what a public endpoint
needs and aiohttp does not do by itself:

- read timeouts: a request's headers must arrive within `header_read_timeout_s` of the connection opening or
  of the request's first byte; a body may not stall longer than `body_read_timeout_s`, nor take longer than
  `body_read_deadline_s` in all. aiohttp has only a keep-alive timeout, and a client trickling a request
  (slowloris) held a connection open for as long as it liked. An idle keep-alive connection is aiohttp's:
  it closes after `keepalive_timeout_s`.
- protocol errors (a malformed request line, a URL or header too long, a body whose framing is invalid, both
  Content-Length and Transfer-Encoding) are answered in the OpenAI envelope, where aiohttp answers text/plain.
- no request bytes in the log: aiohttp logs each protocol error with a traceback whose message quotes the
  offending line (the `Authorization` header included) and, for an oversized line, its first 100 bytes.
  Here a protocol error makes at most one bounded line per second (`ProtocolErrorLog`), with no request bytes,
  and a count of those not logged.

`Connections` builds each connection's protocol and enforces the timeouts: one task looks at every connection a
few times per timeout, rather than a timer per connection re-armed on every read.

    Connection phase         ends when                          bound
    waiting for a head       the handler starts                 header_read_timeout_s: 408, close
    reading the body         the body is complete               body_read_timeout_s / _deadline_s: 408, close
    handling                 the handler returns                the request's own deadlines
    idle (keep-alive)        the next request's first byte      keepalive_timeout_s (aiohttp's): close
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass

from aiohttp import http_exceptions, web, web_protocol, web_request, web_server
from aiohttp.streams import StreamReader
from prometheus_client import Counter

from server.errors import HatchwayError, InternalError, InvalidRequestError, RequestTimeoutError
from server.redact import bounded
from server.serving.acceptor import refusal

log = logging.getLogger(__name__)

# The longest request line's URL and the longest header line aiohttp reads. Different on purpose: aiohttp
# raises the same LineTooLong for both, and its limit tells which was too long (414 or 431).
MAX_URL_BYTES = 8192
MAX_FIELD_BYTES = 8190
# How long a connection whose body timed out may take to answer its 408 before it is closed regardless.
TIMED_OUT_GRACE_S = 5.0
# What of an aiohttp/llhttp error description may be quoted: its fixed words, never the request's bytes.
_SAFE_DESCRIPTION = re.compile(r"[A-Za-z][A-Za-z0-9 ,'()\-]{0,79}")


@dataclass(frozen=True)
class ConnectionLimits:
    """The bounds of one client connection (server.config documents each; 0 turns a timeout off)."""

    header_timeout_s: float = 10.0
    body_timeout_s: float = 30.0
    body_deadline_s: float = 300.0
    keepalive_timeout_s: float = 75.0

    @property
    def tick_s(self) -> float:
        """How often the watchdog looks: a few times per the shortest timeout, at most once a second."""
        timeouts = [t for t in (self.header_timeout_s, self.body_timeout_s, self.body_deadline_s) if t > 0]
        return max(0.05, min([1.0, *(t / 4 for t in timeouts)]))


class ProtocolErrorLog:
    """Logs protocol errors as one bounded line at most every `interval_s`, counting those it leaves out.

    A hostile client can send malformed requests as fast as the plane reads them: each costs a counter
    increment here, never a line of its own."""

    def __init__(self, counter: Counter, *, interval_s: float = 1.0, logger: logging.Logger = log) -> None:
        self.counter = counter
        self.interval_s = interval_s
        self.logger = logger
        self.suppressed = 0
        self._next_at = 0.0

    def report(self, peer: str | None, status: int, what: str) -> None:
        self.counter.labels(str(status)).inc()
        now = time.monotonic()
        if now < self._next_at:
            self.suppressed += 1
            return
        self._next_at = now + self.interval_s
        self.logger.warning(
            "malformed HTTP request from %s answered %d: %s%s",
            bounded(peer or "unknown", 64),
            status,
            what,
            self._more(),
        )

    def flush(self) -> None:
        """Log the count of errors left out since the last line, once the interval allows (the watchdog calls)."""
        if self.suppressed and time.monotonic() >= self._next_at:
            self._next_at = time.monotonic() + self.interval_s
            self.logger.warning("malformed HTTP requests: %s", self._more().strip(" ()"))

    def _more(self) -> str:
        count, self.suppressed = self.suppressed, 0
        return f" ({count} more since the last such line)" if count else ""


class Connection(web_protocol.RequestHandler):
    """One client connection: aiohttp's protocol, with read timeouts and protocol errors in the envelope.

    Parameters: `owner`, the plane's `Connections`; `on_lost`, called once when the connection is gone (the
    acceptor's count of connections per address)."""

    __slots__ = (
        "body",
        "body_progress_at",
        "body_seen",
        "body_started",
        "body_timed_out_at",
        "head_heard",
        "head_overdue",
        "head_since",
        "leftover",
        "on_lost",
        "owner",
        "serving",
    )

    def __init__(self, owner: Connections, on_lost: Callable[[], None] | None = None) -> None:
        super().__init__(
            owner.server,
            loop=owner.loop,
            keepalive_timeout=owner.limits.keepalive_timeout_s,
            access_log=None,  # type: ignore[arg-type]  # aiohttp takes None to mean no access log
            max_line_size=MAX_URL_BYTES,
            max_field_size=MAX_FIELD_BYTES,
        )
        self.owner = owner
        self.on_lost = on_lost
        # Since when a request head is awaited (None while a request is handled, or between requests), and
        # whether any of it arrived.
        self.head_since: float | None = None
        self.head_heard = False
        # Past the header timeout with nothing heard, at one sweep so far (see `check`).
        self.head_overdue = False
        self.serving = False
        # The body being received, how much of it had arrived at the last look, and when it last grew.
        self.body: StreamReader | None = None
        self.body_seen = 0
        self.body_progress_at = 0.0
        self.body_started = 0.0
        self.body_timed_out_at: float | None = None
        # The unread rest of a body whose request was answered without it, which aiohttp reads and discards for
        # a while (its lingering time): what arrives meanwhile is that body, not the next request's head.
        self.leftover: StreamReader | None = None

    # -- asyncio.Protocol -------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.head_since = time.monotonic()  # a connection that never sends a byte is a head that never arrives
        super().connection_made(transport)

    def data_received(self, data: bytes) -> None:
        if self.leftover is not None and self.leftover.is_eof():
            self.leftover = None
        if not self.serving and self.leftover is None:
            self.head_heard = True
            if self.head_since is None:
                self.head_since = time.monotonic()
        body = self.body
        super().data_received(data)
        if body is not None and self._messages and not body.is_eof() and body.exception() is None:
            # Nothing can follow an unfinished body but a parse error of its framing, which aiohttp queues for
            # after the handler, while the handler waits for the rest of the body: tell it now.
            body.set_exception(web.RequestPayloadError("the body's framing is invalid"))

    def connection_lost(self, exc: BaseException | None) -> None:
        super().connection_lost(exc)
        on_lost, self.on_lost = self.on_lost, None
        if on_lost is not None:
            on_lost()

    # -- told by the middleware -------------------------------------------------------------------

    def request_began(self, content: StreamReader) -> None:
        self.serving = True
        self.head_since = None
        self.head_heard = self.head_overdue = False
        if not content.is_eof():
            self.body = content
            self.body_seen = content.total_bytes
            self.body_progress_at = self.body_started = time.monotonic()

    def request_ended(self) -> None:
        self.serving = False
        if self.body is not None and not self.body.is_eof():
            self.leftover = self.body
        self.body = None
        self.body_timed_out_at = None

    # -- the watchdog -----------------------------------------------------------------------------

    def check(self, now: float) -> str | None:
        """Enforce the read timeouts; returns the phase that timed out ("header" or "body"), if one did."""
        limits = self.owner.limits
        if self.head_since is not None:
            if limits.header_timeout_s and now - self.head_since > limits.header_timeout_s:
                if not (self.head_heard or self.head_overdue):
                    # Bytes may wait in the socket that a busy loop has not read yet: look once more at the next
                    # sweep before deciding that nothing was asked (a silent close instead of a 408).
                    self.head_overdue = True
                    return None
                self.head_since, self.head_overdue = None, False
                if self.head_heard:
                    self._refuse(RequestTimeoutError("The request's headers did not arrive in time."))
                else:
                    self.force_close()  # nothing was asked: nothing to answer (a browser's preconnect, say)
                return "header"
            return None
        body = self.body
        if body is None:
            return None
        if body.is_eof():
            self.body = None
        elif self.body_timed_out_at is not None:
            if now - self.body_timed_out_at > TIMED_OUT_GRACE_S:
                self.force_close()
        elif body.total_bytes != self.body_seen:
            self.body_seen, self.body_progress_at = body.total_bytes, now
        elif (limits.body_timeout_s and now - self.body_progress_at > limits.body_timeout_s) or (
            limits.body_deadline_s and now - self.body_started > limits.body_deadline_s
        ):
            # The handler waits for the body: the error reaches it there, and the middleware answers 408.
            self.body_timed_out_at = now
            body.set_exception(RequestTimeoutError("The request body did not arrive in time."))
            return "body"
        return None

    def _refuse(self, error: HatchwayError) -> None:
        """Answer `error` straight on the transport and close: no handler owns the connection yet."""
        transport = self.transport
        if transport is not None and not transport.is_closing():
            with contextlib.suppress(OSError, RuntimeError):
                transport.write(refusal(error, self.owner.new_request_id()))
        self.force_close()

    # -- aiohttp's error path ---------------------------------------------------------------------

    def handle_error(
        self,
        request: web_request.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        """aiohttp's answer to a request it could not parse (or a handler that raised past the middleware):
        the envelope instead of text/plain, and one bounded log line instead of a traceback."""
        if isinstance(exc, http_exceptions.HttpProcessingError):
            error = self._protocol_error(exc)
            self.owner.errors.report(request.remote, error.status, error.message)
        elif status == 504:
            error = HatchwayError("The request handler timed out.")
            error.status, error.code = 504, "handler_timeout"
        else:
            log.error("unhandled error past the middleware", exc_info=exc)
            error = InternalError("The plane failed to handle this request; it has been logged.")
        if request.writer.output_size > 0:
            # As aiohttp does: the response is under way, so nothing else can be said on this connection.
            raise ConnectionError("the response was already under way")
        response = web.Response(
            status=error.status,
            body=error.body(),
            content_type="application/json",
            headers={**error.headers, "X-Request-Id": self.owner.new_request_id()},
        )
        response.force_close()
        return response

    def _protocol_error(self, exc: http_exceptions.HttpProcessingError) -> HatchwayError:
        if isinstance(exc, http_exceptions.LineTooLong):
            if exc.args[1:2] == (self.max_line_size,):
                return _status(InvalidRequestError(f"The URL is longer than {MAX_URL_BYTES} bytes."), 414)
            return _status(InvalidRequestError(f"A request header is longer than {MAX_FIELD_BYTES} bytes."), 431)
        description = _description(exc)
        if description.startswith("Too many headers"):
            return _status(InvalidRequestError(f"More than {self.max_headers} request headers."), 431)
        if isinstance(exc, http_exceptions.BadHttpMethod | http_exceptions.BadStatusLine):
            return InvalidRequestError(f"Malformed HTTP request line: {description}.", code="bad_request_line")
        return InvalidRequestError(f"Malformed HTTP request: {description}.", code="bad_request")

    def log_exception(self, *args: object, **kwargs: object) -> None:
        """aiohttp's other error lines. A request's own trouble (a body timeout, answered already; a body whose
        framing broke after its answer) is counted, not logged with its message, which may quote the request."""
        exc = kwargs.get("exc_info")
        if isinstance(exc, HatchwayError):
            return
        if isinstance(exc, http_exceptions.HttpProcessingError | web.RequestPayloadError):
            self.owner.errors.report(None, 400, type(exc).__name__)
        elif isinstance(exc, BaseException):  # aiohttp's or ours: a bug, whose traceback is wanted
            log.error("HTTP connection error: %s", type(exc).__name__, exc_info=exc)
        else:
            log.error("HTTP connection error: %s", bounded(str(args[0]) if args else "unknown", 200))


def _status(error: HatchwayError, status: int) -> HatchwayError:
    error.status = status
    error.code = "request_header_fields_too_large" if status == 431 else "uri_too_long"
    return error


def _description(exc: http_exceptions.HttpProcessingError) -> str:
    """llhttp's or aiohttp's fixed description of what was wrong, without the bytes its message quotes."""
    text = str(exc.message).split(":", 1)[0].strip()
    return text if _SAFE_DESCRIPTION.fullmatch(text) else "invalid syntax"


class Connections:
    """The plane's client connections: builds each one's protocol (`protocol`, the acceptor's factory) and,
    once started, looks at all of them every `limits.tick_s`: enforces the read timeouts, flushes the
    protocol-error log, counts what timed out.

    Parameters: `server`, aiohttp's server whose handler serves the requests; `limits`; `errors`, where
    protocol errors are reported; `timed_out`, a counter by phase; `new_request_id`, for error answers."""

    def __init__(
        self,
        server: web_server.Server,
        limits: ConnectionLimits,
        errors: ProtocolErrorLog,
        timed_out: Counter,
        new_request_id: Callable[[], str],
    ) -> None:
        self.server = server
        self.limits = limits
        self.errors = errors
        self.timed_out = timed_out
        self.new_request_id = new_request_id
        self.loop = asyncio.get_running_loop()
        self._task: asyncio.Task[None] | None = None

    def protocol(self, on_lost: Callable[[], None] | None = None) -> Connection:
        return Connection(self, on_lost)

    def start(self) -> None:
        self._task = self.loop.create_task(self._run(), name="hatchway-connection-watchdog")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.limits.tick_s)
            self.sweep(time.monotonic())

    def sweep(self, now: float) -> None:
        for connection in self.server.connections:
            if isinstance(connection, Connection) and (phase := connection.check(now)) is not None:
                self.timed_out.labels(phase).inc()
        self.errors.flush()
