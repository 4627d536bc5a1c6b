"""`hatchway serve --workers N`: several plane processes on one port, supervised (server.serving.workers).

Real processes on loopback. Which worker answered a request is read from the kernel, not from the plane: the
process holding the server end of the request's connection (psutil), while the client keeps it open.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import re
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import orjson
import psutil
import pytest
from click.testing import CliRunner, Result

from server.cli import STARTUP_FAILURE, cli
from server.config import Config, ConfigError
from server.serving.workers import worker_count
from tests.conftest import MODEL
from tests.support.mock_upstream import MockUpstream
from tests.support.plane_process import PlaneProcess
from tests.support.upstream_process import UpstreamProcess

ADMIN_KEY = "hwa-workers-test"
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
# Only stored: the node fleet across workers is server.fleet's, tested there.
NATS = ("--nats-url", "nats://127.0.0.1:4222")
ADMIN_KEY_LINE = re.compile(r"Admin key \(shown once.*\): (hwa-\S+)")
# The bound for a change to be in force everywhere is 1 s; SQLite workers reload each second, plus the
# rebuild and the request: a deadline, not a measurement.
CHANGE_DEADLINE_S = 3.0


@dataclass
class Answer:
    status: int
    body: bytes
    # The process that held the server end of the connection: the worker that answered.
    worker: int


class Gateway:
    """`hatchway serve --workers N` as a subprocess: the supervisor, its workers, and requests that say which
    worker answered."""

    def __init__(self, data_dir: Path, *args: str, env: dict[str, str] | None = None) -> None:
        self.process = PlaneProcess(data_dir, *args, env=env)
        self.url = self.process.url
        self.port = int(urlsplit(self.url).port or 0)

    @property
    def pid(self) -> int:
        return self.process.proc.pid

    def workers(self) -> set[int]:
        """The supervisor's children listening on the HTTP port (multiprocessing's resource tracker is not)."""
        found = set()
        for child in psutil.Process(self.pid).children():
            with contextlib.suppress(psutil.NoSuchProcess):  # it exited meanwhile
                listening = (
                    c.status == psutil.CONN_LISTEN and c.laddr.port == self.port for c in child.net_connections()
                )
                if any(listening):
                    found.add(child.pid)
        return found

    def request(self, method: str, path: str, payload: object = None, key: str = ADMIN_KEY) -> Answer:
        """One request on a connection of its own (so the kernel picks a worker for it)."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        try:
            body = None if payload is None else orjson.dumps(payload)
            conn.request(method, path, body=body, headers={"Authorization": f"Bearer {key}"})
            response = conn.getresponse()
            data = response.read()
            assert conn.sock is not None, "the plane closed the connection: no worker to tell"
            return Answer(response.status, data, self.owner(conn.sock.getsockname()[1]))
        finally:
            conn.close()

    def owner(self, client_port: int) -> int:
        """The pid whose socket is the server end of the connection from `client_port`."""
        processes = [psutil.Process(self.pid), *psutil.Process(self.pid).children()]
        for process in processes:
            with contextlib.suppress(psutil.NoSuchProcess):  # it exited meanwhile
                for conn in process.net_connections(kind="tcp"):
                    if conn.raddr and conn.raddr.port == client_port and conn.laddr.port == self.port:
                        return process.pid
        raise AssertionError(f"no process of the gateway holds the connection from port {client_port}")

    def answered_by_each(self, call: Callable[[], Answer], workers: set[int], deadline_s: float) -> dict[int, Answer]:
        """Repeat `call` (each on a new connection) until every one of `workers` gave a 200."""
        deadline = time.monotonic() + deadline_s
        served: dict[int, Answer] = {}
        while set(served) != workers:
            answer = call()
            if answer.status == 200:
                served[answer.worker] = answer
            assert time.monotonic() < deadline, f"only {sorted(served)} of {sorted(workers)} answered 200: {answer}"
        return served

    def configure(self, upstream_url: str) -> str:
        """An org, a provider and an API key, made through one worker; returns the key."""
        assert self.request("POST", "/admin/v1/orgs", {"name": "acme"}).status == 201
        provider = {"org": "acme", "name": "mock", "base_url": upstream_url, "api_keys": ["sk"], "models": [MODEL]}
        assert self.request("POST", "/admin/v1/providers", provider).status == 201
        created = self.request("POST", "/admin/v1/keys", {"org": "acme"})
        assert created.status == 201, created
        key: str = orjson.loads(created.body)["key"]
        return key

    def chat(self, key: str) -> Answer:
        return self.request("POST", "/v1/chat/completions", chat_body(), key=key)


