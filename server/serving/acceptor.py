"""Accepting connections off the event loop, so that overload is refused at once.

An overloaded event loop runs late: a connection it accepts waits a whole loop iteration (tens of ms at
saturation) before anything can answer it, even a refusal, and a client that opens a connection per request
(many do) waits that long to learn it should back off. The acceptor is a thread with its own selector. It
accepts every connection and, while the plane is not overloaded, hands it to the loop at once (aiohttp's
protocol, exactly as if the loop had accepted it). While the plane is overloaded (server.serving.overload), it peeks at
each new connection's request line: an API request (`/v1/...`) gets the 503 envelope with `Retry-After` from
this thread, without the loop; anything else (health, metrics, admin) goes to the loop as usual.

Requests on connections already handed over are shed by the middleware, as before.

The acceptor also caps the connections one client address holds open (`max_per_ip`): one past the cap is
closed as soon as it is accepted, before it costs the loop anything. A connection counts from its accept until
it closes, whoever closes it (this thread, or the loop's protocol, through the `on_lost` it is built with).
"""

from __future__ import annotations

import asyncio
import contextlib
import http
import logging
import selectors
import socket
import threading
import time
from collections.abc import Callable
from typing import cast

from aiohttp import web
from prometheus_client import Counter

from server.errors import HatchwayError
from server.serving.overload import LoadShedder

log = logging.getLogger(__name__)

BACKLOG = 1024
# How long an overloaded plane waits for a new connection's request line before handing it to the loop anyway.
PEEK_WAIT_S = 0.05
PEEK_BYTES = 1024
# How long a refused connection may stay open for its client to read the answer and close.
CLOSE_WAIT_S = 1.0
# What a selector key of the acceptor's thread is.
_LISTENING, _WAKE, _PEEKING, _CLOSING = "listening", "wake", "peeking", "closing"


def listening_socket(host: str, port: int, *, reuse_port: bool = False) -> socket.socket:
    """`reuse_port`: share the port with the other workers of this machine (server.serving.workers), the kernel
    spreading new connections over every listening socket of the port."""
    family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0][0]
    sock = socket.create_server((host, port), family=family, backlog=BACKLOG, reuse_port=reuse_port)
    sock.setblocking(False)
    return sock


def refusal(error: HatchwayError, request_id: str) -> bytes:
    """A whole HTTP/1.1 response for `error`, in the envelope `server.api.middleware.render` gives it."""
    body = error.body()
    headers = {
        "Content-Type": "application/json",
        "Content-Length": str(len(body)),
        **error.headers,
        "X-Request-Id": request_id,
        "Connection": "close",
    }
    head = f"HTTP/1.1 {error.status} {http.HTTPStatus(error.status).phrase}\r\n"
    head += "".join(f"{name}: {value}\r\n" for name, value in headers.items())
    return head.encode("latin-1") + b"\r\n" + body


# Builds the protocol of a handed-over connection; the argument is to be called once it is gone.
ProtocolFactory = Callable[[Callable[[], None]], asyncio.Protocol]


