"""Where the plane's CPU goes: py-spy samples a fresh plane (on the SUT CPU) while wrk holds it at c=32,
non-stream and then stream, and the samples are summarised into bench/results/profile-{mode}.txt:

- self time by function (the frame on top of the stack when sampled),
- inclusive time by function (anywhere on the stack),
- self time by file (server/, aiohttp/, grpc/, asyncio/, ...).

py-spy runs with --nonblocking (it does not pause the plane to read its stacks: cheaper, slightly less exact)
and without --idle, so percentages are of the samples where the plane's threads were running Python or
native code, not waiting. The raw collapsed stacks go next to the summary (profile-{mode}.collapsed), ready for
any flame graph tool (speedscope.app opens them).
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp
import psutil
from harness import BenchError, log
from hatchway import MODELS, configure, start_plane, wait_ready
from loadgen import Request, chat_body, probe
from suite import Suite

RATE_HZ = 250
CONCURRENCY = 32
TOP = 30
FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")


def py_spy() -> str:
    path = Path(sys.executable).parent / "py-spy"
    if not path.exists():
        raise BenchError(f"{path} not found: py-spy is in the dev extra (make install)")
    return str(path)


def _short_file(path: str) -> str:
    for marker in ("site-packages/", "/lib/python3.11/", "/work/main/"):
        if marker in path:
            return path.split(marker, 1)[1]
    return path


def _frame(text: str) -> tuple[str, str]:
    """(function as 'name (file)', file) of one collapsed-stack frame."""
    match = FRAME.match(text)
    if not match:
        return text, text
    file = _short_file(match.group("file"))
    return f"{match.group('func')} ({file})", file


def summarise(collapsed: str) -> dict[str, Any]:
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    files: Counter[str] = Counter()
    total = 0
    for line in collapsed.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        # The first frame of a raw py-spy stack names the thread ("process ... thread ..."): skip non-frames.
        frames = [_frame(f) for f in stack.split(";") if "(" in f]
        if not frames:
            continue
        total += count
        leaf, leaf_file = frames[-1]
        own[leaf] += count
        files[leaf_file] += count
        for name in {name for name, _ in frames}:
            inclusive[name] += count

    def top(counter: Counter[str], n: int) -> list[tuple[str, float]]:
        return [(name, round(100 * c / total, 2)) for name, c in counter.most_common(n)] if total else []

    return {"samples": total, "self": top(own, TOP), "inclusive": top(inclusive, TOP), "files": top(files, 20)}


def thread_cpu(pid: int) -> dict[str, float]:
    """CPU seconds (user + system) used so far by the plane's main thread (the event loop) and by all its other
    threads together (usage writer, acceptor, grpc): Linux names them all after the process, so no finer split."""
    used = {"event loop": 0.0, "other threads": 0.0}
    for thread in psutil.Process(pid).threads():
        used["event loop" if thread.id == pid else "other threads"] += thread.user_time + thread.system_time
    return used


def _per_thread(us_per_request: dict[str, float]) -> str:
    return ", ".join(f"{name} {us:.0f} us" for name, us in us_per_request.items())


def render(mode: str, run: dict[str, Any], summary: dict[str, Any]) -> str:
    threads = summary["thread_cpu_us_per_request"]
    lines = [
        f"Hatchway plane under wrk at c={CONCURRENCY}, {mode}: {run['rps']:.0f} req/s while sampled "
        f"({run['duration_s']:.0f}s, py-spy --rate {RATE_HZ} --nonblocking, {summary['samples']} samples with a "
        "thread on CPU; % of those samples)",
        "",
        f"CPU per request by thread (from /proc; 10 ms ticks): {_per_thread(threads)}",
        "",
        "self time by function",
        *(f"  {pct:6.2f}%  {name}" for name, pct in summary["self"]),
        "",
        "inclusive time by function",
        *(f"  {pct:6.2f}%  {name}" for name, pct in summary["inclusive"]),
        "",
        "self time by file",
        *(f"  {pct:6.2f}%  {name}" for name, pct in summary["files"]),
    ]
    return "\n".join(lines) + "\n"


async def profile_mode(
    suite: Suite, request: Request, pid: int, mode: str, duration_s: float, out: Path
) -> dict[str, Any]:
    raw = suite.workdir / f"profile-{mode}.collapsed"
    argv = [py_spy(), "record", "--pid", str(pid), "--rate", str(RATE_HZ), "--duration", str(round(duration_s))]
    argv += ["--nonblocking", "--format", "raw", "--output", str(raw)]
    spy = await asyncio.create_subprocess_exec(
        *suite.pinning.load(argv), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    await asyncio.sleep(0.5)  # attached before the load starts
    before = thread_cpu(pid)
    result = await suite.closed_loop.run(request, CONCURRENCY, duration_s)
    threads = {
        name: round(1e6 * (seconds - before[name]) / max(result.ok, 1), 1) for name, seconds in thread_cpu(pid).items()
    }
    output, _ = await spy.communicate()
    if spy.returncode != 0 or not raw.exists():
        raise BenchError(f"py-spy exited with {spy.returncode}: {output.decode(errors='replace')[-1500:]}")
    collapsed = raw.read_text()
    summary = summarise(collapsed)
    summary["thread_cpu_us_per_request"] = threads
    run = {"rps": result.rps, "duration_s": result.duration_s}
    (out / f"profile-{mode}.txt").write_text(render(mode, run, summary))
    (out / f"profile-{mode}.collapsed").write_text(collapsed)
    log(f"  profile {mode}: {result.rps:.0f} req/s, {summary['samples']} samples; top self: {summary['self'][:3]}")
    return {"rps": round(result.rps, 1), **summary}


async def run(suite: Suite) -> dict[str, Any]:
    duration_s = 6.0 if suite.quick else 15.0
    out = suite.results_dir
    out.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"rate_hz": RATE_HZ, "concurrency": CONCURRENCY, "duration_s": duration_s}
    with contextlib.ExitStack() as stack:
        plane = start_plane(stack, suite.subdir("profile"), suite.pinning)
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
            await wait_ready(session, plane)
            await configure(session, plane, suite.upstream)
        for mode, (answer, stream) in {"nonstream": ("json", False), "stream": ("sse", True)}.items():
            request = Request(
                f"{plane.url}/v1/chat/completions", plane.api_key, chat_body(MODELS[answer], stream), stream
            )
            await probe(request)
            await suite.closed_loop.run(request, CONCURRENCY, 1.0)  # warm-up
            report[mode] = await profile_mode(suite, request, plane.pid, mode, duration_s, out)
    report["files"] = [
        str(out / f"profile-{mode}.{ext}") for mode in ("nonstream", "stream") for ext in ("txt", "collapsed")
    ]
    return report


def format_table(report: dict[str, Any]) -> str:
    lines = []
    for mode in ("nonstream", "stream"):
        data = report[mode]
        lines.append(f"{mode} ({data['rps']:.0f} req/s, {data['samples']} samples): top self time")
        lines.append(f"  CPU per request by thread: {_per_thread(data.get('thread_cpu_us_per_request', {}))}")
        lines.extend(f"  {pct:6.2f}%  {name}" for name, pct in data["self"][:12])
        lines.append("  by file: " + ", ".join(f"{name} {pct:.1f}%" for name, pct in data["files"][:8]))
    lines.append("full summaries: " + ", ".join(p for p in report["files"] if p.endswith(".txt")))
    return "\n".join(lines)
