"""The GPU run (issue 19): llama.cpp built with CUDA, the agent against a plane on the same machine, CPU vs GPU.

On a device machine with an NVIDIA GPU, with .gpu/ carried (bench/gpu_carry.py packs it; bench/README.md, "The
GPU run", says how):

    bash bench/gpu.sh --out "$OUT"              # estimated 6-8 minutes on 16 cores, the CUDA build the longest step

A dry run of the same steps without a GPU: `--llama build-cpu` (llama.cpp built from the carried sdist without
CUDA) or `--llama installed` (the llama_cpp on PYTHONPATH), with `--quick` (the demo shape, two short rounds).

Steps, each recorded in OUT/gpu.json as it ends (a later step's failure keeps the earlier figures) and summed up
in OUT/gpu.md:

1. probe: the GPU (nvidia-smi), nvcc and a CUDA toolkit with cuBLAS, the Python and the cores;
2. build: llama-cpp-python from the carried sdist with CUDA for this GPU's architecture only (the five-architecture
   release build is `make agent-binary ACCEL=cuda`), installed into a folder put first on PYTHONPATH;
3. models: two of random weights (bench/synth_model.py; the real files cannot travel): the demo model's shape
   (SmolLM2-135M, Q4_1) and SmolLM2-1.7B's (Q4_K_M);
4. legs: bench/node.py's comparison for each model, llama.cpp in process (direct) against the same model through
   a plane and an agent (both real processes here), once on the CPU (--gpu-layers 0, CUDA hidden from both) and
   once on the GPU (the agent's --gpu-layers auto; the direct side all layers). Each leg runs in a process of its
   own, so the CPU leg never initialises CUDA. Each leg records the node as the plane saw it (`admin nodes show`:
   Hello's NVML figures, where auto put the layers and why, the tokens/s the node measured) and the agent's
   `status` (the backend it loaded, whether it offloads);
5. binary (--binary): the PyInstaller CUDA folder built from this tree (installers/pyinstaller), its `status`, and
   the demo-shape GPU leg again with that program as the agent: what a provider installs, on a GPU.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness import REPO_ROOT, BenchError, log, write_json

CARRY = REPO_ROOT / ".gpu"
SHAPES = ("smollm2-135m", "smollm2-1.7b")
# CPU leg threads: half the cores, at most 8 (llama.cpp's generation is bound by memory bandwidth well before), the
# rest left to the plane, the agent's loop and the client. GPU leg: llama.cpp's CPU side only samples.
CPU_THREADS_MAX = 8
GPU_THREADS = 4
LEG_TIMEOUT_S = 600.0


@dataclass(frozen=True)
class Leg:
    shape: str
    device: str  # "cpu" or "gpu"
    rounds: int
    max_tokens: int


def legs(quick: bool) -> list[Leg]:
    """Fewer rounds where a round is slow (the 1.7 B model on the CPU: ~5 s a side); enough elsewhere for a p50."""
    if quick:
        return [Leg(shape, device, 2, 32) for shape in SHAPES for device in ("cpu", "gpu")]
    return [
        Leg("smollm2-135m", "cpu", 10, 128),
        Leg("smollm2-135m", "gpu", 10, 128),
        Leg("smollm2-1.7b", "cpu", 3, 128),
        Leg("smollm2-1.7b", "gpu", 10, 128),
    ]


class Report:
    """OUT/gpu.json, rewritten after every step."""

    def __init__(self, out: Path) -> None:
        self.path = out / "gpu.json"
        self.data: dict[str, Any] = {"started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}

    def step(self, name: str, run: Callable[[], Any], fatal: bool = True) -> Any:
        """`run`'s result, recorded; a failure is recorded too, and raised when `fatal` (a leg's is not: the
        other legs still measure)."""
        started = time.monotonic()
        log(f"gpu: {name} ...")
        try:
            result = run()
        except Exception as exc:
            self.data[name] = {"error": f"{type(exc).__name__}: {exc}", "seconds": round(time.monotonic() - started)}
            self.save()
            if fatal:
                raise
            return None
        self.data[name] = {"result": result, "seconds": round(time.monotonic() - started, 1)}
        self.save()
        return result

    def save(self) -> None:
        write_json(self.path, self.data)


# -- 1. probe ------------------------------------------------------------------------------------------------


def command_output(argv: list[str]) -> str | None:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"{type(exc).__name__}: {exc}"
    return (done.stdout + done.stderr).strip()


def pip_cublas() -> Path | None:
    """A pip-installed nvidia-cublas's folder (site-packages/nvidia/<part>, holding include/ and lib/)."""
    for entry in sys.path:
        for header in sorted(Path(entry or ".").glob("nvidia/*/include/cublas_v2.h")):
            return header.parent.parent
    return None


