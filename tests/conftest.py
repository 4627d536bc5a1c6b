"""Fixtures: a real plane and real mock upstreams on loopback, each on its own port, torn down after the test."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import openai
import pytest

from server.cli.client import AdminClient
from server.config import Config
from server.serve import Server
from tests.loop_thread import LoopThread
from tests.mock_upstream import MockUpstream

ADMIN_KEY = "hwa-test-admin-key"
MODEL = "gpt-4o-mini"


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
        # about the test than the plane. tests/test_overload.py turns shedding on where it is the subject.
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

    def client(self, *, strict: bool = True, **kwargs: Any) -> openai.OpenAI:
        kwargs = {"api_key": self.api_key, "max_retries": 0, **kwargs}
        return openai.OpenAI(base_url=self.plane.v1, _strict_response_validation=strict, **kwargs)

    def async_client(self, *, strict: bool = True, **kwargs: Any) -> openai.AsyncOpenAI:
        kwargs = {"api_key": self.api_key, "max_retries": 0, **kwargs}
        return openai.AsyncOpenAI(base_url=self.plane.v1, _strict_response_validation=strict, **kwargs)

    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"}


@pytest.fixture
def gateway(plane: RunningPlane, upstream: MockUpstream) -> Gateway:
    plane.create_org("acme")
    plane.add_provider("mock-a", upstream, price_in=1.0, price_out=2.0)
    return Gateway(plane, upstream, plane.create_key("acme"))