def chat_body(**extra: object) -> dict[str, object]:
    return {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], **extra}


def start(data_dir: Path, workers: str = "2", env: dict[str, str] | None = None) -> Gateway:
    # The environment of the developer's shell must not reach the gateway (conftest's clean_environ is per test).
    with pytest.MonkeyPatch.context() as patch:
        for name in [n for n in os.environ if n.startswith("HATCHWAY_")]:
            patch.delenv(name)
        return Gateway(data_dir, "--workers", workers, *NATS, env=env)


@pytest.fixture(scope="module")
def upstream_url() -> Iterator[str]:
    upstream = UpstreamProcess("workers")
    yield upstream.url
    upstream.kill()


def kill(gateway: Gateway) -> None:
    workers = gateway.workers() if gateway.process.proc.poll() is None else set()
    gateway.process.kill()
    for pid in workers:  # they would drain and exit on their own, seeing the supervisor gone: sooner
        with contextlib.suppress(psutil.NoSuchProcess):  # it exited meanwhile
            psutil.Process(pid).kill()


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    """Two workers on SQLite, first start: the admin key is generated (and read from the output)."""
    gateway = start(tmp_path_factory.mktemp("workers"))
    yield gateway
    kill(gateway)


@pytest.fixture
def gateways() -> Iterator[list[Gateway]]:
    started: list[Gateway] = []
    yield started
    for gateway in started:
        kill(gateway)


def admin_key(gateway: Gateway) -> str:
    return gateway.process.wait_for(ADMIN_KEY_LINE).group(1)


def test_two_workers_answer_on_one_port(gateway: Gateway) -> None:
    workers = gateway.workers()
    assert len(workers) == 2 and gateway.pid not in workers
    answered = gateway.answered_by_each(lambda: gateway.request("GET", "/readyz"), workers, deadline_s=10)
    assert set(answered) == workers


def test_the_generated_admin_key_is_printed_once_and_works_on_every_worker(gateway: Gateway) -> None:
    key = admin_key(gateway)
    assert len(ADMIN_KEY_LINE.findall(gateway.process.output)) == 1
    assert gateway.process.output.count("Hatchway listening on") == 1
    orgs = lambda: gateway.request("GET", "/admin/v1/orgs", key=key)  # noqa: E731
    gateway.answered_by_each(orgs, gateway.workers(), deadline_s=10)


def test_a_change_made_through_one_worker_is_in_force_on_every_worker_within_a_second(
    gateway: Gateway, upstream_url: str
) -> None:
    headers = {"Authorization": f"Bearer {admin_key(gateway)}"}
    httpx.post(f"{gateway.url}/admin/v1/orgs", json={"name": "change"}, headers=headers).raise_for_status()
    provider = {"org": "change", "name": "mock", "base_url": upstream_url, "api_keys": ["sk"], "models": [MODEL]}
    httpx.post(f"{gateway.url}/admin/v1/providers", json=provider, headers=headers).raise_for_status()
    created = httpx.post(f"{gateway.url}/admin/v1/keys", json={"org": "change"}, headers=headers)
    made_at = time.monotonic()
    key = created.raise_for_status().json()["key"]
    gateway.answered_by_each(lambda: gateway.chat(key), gateway.workers(), deadline_s=CHANGE_DEADLINE_S)
    print(f"in force on every worker {time.monotonic() - made_at:.2f}s after the change")


