#!/bin/sh
# Prints the CUDA toolkit folder to build llama.cpp's CUDA backend with: SRC ($CUDA_HOME, else /usr/local/cuda)
# itself when it has cuBLAS, else DEST, a copy of SRC (symlinks, nvcc a real copy) with cuBLAS added from NVIDIA's
# nvidia-cublas wheel on PyPI. `make agent-binary ACCEL=cuda` calls it.
#
#   installers/cuda/toolkit.sh DEST [SRC]      e.g. installers/cuda/toolkit.sh build/cuda-toolkit /usr/local/cuda
#
# Why: a toolkit installed from NVIDIA's pip wheels (nvidia-cuda-nvcc, -runtime, -cccl, ...) may have nvcc and
# cudart but no cuBLAS, and no lib/stubs/libcuda.so, which CMake's FindCUDAToolkit wants for CUDA::cuda_driver
# (llama.cpp links it for its VMM memory pool). Without a driver stub one is made here from cuda.h: a library named
# libcuda.so.1 with every cu* function as an empty symbol, used for linking only. The real driver, which comes with
# the GPU, is what loads at run time; nothing from DEST's stubs/ is shipped.
#
# nvcc finds its headers and libraries relative to its own real path (nvcc.profile: TOP = $(_HERE_)/..), so DEST's
# bin/nvcc is a copy, not a link: then DEST/include and DEST/lib, with cuBLAS in them, are the ones it uses.
# The wheel is kept in DEST/../cuda-wheels; CUBLAS_WHEEL overrides the requirement (default: the nvidia-cublas
# release for the toolkit's major version), PYTHON the interpreter whose pip downloads it. CUBLAS_FROM, a folder
# holding cuBLAS's include/ and lib/ (an installed nvidia-cublas: site-packages/nvidia/cu13), is linked in
# instead, with nothing downloaded: for a machine that reaches no package index (bench/gpu.py's GPU run).
set -eu

dest=${1:?usage: toolkit.sh DEST [SRC]}
src=$(cd "${2:-${CUDA_HOME:-/usr/local/cuda}}" && pwd -P)
python=${PYTHON:-python3}

has_cublas() { [ -f "$1/include/cublas_v2.h" ] && { [ -e "$1/lib64/libcublas.so" ] || [ -e "$1/lib/libcublas.so" ]; }; }
if has_cublas "$src"; then
	echo "$src"
	exit 0
fi
[ -x "$src/bin/nvcc" ] || { echo "toolkit.sh: no nvcc in $src/bin" >&2; exit 1; }
major=$("$src/bin/nvcc" --version | sed -n 's/.*release \([0-9]*\)\..*/\1/p')
[ -n "$major" ] || { echo "toolkit.sh: cannot read the CUDA version from $src/bin/nvcc --version" >&2; exit 1; }
if [ "$major" -ge 13 ]; then requirement="nvidia-cublas==$major.*"; else requirement="nvidia-cublas-cu$major"; fi
requirement=${CUBLAS_WHEEL:-$requirement}
cublas_from=${CUBLAS_FROM:-}
if [ -n "$cublas_from" ]; then
	cublas_from=$(cd "$cublas_from" && pwd -P)
	[ -f "$cublas_from/include/cublas_v2.h" ] || { echo "toolkit.sh: no include/cublas_v2.h in $cublas_from" >&2; exit 1; }
	requirement="linked from $cublas_from"
fi

