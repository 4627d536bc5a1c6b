"""Pack into .gpu/ what bench/gpu.py needs on the GPU machine, which reaches no network.

    .venv/bin/python bench/gpu_carry.py            # ~1 min; then the device run names .gpu in `carry`

The device tool copies the working tree plus named ignored folders, 64 MiB in all (/work/.library/device). That
machine has Python 3.12 with CUDA's compiler, CMake, ninja, scikit-build-core, numpy and NVML's bindings, but not
this project's other dependencies, llama-cpp-python, or a model; the demo model alone (100 MB) is over the limit.
So .gpu/ holds:

- llama-cpp.tar.xz: llama-cpp-python's sdist trimmed to what a CPU or CUDA build compiles (llama.cpp's docs, test
  vocabularies, UI, examples and the other accelerators' backends dropped), built there with CUDA;
- wheels/: the pure-Python and manylinux x86-64 wheels of this project's runtime dependencies for that Python,
  at the versions installed here, so that the plane and the agent there run what the suite here tested;
- template.gguf: the demo model's metadata, tokenizer included, and no tensors (bench/synth_model.py template):
  bench/gpu.py writes random-weight models of the demo's shape and of a 1.7 B one from it there.
"""

from __future__ import annotations

import argparse
import io
import shutil
import subprocess
import sys
import tarfile
import tempfile
from importlib import metadata
from pathlib import Path

from harness import REPO_ROOT, BenchError
from node import model_path
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from synth_model import write_template

DEST = REPO_ROOT / ".gpu"
LIMIT_BYTES = 64 * 2**20
LLAMA_CPP = "llama-cpp-python==0.3.36"
# The device image's Python, as seen there (/work/.library/device/KINDS.md): markers read the full version.
PYTHON_VERSION = "3.12.3"
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64", "manylinux1_x86_64")
# Not carried: numpy is there already (and large), llama-cpp-python is built there (its own requirements are
# carried), psycopg is PostgreSQL's driver, which a plane on its embedded SQLite never imports.
LEAVE_OUT = {"numpy", "llama-cpp-python", "psycopg", "psycopg-binary"}
# Not requirements of the project's runtime but run there: the CUDA build's backend (pip builds without isolation,
# with no index to fetch it from), PyInstaller for the CUDA folder (bench/gpu.py --binary), and gguf for
# bench/synth_model.py.
TOOLS = ("scikit-build-core", "pathspec", "pyinstaller", "pyinstaller-hooks-contrib", "altgraph", "gguf", "tqdm")
# Parts of the sdist no CPU or CUDA build reads (llama-cpp-python's CMakeLists builds llama, ggml, common and, of
# llama.cpp's tools, mtmd): the sdist's own git history (38 MB), docs, test vocabularies, examples, media.
TRIM = (
    ".git",
    "docs",
    "examples",
    "vendor/llama.cpp/.github",
    "vendor/llama.cpp/benches",
    "vendor/llama.cpp/docs",
    "vendor/llama.cpp/examples",
    "vendor/llama.cpp/media",
    "vendor/llama.cpp/models",
    "vendor/llama.cpp/tests",
    "vendor/llama.cpp/tools/mtmd/tests",
)
TOOLS_KEPT = "mtmd"
MEDIA = (".mp4", ".png", ".jpg", ".jpeg", ".gif", ".wav", ".mp3")
OTHER_BACKENDS = (
    "cann",
    "et",
    "hexagon",
    "metal",
    "musa",
    "opencl",
    "openvino",
    "sycl",
    "virtgpu",
    "vulkan",
    "webgpu",
    "zdnn",
    "zendnn",
)


def runtime_distributions(python_version: str = PYTHON_VERSION) -> dict[str, str]:
    """name -> installed version of what the plane and the agent need at run time on that machine: this project's
    requirements with the agent extra, and theirs, as markers for Linux and its Python select them."""
    environment = {"python_version": minor(python_version), "python_full_version": python_version}
    environment |= {"sys_platform": "linux", "platform_system": "Linux", "platform_machine": "x86_64"}
    found: dict[str, str] = {}
    seen: set[str] = set()
    pending: list[tuple[str, tuple[str, ...]]] = [("hatchway", ("agent",))]
    while pending:
        distribution, extras = pending.pop()
        for line in metadata.requires(distribution) or ():
            requirement = Requirement(line)
            marker = requirement.marker
            if marker is not None and not any(marker.evaluate({**environment, "extra": e}) for e in ("", *extras)):
                continue
            name = canonicalize_name(requirement.name)
            if name in seen:
                continue
            seen.add(name)
            pending.append((name, tuple(requirement.extras)))
            if name not in LEAVE_OUT:
                found[name] = metadata.version(name)
    return found


