"""The usage batch writer: one row the database refuses never costs the rest of its batch their place."""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func
from sqlmodel import Session, create_engine, select

from server.metrics import Metrics
from server.storage.models import UsageRecord, utcnow
from server.usage.writer import RETRY_DELAY_S, UsageWriter
from tests.conftest import RunningPlane


def row(request_id: str, **columns: Any) -> dict[str, Any]:
    """A usage row as the relay records it (server.relay `_record`)."""
    return {
        "created_at": utcnow(),
        "request_id": request_id,
        "org_id": "org_x",
        "key_id": "key_x",
        "endpoint": "chat/completions",
        "model": "m",
        "target": "t",
        "stream": False,
        "status": 200,
        "attempts": 1,
        "prompt_tokens": 3,
        "completion_tokens": 4,
        "cost_usd": None,
        "latency_ms": 1.0,
        "ttft_ms": None,
        "error_code": None,
        "final": True,
        "provider_key_id": None,
        "node_id": None,
        "cache": "bypass",
        "price_in": None,
        "price_out": None,
        **columns,
    }


def stored(plane: RunningPlane, expected: int) -> int:
    engine = plane.server.plane.engine
    deadline = time.monotonic() + 5
    while True:
        with Session(engine) as session:
            count = session.exec(select(func.count()).select_from(UsageRecord)).one()
        if count >= expected or time.monotonic() > deadline:
            return count
        time.sleep(0.05)


def test_a_row_the_database_refuses_is_dropped_alone_counted_and_logged_once(
    plane: RunningPlane, caplog: pytest.LogCaptureFixture
) -> None:
    writer = plane.server.plane.usage
    # Past the clamp (server.usage.metering), straight onto the writer: 2^64-1 does not fit SQLite's INTEGER.
    rows = [row(f"good-{i}") for i in range(10)] + [row("bad", completion_tokens=2**64 - 1)]
    rows += [row(f"good-{i}") for i in range(10, 20)]

    async def record_all() -> None:
        for each in rows:  # in one go on the plane's loop: one batch
            writer.record(each)

    with caplog.at_level(logging.ERROR, logger="server.usage.writer"):
        plane.loop_thread.run(record_all())
        assert stored(plane, 20) == 20
        plane.loop_thread.run(writer.flush())
    with Session(plane.server.plane.engine) as session:
        ids = set(session.exec(select(UsageRecord.request_id)))
    assert ids == {f"good-{i}" for i in range(20)}
    assert (writer.rows_written, writer.rows_dropped) == (20, 1)
    lines = [r.getMessage() for r in caplog.records if r.name == "server.usage.writer"]
    assert len(lines) == 1 and "refused 1 of 21 rows" in lines[0] and "bad" in lines[0] and len(lines[0]) < 600


def test_flush_returns_once_every_recorded_row_is_in_the_database(plane: RunningPlane) -> None:
    writer = plane.server.plane.usage

    async def record_and_flush() -> None:
        for i in range(250):
            writer.record(row(f"r-{i}"))
        await writer.flush()

    plane.loop_thread.run(record_and_flush())
    assert stored(plane, 0) == 250


def impatient_writer(path: Path) -> UsageWriter:
    """A writer whose SQLite connection gives up on a locked database after 50 ms (the plane's waits 30 s)."""
    engine = create_engine(f"sqlite:///{path}", connect_args={"timeout": 0.05})
    return UsageWriter(engine, Metrics(), queue_size=100, flush_interval_s=0.05)


def count(path: Path) -> int:
    with sqlite3.connect(path) as connection:
        return int(connection.execute("SELECT count(*) FROM usage_record").fetchone()[0])


async def test_a_batch_the_database_was_too_busy_for_is_written_on_the_retry(database: Path) -> None:
    writer = impatient_writer(database)
    locker = sqlite3.connect(database)
    locker.execute("BEGIN IMMEDIATE")  # another writer holds the database's write lock
    for i in range(3):
        writer.record(row(f"r-{i}"))
    flushing = asyncio.create_task(writer.flush())
    await asyncio.sleep(RETRY_DELAY_S / 2)
    locker.rollback()
    await flushing
    locker.close()
    assert (writer.rows_written, writer.rows_dropped, count(database)) == (3, 0, 3)
    writer.engine.dispose()


async def test_a_batch_the_database_refuses_twice_is_dropped_counted_and_logged(
    database: Path, caplog: pytest.LogCaptureFixture
) -> None:
    writer = impatient_writer(database)
    locker = sqlite3.connect(database)
    locker.execute("BEGIN IMMEDIATE")
    for i in range(3):
        writer.record(row(f"r-{i}"))
    with caplog.at_level(logging.ERROR, logger="server.usage.writer"):
        await writer.flush()
    locker.rollback()
    locker.close()
    assert (writer.rows_written, writer.rows_dropped, count(database)) == (0, 3, 0)
    assert writer.metrics.registry.get_sample_value("hatchway_usage_rows_dropped_total") == 3
    (line,) = [r.getMessage() for r in caplog.records if r.name == "server.usage.writer"]
    assert "dropped 3 rows" in line and "locked" in line
    writer.engine.dispose()
