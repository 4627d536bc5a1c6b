"""The CI workflow (.github/workflows/ci.yml) runs `make test` on pushes and pull requests, on Linux, with the
services the suite needs on their standard ports. It cannot run here; these checks read it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from tests.conftest import REPO

WORKFLOW = REPO / ".github" / "workflows" / "ci.yml"
TOOLS = Path(sys.executable).parent  # actionlint and shellcheck: installed by the dev extra


def workflow() -> dict[str, Any]:
    document: dict[Any, Any] = yaml.safe_load(WORKFLOW.read_text())
    # YAML 1.1 reads the key `on` as True.
    document["on"] = document.pop(True, document.get("on"))
    return document


def test_the_workflow_passes_actionlint_with_shellcheck() -> None:
    env = {**os.environ, "PATH": f"{TOOLS}{os.pathsep}{os.environ.get('PATH', '')}"}
    result = subprocess.run([str(TOOLS / "actionlint"), str(WORKFLOW)], capture_output=True, text=True, env=env)
    assert (result.returncode, result.stdout) == (0, "")


def test_it_runs_on_every_push_and_pull_request() -> None:
    triggers = workflow()["on"]
    assert "push" in triggers and triggers["push"] is None
    assert "pull_request" in triggers


def test_it_runs_make_test_on_linux() -> None:
    (job,) = workflow()["jobs"].values()
    assert job["runs-on"].startswith("ubuntu")
    commands = [line.strip() for step in job["steps"] for line in step.get("run", "").splitlines()]
    assert "make test" in commands


def test_it_starts_postgresql_redis_and_nats_with_jetstream_on_their_standard_ports() -> None:
    (job,) = workflow()["jobs"].values()
    services = job["services"]
    assert services["postgres"]["ports"] == ["5432:5432"]
    assert services["postgres"]["env"]["POSTGRES_HOST_AUTH_METHOD"] == "trust"
    assert services["redis"]["ports"] == ["6379:6379"]
    nats = next(step["run"] for step in job["steps"] if "nats" in step.get("run", ""))
    assert "--publish 4222:4222" in nats and " -js" in nats


def test_the_installers_workflow_stays_beside_it() -> None:
    assert (WORKFLOW.parent / "installers.yml").is_file()
