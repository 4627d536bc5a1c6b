"""The installers pick the build for the machine's accelerator (a fake `nvidia-smi` and `uname` on a PATH of their
own stand in for the hardware), and the PyInstaller spec's CUDA build collects the runtime libraries it links
(installers/pyinstaller/accel_libs.py, on a fake tree of libraries: no CUDA build is run)."""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
from collections.abc import Callable, Iterable
from pathlib import Path

import pytest

from tests.conftest import REPO
from tests.support.scripts import load_script

LINUX_INSTALL = REPO / "installers" / "linux" / "install.sh"
MACOS_INSTALL = REPO / "installers" / "macos" / "install.sh"
GPU_LINE = "GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-0b1c2d3e-0000-1111-2222-333344445555)"
# The only real tools the installers' detection runs: everything else on PATH is fake or absent.
TOOLS = ("grep", "head", "dirname", "uname")


accel_libs = load_script(REPO / "installers" / "pyinstaller" / "accel_libs.py")


def fake_path(tmp_path: Path, **scripts: str) -> str:
    """A PATH holding the real tools the detection needs and the given fake commands (name: shell body)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in TOOLS:
        if tool not in scripts:
            real = shutil.which(tool)
            assert real is not None, f"{tool} is not on this machine's PATH"
            (bin_dir / tool).symlink_to(real)
    for name, body in scripts.items():
        script = bin_dir / name.replace("_", "-")
        script.write_text(f"#!/bin/sh\n{body}\n")
        script.chmod(0o755)
    return str(bin_dir)


def nvidia_smi_listing(*lines: str) -> str:
    """A fake `nvidia-smi` that answers -L with these lines."""
    return "\n".join(f"echo '{line}'" for line in lines)


def uname(system: str, machine: str) -> str:
    return f'case "$1" in -s) echo {system} ;; -m) echo {machine} ;; *) echo {system} ;; esac'


def detect(script: Path, path: str, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["/bin/sh", str(script), "--detect", *args],
        capture_output=True,
        text=True,
        timeout=30,
        env={"PATH": path, **(env or {})},
    )


def accelerator(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, result.stdout + result.stderr
    line = next(line for line in result.stdout.splitlines() if line.startswith("Accelerator: "))
    return line.removeprefix("Accelerator: ")


# -- Linux: nvidia-smi ---------------------------------------------------------------------------------------------


def test_linux_installer_chooses_cuda_when_nvidia_smi_lists_a_gpu(tmp_path: Path) -> None:
    path = fake_path(tmp_path, nvidia_smi=nvidia_smi_listing(GPU_LINE), uname=uname("Linux", "x86_64"))
    assert accelerator(detect(LINUX_INSTALL, path)) == f"cuda (nvidia-smi lists 1 NVIDIA GPU(s): {GPU_LINE})."


def test_linux_installer_counts_every_gpu_nvidia_smi_lists(tmp_path: Path) -> None:
    second = GPU_LINE.replace("GPU 0", "GPU 1")
    path = fake_path(tmp_path, nvidia_smi=nvidia_smi_listing(GPU_LINE, second), uname=uname("Linux", "x86_64"))
    assert accelerator(detect(LINUX_INSTALL, path)).startswith("cuda (nvidia-smi lists 2 NVIDIA GPU(s): GPU 0:")


def test_linux_installer_chooses_cpu_when_nvidia_smi_fails(tmp_path: Path) -> None:
    failing = "echo 'NVIDIA-SMI has failed because it could not communicate with the NVIDIA driver.'; exit 9"
    path = fake_path(tmp_path, nvidia_smi=failing, uname=uname("Linux", "x86_64"))
    assert accelerator(detect(LINUX_INSTALL, path)) == (
        "cpu (nvidia-smi is here but lists no GPU (is the NVIDIA driver loaded?))."
    )


def test_linux_installer_chooses_cpu_when_nvidia_smi_lists_no_gpu(tmp_path: Path) -> None:
    path = fake_path(tmp_path, nvidia_smi="echo 'No devices were found'", uname=uname("Linux", "x86_64"))
    assert accelerator(detect(LINUX_INSTALL, path)).startswith("cpu (nvidia-smi is here but lists no GPU")


def test_linux_installer_chooses_cpu_without_nvidia_smi(tmp_path: Path) -> None:
    path = fake_path(tmp_path, uname=uname("Linux", "x86_64"))
    assert accelerator(detect(LINUX_INSTALL, path)) == "cpu (no NVIDIA GPU (no nvidia-smi on PATH))."


def test_linux_installer_chooses_cpu_for_an_nvidia_gpu_on_arm(tmp_path: Path) -> None:
    path = fake_path(tmp_path, nvidia_smi=nvidia_smi_listing(GPU_LINE), uname=uname("Linux", "aarch64"))
    assert accelerator(detect(LINUX_INSTALL, path)) == (
        f"cpu (nvidia-smi lists {GPU_LINE}, but the CUDA build is for x86-64 and this is aarch64)."
    )


# -- Linux: the override -------------------------------------------------------------------------------------------


def test_linux_installer_accel_option_overrides_the_gpu_it_finds(tmp_path: Path) -> None:
    path = fake_path(tmp_path, nvidia_smi=nvidia_smi_listing(GPU_LINE), uname=uname("Linux", "x86_64"))
    result = detect(LINUX_INSTALL, path, "--accel", "vulkan")
    assert accelerator(result) == "vulkan (asked for with --accel or HATCHWAY_ACCEL)."


def test_linux_installer_takes_the_accelerator_from_the_environment(tmp_path: Path) -> None:
    path = fake_path(tmp_path, nvidia_smi=nvidia_smi_listing(GPU_LINE), uname=uname("Linux", "x86_64"))
    assert accelerator(detect(LINUX_INSTALL, path, env={"HATCHWAY_ACCEL": "cpu"})).startswith("cpu (asked for")


def test_linux_installer_accel_option_wins_over_the_environment(tmp_path: Path) -> None:
    path = fake_path(tmp_path, uname=uname("Linux", "x86_64"))
    result = detect(LINUX_INSTALL, path, "--accel", "cuda", env={"HATCHWAY_ACCEL": "cpu"})
    assert accelerator(result).startswith("cuda (asked for")


@pytest.mark.parametrize(("accel", "message"), [
    ("metal", "--accel metal: Metal is for macOS"),
    ("rocm", "--accel rocm: one of auto, cpu, cuda, vulkan"),
])  # fmt: skip
def test_linux_installer_refuses_an_accelerator_it_has_no_build_for(tmp_path: Path, accel: str, message: str) -> None:
    result = detect(LINUX_INSTALL, fake_path(tmp_path), "--accel", accel)
    assert result.returncode == 1 and message in result.stderr


# -- Linux: the build taken from a downloaded package --------------------------------------------------------------


def package(tmp_path: Path, script: Path, *builds: str) -> Path:
    """A downloaded package: the installer with these build folders beside it (each a fake hatchway-agent)."""
    root = tmp_path / "package"
    root.mkdir()
    shutil.copy(script, root / "install.sh")
    for build in builds:
        (root / build).mkdir()
        (root / build / "hatchway-agent").write_text("#!/bin/sh\n")
        (root / build / "hatchway-agent").chmod(0o755)
    return root / "install.sh"


def build_line(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout.splitlines()[-1]


def test_linux_installer_installs_the_cuda_build_from_the_package_on_a_gpu(tmp_path: Path) -> None:
    script = package(tmp_path, LINUX_INSTALL, "hatchway-agent", "hatchway-agent-cuda")
    path = fake_path(tmp_path, nvidia_smi=nvidia_smi_listing(GPU_LINE), uname=uname("Linux", "x86_64"))
    assert build_line(detect(script, path)) == f"Build: {script.parent}/hatchway-agent-cuda."


def test_linux_installer_installs_the_cpu_build_from_the_package_without_a_gpu(tmp_path: Path) -> None:
    script = package(tmp_path, LINUX_INSTALL, "hatchway-agent", "hatchway-agent-cuda")
    path = fake_path(tmp_path, uname=uname("Linux", "x86_64"))
    assert build_line(detect(script, path)) == f"Build: {script.parent}/hatchway-agent."


def test_linux_installer_falls_back_to_the_cpu_build_when_the_package_has_no_cuda_build(tmp_path: Path) -> None:
    script = package(tmp_path, LINUX_INSTALL, "hatchway-agent")
    path = fake_path(tmp_path, nvidia_smi=nvidia_smi_listing(GPU_LINE), uname=uname("Linux", "x86_64"))
    result = detect(script, path)
    assert "This package has no cuda build (hatchway-agent-cuda/): installing the CPU build." in result.stdout
    assert build_line(result) == f"Build: {script.parent}/hatchway-agent."


def test_linux_installer_refuses_an_asked_for_build_the_package_lacks(tmp_path: Path) -> None:
    script = package(tmp_path, LINUX_INSTALL, "hatchway-agent", "hatchway-agent-cuda")
    result = detect(script, fake_path(tmp_path), "--accel", "vulkan")
    assert result.returncode == 1
    assert f"--accel vulkan: this package has no vulkan build ({script.parent}/hatchway-agent-vulkan)" in result.stderr


def test_linux_installer_from_option_is_installed_whatever_the_accelerator(tmp_path: Path) -> None:
    script = package(tmp_path, LINUX_INSTALL, "hatchway-agent", "hatchway-agent-cuda")
    path = fake_path(tmp_path, nvidia_smi=nvidia_smi_listing(GPU_LINE), uname=uname("Linux", "x86_64"))
    assert build_line(detect(script, path, "--from", "/srv/my-build")) == "Build: /srv/my-build."


# -- macOS: Apple silicon --------------------------------------------------------------------------------------


def test_macos_installer_chooses_metal_on_apple_silicon(tmp_path: Path) -> None:
    path = fake_path(tmp_path, uname=uname("Darwin", "arm64"))
    assert accelerator(detect(MACOS_INSTALL, path)) == "metal (Apple silicon (arm64): Metal)."


def test_macos_installer_chooses_cpu_on_an_intel_mac(tmp_path: Path) -> None:
    path = fake_path(tmp_path, uname=uname("Darwin", "x86_64"))
    result = detect(MACOS_INSTALL, path)
    assert accelerator(result) == "cpu (an Intel Mac (x86_64): the Metal build is for Apple silicon)."


def test_macos_installer_installs_the_metal_build_from_the_package(tmp_path: Path) -> None:
    script = package(tmp_path, MACOS_INSTALL, "hatchway-agent", "hatchway-agent-metal")
    path = fake_path(tmp_path, uname=uname("Darwin", "arm64"))
    assert build_line(detect(script, path)) == f"Build: {script.parent}/hatchway-agent-metal."


def test_macos_installer_takes_the_default_build_on_apple_silicon_when_there_is_no_metal_one(tmp_path: Path) -> None:
    """llama.cpp enables Metal by default on Apple silicon: the package's default build has it."""
    script = package(tmp_path, MACOS_INSTALL, "hatchway-agent")
    path = fake_path(tmp_path, uname=uname("Darwin", "arm64"))
    assert build_line(detect(script, path)) == f"Build: {script.parent}/hatchway-agent."


