"""Fixtures: a real plane and real mock upstreams on loopback, each on its own port, torn down after the test;
and for several planes sharing PostgreSQL and Redis (issue 17): `planes`, `prefix` (a Redis key prefix of the
test's own) and `private_redis` (a redis-server of the test's own, to stop and start)."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import openai
import pytest
import redis
from sqlalchemy import text

from server.cli.client import AdminClient
from server.config import Config
from server.serving.serve import Server
from tests.support.loop_thread import LoopThread
from tests.support.mock_upstream import MockUpstream

# The checkout the tests run from.
REPO = Path(__file__).resolve().parents[1]
ADMIN_KEY = "hwa-test-admin-key"
MODEL = "gpt-4o-mini"
# This machine's Redis and CI's, on the standard port; each test keeps to its own key prefix (`prefix`).
REDIS = "redis://127.0.0.1:6379/0"
REDIS_SERVER = "/usr/bin/redis-server"


def abandon_request(url: str, body: dict[str, Any], api_key: str, after_s: float) -> None:
    """POST, wait `after_s` without reading, then close the socket: a client that gave up and left.

    A raw socket, because an HTTP client that timed out may keep its connection open until garbage collection.
    """
    parts = urlsplit(url)
    payload = json.dumps(body).encode()
    head = (
        f"POST {parts.path} HTTP/1.1\r\nHost: {parts.netloc}\r\nAuthorization: Bearer {api_key}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n"
    )
    with socket.create_connection((parts.hostname or "127.0.0.1", parts.port or 80)) as sock:
        sock.sendall(head.encode() + payload)
        time.sleep(after_s)


def usage_report(plane: RunningPlane, expected_requests: int, **params: str) -> list[dict[str, Any]]:
    """The report once the batch writer stored `expected_requests` requests (it flushes every 50 ms here)."""
    deadline = time.monotonic() + 5
    while True:
        rows: list[dict[str, Any]] = plane.admin.get("/usage", **params)["data"]
        if sum(r["requests"] for r in rows) >= expected_requests or time.monotonic() > deadline:
            return rows


@pytest.fixture(autouse=True)
def clean_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    """Settings a developer exported in their shell must not change what the tests see."""
    import os

    for name in list(os.environ):
        # Proxy variables too: the plane's upstream client honours them (server.targets.egress).
        if name.startswith("HATCHWAY_") or name.startswith("OPENAI_") or name.lower().endswith("_proxy"):
            monkeypatch.delenv(name)


@pytest.fixture
def loop_thread() -> Iterator[LoopThread]:
    thread = LoopThread()
    yield thread
    thread.close()


@pytest.fixture
def make_upstream(loop_thread: LoopThread) -> Iterator[Callable[..., MockUpstream]]:
    started: list[MockUpstream] = []

    def make(name: str = "mock", reply: str = "Hello from mock", **knobs: Any) -> MockUpstream:
        mock = MockUpstream(name=name, reply=reply)
        for knob, value in knobs.items():
            setattr(mock, knob, value)
        loop_thread.run(mock.start())
        started.append(mock)
        return mock

    yield make
    for mock in started:
        loop_thread.run(mock.stop())


@pytest.fixture
def upstream(make_upstream: Callable[..., MockUpstream]) -> MockUpstream:
    return make_upstream("mock-a")


@dataclass
class RunningPlane:
    server: Server
    loop_thread: LoopThread
    admin: AdminClient

    @property
    def url(self) -> str:
        return self.server.url

    @property
    def v1(self) -> str:
        return f"{self.server.url}/v1"

    def create_org(self, name: str = "acme") -> dict[str, Any]:
        return self.admin.post("/orgs", {"name": name})  # type: ignore[no-any-return]

    def create_key(self, org: str = "acme", **fields: Any) -> str:
        return self.admin.post("/keys", {"org": org, **fields})["key"]  # type: ignore[no-any-return]

    def add_provider(self, name: str, upstream: MockUpstream, org: str = "acme", **fields: Any) -> dict[str, Any]:
        body = {"org": org, "name": name, "base_url": upstream.url, "api_keys": [f"sk-{name}"], "models": [MODEL]}
        return self.admin.post("/providers", body | fields)  # type: ignore[no-any-return]

    def sql(self, statement: str, **params: Any) -> list[dict[str, Any]]:
        """`statement` run on the plane's database beside the plane (its engine, none of its code), and committed;
        its rows."""
        with self.server.plane.engine.begin() as connection:
            result = connection.execute(text(statement), params)
            return [dict(row._mapping) for row in result] if result.returns_rows else []

    def metric(self, name: str, **labels: str) -> float:
        """A sample of /metrics (0 when absent), read as Prometheus scrapes it."""
        text = httpx.get(f"{self.url}/metrics", headers={"Authorization": f"Bearer {ADMIN_KEY}"}).text
        shown = ",".join(f'{k}="{v}"' for k, v in labels.items())
        pattern = re.escape(f"{name}{{{shown}}}" if labels else name) + r" (\S+)"
        found = re.search(f"^{pattern}$", text, re.MULTILINE)
        return float(found.group(1)) if found else 0.0

    def stop(self) -> None:
        self.loop_thread.run(self.server.shutdown())

    def restart(self, config: Config | None = None) -> None:
        """Stop the plane and start it again on the same ports, with the same config or another one."""
        old = self.server
        config = (config or old.config).replace(port=old.port, grpc_port=old.plane.grpc_port)
        self.admin.close()  # no keep-alive connection may outlive the plane it points at
        self.stop()

        async def start() -> Server:
            server = Server(config)
            await server.startup()
            return server

        self.server = self.loop_thread.run(start())
        self.admin = AdminClient(self.url, ADMIN_KEY)


@pytest.fixture
def plane_config(tmp_path: Path) -> Config:
    return Config(
        port=0,
        grpc_port=0,
        data_dir=tmp_path / "plane",
        admin_key=ADMIN_KEY,
        shutdown_grace_s=5,
        usage_flush_interval_s=0.05,
        upstream_header_timeout_s=5,
        stream_idle_timeout_s=5,
        max_body_bytes=64 * 1024,
        # The plane shares this process (and its GIL) with the test's own clients: loop lag here says more
        # about the test than the plane. tests/server/serving/test_overload.py turns shedding on where it is the
        # subject.
        overload_lag_ms=0,
    )


@pytest.fixture
def plane(plane_config: Config, loop_thread: LoopThread) -> Iterator[RunningPlane]:
    async def start() -> Server:
        server = Server(plane_config)
        await server.startup()
        return server

    server = loop_thread.run(start())
    admin = AdminClient(server.url, ADMIN_KEY)
    running = RunningPlane(server, loop_thread, admin)
    yield running
    # Through `running`: a test may have replaced the server (a restart) or the admin client.
    running.admin.close()
    if running.server.runner.server is not None:
        running.stop()


@dataclass
class Gateway:
    """A plane with org `acme`, provider `mock-a` serving MODEL, and an API key for it."""

    plane: RunningPlane
    upstream: MockUpstream
    api_key: str
    # Closed when the test ends: a client left to the garbage collector warns of its open socket in a later test.
    clients: list[openai.OpenAI] = field(default_factory=list)

    def client(self, *, strict: bool = True, **kwargs: Any) -> openai.OpenAI:
        kwargs = {"api_key": self.api_key, "max_retries": 0, **kwargs}
        client = openai.OpenAI(base_url=self.plane.v1, _strict_response_validation=strict, **kwargs)
        self.clients.append(client)
        return client

    def async_client(self, *, strict: bool = True, **kwargs: Any) -> openai.AsyncOpenAI:
        kwargs = {"api_key": self.api_key, "max_retries": 0, **kwargs}
        return openai.AsyncOpenAI(base_url=self.plane.v1, _strict_response_validation=strict, **kwargs)

    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"}


@pytest.fixture
def gateway(plane: RunningPlane, upstream: MockUpstream) -> Iterator[Gateway]:
    plane.create_org("acme")
    plane.add_provider("mock-a", upstream, price_in=1.0, price_out=2.0)
    gateway = Gateway(plane, upstream, plane.create_key("acme"))
    yield gateway
    for client in gateway.clients:
        client.close()


# -- several planes: PostgreSQL and Redis ------------------------------------------------------------------


def require_redis(url: str = REDIS) -> None:
    client = redis.Redis.from_url(url, socket_connect_timeout=2)
    try:
        client.ping()
    except redis.exceptions.ConnectionError as exc:
        pytest.fail(f"these tests need Redis at {url} (issue 17: CI runs one on its standard port): {exc}")
    finally:
        client.close()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def eventually(check: Callable[[], bool], timeout_s: float = 30.0, what: str = "condition") -> None:
    """Poll `check` until it holds; fail naming `what` after `timeout_s` (generous: only a failure waits it out)."""
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


class PrivateRedis:
    """A redis-server of this test's own, without persistence: stopped, it forgets everything."""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        if not Path(REDIS_SERVER).exists():
            pytest.fail(f"this test starts its own Redis and needs {REDIS_SERVER}")
        command = [REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        self.proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        client = redis.Redis.from_url(self.url, socket_connect_timeout=0.2)
        while True:
            try:
                client.ping()
                break
            except redis.exceptions.ConnectionError:
                if time.monotonic() > deadline:
                    raise AssertionError(f"redis-server on port {self.port} never answered") from None
                time.sleep(0.05)
        client.close()

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(10)
            self.proc = None


@pytest.fixture
def private_redis() -> Iterator[PrivateRedis]:
    server = PrivateRedis()
    server.start()
    yield server
    server.stop()


@pytest.fixture
def prefix() -> Iterator[str]:
    """This test's own key prefix on the shared Redis, its keys removed afterwards."""
    require_redis()
    name = f"hatchway-test:{uuid.uuid4().hex[:12]}:"
    yield name
    client = redis.Redis.from_url(REDIS)
    keys = list(client.scan_iter(match=f"{name}*", count=1000))
    if keys:
        client.delete(*keys)
    client.close()


class Planes:
    """Planes started in one loop thread, each a Server of its own; stopped at the end of the test."""

    def __init__(self, loop_thread: LoopThread, base: Config) -> None:
        self.loop_thread = loop_thread
        self.base = base
        self.running: list[RunningPlane] = []

    def start(self, **changes: Any) -> RunningPlane:
        name = f"plane-{len(self.running)}"
        config = self.base.replace(data_dir=self.base.data_dir / name, **changes)

        async def start() -> Server:
            server = Server(config)
            await server.startup()
            return server

        server = self.loop_thread.run(start())
        plane = RunningPlane(server, self.loop_thread, AdminClient(server.url, ADMIN_KEY))
        self.running.append(plane)
        return plane

    def close(self) -> None:
        for plane in self.running:
            plane.admin.close()
            if plane.server.runner.server is not None:
                plane.stop()


@pytest.fixture
def planes(loop_thread: LoopThread, plane_config: Config) -> Iterator[Planes]:
    """Planes on one scratch PostgreSQL database with one secret: they serve the same orgs, keys and providers."""
    from tests.server.storage.test_postgres import scratch_database  # it imports this module

    with scratch_database() as database:
        started = Planes(loop_thread, plane_config.replace(database_url=database, secret_key="shared-test-secret"))
        try:
            yield started
        finally:
            started.close()


# -- nodes across planes: NATS -------------------------------------------------------------------------------

NATS = "nats://127.0.0.1:4222"


def require_nats(url: str = NATS) -> None:
    host, _, port = urlsplit(url).netloc.rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=2).close()
    except OSError as exc:
        pytest.fail(f"these tests need NATS at {url} (issue 17: CI runs one on its standard port): {exc}")


@pytest.fixture
def nats_prefix() -> str:
    """This test's own NATS subjects: planes of other tests (or runs) never hear them."""
    require_nats()
    return f"hatchway-test-{uuid.uuid4().hex[:12]}"
