"""Running the plane: start, wait for a signal, and shut down in named steps.

Connections are accepted by a thread of their own (server.serving.acceptor), which hands them to aiohttp on the loop,
or refuses API requests at once while the plane is overloaded, and closes those past the cap per client
address. Each connection's protocol is server.serving.connections', which bounds how slowly a client may send.

Shutdown: stop accepting connections, let in-flight requests finish within `shutdown_grace_s`, cancel what
is left, then flush the usage queue and close storage (the acceptor stops first; aiohttp's runner does the
next two, the plane's cleanup the last).

With `workers` above 1, `run` hands over to server.serving.workers: a supervisor that does the one-time start-up work
(`prepare`) and runs a `Server` in each of several processes sharing the ports.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass

from aiohttp import web

from server.api.app import create_app
from server.api.middleware import new_request_id
from server.config import Config
from server.plane import Plane
from server.serving.acceptor import Acceptor, listening_socket
from server.serving.connections import ConnectionLimits, Connections, ProtocolErrorLog

log = logging.getLogger("hatchway")

HANDLED_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Server:
    """Parameters: `config`; the `plane` to serve (one built from `config` by default); `reuse_port`, to share
    the HTTP port with the other workers of this machine; `announce`, to print the listening lines (a worker
    leaves them to its supervisor, which prints them once for all)."""

    def __init__(
        self, config: Config, plane: Plane | None = None, *, reuse_port: bool = False, announce: bool = True
    ) -> None:
        self.config = config
        self.plane = plane or Plane(config)
        self.reuse_port = reuse_port
        self.announce = announce
        self.runner = web.AppRunner(
            create_app(self.plane),
            shutdown_timeout=config.shutdown_grace_s,
            access_log=None,
            # A client that leaves cancels its handler, which stops the upstream request or the node's generation
            # at once: nobody keeps paying for tokens that no one will read.
            handler_cancellation=True,
        )
        self.port = 0
        self.acceptor: Acceptor | None = None
        self.connections: Connections | None = None
        self.should_exit = asyncio.Event()

    @property
    def url(self) -> str:
        return f"http://{self.config.host}:{self.port}"

    async def startup(self) -> None:
        await self.runner.setup()  # runs the plane's startup: migrations, admin key, snapshot
        if self.plane.generated_admin_key:
            announce_admin_key(self.plane.generated_admin_key)
        assert self.runner.server is not None  # set up above
        config, metrics = self.config, self.plane.metrics
        self.connections = Connections(
            self.runner.server,
            ConnectionLimits(
                header_timeout_s=config.header_read_timeout_s,
                body_timeout_s=config.body_read_timeout_s,
                body_deadline_s=config.body_read_deadline_s,
                keepalive_timeout_s=config.keepalive_timeout_s,
            ),
            ProtocolErrorLog(metrics.protocol_errors),
            metrics.connections_timed_out,
            new_request_id,
        )
        self.connections.start()
        self.acceptor = Acceptor(
            listening_socket(config.host, config.port, reuse_port=self.reuse_port),
            asyncio.get_running_loop(),
            self.runner.server,
            self.connections.protocol,
            self.plane.shedder,
            new_request_id,
            max_per_ip=config.max_connections_per_ip,
            capped=metrics.connections_capped,
        )
        self.acceptor.start()
        self.port = self.acceptor.port
        if self.announce:
            announce_listening(self.config, self.port, self.plane.grpc_port, self.plane.tls.fingerprint)

    async def shutdown(self) -> None:
        log.info("shutting down: draining in-flight requests for up to %.0fs", self.config.shutdown_grace_s)
        if self.acceptor is not None:
            self.acceptor.stop()
        await self.runner.cleanup()
        if self.connections is not None:
            await self.connections.stop()

    async def run(self, ready: Callable[[Server], None] | None = None) -> None:
        """Serve until SIGINT or SIGTERM (or `should_exit`); `ready` is called once serving."""
        loop = asyncio.get_running_loop()
        for sig in HANDLED_SIGNALS:
            # Windows has no add_signal_handler: KeyboardInterrupt ends the loop there instead.
            with contextlib.suppress(NotImplementedError):
                loop.add_signal_handler(sig, self.should_exit.set)
        await self.startup()
        if ready is not None:
            ready(self)
        # Everything built so far (modules, the snapshot, the app) lives as long as the process: keep it out of
        # the collector's full passes, which otherwise walk all of it each time and showed in the p99 under load
        # (bench/README.md). No collection first: it would hold up readiness, for a little start-up garbage.
        gc.freeze()
        try:
            await self.should_exit.wait()
        finally:
            await self.shutdown()


class PortUnavailableError(OSError):
    """A port the plane is to listen on is taken: found before anything is created (data dir, admin key)."""


def check_ports(config: Config) -> None:
    """Bind and release each configured port (HTTP, then the node service's), so a plane that could not listen
    fails before it creates its data dir or prints a fresh admin key for it. Port 0 is always free."""
    for service, port in (("HTTP", config.port), ("node service (gRPC)", config.grpc_port)):
        if port:
            try:
                listening_socket(config.host, port).close()
            except OSError as exc:
                reason = exc.strerror or str(exc)
                raise PortUnavailableError(
                    f"the {service} port {config.host}:{port} is not available: {reason}"
                ) from exc


def announce_admin_key(admin_key: str) -> None:
    # Printed once, on stdout, for the operator; only its hash is stored.
    print(f"Admin key (shown once, store it now): {admin_key}", flush=True)


def announce_listening(config: Config, port: int, grpc_port: int, fingerprint: str, workers: int = 1) -> None:
    # Printed whatever the log level: operators and scripts (tests, bench) read the bound port from it.
    shared = f" ({workers} workers)" if workers > 1 else ""
    print(f"Hatchway listening on http://{config.host}:{port}{shared}", flush=True)
    scheme = "plaintext, loopback only" if config.grpc_insecure else "TLS"
    print(f"Node service listening on {config.host}:{grpc_port} ({scheme}); CA fingerprint {fingerprint}", flush=True)


@dataclass(frozen=True)
class Prepared:
    """What the one-time start-up work leaves to the processes that serve: the admin key generated on a first
    start (to print once), and the node CA's fingerprint."""

    admin_key: str | None
    fingerprint: str


def prepare(config: Config) -> Prepared:
    """The start-up work done once for several workers: the data dir, the secret key and the node CA (made by
    the plane's constructor when missing), migrations, the admin key and the declared configuration."""
    plane = Plane(config)
    try:
        plane.prepare_storage()
    finally:
        plane.engine.dispose()
    return Prepared(plane.generated_admin_key, plane.tls.fingerprint)


def install_uvloop() -> None:
    if sys.platform != "win32":
        import uvloop

        uvloop.install()


def run(config: Config) -> None:
    from server.serving.workers import supervise, worker_count  # server.serving.workers builds on this module

    workers = worker_count(config)
    if workers > 1:
        supervise(config, workers)
        return
    check_ports(config)
    install_uvloop()
    asyncio.run(Server(config).run())