def test_macos_installer_accel_option_overrides_apple_silicon(tmp_path: Path) -> None:
    path = fake_path(tmp_path, uname=uname("Darwin", "arm64"))
    assert accelerator(detect(MACOS_INSTALL, path, "--accel", "cpu")).startswith("cpu (asked for")


def test_macos_installer_refuses_cuda(tmp_path: Path) -> None:
    result = detect(MACOS_INSTALL, fake_path(tmp_path), "--accel", "cuda")
    assert result.returncode == 1 and "there is no CUDA on macOS" in result.stderr


# -- the PyInstaller spec: what an accelerated build collects ------------------------------------------------------


def library(directory: Path, name: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / name).write_bytes(b"a fake library")
    return directory / name


def imports_from(table: dict[str, list[str]]) -> Callable[[Path], Iterable[str]]:
    """What each fake library links, by file name (ldd / the PE import table, for a real one)."""

    def imports(path: Path) -> Iterable[str]:
        return table.get(path.name, [])

    return imports


CUDA_BACKEND_LINKS = {
    "libggml-cuda.so": ["libggml-base.so.0", "libcudart.so.13", "libcublas.so.13", "libcuda.so.1", "libc.so.6"],
    "libcublas.so.13": ["libcublasLt.so.13", "libc.so.6"],
    "libcublasLt.so.13": ["libc.so.6"],
}