def find_nvcc() -> str | None:
    """The toolkit's nvcc: in $CUDA_HOME or /usr/local/cuda, else the one on PATH (resolved: a toolkit's bin/ is
    often linked from /usr/bin), else from NVIDIA's pip wheels (site-packages/nvidia/*/bin). A toolkit is a folder
    with bin/nvcc and include/."""
    homes = [Path(home) for home in (os.environ.get("CUDA_HOME"), "/usr/local/cuda") if home]
    on_path = shutil.which("nvcc")
    homes += [Path(os.path.realpath(on_path)).parent.parent] if on_path else []
    homes += [bin_dir.parent for entry in sys.path for bin_dir in sorted(Path(entry or ".").glob("nvidia/*/bin"))]
    found = next((home for home in homes if (home / "bin" / "nvcc").exists() and (home / "include").is_dir()), None)
    return str(found / "bin" / "nvcc") if found else on_path


def probe() -> dict[str, Any]:
    nvcc = find_nvcc()
    toolkit = Path(os.path.realpath(nvcc)).parent.parent if nvcc else None
    query = "name,driver_version,memory.total,memory.used,compute_cap,utilization.gpu"
    return {
        "gpu": command_output(["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader"]),
        "compute_cap": (
            command_output(["nvidia-smi", "--query-gpu=compute_cap", "--format=csv,noheader"]) or ""
        ).splitlines()[:1],
        "nvcc": nvcc,
        "nvcc_version": (command_output([nvcc, "--version"]) or "").splitlines()[-2:] if nvcc else None,
        "toolkit": str(toolkit) if toolkit else None,
        "pip_cublas": str(pip_cublas() or ""),
        "python": sys.version.split()[0],
        "cores": os.cpu_count(),
    }


# -- 2. build --------------------------------------------------------------------------------------------------


def cuda_architecture(found: dict[str, Any]) -> str:
    """The GPU's compute capability as CMake names it (9.0 -> 90)."""
    capability = str((found["compute_cap"] or [""])[0])
    if "." not in capability:
        raise BenchError(f"nvidia-smi gave no compute capability: {found['gpu']}")
    return capability.replace(".", "").strip()


def cuda_toolkit(found: dict[str, Any], work: Path) -> Path:
    """CUDA_HOME for the build, as installers/cuda/toolkit.sh decides it: nvcc's toolkit when it has cuBLAS, else a
    copy of it with the pip-installed cuBLAS linked in (this machine reaches no index to fetch the wheel from; with
    no pip-installed cuBLAS either, toolkit.sh's download fails and says so)."""
    if not found["toolkit"]:
        raise BenchError("no nvcc on PATH, in $CUDA_HOME/bin, /usr/local/cuda/bin or NVIDIA's pip wheels")
    script = REPO_ROOT / "installers" / "cuda" / "toolkit.sh"
    env = {**os.environ, "PYTHON": sys.executable}
    if found["pip_cublas"]:
        env["CUBLAS_FROM"] = found["pip_cublas"]
    done = subprocess.run(
        ["sh", str(script), str(work / "cuda-toolkit"), found["toolkit"]], capture_output=True, text=True, env=env
    )
    if done.returncode != 0:
        raise BenchError(f"toolkit.sh failed:\n{done.stderr}")
    return Path(done.stdout.strip().splitlines()[-1])