def test_a_worker_killed_is_replaced_and_the_port_keeps_answering(tmp_path: Path, gateways: list[Gateway]) -> None:
    gateway = start(tmp_path, env={"HATCHWAY_ADMIN_KEY": ADMIN_KEY})
    gateways.append(gateway)
    victim, survivor = sorted(gateway.workers())
    os.kill(victim, signal.SIGKILL)
    psutil.Process(victim).wait(10)
    # At once: the kernel gives new connections only to the sockets still listening.
    assert {gateway.request("GET", "/readyz").worker for _ in range(10)} == {survivor}
    gateway.process.wait_for(re.compile(rf"worker \d \(pid {victim}\) was killed by SIGKILL.*starting it again"))
    deadline = time.monotonic() + 30
    while len(replaced := gateway.workers()) < 2:
        assert time.monotonic() < deadline, f"no worker replaced {victim}:\n{gateway.process.output}"
        time.sleep(0.1)
    assert survivor in replaced and victim not in replaced
    gateway.answered_by_each(lambda: gateway.request("GET", "/readyz"), replaced, deadline_s=10)


def test_sigterm_lets_an_in_flight_stream_finish_then_every_worker_exits(
    tmp_path: Path, gateways: list[Gateway], make_upstream: Callable[..., MockUpstream], upstream_url: str
) -> None:
    words = "one two three four five six seven eight"
    slow = make_upstream("slow", reply=words, chunk_delay_s=0.25)
    gateway = start(tmp_path, env={"HATCHWAY_ADMIN_KEY": ADMIN_KEY})
    gateways.append(gateway)
    key = gateway.configure(slow.url)
    workers = gateway.workers()
    gateway.answered_by_each(lambda: gateway.chat(key), workers, deadline_s=CHANGE_DEADLINE_S)

    first_chunk = threading.Event()
    streamed: list[bytes] = []

    def stream() -> None:
        with httpx.stream(
            "POST",
            f"{gateway.url}/v1/chat/completions",
            json=chat_body(stream=True),
            headers={"Authorization": f"Bearer {key}"},
            timeout=30,
        ) as response:
            assert response.status_code == 200
            for chunk in response.iter_bytes():
                streamed.append(chunk)
                first_chunk.set()

    caller = threading.Thread(target=stream)
    caller.start()
    assert first_chunk.wait(10), "the stream never started"
    assert gateway.process.terminate() == 0
    caller.join(10)
    body = b"".join(streamed).decode()
    assert body.rstrip().endswith("data: [DONE]"), body
    assert all(word in body for word in words.split())
    assert not any(psutil.pid_exists(pid) and psutil.Process(pid).status() != "zombie" for pid in workers)
    assert "killing it" not in gateway.process.output


def test_one_worker_is_the_lone_plane_as_before(tmp_path: Path, gateways: list[Gateway]) -> None:
    gateway = start(tmp_path, workers="1")
    gateways.append(gateway)
    assert gateway.workers() == set()
    assert gateway.request("GET", "/readyz").worker == gateway.pid
    assert f"Hatchway listening on {gateway.url}\n" in gateway.process.output + "\n"


def test_auto_is_one_worker_per_usable_cpu() -> None:
    assert worker_count(Config.load(environ={"HATCHWAY_WORKERS": "auto"})) == len(os.sched_getaffinity(0))


@pytest.mark.parametrize("value", ["0", "-1", "x", "1.5"])
def test_a_workers_value_that_is_not_a_count_is_a_config_error(value: str) -> None:
    with pytest.raises(ConfigError, match=r"workers: expected"):
        worker_count(Config.load(overrides={"workers": value}))


def serve(data_dir: Path, *args: str) -> Result:
    """`hatchway serve` in this process: it fails before serving anything."""
    return CliRunner().invoke(cli, ["serve", "--port", "0", "--grpc-port", "0", "--data-dir", str(data_dir), *args])


def test_a_bad_workers_flag_fails_to_start_with_one_line(tmp_path: Path) -> None:
    result = serve(tmp_path / "data", "--workers", "-1", *NATS)
    assert result.exit_code == STARTUP_FAILURE, result.output
    (line,) = result.stderr.strip().splitlines()
    assert "workers: expected at least 1" in line
    assert not (tmp_path / "data").exists()


def test_several_workers_without_a_nats_url_refuse_to_start(tmp_path: Path) -> None:
    result = serve(tmp_path / "data", "--workers", "2")
    assert result.exit_code == STARTUP_FAILURE, result.output
    assert "--workers 2 needs --nats-url so every worker reaches every node" in result.stderr
    assert not (tmp_path / "data").exists()