def llama_lib(tmp_path: Path, *backends: str) -> Path:
    lib = tmp_path / "site-packages" / "llama_cpp" / "lib"
    for name in ("libllama.so", "libggml.so", "libggml-base.so", "libggml-cpu.so", *backends):
        library(lib, name)
    return lib


def test_cuda_build_collects_the_runtime_and_cublas_beside_llama_cpp_but_not_the_driver(tmp_path: Path) -> None:
    toolkit = tmp_path / "cuda" / "lib64"
    for name in ("libcudart.so.13", "libcublas.so.13", "libcublasLt.so.13", "libcufft.so.12"):
        library(toolkit, name)
    binaries = accel_libs.accelerator_binaries(
        llama_lib(tmp_path, "libggml-cuda.so"), "cuda", search_dirs=[toolkit], imports=imports_from(CUDA_BACKEND_LINKS)
    )
    assert binaries == [
        (str(toolkit / "libcublas.so.13"), "llama_cpp/lib"),
        (str(toolkit / "libcublasLt.so.13"), "llama_cpp/lib"),
        (str(toolkit / "libcudart.so.13"), "llama_cpp/lib"),
    ]


def test_cuda_build_prefers_the_first_folder_that_has_each_library(tmp_path: Path) -> None:
    wheels = tmp_path / "site-packages" / "nvidia"
    library(wheels / "cublas" / "lib", "libcublas.so.13")
    library(wheels / "cublas" / "lib", "libcublasLt.so.13")
    toolkit = tmp_path / "cuda"
    for name in ("libcudart.so.13", "libcublas.so.13", "libcublasLt.so.13"):
        library(toolkit / "lib64", name)
    dirs = accel_libs.cuda_search_dirs(paths=[str(tmp_path / "site-packages")], environ={"CUDA_HOME": str(toolkit)})
    assert dirs[:2] == [wheels / "cublas" / "lib", toolkit / "lib64"]
    binaries = accel_libs.accelerator_binaries(
        llama_lib(tmp_path, "libggml-cuda.so"), "cuda", search_dirs=dirs, imports=imports_from(CUDA_BACKEND_LINKS)
    )
    assert [Path(source) for source, _ in binaries] == [
        wheels / "cublas" / "lib" / "libcublas.so.13",
        wheels / "cublas" / "lib" / "libcublasLt.so.13",
        toolkit / "lib64" / "libcudart.so.13",
    ]