mkdir -p "$dest"
dest=$(cd "$dest" && pwd -P)
case "$src/" in
"$dest"/*) echo "toolkit.sh: DEST $dest holds SRC $src" >&2; exit 1 ;;
esac
stamp="$dest/.toolkit-stamp"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$src $requirement" ] && has_cublas "$dest"; then
	echo "$dest"
	exit 0
fi

wheels="$(dirname "$dest")/cuda-wheels"
if [ -z "$cublas_from" ]; then
	mkdir -p "$wheels"
	"$python" -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
		--dest "$wheels" "$requirement" >&2
fi

# The copy: every file a link to SRC's, except nvcc. SRC's own links (lib64 -> lib, targets/*/include ->
# ../../include) are copied as they are, relative, so that nothing written into DEST lands in SRC.
find "$dest" -mindepth 1 -maxdepth 1 -exec rm -rf {} +
cp -rs "$src/." "$dest/"
(cd "$src" && find . -type l) | while read -r link; do
	rm -f "$dest/$link"
	cp -P "$src/$link" "$dest/$link"
done
cp --remove-destination "$src/bin/nvcc" "$dest/bin/nvcc"
libdir="$dest/lib64"
[ -d "$libdir" ] || libdir="$dest/lib"
for dir in "$dest/include" "$libdir"; do
	case "$(cd "$dir" && pwd -P)/" in
	"$dest"/*) ;;
	*) echo "toolkit.sh: $dir is outside $dest" >&2; exit 1 ;;
	esac
done

# cuBLAS: CUBLAS_FROM's headers and libraries as links, or the wheel's nvidia/<part>/include and nvidia/<part>/lib
# (cu13, or cublas for the -cu12 wheels) unpacked.
if [ -n "$cublas_from" ]; then
	for file in "$cublas_from"/include/cublas*.h "$cublas_from"/lib/libcublas*.so*; do
		case "$file" in
		*/include/*) ln -sf "$file" "$dest/include/" ;;
		*) ln -sf "$file" "$libdir/" ;;
		esac
	done
else
"$python" - "$wheels" "$requirement" "$dest/include" "$libdir" <<'PY'
import re, sys, zipfile
from pathlib import Path

wheels, requirement, include, lib = sys.argv[1:]
name = re.split(r"[=<>!~ ]", requirement, maxsplit=1)[0].replace("-", "_")
found = sorted(Path(wheels).glob(f"{name}-*.whl"))
if not found:
    sys.exit(f"toolkit.sh: no {name} wheel in {wheels}")
with zipfile.ZipFile(found[-1]) as wheel:
    for member in wheel.infolist():
        parts = Path(member.filename).parts
        if len(parts) < 4 or parts[0] != "nvidia" or parts[2] not in ("include", "lib") or member.is_dir():
            continue
        root = Path(include if parts[2] == "include" else lib)
        target = root.joinpath(*parts[3:])
        target.parent.mkdir(parents=True, exist_ok=True)
        if not target.parent.resolve().is_relative_to(root.resolve()):
            sys.exit(f"toolkit.sh: {target.parent} is outside {root}")
        target.unlink(missing_ok=True)
        with wheel.open(member) as source, open(target, "wb") as out:
            while chunk := source.read(1 << 20):
                out.write(chunk)
        target.chmod(0o755 if ".so" in target.name else 0o644)
PY
fi
# The names the linker looks for (the wheels carry only the versioned libcublas.so.N).
for lib in "$libdir"/libcublas*.so.[0-9]*; do
	ln -sf "$(basename "$lib")" "${lib%.so.*}.so"
done

if ! ls "$libdir"/stubs/libcuda.so "$libdir"/libcuda.so >/dev/null 2>&1; then
	mkdir -p "$libdir/stubs"
	${CC:-cc} -E -P -I"$dest/include" "$dest/include/cuda.h" | grep -oE '\bcu[A-Z][A-Za-z0-9_]*[[:space:]]*\(' \
		| tr -d '( \t' | sort -u | sed 's/.*/void &(void) {}/' >"$libdir/stubs/libcuda-stub.c"
	${CC:-cc} -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$libdir/stubs/libcuda.so" "$libdir/stubs/libcuda-stub.c"
fi
has_cublas "$dest" || { echo "toolkit.sh: $dest has no cuBLAS after all" >&2; exit 1; }
echo "$src $requirement" >"$stamp"
echo "$dest"
