"""What an accelerated build of `hatchway-agent` must carry beyond the CPU build (hatchway-agent.spec calls it).

CUDA: llama.cpp's CUDA backend (libggml-cuda.so / ggml-cuda.dll) links the CUDA runtime and cuBLAS, which a
provider's machine has only if someone installed the toolkit there; the driver (libcuda.so.1 / nvcuda.dll) is
the one part that comes with the GPU. So the runtime libraries the backend needs (and what they need in turn:
cuBLAS needs cuBLASLt) are copied into the build, next to libggml-cuda, whose RUNPATH is $ORIGIN. They are looked
for where the build found them: the nvidia-* pip wheels' lib folders, $CUDA_HOME / $CUDA_PATH, /usr/local/cuda.

Metal and Vulkan need nothing extra (Metal is part of macOS; the Vulkan loader is the system's), only a check that
llama.cpp was built with the backend at all, so that a build named `-metal` or `-vulkan` cannot be a CPU build.
"""

from __future__ import annotations

import filecmp
import os
import re
import sys
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

ACCELERATORS = ("cpu", "cuda", "metal", "vulkan")

# The backend's library in llama_cpp/lib, per accelerator (any of the names: Linux, Windows, macOS).
BACKEND_LIBRARIES = {
    "cuda": ("libggml-cuda.so", "ggml-cuda.dll"),
    "metal": ("libggml-metal.dylib", "libggml-metal.so"),
    "vulkan": ("libggml-vulkan.so", "ggml-vulkan.dll", "libggml-vulkan.dylib"),
}

# The CUDA toolkit's redistributable runtime libraries, by the names a library links them under (the SONAME on
# Linux: libcublas.so.13; the DLL name on Windows: cublas64_13.dll). The driver's own libraries are not among them.
CUDA_RUNTIME = re.compile(r"^(?:lib(?:cudart|cublas|cublasLt)\.so\.\d+|(?:cudart|cublas|cublasLt)64_\d+\.dll)$")

Imports = Callable[[Path], Iterable[str]]


class MissingLibrary(RuntimeError):
    """The build cannot be made as asked: a backend or a runtime library it needs is not where it was looked for."""


def backend_library(lib_dir: Path, accel: str) -> Path | None:
    """llama.cpp's library for `accel` in `lib_dir` (llama_cpp/lib), or None for the CPU build."""
    if accel not in ACCELERATORS:
        raise ValueError(f"unknown accelerator {accel!r}: one of {', '.join(ACCELERATORS)}")
    if accel == "cpu":
        return None
    for name in BACKEND_LIBRARIES[accel]:
        if (lib_dir / name).is_file():
            return lib_dir / name
    raise MissingLibrary(
        f"llama-cpp-python in {lib_dir} was not built with {accel} (no {' / '.join(BACKEND_LIBRARIES[accel])}): "
        f"build it with `make agent-binary ACCEL={accel}`"
    )


def cuda_search_dirs(paths: Sequence[str] | None = None, environ: dict[str, str] | None = None) -> list[Path]:
    """Where the CUDA runtime libraries may be, in the order they are preferred."""
    paths = sys.path if paths is None else paths
    environ = dict(os.environ) if environ is None else environ
    found: list[Path] = []
    # The nvidia-cuda-runtime-cu12 / nvidia-cublas-cu12 ... wheels: site-packages/nvidia/<part>/{lib,bin}.
    for entry in paths:
        nvidia = Path(entry or ".") / "nvidia"
        if nvidia.is_dir():
            found += sorted(p for p in nvidia.glob("*/lib") if p.is_dir())
            found += sorted(p for p in nvidia.glob("*/bin") if p.is_dir())
    homes = [environ[k] for k in ("CUDA_HOME", "CUDA_PATH") if environ.get(k)] + ["/usr/local/cuda"]
    for home in homes:
        for sub in ("lib64", "lib", "targets/x86_64-linux/lib", "bin", "bin/x64"):
            if (Path(home) / sub).is_dir():
                found.append(Path(home) / sub)
    return list(dict.fromkeys(found))


def elf_needed(library: Path) -> list[str] | None:
    """The DT_NEEDED names of a 64-bit little-endian ELF library (None for any other file). Read here rather than
    by ldd, which drops what it cannot resolve: the CUDA libraries are rarely on the loader's path."""
    data = library.read_bytes()
    if data[:6] != b"\x7fELF\x02\x01":
        return None

    def number(start: int, size: int) -> int:
        return int.from_bytes(data[start : start + size], "little")

    # Elf64_Ehdr: e_shoff, e_shentsize, e_shnum; Elf64_Shdr: sh_type, sh_offset, sh_size, sh_link; Elf64_Dyn.
    shoff, shentsize, shnum = number(0x28, 8), number(0x3A, 2), number(0x3C, 2)
    sections = [shoff + i * shentsize for i in range(shnum)]
    needed: list[str] = []
    for section in sections:
        if number(section + 4, 4) != 6:  # SHT_DYNAMIC
            continue
        offset, size = number(section + 24, 8), number(section + 32, 8)
        strtab = number(sections[number(section + 40, 4)] + 24, 8)
        for entry in range(offset, offset + size, 16):
            tag, value = number(entry, 8), number(entry + 8, 8)
            if tag == 0:  # DT_NULL
                break
            if tag == 1:  # DT_NEEDED
                end = data.index(b"\0", strtab + value)
                needed.append(data[strtab + value : end].decode())
    return needed