def test_cuda_build_on_windows_collects_the_runtime_dlls(tmp_path: Path) -> None:
    toolkit = tmp_path / "CUDA" / "v13.0" / "bin" / "x64"
    for name in ("cudart64_13.dll", "cublas64_13.dll", "cublasLt64_13.dll"):
        library(toolkit, name)
    lib = tmp_path / "llama_cpp" / "lib"
    library(lib, "ggml-cuda.dll")
    links = {
        "ggml-cuda.dll": ["cudart64_13.dll", "cublas64_13.dll", "nvcuda.dll"],
        "cublas64_13.dll": ["cublasLt64_13.dll"],
    }
    dirs = accel_libs.cuda_search_dirs(paths=[], environ={"CUDA_PATH": str(tmp_path / "CUDA" / "v13.0")})
    binaries = accel_libs.accelerator_binaries(lib, "cuda", search_dirs=dirs, imports=imports_from(links))
    assert sorted(Path(source).name for source, _ in binaries) == [
        "cublas64_13.dll",
        "cublasLt64_13.dll",
        "cudart64_13.dll",
    ]


def test_cuda_build_fails_naming_a_runtime_library_it_cannot_find(tmp_path: Path) -> None:
    toolkit = tmp_path / "cuda" / "lib64"
    library(toolkit, "libcudart.so.13")
    with pytest.raises(accel_libs.MissingLibrary, match=r"links libcublas\.so\.13, found in none of: .*cuda/lib64"):
        accel_libs.accelerator_binaries(
            llama_lib(tmp_path, "libggml-cuda.so"),
            "cuda",
            search_dirs=[toolkit],
            imports=imports_from(CUDA_BACKEND_LINKS),
        )


