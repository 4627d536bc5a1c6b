"""The usage spool (server.usage.spool): a usage row is on disk before its request completes, leaves the disk once it
is in the database, and a plane killed with rows on disk has them inserted, once each, at its next start."""

from __future__ import annotations

import asyncio
import os
import re
import sqlite3
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import orjson
from sqlalchemy import create_engine, text
from sqlmodel import Session, col, select

from server.metrics import Metrics
from server.storage.db import make_engine, migrate
from server.storage.models import UsageRecord
from server.usage.spool import SEGMENT_SUFFIX, UsageSpool, read_segment
from server.usage.writer import UsageWriter
from tests.conftest import MODEL
from tests.server.serving.test_shutdown_accounting import ADMIN, configure
from tests.server.storage.test_postgres import scratch_database
from tests.server.usage.test_writer import row
from tests.support.plane_process import PlaneProcess
from tests.support.upstream_process import UpstreamProcess

# Concurrent streaming clients when the plane is killed (the figure).
STREAMS = 20


def writer(database: Path | str, spool_dir: Path, *, timeout_s: float = 30.0) -> UsageWriter:
    """A writer with an opened spool, after replaying what dead processes left in `spool_dir`; `database`: an
    SQLite file or a PostgreSQL URL."""
    if isinstance(database, str):
        engine = make_engine(database)
    else:
        engine = create_engine(f"sqlite:///{database}", connect_args={"timeout": timeout_s})
    usage = UsageWriter(engine, Metrics(), queue_size=100, flush_interval_s=0.05, spool=UsageSpool(spool_dir))
    assert usage.spool is not None
    usage.spool.open()
    usage.replay()
    return usage


def die(usage: UsageWriter) -> None:
    """What SIGKILL leaves: files as they are and the slot's lock free (the kernel releases a dead process's)."""
    assert usage.spool is not None
    for segment in usage.spool.segments.values():
        if segment.fd >= 0:
            os.close(segment.fd)
    os.close(usage.spool._lock_fd)


def request_ids(path: Path) -> list[str]:
    with sqlite3.connect(path) as connection:
        return sorted(r[0] for r in connection.execute("SELECT request_id FROM usage_record"))


def segments(spool_dir: Path) -> list[Path]:
    return sorted(spool_dir.glob(f"*/*{SEGMENT_SUFFIX}"))


def spooled_rows(spool_dir: Path) -> list[str]:
    return [r["request_id"] for path in segments(spool_dir) for r in read_segment(path)[0]]


async def test_a_recorded_row_is_on_disk_before_record_returns(database: Path, tmp_path: Path) -> None:
    usage = writer(database, tmp_path / "spool")
    usage.record(row("r-1"))
    assert spooled_rows(tmp_path / "spool") == ["r-1"]
    die(usage)


async def test_rows_in_the_database_leave_the_spool(database: Path, tmp_path: Path) -> None:
    usage = writer(database, tmp_path / "spool")
    usage.start()
    for i in range(5):
        usage.record(row(f"r-{i}"))
    await asyncio.sleep(0.3)  # a few flush intervals: sealed, fsynced, inserted, deleted
    usage.record(row("r-5"))
    await usage.stop()
    assert request_ids(database) == [f"r-{i}" for i in range(6)]
    assert segments(tmp_path / "spool") == []


async def test_rows_of_a_killed_plane_are_inserted_at_the_next_start(database: Path, tmp_path: Path) -> None:
    first = writer(database, tmp_path / "spool")
    for i in range(3):
        first.record(row(f"r-{i}"))  # queued in memory, never flushed
    die(first)
    second = writer(database, tmp_path / "spool")
    assert second.rows_replayed == 3
    assert request_ids(database) == ["r-0", "r-1", "r-2"]
    assert spooled_rows(tmp_path / "spool") == []
    await second.stop()
    assert segments(tmp_path / "spool") == []


async def test_a_replayed_row_already_in_the_database_is_not_inserted_again(database: Path, tmp_path: Path) -> None:
    first = writer(database, tmp_path / "spool")
    for i in range(3):
        first.record(row(f"r-{i}"))
    await first.flush()  # in the database, the segment not yet deleted: killed in between
    first.record(row("r-3"))
    die(first)
    assert len(spooled_rows(tmp_path / "spool")) == 4
    second = writer(database, tmp_path / "spool")
    assert second.rows_replayed == 1
    assert request_ids(database) == ["r-0", "r-1", "r-2", "r-3"]
    await second.stop()


async def test_a_replay_on_postgresql_inserts_each_row_once(tmp_path: Path) -> None:
    with scratch_database() as url:
        engine = make_engine(url)
        migrate(engine)
        first = writer(url, tmp_path / "spool")
        for i in range(3):
            first.record(row(f"r-{i}"))
        await first.flush()
        first.record(row("r-3"))
        die(first)
        second = writer(url, tmp_path / "spool")
        assert second.rows_replayed == 1
        await second.stop()
        with engine.connect() as connection:
            ids = sorted(connection.execute(text("SELECT request_id FROM usage_record")).scalars())
        engine.dispose()
        for usage in (first, second):
            usage.engine.dispose()
    assert ids == ["r-0", "r-1", "r-2", "r-3"]


