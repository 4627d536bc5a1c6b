"""What the usage spool (server.usage.spool) costs per request, and what it saves:
`python bench/spool.py [--requests N] [--kill-rounds R]`.

1. On the event loop: `UsageWriter.record` with the spool (one JSON line, one write(2)) against without, per row.
2. Off the loop, once per flush: the fsync (file and directory) of a segment holding one flush's rows.
3. End to end: N streamed requests at c=1 and c=20 through a `hatchway serve` process and the mock upstream,
   spool on and off in alternating rounds on the same machine: requests/s and p50/p99 latency.
4. Usage rows lost on SIGKILL (issue 17's goal: 0): 20 clients stream requests back to back through a plane with
   the default settings, the plane is SIGKILLed after KILL_AFTER_S of load, started again on the same data dir
   (which replays the spool), and each request the client saw complete (`data: [DONE]`) is looked up by its
   `x-request-id` among the final usage rows; spool on and off in alternating rounds.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import aiohttp
from sqlalchemy import create_engine
from sqlmodel import Session, col, select

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from server.metrics import Metrics  # noqa: E402
from server.storage.db import make_engine  # noqa: E402
from server.storage.models import UsageRecord  # noqa: E402
from server.usage.spool import UsageSpool  # noqa: E402
from server.usage.writer import UsageWriter  # noqa: E402
from tests.server.serving.test_shutdown_accounting import configure  # noqa: E402
from tests.server.usage.test_spool import STREAMS, stream_loop  # noqa: E402
from tests.server.usage.test_writer import row  # noqa: E402
from tests.support.plane_process import PlaneProcess  # noqa: E402
from tests.support.upstream_process import UpstreamProcess  # noqa: E402

MODEL = "gpt-4o-mini"
ROUNDS = 3
# Load before the SIGKILL: long enough for the streams to reach a steady rate, so rows sit in every stage (queued
# in memory, mid-insert, spooled and not yet deleted) when the kill comes.
KILL_AFTER_S = 2.5
REPLAYED = re.compile(r"usage spool: replayed (\d+) rows")


def record_cost(rows: int, *, spooled: bool, workdir: Path) -> float:
    """µs per `record` on the loop's thread, the writer not running (its inserts are the same either way)."""

    async def run() -> float:
        engine = make_engine(f"sqlite:///{workdir / 'micro.db'}")
        spool = UsageSpool(workdir / f"micro-spool-{spooled}") if spooled else None
        writer = UsageWriter(engine, Metrics(), queue_size=rows, flush_interval_s=1.0, spool=spool)
        if spool is not None:
            spool.open()
        made = [row(f"r-{i}") for i in range(rows)]
        start = time.perf_counter()
        for r in made:
            writer.record(r)
        elapsed = time.perf_counter() - start
        if spool is not None:
            spool.close()
        engine.dispose()
        return elapsed / rows * 1e6

    return asyncio.run(run())


def fsync_cost(rows: int, workdir: Path) -> float:
    """ms for `sync` of a sealed segment of `rows` rows (the writer's thread, once per flush)."""
    spool = UsageSpool(workdir / "fsync-spool")
    spool.open()
    times = []
    for _ in range(20):
        for i in range(rows):
            spool.append(row(f"r-{i}", row_id=f"{i}"))
        segment = spool.seal()
        assert segment is not None
        start = time.perf_counter()
        spool.sync(segment)
        times.append(time.perf_counter() - start)
        spool.settle([{"_segment": segment.number}] * rows)
        spool.synced(segment)
    spool.close()
    return statistics.median(times) * 1e3


async def load(url: str, key: str, requests: int, concurrency: int) -> tuple[float, list[float]]:
    """Streamed requests, `concurrency` at a time: (requests/s, each one's latency to its last byte in ms)."""
    latencies: list[float] = []
    headers = {"Authorization": f"Bearer {key}"}
    queue = iter(range(requests))

    async def client(http: aiohttp.ClientSession) -> None:
        for i in queue:
            body = {"model": MODEL, "stream": True, "messages": [{"role": "user", "content": f"bench {i}"}]}
            start = time.perf_counter()
            async with http.post(f"{url}/v1/chat/completions", json=body, headers=headers) as response:
                await response.read()
                assert response.status == 200, response.status
            latencies.append((time.perf_counter() - start) * 1e3)

    async with aiohttp.ClientSession() as http:
        start = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(concurrency)))
        elapsed = time.perf_counter() - start
    return requests / elapsed, latencies


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def end_to_end(requests: int, workdir: Path) -> None:
    upstream = UpstreamProcess("mock")
    results: dict[tuple[str, int], list[tuple[float, list[float]]]] = {}
    try:
        for round_ in range(ROUNDS):
            for spool in ("off", "on"):
                data = workdir / f"plane-{spool}-{round_}"
                env = {
                    "HATCHWAY_ADMIN_KEY": "hwa-shutdown",
                    "HATCHWAY_USAGE_SPOOL": spool,
                    "HATCHWAY_LOG_LEVEL": "warning",
                }
                plane = PlaneProcess(data, env=env)
                try:
                    key = configure(plane, upstream)
                    asyncio.run(load(plane.url, key, 50, 4))  # warm-up
                    for concurrency in (1, 20):
                        results.setdefault((spool, concurrency), []).append(
                            asyncio.run(load(plane.url, key, requests, concurrency))
                        )
                finally:
                    plane.terminate()
    finally:
        upstream.kill()
    print(f"\n| spool | c | requests/s (median of {ROUNDS}) | p50 ms | p99 ms |")
    print("|---|---|---|---|---|")
    for (spool, concurrency), runs in sorted(results.items(), key=lambda item: (item[0][1], item[0][0])):
        rates = statistics.median(rate for rate, _ in runs)
        latencies = [latency for _, run in runs for latency in run]
        p50, p99 = percentile(latencies, 0.5), percentile(latencies, 0.99)
        print(f"| {spool} | {concurrency} | {rates:.0f} | {p50:.2f} | {p99:.2f} |")