def tool_distributions() -> dict[str, str]:
    """TOOLS at the versions installed here, else the newest (scikit-build-core is pip's business here)."""
    found: dict[str, str] = {}
    for name in TOOLS:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = ""
    return found


def minor(version: str) -> str:
    return ".".join(version.split(".")[:2])


def download_wheels(distributions: dict[str, str], dest: Path, python_version: str = PYTHON_VERSION) -> None:
    dest.mkdir(parents=True)
    argv = [sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check", "--no-deps"]
    argv += [
        "--only-binary=:all:",
        "--python-version",
        minor(python_version),
        "--implementation",
        "cp",
        "-d",
        str(dest),
    ]
    for platform in PLATFORMS:
        argv += ["--platform", platform]
    argv += [f"{name}=={version}" if version else name for name, version in sorted(distributions.items())]
    subprocess.run(argv, check=True)


def trimmed_sdist(dest: Path) -> None:
    """llama-cpp-python's sdist without what no build reads, as .tar.xz."""
    with tempfile.TemporaryDirectory() as scratch:
        argv = [sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check", "--no-deps"]
        argv += ["--no-binary=:all:", "-d", scratch, LLAMA_CPP]
        subprocess.run(argv, check=True)
        (sdist,) = Path(scratch).glob("llama_cpp_python-*.tar.gz")
        with tarfile.open(sdist) as source, tarfile.open(dest, "w:xz", preset=6) as target:
            for member in source:
                relative = member.name.partition("/")[2]
                if _trimmed(relative):
                    continue
                data = source.extractfile(member) if member.isfile() else None
                target.addfile(member, io.BytesIO(data.read()) if data is not None else None)


def _trimmed(relative: str) -> bool:
    if any(relative == part or relative.startswith(part + "/") for part in TRIM) or relative.endswith(MEDIA):
        return True
    tools = "vendor/llama.cpp/tools/"
    if relative.startswith(tools) and relative[len(tools) :].split("/")[0] != TOOLS_KEPT:
        return True
    backends = "vendor/llama.cpp/ggml/src/ggml-"
    return relative.startswith(backends) and relative[len(backends) :].split("/")[0] in OTHER_BACKENDS


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dest", type=Path, default=DEST, help=f"where to pack (default {DEST})")
    parser.add_argument(
        "--python-version",
        default=PYTHON_VERSION,
        help=f"the wheels' Python (default {PYTHON_VERSION}, the GPU machine's)",
    )
    args = parser.parse_args(argv)
    dest: Path = args.dest
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    distributions = {**tool_distributions(), **runtime_distributions(args.python_version)}
    download_wheels(distributions, dest / "wheels", args.python_version)
    trimmed_sdist(dest / "llama-cpp.tar.xz")
    write_template(model_path(), dest / "template.gguf")
    sizes = {path.relative_to(dest): path.stat().st_size for path in sorted(dest.rglob("*")) if path.is_file()}
    total = sum(sizes.values())
    for path, size in sizes.items():
        print(f"{size / 2**20:8.2f} MiB  {path}")
    tree = sum(p.stat().st_size for p in _tracked_files())
    print(f"{total / 2**20:8.2f} MiB in {dest}; the working tree adds {tree / 2**20:.2f} MiB (limit 64 MiB)")
    if total + tree > LIMIT_BYTES:
        raise BenchError(f"{dest} and the tree come to {(total + tree) / 2**20:.1f} MiB, over the device's 64 MiB")
    return 0


def _tracked_files() -> list[Path]:
    listed = subprocess.run(["git", "ls-files", "-z"], capture_output=True, cwd=REPO_ROOT, check=True).stdout
    return [REPO_ROOT / name for name in listed.decode().split("\0") if name and (REPO_ROOT / name).is_file()]


if __name__ == "__main__":
    sys.exit(main())