async def test_a_torn_last_line_is_skipped_and_counted(database: Path, tmp_path: Path) -> None:
    first = writer(database, tmp_path / "spool")
    first.record(row("r-0"))
    first.record(row("r-1"))
    die(first)
    [path] = segments(tmp_path / "spool")
    with path.open("ab") as file:
        file.write(orjson.dumps({**row("r-2"), "row_id": "x"}, default=str)[:40])  # killed mid-write
    second = UsageSpool(tmp_path / "spool")
    second.open()
    assert second.recovered.torn == 1
    assert [r["request_id"] for r in second.recovered.rows] == ["r-0", "r-1"]


async def test_a_live_plane_s_spool_is_not_replayed_by_another(database: Path, tmp_path: Path) -> None:
    first = writer(database, tmp_path / "spool")
    first.record(row("r-0"))
    second = writer(database, tmp_path / "spool")
    assert second.rows_replayed == 0
    assert first.spool is not None and second.spool is not None
    assert first.spool.slot != second.spool.slot
    assert spooled_rows(tmp_path / "spool") == ["r-0"]
    die(first)
    die(second)


async def test_rows_the_database_could_not_take_stay_for_the_next_start(database: Path, tmp_path: Path) -> None:
    first = writer(database, tmp_path / "spool", timeout_s=0.05)
    locker = sqlite3.connect(database)
    locker.execute("BEGIN IMMEDIATE")  # the database stays locked through the write and its retry
    first.record(row("r-0"))
    await first.stop()
    locker.rollback()
    locker.close()
    assert first.rows_dropped == 1
    assert spooled_rows(tmp_path / "spool") == ["r-0"]
    second = writer(database, tmp_path / "spool")
    assert request_ids(database) == ["r-0"]
    await second.stop()


async def test_every_row_gets_its_own_row_id(database: Path, tmp_path: Path) -> None:
    usage = writer(database, tmp_path / "spool")
    for _ in range(50):
        usage.record(row("same-request"))
    await usage.stop()
    with sqlite3.connect(database) as connection:
        ids = [r[0] for r in connection.execute("SELECT row_id FROM usage_record")]
    assert len(ids) == 50 and max(Counter(ids).values()) == 1


def stream_loop(url: str, key: str, index: int, stop: threading.Event, completed: list[str]) -> None:
    """Stream requests back to back until the plane is gone; note each one the client saw complete ([DONE])."""
    headers = {"Authorization": f"Bearer {key}"}
    with httpx.Client(timeout=30) as http:
        sent = 0
        while not stop.is_set():
            sent += 1
            body = {"model": MODEL, "stream": True, "messages": [{"role": "user", "content": f"hi {index} {sent}"}]}
            try:
                with http.stream("POST", f"{url}/v1/chat/completions", json=body, headers=headers) as response:
                    for line in response.iter_lines():
                        if line == "data: [DONE]":
                            completed.append(response.headers["x-request-id"])
            except httpx.HTTPError:
                return  # the plane was killed


def test_sigkill_under_load_loses_no_usage_row_of_a_completed_request(tmp_path: Path) -> None:
    """And the quota read at the restart counts the replayed rows' tokens: it does not hand them out again."""
    upstream = UpstreamProcess("mock")
    # Rows wait up to a second in memory before their insert: a kill finds many there.
    env = {"HATCHWAY_ADMIN_KEY": "hwa-shutdown", "HATCHWAY_LOG_LEVEL": "info", "HATCHWAY_USAGE_FLUSH_INTERVAL_S": "1"}
    plane = PlaneProcess(tmp_path, env=env)
    completed: list[str] = []
    try:
        key = configure(plane, upstream)
        quota = {"org": "acme", "tokens_per_day": 1_000_000_000}
        httpx.put(f"{plane.url}/admin/v1/limits", json=quota, headers=ADMIN).raise_for_status()
        stop = threading.Event()
        clients = [
            threading.Thread(target=stream_loop, args=(plane.url, key, i, stop, completed)) for i in range(STREAMS)
        ]
        for client in clients:
            client.start()
        time.sleep(2.5)
        plane.kill()  # SIGKILL, mid-load
        stop.set()
        for client in clients:
            client.join(30)
        restarted = PlaneProcess(tmp_path, env=env)
        replayed = restarted.wait_for(re.compile(r"usage spool: replayed (\d+) rows"))
        limits = httpx.get(f"{restarted.url}/admin/v1/limits", params={"org": "acme"}, headers=ADMIN).json()
        assert restarted.terminate() == 0
    finally:
        plane.kill()
        upstream.kill()
    engine = create_engine(f"sqlite:///{tmp_path / 'hatchway.db'}")
    with Session(engine) as session:
        rows = list(session.exec(select(UsageRecord).where(col(UsageRecord.final))))
    engine.dispose()
    assert len(completed) > 100, "the load never got going"
    assert int(replayed.group(1)) > 0, "no row was waiting in memory at the kill: the test proved nothing"
    per_request = Counter(r.request_id for r in rows)
    assert [rid for rid in completed if per_request[rid] != 1] == []
    assert max(per_request.values()) == 1
    used = sum(r.prompt_tokens + r.completion_tokens for r in rows)
    assert limits["data"][0]["usage"]["tokens_per_day_used"] == used
