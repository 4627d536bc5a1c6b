"""The PyInstaller build of hatchway-agent (`make agent-binary`), run as a provider would: no Python around it."""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from agent.cli import demo_model_path
from tests.conftest import RunningPlane
from tests.support.agent_build import EXECUTABLE, agent_build, without_python
from tests.support.agent_process import DEMO_MODEL, describe

# The first test of a session may wait for the build (about 30 s here, longer on a busy machine).
pytestmark = pytest.mark.timeout(600)

QUESTION = [
    {"role": "system", "content": "Answer the question."},
    {"role": "user", "content": "What is the capital of France?"},
]


@pytest.fixture(scope="module")
def build() -> Path:
    return agent_build()


@pytest.fixture
def model(tmp_path: Path) -> Path:
    """The demo GGUF outside the virtualenv, which the runs below hide."""
    return Path(shutil.copy(demo_model_path(), tmp_path / "smollm2.gguf"))


@pytest.fixture
def frozen_agent(tmp_path: Path) -> Iterator[list[subprocess.Popen[str]]]:
    started: list[subprocess.Popen[str]] = []
    yield started
    for proc in started:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_no_python_is_left_to_run_under_the_isolation_the_build_is_tested_in(build: Path) -> None:
    result = subprocess.run(without_python(["python3", "-c", "print('python found')"]), capture_output=True, text=True)
    assert result.returncode != 0 and "python found" not in result.stdout


def test_the_build_bundles_python_llama_cpp_and_grpc_root_certificates(build: Path) -> None:
    bundled = build / "_internal"
    assert list(bundled.glob("libpython3*.so*"))
    assert list((bundled / "llama_cpp" / "lib").glob("libllama.so*"))
    assert list((bundled / "llama_cpp" / "lib").glob("libggml*.so*"))
    assert (bundled / "grpc" / "_cython" / "_credentials" / "roots.pem").is_file()


def test_the_build_enrolls_and_answers_a_chat_completion_with_no_python_on_the_machine(
    build: Path, plane: RunningPlane, model: Path, tmp_path: Path, frozen_agent: list[subprocess.Popen[str]]
) -> None:
    plane.create_org("acme")
    key = plane.create_key("acme")
    token = plane.admin.post("/node-tokens", {"org": "acme"})["token"]
    address = f"127.0.0.1:{plane.server.plane.grpc_port}"
    config = tmp_path / "agent.json"

    enroll = [str(EXECUTABLE), "enroll", "--plane", address, "--token", token, "--name", "frozen"]
    enrolled = subprocess.run(
        without_python([*enroll, "--config", str(config)]), capture_output=True, text=True, timeout=120
    )
    assert enrolled.returncode == 0, describe(enrolled)

    log = tmp_path / "agent.log"
    run = [str(EXECUTABLE), "run", "--config", str(config), "--model", f"{model}={DEMO_MODEL}"]
    with log.open("w") as out:
        frozen_agent.append(
            subprocess.Popen(
                without_python([*run, "--context", "1024", "--threads", "1"]), stdout=out, stderr=subprocess.STDOUT
            )
        )
    node = wait_for_ready_node(plane, "frozen", log)

    with openai.OpenAI(base_url=plane.v1, api_key=key, max_retries=0) as client:
        raw = client.chat.completions.with_raw_response.create(
            model=DEMO_MODEL, messages=QUESTION, temperature=0, max_tokens=24
        )
    assert "Paris" in (raw.parse().choices[0].message.content or "")
    assert raw.headers["x-hatchway-route"] == node


def test_the_build_refuses_to_install_a_service_without_root(build: Path) -> None:
    as_nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
    result = subprocess.run([*as_nobody, str(EXECUTABLE), "service", "install"], capture_output=True, text=True)
    assert result.returncode == 1
    assert "needs root" in result.stderr


def wait_for_ready_node(plane: RunningPlane, name: str, log: Path, timeout_s: float = 120) -> str:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for node in plane.admin.get("/nodes")["data"]:
            if node["name"] == name and node["state"] == "ready":
                return str(node["id"])
        time.sleep(0.2)
    raise AssertionError(f"node {name} never became ready; agent output:\n{log.read_text()}")