def library_imports(library: Path) -> list[str]:
    """The names `library` links: its ELF DT_NEEDED entries, else PyInstaller's reading (the PE import table on
    Windows, Mach-O load commands on macOS)."""
    needed = elf_needed(library)
    if needed is not None:
        return needed
    from PyInstaller.depend.bindepend import get_imports  # type: ignore[import-untyped]

    return [Path(name).name for name, _ in get_imports(str(library))]


def cuda_runtime_libraries(
    backend: Path, search_dirs: Iterable[Path], imports: Imports = library_imports
) -> list[Path]:
    """The CUDA runtime libraries `backend` needs, directly or through each other, each found in the first of
    `search_dirs` that has it under the name it is linked by."""
    dirs = list(search_dirs)
    found: dict[str, Path] = {}
    missing: list[str] = []
    pending = [name for name in imports(backend) if CUDA_RUNTIME.match(name)]
    while pending:
        name = pending.pop(0)
        if name in found or name in missing:
            continue
        path = next((d / name for d in dirs if (d / name).is_file()), None)
        if path is None:
            missing.append(name)
            continue
        found[name] = path
        pending += [n for n in imports(path) if CUDA_RUNTIME.match(n)]
    if missing:
        raise MissingLibrary(
            f"{backend.name} links {', '.join(missing)}, found in none of: {', '.join(map(str, dirs)) or '(none)'}; "
            "set CUDA_HOME to the CUDA toolkit it was built with, or pip install its nvidia-* runtime wheels"
        )
    if not found:
        raise MissingLibrary(f"{backend.name} links no CUDA runtime library: is it a CUDA build?")
    return [found[name] for name in sorted(found)]


def accelerator_binaries(
    lib_dir: Path,
    accel: str,
    dest: str = "llama_cpp/lib",
    search_dirs: Iterable[Path] | None = None,
    imports: Imports = library_imports,
) -> list[tuple[str, str]]:
    """PyInstaller `binaries` entries (source, destination folder) that the `accel` build adds to the CPU one.

    The libraries land in `dest`, beside llama.cpp's own, which find them through their $ORIGIN RUNPATH."""
    backend = backend_library(lib_dir, accel)
    if backend is None or accel != "cuda":
        return []
    dirs = cuda_search_dirs() if search_dirs is None else search_dirs
    return [(str(path), dest) for path in cuda_runtime_libraries(backend, dirs, imports)]


def link_top_level_copies(
    binaries: Sequence[tuple[str, str, str]], accel_binaries: Iterable[tuple[str, str]], platform: str = sys.platform
) -> list[tuple[str, str, str]]:
    """PyInstaller's binaries (dest, source, typecode) with each top-level copy of a library that
    `accelerator_binaries` put in its folder replaced by a link to that one.

    PyInstaller also collects what a collected library links into the top folder, as a link to the copy already
    collected when it found the same file by the same path, else as a second copy: the CUDA runtime, reached through
    a linked folder (lib64 -> lib) or another path, would be shipped twice (cuBLASLt alone is ~550 MB). No links on
    Windows, where the second copy stays."""
    if platform == "win32":
        return list(binaries)
    placed = {Path(source).name: f"{dest}/{Path(source).name}" for source, dest in accel_binaries}
    return [
        (dest, placed[dest], "SYMLINK") if typecode == "BINARY" and dest in placed else (dest, source, typecode)
        for dest, source, typecode in binaries
    ]


# A shared library's names on Linux: the linker's (libllama.so), the SONAME (libllama.so.0), the full version.
VERSIONED_NAME = re.compile(r"^(?P<stem>.+\.so)(?:\.\d+)+$|^(?P<bare>.+\.so)$")


def link_versioned_copies(
    binaries: Sequence[tuple[str, str, str]],
    platform: str = sys.platform,
    same: Callable[[str, str], bool] = lambda a, b: filecmp.cmp(a, b, shallow=False),
) -> list[tuple[str, str, str]]:
    """PyInstaller's binaries (dest, source, typecode) with the names of one library that are copies of one file
    (llama-cpp-python's wheel holds libllama.so, .so.0 and .so.0.5.0 as three files) made links to the longest,
    beside them.

    ctypes opens the linker's name (libllama.so), the loader the SONAME (libggml.so.0): each must exist, once on
    disk is enough. A CUDA build's libggml-cuda is 60 MB per GPU architecture, three times over. No links on
    Windows (a DLL has one name)."""
    if platform == "win32":
        return list(binaries)
    groups: dict[tuple[str, str], list[tuple[str, str]]] = {}
    for dest, source, typecode in binaries:
        match = VERSIONED_NAME.match(Path(dest).name)
        if typecode == "BINARY" and match:
            stem = match["stem"] or match["bare"]
            groups.setdefault((str(Path(dest).parent), stem), []).append((dest, source))
    links: dict[str, str] = {}
    for names in groups.values():
        kept_dest, kept_source = max(names, key=lambda name: len(name[0]))
        for dest, source in names:
            if dest != kept_dest and same(source, kept_source):
                # PyInstaller writes a SYMLINK's target as given: relative to the link's own folder.
                links[dest] = os.path.relpath(kept_dest, Path(dest).parent)
    return [
        (dest, links[dest], "SYMLINK") if dest in links else (dest, source, typecode)
        for dest, source, typecode in binaries
    ]
