"""`make run` (`hatchway demo`): the plane and a local agent with the demo model, and a curl that answers."""

from __future__ import annotations

import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx


def test_demo_prints_a_curl_that_answers_through_the_local_node(tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "server", "demo", "--port", "0", "--grpc-port", "0", "--data-dir", str(tmp_path)],
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
        output = "".join(lines)
        # Run the very command the demo printed (without the shell: its arguments parsed the same way).
        command = shlex.split(re.search(r"(curl .*?)\n\n", output, re.S).group(1).replace("\\\n", " "))  # type: ignore[union-attr]
        url = command[1]
        headers = dict(h.split(": ", 1) for h in command[command.index("-H") + 1 :: 2][:2])
        body = command[command.index("-d") + 1]
        response = httpx.post(url, content=body, headers=headers, timeout=60)
        assert response.status_code == 200, response.text
        assert "Paris" in response.json()["choices"][0]["message"]["content"]
        assert response.headers["x-hatchway-route"].startswith("node_")
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(60) == 0
        reader.join(5)
        stdout.close()
