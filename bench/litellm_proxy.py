"""LiteLLM's proxy as a second gateway to compare with: installed into its own virtualenv on first use
(bench/.venv-litellm, git-ignored), configured with the mock upstream's two answers and a master key (so it
authenticates like Hatchway does), and run with one worker on the SUT CPU.

Nothing here may fail the whole benchmark: `start_litellm` returns a `LiteLLM` whose `error` says why it is
missing, and the results record that instead of its figures.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from harness import BENCH_DIR, HOST, BenchError, Child, Pinning, child_env, child_process, free_port, log, wait_for_tcp
from upstream import UPSTREAM_MODEL, Upstream

# Pinned, so every run measures the same proxy. The newest release whose `proxy` extra resolves from the
# registry here: later ones pin litellm-proxy(-extras) versions that are not published. (1.107.0, the release
# pulled as compromised, is not a candidate either way.)
LITELLM_REQUIREMENT = "litellm[proxy]==1.106.12"
VENV = BENCH_DIR / ".venv-litellm"
MASTER_KEY = "sk-litellm-bench-master"
MODELS = {"json": "bench-json", "sse": "bench-sse"}
INSTALL_TIMEOUT_S = 900.0
STARTUP_TIMEOUT_S = 120.0


@dataclass
class LiteLLM:
    url: str = ""
    child: Child | None = None
    version: str | None = None
    ready_s: float = 0.0
    error: str | None = None


def ensure_installed() -> Path:
    """The venv's `litellm` script, creating the venv and installing the pinned proxy when needed."""
    script = VENV / "bin" / "litellm"
    python = VENV / "bin" / "python"
    if script.exists() and _installed_version(python) == LITELLM_REQUIREMENT.rpartition("==")[2]:
        return script
    if not python.exists():
        log(f"creating {VENV.relative_to(BENCH_DIR.parent)} for LiteLLM")
        subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True, capture_output=True, timeout=120)
    log(f"installing {LITELLM_REQUIREMENT} into {VENV.relative_to(BENCH_DIR.parent)} (first run only, minutes)")
    result = subprocess.run(
        [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", LITELLM_REQUIREMENT],
        capture_output=True,
        text=True,
        timeout=INSTALL_TIMEOUT_S,
        check=False,
    )
    if result.returncode != 0 or not script.exists():
        raise BenchError(f"pip install {LITELLM_REQUIREMENT} failed: {(result.stderr or result.stdout)[-1500:]}")
    return script


def _installed_version(python: Path) -> str | None:
    if not python.exists():
        return None
    code = "import importlib.metadata as m; print(m.version('litellm'))"
    result = subprocess.run([str(python), "-c", code], capture_output=True, text=True, timeout=60, check=False)
    return result.stdout.strip() or None


def config_yaml(upstream: Upstream) -> str:
    """JSON is YAML: no YAML writer needed."""
    import json

    models = [
        {
            "model_name": model,
            "litellm_params": {
                "model": f"openai/{UPSTREAM_MODEL}",
                "api_base": upstream.url(answer),
                "api_key": "sk-mock",
            },
        }
        for answer, model in MODELS.items()
    ]
    doc = {
        "model_list": models,
        "general_settings": {"master_key": MASTER_KEY},
        "litellm_settings": {"drop_params": True, "telemetry": False},
    }
    return json.dumps(doc, indent=2)


def start_litellm(stack: contextlib.ExitStack, workdir: Path, pinning: Pinning, upstream: Upstream) -> LiteLLM:
    try:
        script = ensure_installed()
    except (BenchError, OSError, subprocess.SubprocessError) as exc:
        log(f"LiteLLM left out: {exc}")
        return LiteLLM(error=f"install failed: {exc}"[:2000])
    version = _installed_version(VENV / "bin" / "python")
    config = workdir / "litellm.yaml"
    config.write_text(config_yaml(upstream))
    port = free_port()
    argv = [str(script), "--config", str(config), "--host", HOST, "--port", str(port), "--num_workers", "1"]
    env = child_env(
        # No network here: use the cost map shipped in the package instead of fetching one at start-up.
        LITELLM_LOCAL_MODEL_COST_MAP="True",
        LITELLM_LOG="ERROR",
        LITELLM_TELEMETRY="False",
        PYTHONUNBUFFERED="1",
    )
    try:
        child = stack.enter_context(child_process("litellm proxy", pinning.sut(argv), workdir / "litellm.log", env))
        wait_for_tcp(child, port, STARTUP_TIMEOUT_S)
    except BenchError as exc:
        log(f"LiteLLM left out: {exc}")
        return LiteLLM(version=version, error=f"did not start: {exc}"[:2000])
    return LiteLLM(f"http://{HOST}:{port}", child, version, time.perf_counter() - child.started_at)
