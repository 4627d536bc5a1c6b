"""Hatchway's benchmark suite: the one entry point (`make bench`, `make bench-quick`, `make bench-profile`).

    python bench/run.py [--quick] [--only NAMES] [--skip NAMES] [--litellm | --no-litellm]
                        [--no-pin] [--python-mock] [--python-load] [--results DIR] [--deadline-s S]
                        [--baseline REF]

Benchmarks (NAMES, comma-separated; all of them but `profile` by default):

    gateway    1. overhead: direct vs bare aiohttp relay vs Hatchway vs LiteLLM, non-stream and stream, c=1/32/128
    overload   5. offered load at 2x the capacity gateway measured: p99 of what is served, speed of 429/503
    soak       4. RSS, open fds (and tasks, when /metrics has them) over a long mixed run
    fleet      3. N simulated agents over gRPC: plane memory per agent, heartbeat CPU, dispatch latency
    node       2. llama.cpp through plane + agent vs in-process: TTFT and tokens/s
    node-structured  2b. the same with a JSON schema and with a tool call, grammar on both sides (not by default)
    conversations  6. a node's slots: interleaved conversations' follow-up TTFT, cancel during a long prompt
                   (with --baseline REF, the engine of REF too)
    failover   7. a stalled stream's rescue time, and a 20 s first token with and without hedging
    cross-plane  8. a node job across planes (NATS) vs the same plane: added TTFT, msg/s, tokens/s (not by default)
    workers    9. one plane process vs `--workers 2`, policy on, non-stream and stream, c=32/128: req/s and the ratio
    profile    py-spy on the plane at c=32, non-stream and stream: bench/results/profile-*.txt

Results: one JSON per benchmark plus summary.json (machine, versions, git commit, durations, targets) in
bench/results/ (bench/results/quick/ with --quick, which is git-ignored). The tables go to stdout, progress
to stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import conversations
import cross_plane
import failover
import fleet
import gateway
import node
import node_structured
import orjson
import overload
import profiling
import soak
import targets
import workers
from harness import BENCH_DIR, RESULTS_DIR, BenchError, Pinning, log, machine_info, run_async, write_json
from suite import Suite

BENCHMARKS = (
    "gateway",
    "overload",
    "soak",
    "fleet",
    "node",
    "node-structured",
    "conversations",
    "failover",
    "cross-plane",
    "workers",
    "profile",
)
DEFAULT = ("gateway", "overload", "soak", "fleet", "node", "conversations", "failover", "workers")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="short runs for iteration (about 3 minutes)")
    parser.add_argument("--only", type=_names, default=None, help="run only these benchmarks")
    parser.add_argument("--skip", type=_names, default=(), help="leave these benchmarks out")
    litellm = parser.add_mutually_exclusive_group()
    litellm.add_argument("--litellm", dest="litellm", action="store_true", default=None, help="include LiteLLM")
    litellm.add_argument("--no-litellm", dest="litellm", action="store_false", help="leave LiteLLM out")
    parser.add_argument("--no-pin", action="store_true", help="do not pin processes to CPUs")
    parser.add_argument("--python-mock", action="store_true", help="use the Python mock upstream, not nginx")
    parser.add_argument("--python-load", action="store_true", help="use the Python load generator, not wrk")
    parser.add_argument("--results", type=Path, default=None, help="where the JSON goes (default bench/results)")
    parser.add_argument("--in-process", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--deadline-s", type=float, default=1800.0, help="abort the whole run after this")
    parser.add_argument(
        "--baseline",
        metavar="REF",
        default=None,
        help="also run the plane as of this git commit (a previous version) in the gateway benchmark",
    )
    args = parser.parse_args(argv)
    args.selected = [name for name in (args.only or DEFAULT) if name not in args.skip]
    if args.results is None:
        args.results = RESULTS_DIR / "quick" if args.quick else RESULTS_DIR
    return args


def _names(text: str) -> tuple[str, ...]:
    names = tuple(part.strip() for part in text.split(",") if part.strip())
    unknown = [name for name in names if name not in BENCHMARKS]
    if unknown:
        raise argparse.ArgumentTypeError(
            f"unknown benchmark(s) {', '.join(unknown)}; choose from {', '.join(BENCHMARKS)}"
        )
    return names


def _runners(args: argparse.Namespace) -> dict[str, Callable[[Suite], Awaitable[dict[str, Any]]]]:
    return {
        "gateway": lambda suite: gateway.run(suite, args.litellm),
        "overload": overload.run,
        "soak": soak.run,
        "fleet": fleet.run,
        "node": node.run,
        "node-structured": node_structured.run,
        "conversations": conversations.run,
        "failover": failover.run,
        "cross-plane": cross_plane.run,
        "workers": workers.run,
        "profile": profiling.run,
    }


FORMATTERS: dict[str, Callable[[dict[str, Any]], str]] = {
    "gateway": gateway.format_table,
    "overload": overload.format_table,
    "soak": soak.format_table,
    "fleet": fleet.format_table,
    "node": node.format_table,
    "node-structured": node_structured.format_table,
    "conversations": conversations.format_table,
    "failover": failover.format_table,
    "cross-plane": cross_plane.format_table,
    "workers": workers.format_table,
    "profile": profiling.format_table,
}

TITLES = {
    "gateway": "1. Gateway overhead",
    "node": "2. Node path",
    "node-structured": "2b. Node path: JSON schema and tools",
    "fleet": "3. Fleet",
    "soak": "4. Soak",
    "overload": "5. Overload",
    "conversations": "6. A node's slots",
    "failover": "7. Failover timings",
    "cross-plane": "8. Node job across planes",
    "workers": "9. Every core: 1 worker vs 2",
    "profile": "Profile of the plane (py-spy)",
}


async def node_in_child(suite: Suite, args: argparse.Namespace) -> dict[str, Any]:
    """The node benchmark in a process of its own: it loads llama.cpp into its process, and a crash in there
    (seen: SIGSEGV in llama_decode with some builds) must cost only its own figures, not the whole run."""
    out = suite.subdir("node-child")
    argv = [sys.executable, str(BENCH_DIR / "run.py"), "--only", "node", "--in-process", "--results", str(out)]
    argv += ["--quick"] if suite.quick else []
    proc = await asyncio.create_subprocess_exec(*argv, stdout=asyncio.subprocess.DEVNULL)
    code = await proc.wait()
    result = out / "node.json"
    if code != 0 or not result.exists():
        why = f"killed by signal {-code}" if code < 0 else f"exit code {code}"
        raise BenchError(f"the node benchmark's process ended with {why} (see its output above)")
    report: dict[str, Any] = orjson.loads(result.read_bytes())
    report.pop("machine", None)
    return report


async def run_all(suite: Suite, args: argparse.Namespace) -> dict[str, float]:
    durations: dict[str, float] = {}
    runners = _runners(args)
    for name in args.selected:
        log(f"== {TITLES[name]} ({'quick' if suite.quick else 'full'})")
        started = time.perf_counter()
        try:
            # llama.cpp benchmarks run on all cores; everything else keeps the load on its own core.
            llama = name in ("node", "conversations", "cross-plane")
            pin = contextlib.nullcontext() if llama else suite.pinning.runner_on_load_cpu()
            with pin:
                if name == "node" and not args.in_process:
                    report = await node_in_child(suite, args)
                else:
                    report = await runners[name](suite)
        except BenchError as exc:
            log(f"{name}: FAILED: {exc}")
            report = {"error": str(exc)}
        durations[name] = round(time.perf_counter() - started, 1)
        report["elapsed_s"] = durations[name]
        suite.results[name] = report
        write_json(args.results / f"{name}.json", {"machine": suite.results["machine"], **report})
        log(f"== {name} done in {durations[name]:.0f}s")
    return durations


def print_report(suite: Suite, args: argparse.Namespace, durations: dict[str, float]) -> None:
    machine = suite.results["machine"]
    sections = []
    for name in sorted(args.selected, key=lambda n: list(TITLES).index(n)):
        report = suite.results.get(name, {})
        body = f"FAILED: {report['error']}" if "error" in report else FORMATTERS[name](report)
        sections.append(f"## {TITLES[name]}\n{body}")
    sections.append("## Targets\n" + targets.format_table(targets.evaluate(suite.results), args.selected))
    print("\n\n".join(sections))
    print(
        f"\n{machine['cpu_model']}, {machine['cpu_count']} CPUs; Python {machine['python']}; "
        f"{suite.pinning.note}; load average at start {machine['load_average_at_start']}; "
        f"{'quick' if args.quick else 'full'} run, {sum(durations.values()):.0f}s "
        f"({', '.join(f'{k} {v:.0f}s' for k, v in durations.items())})"
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    with contextlib.ExitStack() as stack:
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="hatchway-bench-")))
        suite = Suite(
            stack=stack,
            workdir=workdir,
            pinning=Pinning.detect(not args.no_pin),
            quick=args.quick,
            results_dir=args.results,
            prefer_nginx=not args.python_mock,
            prefer_wrk=not args.python_load,
            baseline=args.baseline,
        )
        suite.results["machine"] = machine_info()
        log(suite.pinning.note)

        async def bounded() -> dict[str, float]:
            async with asyncio.timeout(args.deadline_s):
                return await run_all(suite, args)

        try:
            durations = run_async(bounded())
        except TimeoutError:
            log(f"bench/run.py: gave up after --deadline-s {args.deadline_s:.0f}s")
            return 1
        except KeyboardInterrupt:
            # The subprocesses are stopped on the way out; a traceback would add nothing.
            log("bench/run.py: interrupted")
            return 130
    print_report(suite, args, durations)
    summary = {
        "machine": suite.results["machine"],
        "mode": "quick" if args.quick else "full",
        "pinning": suite.pinning.as_dict(),
        "durations_s": durations,
        "total_s": round(time.perf_counter() - started, 1),
        "targets": targets.evaluate(suite.results),
    }
    write_json(args.results / "summary.json", summary)
    log(f"wrote {args.results}/summary.json and one JSON per benchmark")
    failed = [name for name in args.selected if "error" in suite.results.get(name, {})]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
