"""Benchmark: structured output and tool calls on the node path, through plane + agent versus in process.

The same chat request, streamed at temperature 0 with a fixed seed, two ways:

    in process   agent.engine.Engine in this process: the same template, grammar and sampler the agent runs
                 (grammar cost included), no plane, no gRPC
    hatchway     a real agent subprocess enrolled in a real plane subprocess, over /v1/chat/completions

for two requests: a `response_format` json_schema answer, and a `tool_choice: required` call of one function
(arguments bound to its parameters). Time to first token is to the first content for the schema and to the
call's first fragment (its name known) for the tool; tokens/s is of the tokens after the first over the time
after it (for the tool, whose first fragment comes some 18 tokens in: of all tokens over the whole time),
completion tokens from usage on both sides. As in bench/node.py the two sides never generate at the
same time, rounds alternate which goes first, and the prompt is the same every round (both reuse their cached
prefix: TTFT is one decode step plus what lies between the client and llama.cpp).

A third line per request is a reference, not a side: llama-cpp-python's own grammar sampling (the grammar applied
to the whole vocabulary before every token) on the same prompt and grammar, to show what agent.grammar's
`GrammarChain` (the grammar applied only when the chain's pick breaks it, as llama.cpp's own sampler does) saves.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
from dataclasses import dataclass
from typing import Any

import aiohttp
from harness import REPO_ROOT, BenchError, Child, log, percentile, stop_process, wait_until_quiet
from hatchway import Plane, configure, node_token, start_plane, wait_for_model, wait_ready
from node import CONTEXT, LLAMA_MODEL, SEED, enroll_agent, model_path, sse_chunks, start_agent
from node import Settings as NodeSettings
from suite import Suite

sys.path.insert(0, str(REPO_ROOT))  # agent.* for the in-process side
from agent.engine import CHAT, End, Engine, Job, Text
from agent.models import ModelConfig

CITY = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 40},
        "country": {"type": "string", "maxLength": 40},
        "population": {"type": "integer"},
        "landmarks": {"type": "array", "items": {"type": "string", "maxLength": 40}, "maxItems": 4},
    },
    "required": ["city", "country", "population", "landmarks"],
    "additionalProperties": False,
}
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather forecast for a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 40},
                "unit": {"enum": ["celsius", "fahrenheit"]},
                "days": {"type": "integer"},
            },
            "required": ["city", "unit", "days"],
            "additionalProperties": False,
        },
    },
}
# Begins the answer text of a call (its first fragment), as the sides record it.
CALL_MARK = "call:"
CASES: dict[str, dict[str, Any]] = {
    "json_schema": {
        "messages": [{"role": "user", "content": "Describe Paris as JSON: its country, population, landmarks."}],
        "response_format": {"type": "json_schema", "json_schema": {"name": "city", "schema": CITY, "strict": True}},
    },
    "tool": {
        "messages": [{"role": "user", "content": "What will the weather be in Paris for the next three days?"}],
        "tools": [WEATHER],
        "tool_choice": "required",
        "parallel_tool_calls": False,
    },
}


@dataclass(frozen=True)
class Settings:
    rounds: int
    threads: int
    max_tokens: int

    @classmethod
    def for_run(cls, quick: bool) -> Settings:
        return cls(rounds=2, threads=2, max_tokens=48) if quick else cls(rounds=8, threads=2, max_tokens=64)


@dataclass
class Run:
    ttft_s: float
    generation_s: float
    tokens: int
    answer: str  # the content, or the call's name and arguments

    @property
    def tokens_per_s(self) -> float:
        """Of the tokens after the first, over the time after it. A call's first fragment comes only once its name
        is written (some 18 tokens in), so for a call: of all the tokens, over the whole time."""
        if self.answer.startswith(CALL_MARK):
            total = self.ttft_s + self.generation_s
            return self.tokens / total if total > 0 else 0.0
        return (self.tokens - 1) / self.generation_s if self.tokens > 1 and self.generation_s > 0 else 0.0


def body(case: str, max_tokens: int) -> dict[str, Any]:
    return {**CASES[case], "max_tokens": max_tokens, "temperature": 0, "seed": SEED}


async def in_process(engine: Engine, case: str, max_tokens: int) -> Run:
    started = time.perf_counter()
    first = last = started
    answer: list[str] = []
    end: End | None = None
    # Batched as the agent batches by default (agent/connection.py): a wake-up of this loop per token would take
    # a core from llama.cpp's threads.
    job = Job(CHAT, {"model": LLAMA_MODEL, **body(case, max_tokens)}, batch_s=0.05, batch_max=16)
    async for event in engine.generate(job):
        if isinstance(event, Text):
            pieces = [event.text] + [f"{CALL_MARK if c.id else ''}{c.name}{c.arguments}" for c in event.tool_calls]
            if any(pieces):
                last = time.perf_counter()
                first = first if answer else last
                answer.extend(pieces)
        elif isinstance(event, End):
            end = event
    if end is None or not answer:
        raise BenchError(f"in process: no answer for {case}")
    return Run(first - started, last - first, end.completion_tokens, "".join(answer))


async def through_hatchway(session: aiohttp.ClientSession, plane: Plane, key: str, case: str, max_tokens: int) -> Run:
    request = {
        **body(case, max_tokens),
        "model": LLAMA_MODEL,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    started = time.perf_counter()
    first = last = started
    answer: list[str] = []
    usage: dict[str, Any] = {}
    timeout = aiohttp.ClientTimeout(total=120)
    async for chunk in sse_chunks(session, f"{plane.url}/v1/chat/completions", key, request, timeout):
        usage = chunk.get("usage") or usage
        for choice in chunk.get("choices") or ():
            delta = choice.get("delta") or {}
            pieces = [delta.get("content") or ""]
            for call in delta.get("tool_calls") or ():
                function = call.get("function") or {}
                mark = CALL_MARK if call.get("id") else ""
                pieces.append(f"{mark}{function.get('name') or ''}{function.get('arguments') or ''}")
            if any(pieces):
                last = time.perf_counter()
                first = first if answer else last
                answer.extend(pieces)
    if not answer:
        raise BenchError(f"hatchway: no answer for {case}")
    return Run(first - started, last - first, int(usage.get("completion_tokens", 0)), "".join(answer))


def stock_llama(engine: Engine, case: str, max_tokens: int) -> Run:
    """llama-cpp-python's own grammar sampling (grammar first, every token) on the prompt and grammar the
    engine builds for the case: the reference GrammarChain is compared with."""
    from llama_cpp.llama_grammar import LlamaGrammar

    from agent.engine.requests import _render_chat

    model = engine._models[LLAMA_MODEL]
    assert model.formatter is not None
    plan = model._plan({"model": LLAMA_MODEL, **body(case, max_tokens)})
    prompt, _ = _render_chat(model.formatter, plan.messages, plan.tools)
    grammar = plan.output.grammar
    if grammar is None:
        raise BenchError(f"{case}: no grammar")
    llama = model.slots.tokenizer
    started = time.perf_counter()
    first = last = started
    pieces: list[str] = []
    stream = llama.create_completion(
        prompt,
        stream=True,
        max_tokens=max_tokens,
        temperature=0.0,
        seed=SEED,
        grammar=LlamaGrammar.from_string(grammar),
    )
    assert not isinstance(stream, dict)
    for chunk in stream:
        text = chunk["choices"][0]["text"]
        last = time.perf_counter()
        first = first if pieces else last
        pieces.append(text)
    return Run(first - started, last - first, len(pieces), "".join(pieces))


def summary(values: list[float], digits: int = 2) -> dict[str, float]:
    return {"p50": round(percentile(values, 50), digits), "p90": round(percentile(values, 90), digits)}


async def measure(
    session: aiohttp.ClientSession, plane: Plane, agent: Child, key: str, engine: Engine, settings: Settings
) -> dict[str, Any]:
    report: dict[str, Any] = {}
    for case in CASES:
        await in_process(engine, case, settings.max_tokens)  # warm-up: both prompt caches filled
        await through_hatchway(session, plane, key, case, settings.max_tokens)
        runs: dict[str, list[Run]] = {"in_process": [], "hatchway": []}
        for index in range(settings.rounds):
            order = ["in_process", "hatchway"] if index % 2 == 0 else ["hatchway", "in_process"]
            for side in order:
                await wait_until_quiet([plane.pid, agent.pid])
                if side == "in_process":
                    run = await in_process(engine, case, settings.max_tokens)
                else:
                    run = await through_hatchway(session, plane, key, case, settings.max_tokens)
                runs[side].append(run)
                log(
                    f"  {case} round {index + 1} {side:10} TTFT {run.ttft_s * 1000:7.1f} ms "
                    f"{run.tokens_per_s:6.1f} tok/s {run.tokens} tokens"
                )
        pairs = list(zip(runs["in_process"], runs["hatchway"], strict=True))
        report[case] = {
            **{
                side: {
                    "ttft_ms": summary([r.ttft_s * 1000 for r in values]),
                    "tokens_per_s": summary([r.tokens_per_s for r in values]),
                    "tokens": summary([float(r.tokens) for r in values], 0),
                }
                for side, values in runs.items()
            },
            "added_ttft_ms": summary([(h.ttft_s - d.ttft_s) * 1000 for d, h in pairs]),
            "tokens_per_s_ratio": summary([h.tokens_per_s / d.tokens_per_s for d, h in pairs if d.tokens_per_s], 3),
            "same_answer": all(d.answer == h.answer for d, h in pairs),
        }
    # Last: llama-cpp-python on another thread starts another OpenMP team, which slows every later decode.
    for case in CASES:
        await wait_until_quiet([plane.pid, agent.pid])
        stock = await asyncio.to_thread(stock_llama, engine, case, settings.max_tokens)
        report[case]["stock_llama_cpp_python"] = {
            "ttft_ms": round(stock.ttft_s * 1000, 1),
            "tokens_per_s": round(stock.tokens_per_s, 2),
            "tokens": stock.tokens,
        }
    return report


async def run(suite: Suite) -> dict[str, Any]:
    settings = Settings.for_run(suite.quick)
    workdir = suite.subdir("node-structured")
    plane = start_plane(suite.stack, workdir, None)
    report: dict[str, Any] = {"settings": settings.__dict__}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as session:
        await wait_ready(session, plane)
        key = await configure(session, plane, None)
        config = workdir / "agent.json"
        await enroll_agent(plane, await node_token(session, plane), config)
        node_settings = NodeSettings(rounds=0, threads=settings.threads, max_tokens=0, messages=0, stream_rounds=0)
        agent = start_agent(suite.stack, workdir, config, node_settings)
        engine = Engine(
            [ModelConfig(model_path(), name=LLAMA_MODEL, slots=1, context=CONTEXT, threads=settings.threads)]
        )
        await engine.start()
        try:
            await wait_for_model(session, plane, LLAMA_MODEL, agent)
            report.update(await measure(session, plane, agent, key, engine, settings))
        finally:
            await engine.close()
            with contextlib.suppress(Exception):
                stop_process(agent.proc)
    stop_process(plane.child.proc)
    return report


def format_table(report: dict[str, Any]) -> str:
    settings = report["settings"]
    lines = [
        f"structured output and tools on a node: in process vs through plane + agent "
        f"({settings['threads']} threads, up to {settings['max_tokens']} tokens, {settings['rounds']} rounds)"
    ]
    header = f"{'request':12} {'path':22} {'TTFT p50 ms':>11} {'TTFT p90 ms':>11} {'tok/s p50':>9} {'tokens':>6}"
    lines += [header, "-" * len(header)]
    for case in CASES:
        result = report[case]
        for side in ("in_process", "hatchway"):
            row = result[side]
            lines.append(
                f"{case:12} {side:22} {row['ttft_ms']['p50']:>11.1f} {row['ttft_ms']['p90']:>11.1f} "
                f"{row['tokens_per_s']['p50']:>9.1f} {row['tokens']['p50']:>6.0f}"
            )
        stock = result["stock_llama_cpp_python"]
        lines.append(
            f"{case:12} {'stock grammar (ref.)':22} {stock['ttft_ms']:>11.1f} {'':>11} "
            f"{stock['tokens_per_s']:>9.1f} {stock['tokens']:>6}"
        )
        added, ratio = result["added_ttft_ms"], result["tokens_per_s_ratio"]
        lines.append(
            f"{'':12} added TTFT p50 {added['p50']:+.1f} ms (p90 {added['p90']:+.1f}); tok/s hatchway/in process "
            f"p50 {ratio['p50']:.3f}; same answer: {'yes' if result['same_answer'] else 'NO'}"
        )
    return "\n".join(lines)