def test_cuda_build_fails_on_a_llama_cpp_built_without_cuda(tmp_path: Path) -> None:
    with pytest.raises(accel_libs.MissingLibrary, match="was not built with cuda"):
        accel_libs.accelerator_binaries(llama_lib(tmp_path), "cuda", search_dirs=[], imports=imports_from({}))


@pytest.mark.parametrize(("accel", "backend"), [("metal", "libggml-metal.dylib"), ("vulkan", "libggml-vulkan.so")])
def test_metal_and_vulkan_builds_add_nothing_but_need_their_backend(tmp_path: Path, accel: str, backend: str) -> None:
    assert accel_libs.accelerator_binaries(llama_lib(tmp_path, backend), accel, search_dirs=[]) == []
    with pytest.raises(accel_libs.MissingLibrary, match=f"was not built with {accel}"):
        accel_libs.accelerator_binaries(llama_lib(tmp_path / "cpu-only"), accel, search_dirs=[])


def test_cpu_build_adds_nothing(tmp_path: Path) -> None:
    assert accel_libs.accelerator_binaries(llama_lib(tmp_path), "cpu", search_dirs=[]) == []


def test_the_spec_names_the_build_after_its_accelerator() -> None:
    spec = (REPO / "installers" / "pyinstaller" / "hatchway-agent.spec").read_text()
    assert 'NAME = "hatchway-agent" if ACCEL == "cpu" else f"hatchway-agent-{ACCEL}"' in spec
    assert "accelerator_binaries(" in spec and "name=NAME" in spec


def test_make_agent_binary_builds_each_accelerator_with_its_backend_into_its_own_folder_and_wheelhouse() -> None:
    plans: dict[str, str] = {}
    for accel in ("cpu", "cuda", "vulkan", "metal"):
        result = subprocess.run(
            ["make", "--no-print-directory", "-n", "-B", "agent-binary", f"ACCEL={accel}"],
            cwd=REPO,
            capture_output=True,
            text=True,
            env={**os.environ, "HOME": "/nonexistent-home"},
        )
        assert result.returncode == 0, result.stderr
        plans[accel] = result.stdout
    assert "--distpath dist " in plans["cpu"] and "HATCHWAY_ACCEL" not in plans["cpu"]
    for accel, flag in (("cuda", "-DGGML_CUDA=on"), ("vulkan", "-DGGML_VULKAN=on"), ("metal", "-DGGML_METAL=on")):
        assert (
            flag in plans[accel] and f"HATCHWAY_ACCEL={accel} build/agent-venv-{accel}/bin/pyinstaller" in plans[accel]
        )
        assert f"touch dist/hatchway-agent-{accel}/hatchway-agent" in plans[accel]
    wheelhouses = {accel: set(re.findall(r"/wheels/([0-9a-f]{16})/", plan)) for accel, plan in plans.items()}
    assert all(len(hashes) == 1 for hashes in wheelhouses.values()), wheelhouses
    assert len(set.union(*wheelhouses.values())) == 4


def test_make_agent_binary_refuses_an_unknown_accelerator() -> None:
    result = subprocess.run(
        ["make", "--no-print-directory", "-n", "agent-binary", "ACCEL=rocm"], cwd=REPO, capture_output=True, text=True
    )
    assert result.returncode != 0 and "ACCEL=rocm: one of cpu, cuda, metal, vulkan" in result.stderr


def test_elf_needed_reads_the_libraries_a_real_library_links() -> None:
    """The default reading of what a library links (ldd would drop the CUDA libraries it cannot resolve)."""
    llama = importlib.util.find_spec("llama_cpp")
    assert llama is not None and llama.origin is not None
    libggml = Path(llama.origin).parent / "lib" / "libggml.so"
    needed = accel_libs.elf_needed(libggml)
    assert {"libggml-base.so.0", "libggml-cpu.so.0", "libc.so.6"} <= set(needed)
    assert accel_libs.elf_needed(LINUX_INSTALL) is None


