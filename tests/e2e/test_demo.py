"""`make run` (`hatchway demo`): the plane and a local agent with the demo model, a curl that answers, and a link
that makes the console's admin account."""

from __future__ import annotations

import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import httpx
import pytest

from server.accounts.sessions import SESSION_COOKIE


@pytest.fixture(scope="module")
def demo_output(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """What the demo printed once it was ready; it runs until the module's tests are done, then stops on Ctrl-C."""
    data_dir = tmp_path_factory.mktemp("demo")
    proc = subprocess.Popen(
        [sys.executable, "-m", "server", "demo", "--port", "0", "--grpc-port", "0", "--data-dir", str(data_dir)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines: list[str] = []
    stdout = proc.stdout
    assert stdout is not None
    reader = threading.Thread(target=lambda: lines.extend(iter(stdout.readline, "")), daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 120
        while not any("Press Ctrl-C" in line for line in lines):
            assert proc.poll() is None and time.monotonic() < deadline, "".join(lines)
            time.sleep(0.1)
        yield "".join(lines)
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(60) == 0
        reader.join(5)
        stdout.close()


def test_demo_prints_a_curl_that_answers_through_the_local_node(demo_output: str) -> None:
    # Run the very command the demo printed (without the shell: its arguments parsed the same way).
    command = shlex.split(re.search(r"(curl .*?)\n\n", demo_output, re.S).group(1).replace("\\\n", " "))  # type: ignore[union-attr]
    url = command[1]
    headers = dict(h.split(": ", 1) for h in command[command.index("-H") + 1 :: 2][:2])
    body = command[command.index("-d") + 1]
    response = httpx.post(url, content=body, headers=headers, timeout=60)
    assert response.status_code == 200, response.text
    assert "Paris" in response.json()["choices"][0]["message"]["content"]
    assert response.headers["x-hatchway-route"].startswith("node_")


def test_demo_prints_a_one_time_link_that_makes_the_consoles_plane_admin(demo_output: str) -> None:
    link = re.search(r"(http://\S+/console/accept#token=(\S+))", demo_output)
    assert link is not None, demo_output
    base = link.group(1).split("/console/", 1)[0]
    accept = {"token": link.group(2), "name": "Admin", "password": "a long enough password"}
    accepted = httpx.post(f"{base}/auth/invitations/accept", json=accept)
    assert accepted.status_code == 201, accepted.text
    me = httpx.get(f"{base}/admin/v1/me", cookies={SESSION_COOKIE: accepted.cookies[SESSION_COOKIE]})
    assert me.json()["role"] == "plane_admin" and me.json()["email"] == "admin@localhost"
    assert httpx.post(f"{base}/auth/invitations/accept", json=accept).status_code == 400  # once only
