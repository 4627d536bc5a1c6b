"""Benchmark: a node job dispatched across planes (issue 17) against the same-plane path.

Two `hatchway serve` processes make one gateway: one fresh PostgreSQL database (this machine's, on its standard
port), one secret key, one admin key, and one NATS (HATCHWAY_NATS_URL, default nats://127.0.0.1:4222) under a
subject prefix of this run's own (server/fleet). The node dials plane A only; a request made to A is the
same-plane path, the same request made to B crosses NATS to A and its events come back (the cross-plane path).
Both planes serve one org and key, with no limits, quotas or cache (`configure(policy=False)`): what both paths
share costs them alike, and the hop is the figure.

1. Protocol path: a fake agent (bench/fake_agent.py, answers at once with one-token batches) connected to A.
   Time to first SSE chunk of a streamed one-batch completion made to A and to B, in paired rounds that
   alternate which plane goes first, one request at a time, each started with both planes quiet: p50/p90/p99 of
   each side and of the added TTFT per pair (the issue's goal: at most 2 ms). Then messages/s for 1 and 16
   concurrent streams of one-token batches at A and at B (blocks alternating), with the CPU both planes spent
   per message (a job at B costs A its forwarding too).
2. The real agent with the demo model, as bench/node.py part 1 runs it (same prompt, temperature 0, fixed seed):
   TTFT and generation tokens/s at A and at B in paired rounds: added TTFT and the tokens/s ratio B/A per round.

Run: `python bench/run.py --only cross-plane [--quick]`.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import socket
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

import aiohttp
import grpc
import node
from fake_agent import FAKE_MODEL, FakeAgent, plane_certificate
from harness import (
    REPO_ROOT,
    BenchError,
    MachineLoad,
    cpu_seconds,
    log,
    sample_process,
    stop_process,
    summary,
    wait_until_quiet,
)
from hatchway import Plane, configure, node_token, start_plane, wait_for_model, wait_ready
from node import Generation, StreamRun, fake_stream, hatchway_generation, stream_run, summarise_streams
from suite import Suite

sys.path.insert(0, str(REPO_ROOT))
from tests.server.storage.test_postgres import scratch_database

NATS_URL = os.environ.get("HATCHWAY_NATS_URL", "nats://127.0.0.1:4222")
SECRET_KEY = "hwa-bench-one-secret-for-both-planes"
TTFT_GOAL_MS = 2.0
# Config changes reach every plane within 1 s (issue 17): B knows the org and key made through A after this.
CONFIG_SETTLE_S = 1.5
PROGRESS_EVERY = 50  # pairs between two progress lines

_R = TypeVar("_R")


@dataclass(frozen=True)
class Settings:
    warmup: int  # unrecorded pairs first: connections, code paths, the node's ads
    rounds: int  # paired TTFT rounds with the fake agent
    messages: int  # one-token batches per stream in the throughput part
    stream_rounds: int
    llama_rounds: int

    @classmethod
    def for_run(cls, quick: bool) -> Settings:
        if quick:
            return cls(warmup=5, rounds=30, messages=500, stream_rounds=1, llama_rounds=2)
        # 300 pairs: the p99 of the added TTFT rests on its 3 worst pairs, not on one. 1,000 batches a stream:
        # under the fake model's context (fake_agent.CONTEXT, 1,024 tokens), which bounds the usage a plane bills.
        return cls(warmup=20, rounds=300, messages=1000, stream_rounds=3, llama_rounds=10)


@dataclass(frozen=True)
class Gateway:
    a: Plane  # the node's plane
    b: Plane  # the other one

    @property
    def pids(self) -> list[int]:
        return [self.a.pid, self.b.pid]

    def sides(self) -> tuple[tuple[str, Plane], tuple[str, Plane]]:
        return ("same", self.a), ("cross", self.b)


def require_nats() -> None:
    host, _, port = urlsplit(NATS_URL).netloc.rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=2).close()
    except OSError as exc:
        raise BenchError(f"NATS is not reachable at {NATS_URL} ({exc}): set HATCHWAY_NATS_URL or start it") from exc


async def start_gateway(stack: contextlib.ExitStack, workdir: Path, session: aiohttp.ClientSession) -> Gateway:
    require_nats()
    try:
        database = stack.enter_context(scratch_database())
    except Exception as exc:  # psycopg's errors: PostgreSQL is down or refuses
        raise BenchError(f"cannot create a scratch PostgreSQL database at 127.0.0.1:5432: {exc}") from exc
    prefix = f"hatchway-bench-{secrets.token_hex(6)}"

    def plane(name: str) -> Plane:
        return start_plane(
            stack,
            workdir,
            None,
            name,
            plane_name=name,
            database_url=database,
            secret_key=SECRET_KEY,
            nats_url=NATS_URL,
            nats_prefix=prefix,
        )

    # One after the other: the first migrates the empty database. Not pinned: two planes, NATS and the agent
    # take both cores of a 2-core machine, as planes on machines of their own would not share one core.
    a = plane("plane-a")
    await wait_ready(session, a)
    b = plane("plane-b")
    await wait_ready(session, b)
    # No policy: the cross-plane hop is the figure, and limits, quotas and cache lookups cost both planes alike.
    # (bench/hatchway.py's GENEROUS_LIMITS are over PostgreSQL's INTEGER columns of limit_policy: a 500 there.)
    b.api_key = await configure(session, a, None, policy=False)
    await asyncio.sleep(CONFIG_SETTLE_S)
    return Gateway(a, b)


# -- part 1: the fake agent ------------------------------------------------------------------------------


async def paired(
    gateway: Gateway, rounds: int, measure: Callable[[Plane], Awaitable[_R]], quiet: list[int]
) -> list[dict[str, _R]]:
    """`rounds` pairs of `measure` at A and at B, alternating which goes first, each started on quiet planes."""
    pairs = []
    for index in range(rounds):
        sides = gateway.sides()
        pair: dict[str, _R] = {}
        for name, plane in sides if index % 2 == 0 else reversed(sides):
            await wait_until_quiet(quiet)
            pair[name] = await measure(plane)
        pairs.append(pair)
        if (index + 1) % PROGRESS_EVERY == 0:
            log(f"  {index + 1}/{rounds} pairs")
    return pairs


async def first_chunk(session: aiohttp.ClientSession, plane: Plane, key: str) -> float:
    result = await fake_stream(session, plane, key, 1)
    if result.problem:
        raise BenchError(f"{plane.url}: {result.problem}")
    return result.first_chunk_s * 1000


def summarise_ttft(pairs: list[dict[str, float]]) -> dict[str, Any]:
    added = [p["cross"] - p["same"] for p in pairs]
    return {
        "same_plane_ms": summary([p["same"] for p in pairs]),
        "cross_plane_ms": summary([p["cross"] for p in pairs]),
        "added_ms": summary(added),
        "goal_ms": TTFT_GOAL_MS,
        "pairs_ms": [[round(p["same"], 3), round(p["cross"], 3)] for p in pairs],
    }


@dataclass
class SideRun:
    run: StreamRun
    planes_cpu_s: float  # both planes: a job at B costs A its forwarding


async def measure_streams(
    session: aiohttp.ClientSession, gateway: Gateway, key: str, agent: FakeAgent, rounds: int
) -> dict[str, dict[int, list[SideRun]]]:
    async def one(plane: Plane, concurrency: int) -> SideRun:
        before = sum(cpu_seconds(pid) for pid in gateway.pids)
        run = await stream_run(session, plane, key, agent, concurrency)
        return SideRun(run, sum(cpu_seconds(pid) for pid in gateway.pids) - before)

    for _, plane in gateway.sides():
        for concurrency in node.STREAM_CONCURRENCY:
            await one(plane, concurrency)  # warm-up
    runs: dict[str, dict[int, list[SideRun]]] = {
        name: {c: [] for c in node.STREAM_CONCURRENCY} for name in ("same", "cross")
    }
    for index in range(rounds):
        for concurrency in node.STREAM_CONCURRENCY:
            sides = gateway.sides()
            for name, plane in sides if index % 2 == 0 else reversed(sides):
                await wait_until_quiet(gateway.pids)
                side = await one(plane, concurrency)
                runs[name][concurrency].append(side)
                log(
                    f"  stream round {index + 1} {name:5} streams={concurrency:<3} {side.run.messages_per_s:9.1f} "
                    f"msg/s  planes CPU {1e6 * side.planes_cpu_s / max(1, _chunks(side.run)):6.1f} us/msg"
                    + (f"  problems {len(side.run.problems)}" if side.run.problems else "")
                )
    return runs


def _chunks(run: StreamRun) -> int:
    return sum(r.chunks for r in run.results)


def summarise_side(runs: dict[int, list[SideRun]]) -> list[dict[str, Any]]:
    rows = summarise_streams({c: [side.run for side in sides] for c, sides in runs.items()})
    for row in rows:
        sides = runs[row["concurrency"]]
        per_message = [1e6 * s.planes_cpu_s / _chunks(s.run) for s in sides if _chunks(s.run)]
        row["planes_cpu_us_per_message"] = summary(per_message, 2)
    return rows


async def fake_part(session: aiohttp.ClientSession, gateway: Gateway, key: str, settings: Settings) -> dict[str, Any]:
    a = gateway.a
    token = await node_token(session, a)
    agent = FakeAgent(a.grpc_address, await plane_certificate(a.grpc_address, token), "bench-fake-agent")
    try:
        await agent.enroll(token)
        await agent.connect()
        await wait_for_model(session, a, FAKE_MODEL)
        await wait_for_model(session, gateway.b, FAKE_MODEL)
        agent.messages = 1
        # The planes only: this process's own sample would count them again (psutil adds a process's children).
        quiet = gateway.pids
        await paired(gateway, settings.warmup, lambda plane: first_chunk(session, plane, key), quiet)
        pairs = await paired(gateway, settings.rounds, lambda plane: first_chunk(session, plane, key), quiet)
        ttft = summarise_ttft(pairs)
        log(
            f"  first chunk p50: same plane {ttft['same_plane_ms']['p50']:.3f} ms, cross plane "
            f"{ttft['cross_plane_ms']['p50']:.3f} ms, added p50 {ttft['added_ms']['p50']:+.3f} ms"
        )
        agent.messages = settings.messages
        runs = await measure_streams(session, gateway, key, agent, settings.stream_rounds)
    except grpc.aio.AioRpcError as exc:
        raise BenchError(f"fake agent: the plane ended the call: {exc.code().name} {exc.details()}") from exc
    finally:
        await agent.close()
    return {
        "ttft": ttft,
        "stream": {
            "messages_per_stream": settings.messages,
            "same_plane": summarise_side(runs["same"]),
            "cross_plane": summarise_side(runs["cross"]),
        },
    }


# -- part 2: the real agent with the demo model --------------------------------------------------------------


def summarise_llama(pairs: list[dict[str, Generation]]) -> dict[str, Any]:
    def side(runs: list[Generation]) -> dict[str, Any]:
        return {
            "ttft_ms": summary([r.ttft_s * 1000 for r in runs]),
            "tokens_per_s": summary([r.tokens_per_s for r in runs], 2),
            "tokens": summary([float(r.tokens) for r in runs], 1),
        }

    same, cross = [p["same"] for p in pairs], [p["cross"] for p in pairs]
    return {
        "same_plane": side(same),
        "cross_plane": side(cross),
        "added_ttft_ms": summary([(c.ttft_s - s.ttft_s) * 1000 for s, c in zip(same, cross, strict=True)]),
        "tokens_per_s_ratio": summary(
            [c.tokens_per_s / s.tokens_per_s for s, c in zip(same, cross, strict=True) if s.tokens_per_s > 0], 4
        ),
        "same_text": all(s.text == c.text for s, c in zip(same, cross, strict=True)),
        "rounds": [{"same": p["same"].as_dict(), "cross": p["cross"].as_dict()} for p in pairs],
    }


async def llama_part(
    stack: contextlib.ExitStack,
    workdir: Path,
    session: aiohttp.ClientSession,
    gateway: Gateway,
    key: str,
    settings: Settings,
    agent_settings: node.Settings,
) -> dict[str, Any]:
    config = workdir / "agent.json"
    await node.enroll_agent(gateway.a, await node_token(session, gateway.a), config)
    agent = node.start_agent(stack, workdir, config, agent_settings)
    await wait_for_model(session, gateway.a, node.LLAMA_MODEL, agent)
    await wait_for_model(session, gateway.b, node.LLAMA_MODEL, agent)

    async def generation(plane: Plane) -> Generation:
        result = await hatchway_generation(session, plane, key, agent_settings.max_tokens)
        log(
            f"  llama {'same ' if plane is gateway.a else 'cross'} TTFT {result.ttft_s * 1000:7.2f} ms  "
            f"{result.tokens_per_s:7.1f} tok/s  {result.tokens} tokens"
        )
        return result

    quiet = [*gateway.pids, agent.pid]
    await paired(gateway, 1, generation, quiet)  # warm-up: the weights paged in, llama.cpp's prompt cache filled
    pairs = await paired(gateway, settings.llama_rounds, generation, quiet)
    # The next benchmark must not share the CPU with an idle agent's heartbeats and model.
    await asyncio.to_thread(stop_process, agent.proc)
    return {**summarise_llama(pairs), "max_tokens": agent_settings.max_tokens, "threads": agent_settings.threads}


# -- orchestration -----------------------------------------------------------------------------------------


async def run(suite: Suite) -> dict[str, Any]:
    settings = Settings.for_run(suite.quick)
    agent_settings = node.Settings.for_run(suite.quick)
    workdir = suite.subdir("cross-plane")
    report: dict[str, Any] = {"settings": settings.__dict__, "nats_url": NATS_URL, "versions": node.versions()}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
        gateway = await start_gateway(suite.stack, workdir, session)
        key = gateway.b.api_key
        # On a shared machine, what others ran meanwhile explains a noisy p99: say how much.
        with MachineLoad() as fake_load:
            report["fake"] = await fake_part(session, gateway, key, settings)
        with MachineLoad() as llama_load:
            report["llama"] = await llama_part(suite.stack, workdir, session, gateway, key, settings, agent_settings)
        report["machine_load"] = {"fake": fake_load.as_dict(), "llama": llama_load.as_dict()}
        report["plane_rss_mib_end"] = {
            "a": round(sample_process(gateway.a.pid).rss_bytes / 2**20, 1),
            "b": round(sample_process(gateway.b.pid).rss_bytes / 2**20, 1),
        }
    for plane in (gateway.b, gateway.a):
        stop_process(plane.child.proc)
    return report


def format_ttft(result: dict[str, Any]) -> str:
    title = (
        f"time to first SSE chunk, fake agent on plane A, c=1, {result['same_plane_ms']['n']} paired rounds "
        f"(request at A: same plane; at B: across NATS)"
    )
    header = f"{'path':18} {'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8}"
    lines = [title, header, "-" * len(header)]
    for name, key in (
        ("same plane (A)", "same_plane_ms"),
        ("cross plane (B)", "cross_plane_ms"),
        ("added per pair", "added_ms"),
    ):
        row = result[key]
        lines.append(f"{name:18} {row['p50']:>8.3f} {row['p90']:>8.3f} {row['p99']:>8.3f}")
    goal = result["goal_ms"]
    verdicts = [f"{q} {'met' if result['added_ms'][q] <= goal else 'NOT met'}" for q in ("p50", "p90", "p99")]
    lines.append(f"goal: added TTFT <= {goal:.0f} ms: {', '.join(verdicts)}")
    return "\n".join(lines)


def format_streams(result: dict[str, Any]) -> str:
    title = f"job stream (fake agent, {result['messages_per_stream']} one-token batches a stream)"
    header = f"{'streams':>7} {'path':6} {'msg/s p50':>10} {'1st chunk p50 ms':>16} {'planes CPU us/msg':>17} "
    header += f"{'bad streams':>11}"
    lines = [title, header, "-" * len(header)]
    same = {row["concurrency"]: row for row in result["same_plane"]}
    for cross in result["cross_plane"]:
        concurrency = cross["concurrency"]
        for name, row in (("same", same[concurrency]), ("cross", cross)):
            lines.append(
                f"{concurrency:>7} {name:6} {row['messages_per_s']['p50']:>10.1f} "
                f"{row['first_chunk_ms']['p50']:>16.2f} {row['planes_cpu_us_per_message']['p50']:>17.1f} "
                f"{row['bad_streams']:>5}/{row['streams']:<5}"
            )
            lines.extend(f"    {problem}" for problem in row["problems"])
        base = same[concurrency]["messages_per_s"]["p50"]
        ratio = cross["messages_per_s"]["p50"] / base if base else 0.0
        lines.append(f"{'':>7} cross/same msg/s: {ratio:.3f}")
    return "\n".join(lines)


def format_llama(result: dict[str, Any]) -> str:
    title = (
        f"the demo model through the real agent on plane A ({node.MODEL_FILE}, {result['threads']} threads, "
        f"{result['max_tokens']} tokens, {result['same_plane']['ttft_ms']['n']} paired rounds)"
    )
    header = f"{'path':16} {'TTFT p50 ms':>11} {'TTFT p90 ms':>11} {'tok/s p50':>9} {'tok/s p90':>9}"
    lines = [title, header, "-" * len(header)]
    for name, key in (("same plane (A)", "same_plane"), ("cross plane (B)", "cross_plane")):
        side = result[key]
        lines.append(
            f"{name:16} {side['ttft_ms']['p50']:>11.2f} {side['ttft_ms']['p90']:>11.2f} "
            f"{side['tokens_per_s']['p50']:>9.1f} {side['tokens_per_s']['p90']:>9.1f}"
        )
    added, ratio = result["added_ttft_ms"], result["tokens_per_s_ratio"]
    lines.append(
        f"added TTFT (paired): p50 {added['p50']:+.2f} ms, p90 {added['p90']:+.2f} ms; tok/s cross/same: "
        f"p50 {ratio['p50']:.3f}, p90 {ratio['p90']:.3f}; same text: {'yes' if result['same_text'] else 'NO'}"
    )
    return "\n".join(lines)


def format_table(report: dict[str, Any]) -> str:
    fake, load = report["fake"], report["machine_load"]
    sections = [format_ttft(fake["ttft"]), format_streams(fake["stream"]), format_llama(report["llama"])]
    sections.append(
        "other processes on the machine meanwhile: "
        f"{load['fake']['foreign_cpu_percent_of_one_core']:.0f}% of a core (fake agent parts), "
        f"{load['llama']['foreign_cpu_percent_of_one_core']:.0f}% (demo model part)"
    )
    return "\n\n".join(sections)
