"""Several plane processes on one machine serving the same ports: `hatchway serve --workers N`.

One plane is one Python process on one core; workers put every core to use. The process `hatchway serve` started
becomes a supervisor that serves nothing itself:

1. It checks the ports as a lone plane does, then holds each with a socket bound with SO_REUSEPORT but not
   listening: a port 0 becomes a concrete port that every worker binds, and the port stays the gateway's while a
   worker restarts. Only listening sockets are given connections, so the placeholder takes no share of them.
2. It does the one-time start-up work (server.serving.serve.prepare): the data dir, the secret key and the node CA,
   migrations, the admin key (printed once, here) and the declared configuration, so that N workers never race
   to do it.
3. It starts N workers. Each runs a whole plane (server.serving.serve.Server) whose HTTP and gRPC sockets are bound with
   SO_REUSEPORT on the same two ports; the kernel spreads new connections over them by a hash of each
   connection's addresses, and a connection stays with the worker that accepted it. Once every worker is
   serving, the supervisor prints the listening lines (once, for all of them).
4. A worker that exits while the supervisor is not stopping is restarted, after RESTART_FIRST_S, doubling up to
   RESTART_MAX_S while it keeps dying young, with a log line saying how it ended. A worker that fails before the
   first time all were serving fails the start instead (exit code 3, as any start-up failure).
5. SIGTERM or SIGINT: SIGTERM to every worker, each of which drains as a lone plane does (`shutdown_grace_s`);
   the supervisor exits once all have, with SIGKILL for any still there STOP_MARGIN_S after the grace.

Workers are started with multiprocessing's "spawn" context: a fresh interpreter that imports the plane anew and
is handed, pickled, exactly the Config the supervisor resolved (the concrete ports, the reload interval below),
with no second parse of flags, environment and file (a re-exec of `hatchway serve` would need one, plus a way to
override its own flags). Not "fork": the supervisor has opened the database and built a plane to prepare it, and
a forked child would inherit its connections and whatever locks its threads held. Not "forkserver": it would
save a worker start about a second of imports, which only start-up and restarts pay. (spawn also starts
multiprocessing's small resource-tracker process, which exits with the supervisor.) A worker watches its
supervisor through the pipe multiprocessing keeps to it, and drains when it is gone: a supervisor killed with
SIGKILL leaves no orphan serving the ports.

What workers share, and how:
- the ports, above; and the data dir: the secret key and node CA made once, the usage spool with a slot per
  worker (server.usage.spool: a worker killed leaves its slot to the worker that replaces it, which replays it);
- the database: SQLite in WAL mode, one file for every process, or PostgreSQL. PostgreSQL announces each
  configuration change to every worker at once (server.storage.notify); SQLite cannot, so with several workers
  on SQLite each reloads the configuration every second (`config_reload_s` capped at 1): a change made through one
  worker is in force on all within about a second;
- rate limits, quotas and the response cache only through Redis (`redis_url`): without it each worker holds its
  own, so a limit is enforced per worker, up to N times over (a warning says so at start). Targets' health is
  each worker's own;
- nodes only through NATS (`nats_url`): an agent connects to one worker, and the others reach it through the
  broker (server.fleet). Without it a request could only use the nodes of the worker it reached, so several
  workers without `nats_url` refuse to start.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import os
import signal
import socket
import sys
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from typing import Any

from server.config import Config, ConfigError
from server.plane import Plane
from server.serving.serve import (
    HANDLED_SIGNALS,
    Server,
    announce_admin_key,
    announce_listening,
    check_ports,
    install_uvloop,
    prepare,
)

log = logging.getLogger("hatchway.workers")

AUTO = "auto"
# A restarted worker waits this long, doubled for each young death in a row (a worker crashing at start must not
# spin the machine), up to RESTART_MAX_S; one that lived STABLE_S is forgiven its past deaths.
RESTART_FIRST_S = 0.5
RESTART_MAX_S = 15.0
STABLE_S = 30.0
# Beyond shutdown_grace_s, what a draining worker's last steps may take (node service, usage flush) before SIGKILL.
STOP_MARGIN_S = 10.0
# Planes on SQLite hear of each other's changes only by reloading (server.storage.notify): with several workers,
# this often at least.
SQLITE_RELOAD_S = 1.0


class WorkerStartError(ChildProcessError):
    """A worker ended before every worker was serving for the first time: the start failed."""


def worker_count(config: Config) -> int:
    """How many workers `config.workers` asks for: a number from 1, or auto (the CPUs this process may use)."""
    value = str(config.workers).strip().lower()
    if value == AUTO:
        return usable_cpus()
    try:
        count = int(value)
    except ValueError:
        raise ConfigError(f"workers: expected a number of processes or auto, got {config.workers!r}") from None
    if count < 1:
        raise ConfigError(f"workers: expected at least 1 (or auto, one per core), got {config.workers!r}")
    return count


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity, which a container's cpuset or taskset narrows), else all."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0)) or 1
    return os.cpu_count() or 1


def check_sharing(config: Config, count: int) -> None:
    """Refuse what several workers cannot do, and warn of what they do per worker."""
    if not config.nats_url:
        raise ConfigError(
            f"--workers {count} needs --nats-url so every worker reaches every node: an agent connects to one "
            "worker only, and the others reach it through NATS (HATCHWAY_NATS_URL=nats://HOST:4222)"
        )
    if not config.redis_url:
        log.warning(
            "%d workers without --redis-url: rate limits and quotas are held by each worker alone, so each is "
            "enforced per worker (up to %d times over); set HATCHWAY_REDIS_URL for exact limits",
            count,
            count,
        )


def worker_config(config: Config, port: int, grpc_port: int) -> Config:
    """The Config every worker serves: the ports the supervisor holds, and on SQLite a reload each second."""
    changes: dict[str, Any] = {"port": port, "grpc_port": grpc_port}
    if not config.database_url:
        reload_s = config.config_reload_s
        changes["config_reload_s"] = min(reload_s, SQLITE_RELOAD_S) if reload_s > 0 else SQLITE_RELOAD_S
    return config.replace(**changes)


def reserve_port(host: str, port: int) -> socket.socket:
    """A socket bound to `port` (a free one for 0) with SO_REUSEPORT, never listening: it holds the port for the
    workers' listening sockets without taking a share of the connections (the kernel gives those only to
    listening sockets)."""
    family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0][0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        # As the workers' sockets have them (socket.create_server sets SO_REUSEADDR, grpc both): every socket
        # sharing a port must set SO_REUSEPORT.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    return sock


def supervise(config: Config, count: int) -> None:
    """Run `count` workers until SIGTERM or SIGINT (the module docstring says how); SystemExit(1) when a worker
    had to be killed or ended with an error while stopping."""
    check_sharing(config, count)
    check_ports(config)
    reserved = [reserve_port(config.host, config.port), reserve_port(config.host, config.grpc_port)]
    try:
        prepared = prepare(config)
        if prepared.admin_key:
            announce_admin_key(prepared.admin_key)
        http_port, grpc_port = (int(sock.getsockname()[1]) for sock in reserved)
        supervisor = Supervisor(worker_config(config, http_port, grpc_port), count, prepared.fingerprint)
        code = supervisor.run()
    finally:
        for sock in reserved:
            sock.close()
    log.info("all workers stopped: %r", supervisor)
    if code:
        raise SystemExit(code)


@dataclass
class Worker:
    index: int
    process: BaseProcess
    # The worker sends its ports on it once serving.
    pipe: Connection
    started_at: float
    serving: bool = False


class Supervisor:
    """Parameters: the workers' `config`, their `count`, and the node CA's `fingerprint` for the listening lines."""

    def __init__(self, config: Config, count: int, fingerprint: str) -> None:
        self.config = config
        self.count = count
        self.fingerprint = fingerprint
        self.context = multiprocessing.get_context("spawn")
        self.workers: dict[int, Worker] = {}
        # When each worker that died is to be started again, and how many young deaths in a row it has had.
        self.restarts_due: dict[int, float] = {}
        self.young_deaths: dict[int, int] = {}
        self.started = False  # every worker was serving once: the gateway is up
        self.should_exit = False
        self.workers_restarted = 0
        self.workers_killed = 0

    def __repr__(self) -> str:
        return f"Supervisor(workers={self.count}, restarted={self.workers_restarted}, killed={self.workers_killed})"

    def run(self) -> int:
        """Start the workers and supervise them until a signal; the exit code (0: every worker drained)."""
        wake_r, wake_w = socket.socketpair()
        wake_r.setblocking(False)
        wake_w.setblocking(False)
        # Python runs signal handlers between bytecodes, and retries a wait they interrupt: the wake-up fd is
        # what makes the wait below return when a signal comes.
        previous_fd = signal.set_wakeup_fd(wake_w.fileno())
        previous = {sig: signal.signal(sig, self._on_signal) for sig in HANDLED_SIGNALS}
        try:
            for index in range(self.count):
                self._start(index)
            self._supervise(wake_r)
        finally:
            code = self._stop()
            signal.set_wakeup_fd(previous_fd)
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            wake_r.close()
            wake_w.close()
        return code

    def _on_signal(self, signum: int, _frame: object) -> None:
        self.should_exit = True

    def _start(self, index: int) -> None:
        receiver, sender = self.context.Pipe(duplex=False)
        process = self.context.Process(
            target=run_worker, args=(self.config, index, sender), name=f"hatchway-worker-{index}", daemon=False
        )
        process.start()
        sender.close()  # the worker holds the other end: its exit ends the pipe
        self.workers[index] = Worker(index, process, receiver, time.monotonic())
        log.debug("worker %d started (pid %s)", index, process.pid)

    def _supervise(self, wake: socket.socket) -> None:
        while not self.should_exit:
            now = time.monotonic()
            for index, due in list(self.restarts_due.items()):
                if due <= now:
                    del self.restarts_due[index]
                    self._start(index)
            timeout = max(0.0, min(self.restarts_due.values()) - now) if self.restarts_due else None
            exits = {worker.process.sentinel: worker for worker in self.workers.values()}
            pipes = {worker.pipe: worker for worker in self.workers.values() if not worker.serving}
            ready = wait([*exits, *pipes, wake], timeout)
            if wake in ready:
                with contextlib.suppress(BlockingIOError):
                    wake.recv(4096)
            for pipe, worker in pipes.items():
                if pipe in ready:
                    self._on_message(worker)
            for sentinel, worker in exits.items():
                if sentinel in ready:
                    self._on_exit(worker)

    def _on_message(self, worker: Worker) -> None:
        try:
            port, grpc_port = worker.pipe.recv()
        except (EOFError, OSError):
            return  # it died first: its sentinel says so
        worker.serving = True
        log.info("worker %d (pid %s) serving on ports %d and %d", worker.index, worker.process.pid, port, grpc_port)
        if not self.started and all(w.serving for w in self.workers.values()) and len(self.workers) == self.count:
            self.started = True
            announce_listening(self.config, port, grpc_port, self.fingerprint, self.count)

    def _on_exit(self, worker: Worker) -> None:
        del self.workers[worker.index]
        worker.pipe.close()
        worker.process.join()
        how = describe_exit(worker.process.exitcode)
        if self.should_exit:
            return
        if not self.started:
            raise WorkerStartError(
                f"worker {worker.index} (pid {worker.process.pid}) {how} before every worker was serving"
            )
        lived_s = time.monotonic() - worker.started_at
        deaths = 0 if lived_s >= STABLE_S else self.young_deaths.get(worker.index, 0)
        delay_s = min(RESTART_MAX_S, RESTART_FIRST_S * 2**deaths)
        self.young_deaths[worker.index] = deaths + 1
        self.restarts_due[worker.index] = time.monotonic() + delay_s
        self.workers_restarted += 1
        log.warning(
            "worker %d (pid %s) %s after %.1fs; starting it again in %.1fs",
            worker.index,
            worker.process.pid,
            how,
            lived_s,
            delay_s,
        )

    def _stop(self) -> int:
        """SIGTERM to every worker, then wait for them to drain; SIGKILL past the grace. 0 when all ended well."""
        self.restarts_due.clear()
        for worker in self.workers.values():
            if worker.process.pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(worker.process.pid, signal.SIGTERM)
        if self.workers:
            log.info(
                "stopping %d workers: each drains for up to %.0fs", len(self.workers), self.config.shutdown_grace_s
            )
        deadline = time.monotonic() + self.config.shutdown_grace_s + STOP_MARGIN_S
        code = 0
        while self.workers:
            exits = {worker.process.sentinel: worker for worker in self.workers.values()}
            ready = wait(list(exits), max(0.0, deadline - time.monotonic()))
            if not ready:
                break
            for sentinel, worker in exits.items():
                if sentinel not in ready:
                    continue
                del self.workers[worker.index]
                worker.process.join()
                if worker.process.exitcode not in (0, -signal.SIGTERM):
                    log.warning("worker %d %s while stopping", worker.index, describe_exit(worker.process.exitcode))
                    code = 1
        for worker in self.workers.values():
            log.warning(
                "worker %d (pid %s) still running after the grace: killing it", worker.index, worker.process.pid
            )
            worker.process.kill()
            worker.process.join()
            self.workers_killed += 1
            code = 1
        self.workers.clear()
        return code


def describe_exit(code: int | None) -> str:
    if code is None:
        return "is still running"
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"was killed by {signal.Signals(-code).name}"
        return f"was killed by signal {-code}"
    return f"exited with code {code}"


# -- a worker ----------------------------------------------------------------------------------------------------


class WorkerPlane(Plane):
    """A worker's plane: its supervisor prepared the storage before starting it, and it shares the node service's
    port with the other workers."""

    reuse_port = True

    def prepare_storage(self) -> None:
        """Done once by the supervisor (server.serving.serve.prepare): N workers would race over migrations, the admin
        key and the declared configuration, and print a generated key N times."""


def run_worker(config: Config, index: int, pipe: Connection) -> None:
    """A worker process's main (spawned by Supervisor): serve one plane until SIGTERM or the supervisor is gone."""
    # A Ctrl-C reaches the whole process group, workers included: the supervisor's SIGTERM is what stops them,
    # and until the plane's own handlers are in place (Server.run) a SIGINT would end a worker with a traceback.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    logging.basicConfig(
        level=config.log_level.upper(),
        format=f"%(asctime)s %(levelname)s worker {index} [%(process)d] %(name)s: %(message)s",
    )
    if config.plane_name:
        # Each worker is a plane of its own for the node fleet: the operator's name, made distinct as HOST:PID is.
        config = config.replace(plane_name=f"{config.plane_name}:{os.getpid()}")
    try:
        install_uvloop()
        asyncio.run(_serve(config, pipe))
    except (ConfigError, OSError) as exc:
        print(f"Error: worker {index} cannot start: {exc}", file=sys.stderr, flush=True)
        sys.exit(1)


async def _serve(config: Config, pipe: Connection) -> None:
    server = Server(config, WorkerPlane(config), reuse_port=True, announce=False)
    parent = multiprocessing.parent_process()
    if parent is not None:
        loop = asyncio.get_running_loop()

        def orphaned() -> None:
            loop.remove_reader(parent.sentinel)
            log.warning("the supervisor is gone: draining and exiting")
            server.should_exit.set()

        # The pipe to the supervisor reads as closed once it has exited, however it ended.
        loop.add_reader(parent.sentinel, orphaned)

    def serving(server: Server) -> None:
        pipe.send((server.port, server.plane.grpc_port))
        pipe.close()

    await server.run(ready=serving)