def shared_library(directory: Path, soname: str, *links: str) -> Path:
    """A real (empty) shared library named `soname` that links `links` (found in `directory`)."""
    directory.mkdir(parents=True, exist_ok=True)
    source = directory / "empty.c"
    source.write_text("int hatchway_placeholder;\n")
    argv = ["cc", "-shared", "-fPIC", f"-Wl,-soname,{soname}", "-o", str(directory / soname), str(source)]
    argv += ["-Wl,--no-as-needed", f"-L{directory}", *(f"-l:{name}" for name in links)]
    subprocess.run(argv, check=True, capture_output=True, timeout=60)
    return directory / soname


def test_cuda_build_reads_what_real_libraries_link_to_collect_them(tmp_path: Path) -> None:
    toolkit = tmp_path / "cuda" / "lib64"
    shared_library(toolkit, "libcudart.so.13")
    shared_library(toolkit, "libcublasLt.so.13")
    shared_library(toolkit, "libcublas.so.13", "libcublasLt.so.13")
    shared_library(toolkit, "libcuda.so.1")
    lib = tmp_path / "llama_cpp" / "lib"
    backend = shared_library(toolkit, "libggml-cuda.so", "libcudart.so.13", "libcublas.so.13", "libcuda.so.1")
    lib.mkdir(parents=True)
    backend.rename(lib / backend.name)
    binaries = accel_libs.accelerator_binaries(lib, "cuda", search_dirs=[toolkit])
    assert binaries == [
        (str(toolkit / name), "llama_cpp/lib") for name in ("libcublas.so.13", "libcublasLt.so.13", "libcudart.so.13")
    ]


def test_a_cuda_runtime_library_pyinstaller_also_put_at_the_top_is_shipped_once_as_a_link() -> None:
    placed = [("/wheels/nvidia/cublas/lib/libcublasLt.so.13", "llama_cpp/lib")]
    binaries = [
        ("libcublasLt.so.13", "/usr/local/cuda/lib64/libcublasLt.so.13", "BINARY"),  # found by another path
        ("llama_cpp/lib/libcublasLt.so.13", "/wheels/nvidia/cublas/lib/libcublasLt.so.13", "BINARY"),
        ("libz.so.1", "/usr/lib/libz.so.1", "BINARY"),
    ]
    assert accel_libs.link_top_level_copies(binaries, placed, platform="linux") == [
        ("libcublasLt.so.13", "llama_cpp/lib/libcublasLt.so.13", "SYMLINK"),
        binaries[1],
        binaries[2],
    ]


def test_on_windows_the_top_level_copies_stay_copies() -> None:
    placed = [("C:/cuda/bin/cublasLt64_13.dll", "llama_cpp/lib")]
    binaries = [("cublasLt64_13.dll", "C:/cuda/bin/cublasLt64_13.dll", "BINARY")]
    assert accel_libs.link_top_level_copies(binaries, placed, platform="win32") == binaries


def test_the_names_of_one_library_that_are_copies_of_one_file_ship_once(tmp_path: Path) -> None:
    for name in ("libllama.so", "libllama.so.0", "libllama.so.0.5.0"):
        (tmp_path / name).write_bytes(b"the same library")
    (tmp_path / "libggml.so").write_bytes(b"one library")
    (tmp_path / "libggml.so.0").write_bytes(b"another build of it")
    binaries = [(f"llama_cpp/lib/{p.name}", str(p), "BINARY") for p in sorted(tmp_path.iterdir())]
    shipped = {dest: (source, typecode) for dest, source, typecode in accel_libs.link_versioned_copies(binaries)}
    assert shipped["llama_cpp/lib/libllama.so.0.5.0"] == (str(tmp_path / "libllama.so.0.5.0"), "BINARY")
    # A link's target is relative to its own folder, as PyInstaller writes it.
    assert shipped["llama_cpp/lib/libllama.so"] == ("libllama.so.0.5.0", "SYMLINK")
    assert shipped["llama_cpp/lib/libllama.so.0"] == ("libllama.so.0.5.0", "SYMLINK")
    # Names whose files differ stay files.
    assert {shipped[f"llama_cpp/lib/{n}"][1] for n in ("libggml.so", "libggml.so.0")} == {"BINARY"}


def test_on_windows_each_library_keeps_its_one_file(tmp_path: Path) -> None:
    binaries = [("llama_cpp/lib/llama.dll", str(tmp_path / "llama.dll"), "BINARY")]
    assert accel_libs.link_versioned_copies(binaries, platform="win32") == binaries


