"""When llama.cpp's libraries cannot be loaded (a CUDA build on a machine whose NVIDIA driver is missing), the
agent says what to do instead of a traceback (agent.launch). The failure is a stand-in llama_cpp package that
raises what the PyInstaller build raises: the real one cannot be made to fail on a machine that runs the tests."""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys
from pathlib import Path

from agent.launch import CPU_OPTION, DRIVER_LIBRARY, load_failure_message
from tests.conftest import REPO

# What the PyInstaller build's llama_cpp raised on this GPU-less machine (bench/results/gpu/cuda-build.md): it names
# libllama, not the driver library that libggml-cuda could not find.
FROZEN_FAILURE = (
    "Failed to load shared library '/opt/hatchway-agent/_internal/llama_cpp/lib/libllama.so': Failed to load "
    "dynlib/dll '/opt/hatchway-agent/_internal/llama_cpp/lib/libllama.so'. Most likely this dynlib/dll was not "
    "found when the application was frozen."
)
# What a pip-installed CUDA llama_cpp raises: the loader's own words.
PIP_FAILURE = (
    "Failed to load shared library '/venv/llama_cpp/lib/libggml-cuda.so': "
    f"{DRIVER_LIBRARY}: cannot open shared object file: No such file or directory"
)


def test_a_cuda_build_without_its_driver_is_named_with_what_to_do() -> None:
    message = load_failure_message(RuntimeError(FROZEN_FAILURE), driver_missing=True)
    assert message is not None
    assert "libllama.so" in message and "NVIDIA driver" in message and CPU_OPTION in message


def test_an_error_naming_the_driver_library_gets_the_advice_too() -> None:
    message = load_failure_message(RuntimeError(PIP_FAILURE), driver_missing=False)
    assert message is not None and "NVIDIA driver" in message


def test_another_library_that_fails_to_load_is_named_without_the_cuda_advice() -> None:
    message = load_failure_message(RuntimeError(FROZEN_FAILURE), driver_missing=False)
    assert message is not None and "libllama.so" in message and "NVIDIA" not in message


def test_an_unrelated_error_is_not_taken_for_a_load_failure() -> None:
    assert load_failure_message(RuntimeError("something else"), driver_missing=True) is None


def driver_loads() -> bool:
    try:
        ctypes.CDLL(DRIVER_LIBRARY)
    except OSError:
        return False
    return True


def test_a_cuda_build_that_cannot_load_exits_with_the_diagnosis_not_a_traceback(tmp_path: Path) -> None:
    fake = tmp_path / "llama_cpp"
    (fake / "lib").mkdir(parents=True)
    (fake / "lib" / "libggml-cuda.so").write_bytes(b"")  # what makes it a CUDA build
    (fake / "__init__.py").write_text(f"raise RuntimeError({FROZEN_FAILURE!r})\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(REPO)])}
    result = subprocess.run(
        [sys.executable, "-m", "agent", "--help"], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=60
    )
    assert result.returncode == 1
    assert "llama.cpp cannot be loaded" in result.stderr and "Traceback" not in result.stderr
    # The advice follows what this machine is: no driver here (the project's machines), the driver elsewhere.
    assert ("NVIDIA driver" in result.stderr) is not driver_loads()
