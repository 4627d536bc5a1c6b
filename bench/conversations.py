"""Benchmark 6, a node's slots: conversations that interleave, cancels during a long prompt, and cold prompts.

In-process on the agent's llama.cpp engine (agent/engine/, SmolLM2, 2 slots of 2,048 tokens, 2 threads), in a
child process per engine: llama.cpp in the runner's process could take the whole run down with it.

1. Interleaved conversations: two conversations, each with its own ~400-token system message, take turns on the
   engine (A1 B1 A2 B2 ...). Time to first token of first turns (nothing cached) and of follow-ups, which are quick
   only where the follow-up finds its slot holding the conversation so far. `cached` is the engine's own count of
   prompt tokens it did not evaluate again (End.cached_tokens; engines before it report none).
2. Cancel during a long prompt: a ~1,200-token prompt nobody cached, cancelled 0.5 s in; the time from the cancel
   to the job's end, when its slot is free again.
3. Cold prompt: time to first token of a ~1,200-token prompt nobody cached: what evaluating the prompt in chunks,
   so that a cancel can stop it, costs against evaluating it in one call.

    python bench/conversations.py [--quick] [--source DIR] [--out FILE]

`--source` runs the engine of another checkout (bench/run.py --baseline REF passes a git worktree of REF), so that
one run compares this tree's engine with an earlier one on the same machine, in the same minutes.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
from harness import BenchError, log, percentile, write_json
from suite import Suite

THIS_FILE = Path(__file__).resolve()
REPO_ROOT = THIS_FILE.parent.parent
SLOTS = 2
CONTEXT = 2048
THREADS = 2
MAX_TOKENS = 16
CANCEL_AFTER_S = 0.5
CHILD_TIMEOUT_S = 900.0
QUESTIONS = (
    "Which item is the longest?",
    "And the shortest?",
    "Which two are closest in length?",
    "Summarise the list in one sentence.",
    "Which one would you visit first?",
    "Name one more that could be on the list.",
)


@dataclass(frozen=True)
class Settings:
    turns: int  # per conversation
    rounds: int  # of parts 2 and 3

    @classmethod
    def for_run(cls, quick: bool) -> Settings:
        return cls(turns=3, rounds=2) if quick else cls(turns=6, rounds=5)


def document(topic: str, unit: str) -> str:
    """A system message of about 400 tokens, different from the first sentence on for each topic."""
    facts = [f"{topic.capitalize()} number {n} measures {n * 37 % 900 + 40} {unit}." for n in range(40)]
    return f"Answer from this list of {topic}. " + " ".join(facts)


def long_prompt(title: str) -> str:
    """About 1,200 tokens, sharing no prefix with the prompt of another title."""
    return f"{title}\n" + " ".join(
        f"Line {n}: the river flows past the mill and the miller counts his sacks." for n in range(60)
    )


# -- the child: one engine, three parts ------------------------------------------------------------------------


async def measure(settings: Settings) -> dict[str, Any]:
    from node import model_path

    from agent.engine import CHAT, COMPLETIONS, End, Engine, Job, Text  # from --source, see main()
    from agent.models import ModelConfig

    engine = Engine([ModelConfig(model_path(), name="m", slots=SLOTS, context=CONTEXT, threads=THREADS)])
    await engine.start()
    if engine.issues:
        raise BenchError(f"the engine could not load the model: {engine.issues}")

    async def timed(job: Any, cancel_after_s: float | None = None) -> dict[str, Any]:
        started = time.perf_counter()
        first: float | None = None
        cancelled_at: float | None = None
        pieces: list[str] = []
        end: Any = None

        async def cancel() -> None:
            nonlocal cancelled_at
            await asyncio.sleep(cancel_after_s or 0)
            cancelled_at = time.perf_counter()
            job.cancel.set()

        canceller = asyncio.create_task(cancel()) if cancel_after_s is not None else None
        async for event in engine.generate(job):
            if isinstance(event, Text):
                first = first or time.perf_counter()
                pieces.append(event.text)
            elif isinstance(event, End):
                end = event
        ended = time.perf_counter()
        if canceller is not None:
            await canceller
        return {
            "ttft_ms": None if first is None else round((first - started) * 1000, 1),
            "stopped_ms": None if cancelled_at is None else round((ended - cancelled_at) * 1000, 1),
            "text": "".join(pieces),
            "finish_reason": end.finish_reason,
            "prompt_tokens": end.prompt_tokens,
            "cached": getattr(end, "cached_tokens", None),
        }

    try:
        conversations: dict[str, list[dict[str, str]]] = {
            "A": [{"role": "system", "content": document("rivers", "kilometres")}],
            "B": [{"role": "system", "content": document("towers", "metres")}],
        }
        turns: list[dict[str, Any]] = []
        for turn in range(settings.turns):
            for name, messages in conversations.items():
                messages.append({"role": "user", "content": QUESTIONS[turn % len(QUESTIONS)]})
                body = {"model": "m", "messages": messages, "temperature": 0, "seed": 1, "max_tokens": MAX_TOKENS}
                result = await timed(Job(CHAT, body))
                messages.append({"role": "assistant", "content": result.pop("text")})
                turns.append({"conversation": name, "turn": turn + 1, **result})
                ttft, cached = result["ttft_ms"], result["cached"]
                log(f"  conversation {name} turn {turn + 1}: TTFT {ttft:8.1f} ms, cached {cached}")
        cancels = []
        colds = []
        for index in range(settings.rounds):
            body = {"model": "m", "prompt": long_prompt(f"Cancel {index}"), "temperature": 0, "max_tokens": 4}
            result = await timed(Job(COMPLETIONS, body), CANCEL_AFTER_S)
            cancels.append(result)
            log(f"  cancel {index + 1}: stopped {result['stopped_ms']:8.1f} ms after the cancel")
            body = {"model": "m", "prompt": long_prompt(f"Cold {index}"), "temperature": 0, "max_tokens": 1}
            result = await timed(Job(COMPLETIONS, body))
            colds.append(result)
            log(f"  cold prompt {index + 1}: TTFT {result['ttft_ms']:8.1f} ms, {result['prompt_tokens']} tokens")
    finally:
        await engine.close()
    follow_ups = [t["ttft_ms"] for t in turns if t["turn"] > 1]
    return {
        "first_turn_ttft_ms": _summary([t["ttft_ms"] for t in turns if t["turn"] == 1]),
        "follow_up_ttft_ms": _summary(follow_ups),
        "cancel_stopped_ms": _summary([c["stopped_ms"] for c in cancels]),
        "cold_prompt_ttft_ms": _summary([c["ttft_ms"] for c in colds]),
        "cold_prompt_tokens": colds[0]["prompt_tokens"] if colds else None,
        "turns": turns,
        "cancels": [{k: c[k] for k in ("stopped_ms", "finish_reason", "prompt_tokens")} for c in cancels],
    }


def _summary(values: list[float]) -> dict[str, float]:
    return {
        "p50": round(percentile(values, 50), 1),
        "p90": round(percentile(values, 90), 1),
        "max": round(max(values, default=0.0), 1),
        "n": len(values),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--source", type=Path, default=REPO_ROOT, help="the checkout whose agent/ engine runs")
    parser.add_argument("--out", type=Path, default=None, help="write the JSON here (default: stdout)")
    args = parser.parse_args(argv)
    source = args.source.resolve()
    sys.path.insert(0, str(source))
    import agent.engine

    engine_file = Path(agent.engine.__file__ or "?").resolve()
    if not engine_file.is_relative_to(source):
        raise SystemExit(f"agent.engine came from {engine_file}, not from {source}")
    report = {"source": str(source), **asyncio.run(measure(Settings.for_run(args.quick)))}
    if args.out is None:
        sys.stdout.buffer.write(orjson.dumps(report, option=orjson.OPT_INDENT_2) + b"\n")
    else:
        write_json(args.out, report)
    return 0


# -- the parent: bench/run.py's side ---------------------------------------------------------------------------


async def run_child(suite: Suite, key: str, label: str, source: Path) -> dict[str, Any]:
    out = suite.subdir("conversations") / f"{key}.json"
    argv = [sys.executable, str(THIS_FILE), "--source", str(source), "--out", str(out)]
    argv += ["--quick"] if suite.quick else []
    log(f" engine of {label} ({source})")
    proc = await asyncio.create_subprocess_exec(*argv, stdout=asyncio.subprocess.DEVNULL)
    try:
        async with asyncio.timeout(CHILD_TIMEOUT_S):
            code = await proc.wait()
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise BenchError(f"the conversations benchmark of {label} took over {CHILD_TIMEOUT_S:.0f}s") from None
    if code != 0 or not out.exists():
        why = f"killed by signal {-code}" if code < 0 else f"exit code {code}"
        raise BenchError(f"the conversations benchmark of {label} ended with {why} (see its output above)")
    report: dict[str, Any] = orjson.loads(out.read_bytes())
    return report


async def run(suite: Suite) -> dict[str, Any]:
    from hatchway import checkout

    settings = Settings.for_run(suite.quick)
    engines = {"this tree": await run_child(suite, "current", "this tree", REPO_ROOT)}
    if suite.baseline:
        source = checkout(suite.stack, suite.workdir, suite.baseline)
        engines[f"@{suite.baseline}"] = await run_child(suite, "baseline", f"@{suite.baseline}", source)
    return {
        "settings": {**settings.__dict__, "slots": SLOTS, "context": CONTEXT, "threads": THREADS},
        "cpus": os.cpu_count(),
        "engines": engines,
    }


def format_table(report: dict[str, Any]) -> str:
    settings = report["settings"]
    title = (
        f"a node's slots (SmolLM2, {settings['slots']} slots, {settings['threads']} threads; 2 conversations x "
        f"{settings['turns']} turns interleaved; {settings['rounds']} rounds of cancel and cold prompt)"
    )
    header = (
        f"{'engine':14} {'1st turn TTFT p50':>17} {'follow-up TTFT p50':>18} {'p90':>8} "
        f"{'cancel->free p50':>16} {'max':>8} {'cold 1.2k TTFT p50':>18}"
    )
    lines = [title, header, "-" * len(header)]
    for name, engine in report["engines"].items():
        lines.append(
            f"{name:14} {engine['first_turn_ttft_ms']['p50']:>14.0f} ms {engine['follow_up_ttft_ms']['p50']:>15.0f} ms "
            f"{engine['follow_up_ttft_ms']['p90']:>5.0f} ms {engine['cancel_stopped_ms']['p50']:>13.0f} ms "
            f"{engine['cancel_stopped_ms']['max']:>5.0f} ms {engine['cold_prompt_ttft_ms']['p50']:>15.0f} ms"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
