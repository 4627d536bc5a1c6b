"""The agent's entry point (`hatchway-agent`, `python -m agent`, the PyInstaller build): the CLI, or, when
llama.cpp's libraries cannot be loaded, a message a provider can act on instead of a traceback.

llama-cpp-python loads its shared libraries when it is imported, which the CLI does at start-up. A CUDA build's
backend links the NVIDIA driver's library (libcuda.so.1 / nvcuda.dll), which comes with the GPU's driver, not with
the agent: on a machine whose driver is missing or broken nothing of the agent could start, `--help` included. The
error does not always say so (the PyInstaller build reports only that libllama could not be loaded), so the
diagnosis is made here: a CUDA build (libggml-cuda beside libllama) whose driver library does not load.
"""

from __future__ import annotations

import ctypes
import importlib.util
import sys
from pathlib import Path

# What llama-cpp-python raises when one of its libraries does not load (llama_cpp._ctypes_extensions).
LOAD_FAILURE = "Failed to load shared library"
CUDA_BACKENDS = ("libggml-cuda.so", "ggml-cuda.dll")
DRIVER_LIBRARY = "nvcuda.dll" if sys.platform == "win32" else "libcuda.so.1"
CPU_OPTION = "-Accel cpu" if sys.platform == "win32" else "--accel cpu"
DRIVER_ADVICE = (
    "This is the CUDA build: it needs the NVIDIA driver ({library}), which is missing or broken here (`nvidia-smi`"
    " should list the GPU). Install or repair the driver, or reinstall the CPU build with the installer's"
    " `{option}`."
)


def load_failure_message(error: BaseException, driver_missing: bool) -> str | None:
    """What to tell the provider when `error` is llama.cpp's libraries failing to load (`driver_missing`: a CUDA
    build whose driver library does not load); None for any other error."""
    text = str(error)
    if LOAD_FAILURE not in text:
        return None
    message = f"hatchway-agent: llama.cpp cannot be loaded: {text}"
    if driver_missing or DRIVER_LIBRARY in text:
        message += "\n" + DRIVER_ADVICE.format(library=DRIVER_LIBRARY, option=CPU_OPTION)
    return message


def cuda_driver_missing() -> bool:
    """Whether llama_cpp is a CUDA build (found without importing it) whose driver library does not load."""
    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or not spec.submodule_search_locations:
        return False
    lib = Path(spec.submodule_search_locations[0]) / "lib"
    if not any((lib / name).exists() for name in CUDA_BACKENDS):
        return False
    try:
        ctypes.CDLL(DRIVER_LIBRARY)
    except OSError:
        return True
    return False


def main() -> None:
    try:
        from agent.cli import main as cli_main
    except (RuntimeError, OSError) as exc:
        message = load_failure_message(exc, cuda_driver_missing())
        if message is None:
            raise
        sys.exit(message)
    cli_main()
