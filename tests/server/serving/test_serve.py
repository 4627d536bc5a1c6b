"""`hatchway serve` as operators run it: first start, restarts, signals, graceful shutdown."""

from __future__ import annotations

import itertools
import os
import re
import socket
import sqlite3
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import MODEL
from tests.support.mock_upstream import MockUpstream
from tests.support.plane_process import PlaneProcess

ADMIN_KEY_LINE = re.compile(r"Admin key \(shown once.*\): (hwa-\S+)")


@pytest.fixture
def processes() -> Iterator[list[PlaneProcess]]:
    started: list[PlaneProcess] = []
    yield started
    for process in started:
        process.kill()


def test_first_start_prints_an_admin_key_once(tmp_path: Path, processes: list[PlaneProcess]) -> None:
    first = PlaneProcess(tmp_path)
    processes.append(first)
    admin_key = first.wait_for(ADMIN_KEY_LINE).group(1)
    response = httpx.get(f"{first.url}/admin/v1/orgs", headers={"Authorization": f"Bearer {admin_key}"})
    assert response.status_code == 200
    assert first.terminate() == 0

    second = PlaneProcess(tmp_path)
    processes.append(second)
    assert not ADMIN_KEY_LINE.search(second.output)
    response = httpx.get(f"{second.url}/admin/v1/orgs", headers={"Authorization": f"Bearer {admin_key}"})
    assert response.status_code == 200, "the admin key must survive a restart"
    assert admin_key not in (tmp_path / "hatchway.db").read_bytes().decode(errors="replace")


def test_admin_key_from_the_environment_is_used_and_not_printed(tmp_path: Path, processes: list[PlaneProcess]) -> None:
    process = PlaneProcess(tmp_path, env={"HATCHWAY_ADMIN_KEY": "hwa-from-env"})
    processes.append(process)
    assert not ADMIN_KEY_LINE.search(process.output)
    response = httpx.get(f"{process.url}/admin/v1/orgs", headers={"Authorization": "Bearer hwa-from-env"})
    assert response.status_code == 200


def test_sigterm_lets_an_in_flight_request_finish_and_flushes_its_usage(
    tmp_path: Path, processes: list[PlaneProcess], make_upstream: Callable[..., MockUpstream]
) -> None:
    upstream = make_upstream("slow", delay_s=1.0)
    process = PlaneProcess(tmp_path, env={"HATCHWAY_ADMIN_KEY": "hwa-k", "HATCHWAY_USAGE_FLUSH_INTERVAL_S": "60"})
    processes.append(process)
    admin = {"Authorization": "Bearer hwa-k"}
    httpx.post(f"{process.url}/admin/v1/orgs", json={"name": "acme"}, headers=admin).raise_for_status()
    provider = {"org": "acme", "name": "slow", "base_url": upstream.url, "api_keys": ["sk"], "models": [MODEL]}
    httpx.post(f"{process.url}/admin/v1/providers", json=provider, headers=admin).raise_for_status()
    key = httpx.post(f"{process.url}/admin/v1/keys", json={"org": "acme"}, headers=admin).json()["key"]

    result: dict[str, httpx.Response] = {}

    def call() -> None:
        result["response"] = httpx.post(
            f"{process.url}/v1/chat/completions",
            json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}]},
            headers={"Authorization": f"Bearer {key}"},
            timeout=30,
        )

    caller = threading.Thread(target=call)
    caller.start()
    while not upstream.requests:  # the request is in flight once the upstream has it
        threading.Event().wait(0.02)
    assert process.terminate() == 0
    caller.join(10)
    assert result["response"].status_code == 200
    with sqlite3.connect(tmp_path / "hatchway.db") as db:
        assert db.execute("SELECT count(*) FROM usage_record WHERE status = 200").fetchone()[0] == 1


def test_bad_config_file_fails_with_a_message(tmp_path: Path) -> None:
    import subprocess
    import sys

    config = tmp_path / "hatchway.toml"
    config.write_text("[server]\nport = 'eighty'\n")
    proc = subprocess.run(
        [sys.executable, "-m", "server", "serve", "--config", str(config), "--data-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode != 0
    assert "[server].port" in proc.stderr and "Traceback" not in proc.stderr


# What `hatchway serve` imports and does up to serving, in a fresh interpreter, then which modules it left loaded.
STARTUP_MODULES = """
import sys
from pathlib import Path
import server.cli, server.serving.serve
from server.config import Config
from server.plane import Plane
plane = Plane(Config.load(overrides={"data_dir": Path(sys.argv[1])}))
plane.prepare_storage()
print(plane.tls.fingerprint)
print(" ".join(sorted(name for name in sys.modules if name.partition(".")[0] in sys.argv[2:] or name in sys.argv[2:])))
"""


def loaded_at_startup(data_dir: Path, *watched: str) -> set[str]:
    import subprocess
    import sys

    command = [sys.executable, "-c", STARTUP_MODULES, str(data_dir), *watched]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return set(proc.stdout.splitlines()[-1].split())


def test_the_plane_keeps_tooling_it_does_not_serve_with_out_of_memory(tmp_path: Path) -> None:
    # Alembic only when a schema must be upgraded; the admin CLI and its HTTP client never.
    tooling = ("alembic", "mako", "httpx", "server.cli.admin")
    assert loaded_at_startup(tmp_path, *tooling) == set(), "first start, new database"
    # cryptography makes the first start's certificate, and decrypts provider keys: a restart with none needs none.
    assert loaded_at_startup(tmp_path, *tooling, "cryptography") == set(), "restart, no provider keys"


@pytest.mark.parametrize("taken", ["--port", "--grpc-port"])
def test_a_port_in_use_fails_at_once_with_one_line_and_creates_nothing(tmp_path: Path, taken: str) -> None:
    data_dir = tmp_path / "plane"
    with socket.create_server(("127.0.0.1", 0)) as holder:
        ports = {"--port": "0", "--grpc-port": "0", taken: str(holder.getsockname()[1])}
        proc = subprocess.run(
            [sys.executable, "-m", "server", "serve", "--data-dir", str(data_dir), *itertools.chain(*ports.items())],
            capture_output=True,
            text=True,
            timeout=60,
            env={**os.environ, "HATCHWAY_GRPC_PORT": "0"},
        )
    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert proc.stdout == "" and "Admin key" not in proc.stderr
    (line,) = proc.stderr.strip().splitlines()
    assert ports[taken] in line and "in use" in line, line
    assert not data_dir.exists()