def kill_round(spool: str, data: Path, upstream: UpstreamProcess) -> tuple[int, int, int, int]:
    """One plane SIGKILLed under load, then restarted on its data dir: (requests completed, completed requests with
    no usage row, completed requests with more than one, rows replayed at the restart)."""
    env = {"HATCHWAY_ADMIN_KEY": "hwa-shutdown", "HATCHWAY_USAGE_SPOOL": spool, "HATCHWAY_LOG_LEVEL": "warning"}
    plane = PlaneProcess(data, env=env)
    completed: list[str] = []
    try:
        key = configure(plane, upstream)
        stop = threading.Event()
        clients = [
            threading.Thread(target=stream_loop, args=(plane.url, key, i, stop, completed)) for i in range(STREAMS)
        ]
        for client in clients:
            client.start()
        time.sleep(KILL_AFTER_S)
        plane.kill()
        stop.set()
        for client in clients:
            client.join(30)
        # The restart replays the spool before it listens; SIGTERM then drains its own writer.
        restarted = PlaneProcess(data, env=env)
        replayed = next((int(m.group(1)) for line in restarted.lines if (m := REPLAYED.search(line))), 0)
        assert restarted.terminate() == 0, restarted.output
    finally:
        plane.kill()
    engine = create_engine(f"sqlite:///{data / 'hatchway.db'}")
    with Session(engine) as session:
        ids = session.exec(select(UsageRecord.request_id).where(col(UsageRecord.final))).all()
    engine.dispose()
    rows = Counter(ids)
    missing = sum(1 for rid in completed if rows[rid] == 0)
    doubled = sum(1 for rid in completed if rows[rid] > 1)
    return len(completed), missing, doubled, replayed


def kill_rows_lost(rounds: int, workdir: Path) -> None:
    upstream = UpstreamProcess("mock")
    results: dict[str, list[tuple[int, int, int, int]]] = {"off": [], "on": []}
    try:
        for round_ in range(rounds):
            for spool in ("off", "on"):
                results[spool].append(kill_round(spool, workdir / f"kill-{spool}-{round_}", upstream))
    finally:
        upstream.kill()
    print(f"\nSIGKILL after {KILL_AFTER_S} s of c={STREAMS} streamed requests, restart on the same data dir:")
    print("| spool | round | completed requests | rows missing | rows doubled | replayed at restart |")
    print("|---|---|---|---|---|---|")
    for spool, runs in results.items():
        for round_, (completed, missing, doubled, replayed) in enumerate(runs, 1):
            print(f"| {spool} | {round_} | {completed} | {missing} | {doubled} | {replayed} |")
        total = [sum(run[i] for run in runs) for i in range(4)]
        print(f"| {spool} | all | {total[0]} | {total[1]} | {total[2]} | {total[3]} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=2000, help="streamed requests per run")
    parser.add_argument("--kill-rounds", type=int, default=ROUNDS, help="SIGKILL rounds per spool mode (0: none)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        off = min(record_cost(20_000, spooled=False, workdir=workdir) for _ in range(3))
        on = min(record_cost(20_000, spooled=True, workdir=workdir) for _ in range(3))
        print(f"record() on the loop: {off:.2f} µs/row without the spool, {on:.2f} µs/row with it (+{on - off:.2f})")
        for rows in (1, 100, 1000):
            print(
                f"fsync of a sealed segment of {rows} rows (writer thread, once per flush): "
                f"{fsync_cost(rows, workdir):.2f} ms"
            )
        end_to_end(args.requests, workdir)
        if args.kill_rounds:
            kill_rows_lost(args.kill_rounds, workdir)


if __name__ == "__main__":
    main()
