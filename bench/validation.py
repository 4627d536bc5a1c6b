"""What checking a request body costs: the hand-written validator the plane had until issue 15 against the
schema validator that replaced it (OpenAI's published request schemas, compiled by jsonschema-rs), side by
side on the same bodies in one run.

    .venv/bin/python bench/validation.py [--rounds N]

Each figure is per request, parse included (the raw bytes to a checked dict, which is what the plane does
before routing): p50 and p99 of single calls, in microseconds, plus the schema check alone. The old
validator is read from git at the commit before the change (OLD_COMMIT), so nothing of it is kept in the
tree.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson

from server.api import validation
from server.api.schema import RequestSchema

ROOT = Path(__file__).resolve().parent.parent
# main when issue 15 was filed: server/api/validation.py there is the hand-written validator.
OLD_COMMIT = "0f51e95"

SYSTEM = {"role": "system", "content": "You are a helpful assistant. Answer briefly and cite no sources."}
TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather for a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "unit": {"type": "string", "enum": ["c", "f"]}},
            "required": ["city"],
        },
    },
}


def _turns(n: int) -> list[dict[str, Any]]:
    roles = ("user", "assistant")
    return [{"role": roles[i % 2], "content": f"Message {i}: " + "lorem ipsum dolor sit amet " * 6} for i in range(n)]


BODIES: dict[str, tuple[str, dict[str, Any]]] = {
    "chat, 2 messages": (
        "chat/completions",
        {"model": "gpt-4o-mini", "messages": [SYSTEM, {"role": "user", "content": "What is the capital of France?"}]},
    ),
    "chat, stream + options": (
        "chat/completions",
        {
            "model": "gpt-4o-mini",
            "messages": [SYSTEM, {"role": "user", "content": "Hi"}],
            "stream": True,
            "stream_options": {"include_usage": True},
            "temperature": 0.7,
            "max_tokens": 256,
        },
    ),
    "chat, tools": (
        "chat/completions",
        {"model": "gpt-4o-mini", "messages": [SYSTEM, *_turns(3)], "tools": [TOOL], "tool_choice": "auto"},
    ),
    "chat, 40 messages": ("chat/completions", {"model": "gpt-4o-mini", "messages": [SYSTEM, *_turns(40)]}),
    # Over 64 brackets: the depth limit walks the parsed body (below that, it cannot be exceeded).
    "chat, 100 messages": ("chat/completions", {"model": "gpt-4o-mini", "messages": [SYSTEM, *_turns(100)]}),
    "completion": ("completions", {"model": "gpt-3.5-turbo-instruct", "prompt": "Once upon a time", "max_tokens": 16}),
    "embeddings, 100 inputs": (
        "embeddings",
        {"model": "text-embedding-3-small", "input": [f"document {i} " * 8 for i in range(100)]},
    ),
}


def old_validator() -> types.ModuleType:
    source = subprocess.run(
        ["git", "show", f"{OLD_COMMIT}:server/api/validation.py"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout
    module = types.ModuleType("old_validation")
    exec(compile(source, f"{OLD_COMMIT}:server/api/validation.py", "exec"), module.__dict__)
    return module


def timings(fn: Callable[[], object], rounds: int) -> tuple[float, float]:
    """p50 and p99 of `rounds` single calls, in microseconds."""
    for _ in range(min(1000, rounds)):
        fn()
    samples = []
    clock = time.perf_counter_ns
    for _ in range(rounds):
        start = clock()
        fn()
        samples.append(clock() - start)
    samples.sort()
    return samples[len(samples) // 2] / 1000, samples[int(len(samples) * 0.99)] / 1000


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=20_000, help="calls per body and validator")
    args = parser.parse_args()
    old = old_validator()
    old_checks = {
        "chat/completions": old.validate_chat,
        "completions": old.validate_completion,
        "embeddings": old.validate_embedding,
    }
    new_checks = {
        "chat/completions": validation.validate_chat,
        "completions": validation.validate_completion,
        "embeddings": validation.validate_embedding,
    }
    header = f"{'body':<24} {'bytes':>6}  {'old p50':>8} {'old p99':>8}  {'new p50':>8} {'new p99':>8}"
    print(f"{header}  {'schema p50':>10} {'schema p99':>10}   (microseconds per request, parse included)")
    for label, (endpoint, body) in BODIES.items():
        raw = orjson.dumps(body)
        schema = RequestSchema.load(endpoint)
        parsed = orjson.loads(raw)
        old_p50, old_p99 = timings(lambda: old_checks[endpoint](old.parse_body(raw)), args.rounds)  # noqa: B023
        new_p50, new_p99 = timings(lambda: new_checks[endpoint](validation.parse_body(raw)), args.rounds)  # noqa: B023
        only_p50, only_p99 = timings(lambda: schema.check(parsed), args.rounds)  # noqa: B023
        print(
            f"{label:<24} {len(raw):>6}  {old_p50:>8.1f} {old_p99:>8.1f}  {new_p50:>8.1f} {new_p99:>8.1f}  "
            f"{only_p50:>10.1f} {only_p99:>10.1f}"
        )
    print(f"python {sys.version.split()[0]}; old validator from git {OLD_COMMIT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