def build_llama(found: dict[str, Any], work: Path, site: Path, cuda: bool = True) -> dict[str, Any]:
    """llama-cpp-python with CUDA from the carried sdist, for this GPU only, into `site` (`cuda` False: the CPU
    build, for a dry run of these steps on a machine without a GPU). A wheel built with the same arguments by an
    earlier call on the same machine is reused."""
    source = work / "llama-src"
    shutil.rmtree(source, ignore_errors=True)
    source.mkdir(parents=True)
    with tarfile.open(CARRY / "llama-cpp.tar.xz") as tar:
        tar.extractall(source, filter="data")
    (tree,) = source.iterdir()
    env = {**os.environ, "CMAKE_BUILD_PARALLEL_LEVEL": str(os.cpu_count() or 1)}
    cmake_args = ""
    if cuda:
        toolkit = cuda_toolkit(found, work)
        cmake_args = f"-DGGML_CUDA=on -DCMAKE_CUDA_ARCHITECTURES={cuda_architecture(found)}"
        cmake_args += f" -DCUDAToolkit_ROOT={toolkit} -DCMAKE_CUDA_COMPILER={toolkit}/bin/nvcc"
        env["CUDA_HOME"] = str(toolkit)
    env["CMAKE_ARGS"] = cmake_args
    wheels = work / "llama-wheel"
    built = wheels / "cmake-args"
    if built.is_file() and built.read_text() == cmake_args and any(wheels.glob("llama_cpp_python-*.whl")):
        install_wheel(next(wheels.glob("llama_cpp_python-*.whl")), site)
        return {"cmake_args": cmake_args, "reused": str(wheels)}
    shutil.rmtree(wheels, ignore_errors=True)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check"]
    build_log = work / "llama-build.log"
    with build_log.open("w") as out:
        argv = [*pip, "wheel", "--no-deps", "--no-index", "--no-build-isolation", "-v", "-w", str(wheels), str(tree)]
        done = subprocess.run(argv, stdout=out, stderr=subprocess.STDOUT, env=env)
    if done.returncode != 0:
        tail = "\n".join(build_log.read_text(errors="replace").splitlines()[-40:])
        raise BenchError(f"building llama-cpp-python failed:\n{tail}")
    built.write_text(cmake_args)
    install_wheel(next(wheels.glob("llama_cpp_python-*.whl")), site)
    return {"cmake_args": cmake_args, "wheel_mib": round(sum(w.stat().st_size for w in wheels.iterdir()) / 2**20, 1)}


def install_wheel(wheel: Path, site: Path) -> None:
    argv = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-index", "--upgrade"]
    subprocess.run([*argv, "--target", str(site), str(wheel)], check=True)


def llama_backend() -> dict[str, Any]:
    """What llama.cpp in this environment can do, from a fresh process (the build's libraries load there)."""
    code = "import json, llama_cpp; print(json.dumps({'version': llama_cpp.__version__, "
    code += "'gpu_offload': bool(llama_cpp.llama_supports_gpu_offload())}))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise BenchError(f"llama_cpp does not load:\n{done.stderr[-2000:]}")
    loaded: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return loaded


# -- 3. models -------------------------------------------------------------------------------------------------


def make_models(work: Path, quick: bool) -> dict[str, str]:
    models = work / "models"
    models.mkdir(exist_ok=True)
    made: dict[str, str] = {}
    for shape in SHAPES[:1] if quick else SHAPES:
        path = models / f"{shape}.gguf"
        if not path.exists():
            argv = [sys.executable, str(REPO_ROOT / "bench" / "synth_model.py"), "make"]
            argv += ["--template", str(CARRY / "template.gguf"), "--shape", shape, "--out", str(path)]
            # llama.cpp's quantizer prints a line per tensor: to a log, not the run's output.
            with (models / f"{shape}.log").open("w") as out:
                if subprocess.run(argv, stdout=out, stderr=subprocess.STDOUT, check=False).returncode != 0:
                    raise BenchError(f"synth_model.py failed: {models / f'{shape}.log'}")
        made[shape] = str(path)
    return made


# -- 4. one leg, in a process of its own ----------------------------------------------------------------------


