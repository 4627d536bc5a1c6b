"""Serve MockUpstream in a process of its own until SIGTERM/SIGINT: `python -m tests.support.upstream_process`.

End-to-end tests run it apart from the plane so it can be killed like a real provider. It prints
``listening on http://HOST:PORT`` once bound, the same line the plane prints.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import signal
import subprocess
import sys
from collections.abc import Coroutine
from typing import Any

from tests.support.mock_upstream import MockUpstream


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--name", default="mock")
    parser.add_argument("--reply", default="Hello from mock")
    parser.add_argument("--models", default="gpt-4o-mini", help="comma-separated model ids")
    return parser.parse_args(argv)


async def serve(args: argparse.Namespace) -> None:
    mock = MockUpstream(name=args.name, reply=args.reply, models=args.models.split(","))
    mock.record = False
    await mock.start(args.host, args.port)
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stopping.set)
    print(f"mock upstream listening on http://{args.host}:{mock.port}", flush=True)
    try:
        await stopping.wait()
    finally:
        await mock.stop()


def run(main: Coroutine[Any, Any, None]) -> None:
    """Run on uvloop when installed: the upstream should be the cheapest hop on the path."""
    try:
        import uvloop
    except ImportError:
        asyncio.run(main)
        return
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(main)


class UpstreamProcess:
    """A mock provider in its own process, so it can be killed like a real one."""

    def __init__(self, name: str, reply: str = "Hello from mock", *args: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.support.upstream_process", "--name", name, "--reply", reply, *args],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        match = re.search(r"listening on (http://\S+)", line)
        assert match, f"upstream {name} did not start: {line!r}"
        self.url = match.group(1) + "/v1"

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()


if __name__ == "__main__":
    run(serve(parse_args()))