# -- installers/cuda/toolkit.sh: the CUDA toolkit the CUDA build compiles with --------------------------------------

TOOLKIT = REPO / "installers" / "cuda" / "toolkit.sh"


def fake_toolkit(root: Path) -> Path:
    """A CUDA toolkit without cuBLAS, as NVIDIA's pip wheels make one: nvcc, cuda.h, cudart."""
    (root / "bin").mkdir(parents=True)
    nvcc = root / "bin" / "nvcc"
    nvcc.write_text("#!/bin/sh\necho 'Cuda compilation tools, release 13.0, V13.0.88'\n")
    nvcc.chmod(0o755)
    (root / "include").mkdir()
    (root / "include" / "cuda.h").write_text("int cuInit(unsigned int flags);\nint cuDeviceGet(int *d, int o);\n")
    (root / "lib64").mkdir()
    (root / "lib64" / "libcudart.so.13").write_bytes(b"")
    return root


def installed_cublas(root: Path) -> Path:
    """An installed nvidia-cublas package's folder: site-packages/nvidia/cu13 with include/ and lib/."""
    (root / "include").mkdir(parents=True)
    (root / "include" / "cublas_v2.h").write_text("/* cuBLAS */\n")
    (root / "include" / "cublasLt.h").write_text("/* cuBLASLt */\n")
    (root / "lib").mkdir()
    for name in ("libcublas.so.13", "libcublasLt.so.13"):
        (root / "lib" / name).write_bytes(b"\x7fELF")
    return root


def run_toolkit(dest: Path, source: Path, **env: str) -> subprocess.CompletedProcess[str]:
    """toolkit.sh DEST SOURCE, with a PYTHON that fails: a pip download it tried would fail the run (the GPU machine
    reaches no package index)."""
    return subprocess.run(
        ["sh", str(TOOLKIT), str(dest), str(source)],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHON": "false", **env},
    )


def test_cuda_toolkit_links_an_installed_cublas_without_downloading_anything(tmp_path: Path) -> None:
    source = fake_toolkit(tmp_path / "cuda")
    cublas = installed_cublas(tmp_path / "site-packages" / "nvidia" / "cu13")
    done = run_toolkit(tmp_path / "build" / "cuda-toolkit", source, CUBLAS_FROM=str(cublas))
    assert done.returncode == 0, done.stderr
    toolkit = Path(done.stdout.strip())
    assert toolkit == (tmp_path / "build" / "cuda-toolkit").resolve()
    assert (toolkit / "include" / "cublas_v2.h").resolve() == (cublas / "include" / "cublas_v2.h").resolve()
    assert (toolkit / "lib64" / "libcublas.so").resolve() == (cublas / "lib" / "libcublas.so.13").resolve()
    assert (toolkit / "lib64" / "libcublasLt.so").resolve() == (cublas / "lib" / "libcublasLt.so.13").resolve()
    # The rest of the toolkit is the source's, and the driver is a link-time stub.
    assert (toolkit / "include" / "cuda.h").resolve() == (source / "include" / "cuda.h").resolve()
    assert (toolkit / "lib64" / "stubs" / "libcuda.so").is_file()
    assert not (tmp_path / "build" / "cuda-wheels").exists()


def test_cuda_toolkit_is_the_source_itself_when_it_has_cublas(tmp_path: Path) -> None:
    source = fake_toolkit(tmp_path / "cuda")
    (source / "include" / "cublas_v2.h").write_text("/* cuBLAS */\n")
    (source / "lib64" / "libcublas.so").write_bytes(b"\x7fELF")
    done = run_toolkit(tmp_path / "dest", source)
    assert done.returncode == 0, done.stderr
    assert Path(done.stdout.strip()) == source.resolve()
    assert not (tmp_path / "dest").exists()


def test_cuda_toolkit_refuses_a_cublas_folder_without_cublas(tmp_path: Path) -> None:
    source = fake_toolkit(tmp_path / "cuda")
    (tmp_path / "empty").mkdir()
    done = run_toolkit(tmp_path / "dest", source, CUBLAS_FROM=str(tmp_path / "empty"))
    assert done.returncode == 1
    assert f"no include/cublas_v2.h in {(tmp_path / 'empty').resolve()}" in done.stderr