class Acceptor:
    """Parameters: the listening `sock`; the `loop` that serves; aiohttp's `server`, whose connections count
    towards overload; `protocol`, which builds a connection's protocol; the `shedder`; `new_request_id`;
    `max_per_ip`, the connections one address may hold (0: no cap), and `capped`, counting those closed
    for it."""

    def __init__(
        self,
        sock: socket.socket,
        loop: asyncio.AbstractEventLoop,
        server: web.Server,
        protocol: ProtocolFactory,
        shedder: LoadShedder,
        new_request_id: Callable[[], str],
        *,
        max_per_ip: int = 0,
        capped: Counter | None = None,
    ) -> None:
        self.sock = sock
        self.loop = loop
        self.server = server
        self.protocol = protocol
        self.shedder = shedder
        self.new_request_id = new_request_id
        self.max_per_ip = max_per_ip
        self.capped = capped
        self.refused = 0
        # Open connections by client address; taken by this thread, given back by either thread.
        self._per_ip: dict[str, int] = {}
        self._per_ip_lock = threading.Lock()
        # The address of each connection this thread still holds, so that closing it gives its place back.
        self._address_of: dict[socket.socket, str] = {}
        self._stopping = False
        self._wake_r, self._wake_w = socket.socketpair()
        self._thread = threading.Thread(target=self._run, name="hatchway-acceptor", daemon=True)
        self._tasks: set[asyncio.Task[None]] = set()
        # When the oldest handover the loop has not taken yet was made, and how long the last one waited: how
        # far behind the loop is right now, before its lag watcher can tell.
        self._handed_at: float | None = None
        self.handover_wait_s = 0.0

    @property
    def port(self) -> int:
        return int(self.sock.getsockname()[1])

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Stop accepting and close the listening socket; connections already handed over are the loop's."""
        self._stopping = True
        with contextlib.suppress(OSError):
            self._wake_w.send(b"x")
        self._thread.join()
        for sock in (self.sock, self._wake_r, self._wake_w):
            sock.close()

    # -- the thread -------------------------------------------------------------------------------------

    def _run(self) -> None:
        selector = selectors.DefaultSelector()
        selector.register(self.sock, selectors.EVENT_READ, _LISTENING)
        selector.register(self._wake_r, selectors.EVENT_READ, _WAKE)
        # Connections this thread still holds, with their deadline: those of an overloaded moment waiting for
        # their request line (_PEEKING), and refused ones waiting for the client to close (_CLOSING).
        held: dict[socket.socket, float] = {}

        def hold(conn: socket.socket, state: str, for_s: float) -> None:
            held[conn] = time.monotonic() + for_s
            selector.register(conn, selectors.EVENT_READ, state)

        def release(conn: socket.socket) -> None:
            selector.unregister(conn)
            del held[conn]

        try:
            while not self._stopping:
                ready = selector.select(PEEK_WAIT_S if held else None)
                handover: list[socket.socket] = []
                for key, _ in ready:
                    conn = cast(socket.socket, key.fileobj)
                    if key.data is _LISTENING:
                        for accepted in self._accept_all():
                            if not self._take_place(accepted):
                                continue
                            if self._refusal() is not None:
                                hold(accepted, _PEEKING, PEEK_WAIT_S)
                            else:
                                handover.append(accepted)
                    elif key.data is _PEEKING:
                        release(conn)
                        if self._triage(conn, handover):
                            hold(conn, _CLOSING, CLOSE_WAIT_S)
                    elif key.data is _CLOSING and not _drain(conn):
                        release(conn)
                        self._close(conn)
                now = time.monotonic()
                for conn, deadline in list(held.items()):
                    if deadline <= now:
                        state = selector.get_key(conn).data
                        release(conn)
                        if state is _PEEKING:
                            handover.append(conn)  # a slow client: the loop deals with it as with any other
                        else:
                            self._close(conn)
                if handover:
                    if self._handed_at is None:
                        self._handed_at = time.monotonic()
                    handed = [(conn, self._address_of.pop(conn, "")) for conn in handover]
                    self.loop.call_soon_threadsafe(self._adopt, handed, time.monotonic())
        except Exception:
            log.exception("the acceptor thread failed; no new connection will be accepted")
        finally:
            for conn in held:
                self._close(conn)
            selector.close()

    def _accept_all(self) -> list[socket.socket]:
        accepted: list[socket.socket] = []
        while True:
            try:
                conn, address = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return accepted
            except OSError as exc:  # out of file descriptors, say: the next round may do better
                log.warning("accept failed: %s", exc)
                return accepted
            conn.setblocking(False)
            with contextlib.suppress(OSError):
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._address_of[conn] = str(address[0]) if isinstance(address, tuple) else str(address)
            accepted.append(conn)

    # -- connections per client address ----------------------------------------------------------

    def _take_place(self, conn: socket.socket) -> bool:
        """Count `conn` against its address; False (and `conn` closed) when the address is at its cap."""
        if not self.max_per_ip:
            return True
        address = self._address_of[conn]
        with self._per_ip_lock:
            count = self._per_ip.get(address, 0)
            if count < self.max_per_ip:
                self._per_ip[address] = count + 1
                return True
        del self._address_of[conn]
        conn.close()
        if self.capped is not None:
            self.capped.inc()
        return False

    def _give_place(self, address: str) -> None:
        """A connection of `address` closed (called from either thread)."""
        if not self.max_per_ip:
            return
        with self._per_ip_lock:
            count = self._per_ip.get(address, 0) - 1
            if count > 0:
                self._per_ip[address] = count
            else:
                self._per_ip.pop(address, None)

    def connections_of(self, address: str) -> int:
        with self._per_ip_lock:
            return self._per_ip.get(address, 0)

    def _close(self, conn: socket.socket) -> None:
        """Close a connection this thread still holds, giving its place back."""
        self._give_place(self._address_of.pop(conn, ""))
        conn.close()

    def _triage(self, conn: socket.socket, handover: list[socket.socket]) -> bool:
        """Refuse an API request while the plane is overloaded (True: refused, the client is to close); hand
        anything else to the loop."""
        try:
            head = conn.recv(PEEK_BYTES, socket.MSG_PEEK)
        except OSError:
            head = b""
        if not head:
            self._close(conn)  # the client left already
            return False
        target = head.split(b" ", 2)[1] if head.count(b" ") >= 2 else b""
        error = self._refusal() if target.startswith(b"/v1/") else None
        if error is None:
            handover.append(conn)
            return False
        self.shedder.on_shed()
        self.refused += 1
        # Read what the client sent before answering, and let the client close first (_CLOSING): closing on
        # unread data would reset the connection, and the client could lose the answer.
        _drain(conn)
        try:
            conn.send(refusal(error, self.new_request_id()))
            conn.shutdown(socket.SHUT_WR)
        except OSError:
            self._close(conn)
            return False
        return True

    def _refusal(self) -> HatchwayError | None:
        """Why a new API request is to be refused now, or None when the plane can take it."""
        # The connections the loop holds count towards the floor here: requests queued on them, not yet read,
        # are not in flight yet, and at twice the capacity most of the backlog is such requests. Counted only
        # when the loop is late: `connections` copies the server's list.
        return self.shedder.overload(self._loop_wait_s(), lambda: len(self.server.connections))

    def _loop_wait_s(self) -> float:
        """How long a connection handed over now would wait for the loop: the last handover's wait, or longer
        when one is still waiting."""
        handed_at = self._handed_at
        return max(self.handover_wait_s, time.monotonic() - handed_at if handed_at is not None else 0.0)

    # -- the loop ---------------------------------------------------------------------------------------

    def _adopt(self, conns: list[tuple[socket.socket, str]], handed_at: float) -> None:
        self._handed_at = None
        self.handover_wait_s = time.monotonic() - handed_at
        for conn, address in conns:
            if self._stopping:
                self._give_place(address)
                conn.close()
                continue
            task = self.loop.create_task(self._connect(conn, address))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _connect(self, conn: socket.socket, address: str) -> None:
        given_back = False

        def on_lost() -> None:
            nonlocal given_back
            if not given_back:  # once, whether the protocol saw the connection go or never got it
                given_back = True
                self._give_place(address)

        try:
            await self.loop.connect_accepted_socket(lambda: self.protocol(on_lost), conn)
        except OSError as exc:
            log.debug("a connection closed before the loop took it: %s", exc)
            on_lost()
            conn.close()


def _drain(conn: socket.socket) -> bool:
    """Read whatever the client sent; False once it has closed (or the connection broke)."""
    try:
        while conn.recv(65536):
            pass
    except (BlockingIOError, InterruptedError):
        return True
    except OSError:
        return False
    return False