def run_leg(leg: Leg, model: Path, work: Path, agent: list[str] | None = None) -> dict[str, Any]:
    out = work / f"leg-{leg.shape}-{leg.device}{'-binary' if agent else ''}.json"
    cores = os.cpu_count() or 2
    threads = min(CPU_THREADS_MAX, max(1, cores // 2)) if leg.device == "cpu" else GPU_THREADS
    argv = [sys.executable, str(Path(__file__)), "leg", "--model", str(model), "--label", leg.shape]
    argv += ["--gpu-layers", "0" if leg.device == "cpu" else "auto", "--threads", str(threads)]
    argv += ["--rounds", str(leg.rounds), "--max-tokens", str(leg.max_tokens), "--result", str(out)]
    argv += [f"--agent={part}" for part in agent or ()]
    env = dict(os.environ)
    if leg.device == "cpu":
        # Neither side may reach the GPU: llama.cpp's CUDA build offloads large batches even with no layers on it.
        env["CUDA_VISIBLE_DEVICES"] = ""
    done = subprocess.run(argv, env=env, timeout=LEG_TIMEOUT_S, check=False)
    if done.returncode != 0 or not out.exists():
        raise BenchError(f"leg {leg} ended with exit code {done.returncode}")
    result: dict[str, Any] = json.loads(out.read_text())
    return result


async def leg_main(args: argparse.Namespace) -> dict[str, Any]:
    """bench/node.py's llama part against a plane of this checkout, then the agent's own `status`."""
    import aiohttp
    from hatchway import configure, start_plane, wait_ready
    from node import AGENT_MODULE, Settings, Subject, llama_part

    subject = Subject(Path(args.model), args.gpu_layers, tuple(args.agent) or AGENT_MODULE, args.label)
    settings = Settings(args.rounds, args.threads, args.max_tokens, messages=0, stream_rounds=0)
    workdir = Path(tempfile.mkdtemp(prefix=f"leg-{args.label}-"))
    with contextlib.ExitStack() as stack:
        plane = start_plane(stack, workdir, None, source=REPO_ROOT)
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as session:
            await wait_ready(session, plane)
            key = await configure(session, plane, None)
            result = await llama_part(stack, workdir, session, plane, key, settings, subject)
    result["agent_status"] = agent_status(subject.agent, workdir / "agent.json")
    result["settings"] = {**settings.__dict__, "gpu_layers": args.gpu_layers, "model": args.label}
    return result


def agent_status(program: Sequence[str], config: Path | None = None) -> Any:
    """`hatchway-agent status`: its JSON (stdout; llama.cpp logs to stderr), else what it printed."""
    argv = [*program, "status", *(["--config", str(config)] if config else [])]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)
    try:
        return json.loads(done.stdout)
    except ValueError:
        return {"exit_code": done.returncode, "output": (done.stdout + done.stderr)[-4000:]}


# -- 5. the PyInstaller CUDA folder ---------------------------------------------------------------------------


def build_binary(work: Path) -> Path:
    spec = REPO_ROOT / "installers" / "pyinstaller" / "hatchway-agent.spec"
    argv = [sys.executable, "-m", "PyInstaller", "--noconfirm", "--clean", "--log-level", "WARN"]
    argv += ["--distpath", str(work / "dist"), "--workpath", str(work / "pyinstaller"), str(spec)]
    subprocess.run(argv, check=True, env={**os.environ, "HATCHWAY_ACCEL": "cuda"}, cwd=REPO_ROOT)
    return work / "dist" / "hatchway-agent-cuda" / "hatchway-agent"


# -- the whole run ---------------------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> None:
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    work: Path = args.work
    work.mkdir(parents=True, exist_ok=True)
    site = work / "llama-site"
    report = Report(out)
    found = report.step("probe", probe)
    if args.llama != "installed":
        site.mkdir(exist_ok=True)
        os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")]))
        report.step("build", lambda: build_llama(found, work, site, cuda=args.llama == "build"))
    report.step("backend", llama_backend)
    models = report.step("models", lambda: make_models(work, args.quick))
    try:
        for leg in legs(args.quick):
            if leg.shape in models:
                measure = functools.partial(run_leg, leg, Path(models[leg.shape]), work)
                report.step(f"{leg.shape}-{leg.device}", measure, fatal=False)
        if args.binary:
            program = report.step("binary", lambda: str(build_binary(work)))
            report.step("binary-status", lambda: agent_status([program]))
            leg = Leg("smollm2-135m", "gpu", 5, 128)
            report.step("binary-leg", lambda: run_leg(leg, Path(models[leg.shape]), work, [program]), fatal=False)
    finally:
        (out / "gpu.md").write_text(summary(report.data))
        print(summary(report.data))


def summary(data: dict[str, Any]) -> str:
    """The figures the issue asks for, as a table."""
    lines = ["# GPU run", "", f"started {data.get('started')}", ""]
    found = data.get("probe", {}).get("result", {})
    lines += [f"- GPU: {found.get('gpu')}", f"- nvcc: {found.get('nvcc_version')}", f"- cores: {found.get('cores')}"]
    lines += [f"- llama.cpp: {data.get('backend', {}).get('result')}", ""]
    header = "| model, device | direct tok/s | through node tok/s | ratio p50 | direct TTFT ms | added TTFT p50 ms |"
    lines += [header, "|---|---|---|---|---|---|"]
    placement: list[str] = []
    for name, step in data.items():
        leg = step.get("result") if isinstance(step, dict) else None
        if not isinstance(leg, dict) or "direct" not in leg:
            continue
        direct, hatchway = leg["direct"], leg["hatchway"]
        lines.append(
            f"| {name} | {direct['tokens_per_s']['p50']:.1f} | "
            f"{hatchway['tokens_per_s']['p50']:.1f} | {leg['tokens_per_s_ratio']['p50']:.3f} | "
            f"{direct['ttft_ms']['p50']:.2f} | {leg['added_ttft_ms']['p50']:+.2f} |"
        )
        node = leg.get("node", {})
        for model in node.get("models", []):
            placement.append(
                f"- {name}: --gpu-layers {leg['settings']['gpu_layers']} -> {model.get('gpu_layers')} of "
                f"{model.get('layers_total')} layers ({model.get('gpu_layers_reason')}); node measured "
                f"{model.get('tokens_per_s')} tok/s; backend {node.get('backend')}, offload {node.get('gpu_offload')}; "
                f"GPUs in Hello {node.get('hardware', {}).get('gpus')}"
            )
    failed = [f"- {name}: {step['error']}" for name, step in data.items() if isinstance(step, dict) and "error" in step]
    return "\n".join([*lines, "", *placement, *(["", "Failed:", *failed] if failed else []), ""])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command")
    whole = commands.add_parser("run", help="the whole run (the default)")
    whole.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "/tmp/hatchway-gpu")))
    whole.add_argument("--work", type=Path, default=Path("/tmp/hatchway-gpu-work"))
    whole.add_argument(
        "--llama",
        choices=("build", "build-cpu", "installed"),
        default="build",
        help="build llama.cpp with CUDA (the default), without (a dry run), or use the one installed",
    )
    whole.add_argument("--quick", action="store_true", help="the demo shape only, two short rounds a leg")
    whole.add_argument("--binary", action="store_true", help="also build and run the PyInstaller CUDA folder")
    one = commands.add_parser("leg", help="one comparison in this process (the run starts these)")
    one.add_argument("--model", required=True)
    one.add_argument("--label", required=True)
    one.add_argument("--gpu-layers", required=True)
    one.add_argument("--threads", type=int, required=True)
    one.add_argument("--rounds", type=int, required=True)
    one.add_argument("--max-tokens", type=int, required=True)
    one.add_argument("--agent", action="append", default=[])
    one.add_argument("--result", type=Path, required=True)
    given = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(given if given[:1] in (["run"], ["leg"], ["-h"], ["--help"]) else ["run", *given])
    if args.command == "leg":
        write_json(args.result, asyncio.run(leg_main(args)))
    else:
        run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
