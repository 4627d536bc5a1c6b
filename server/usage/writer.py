"""Usage rows leave the request path through a bounded queue drained by one batch writer.

A request only builds a row (a dict of `UsageRecord`'s columns) and puts it on the queue (no I/O); the writer
flushes every `flush_interval_s` or when `batch_size` rows are waiting, in a worker thread, as one executemany
of an INSERT compiled once for the engine's driver, and drains everything on stop.

One bad row never costs the others their place: when the database refuses a batch for what is in it (a value
out of range, a constraint), the writer splits the batch in halves and writes each in its own transaction,
down to the single rows the database refuses, which are dropped, counted in `hatchway_usage_rows_dropped_total`
and logged once per batch. When it refuses the batch for its own state (locked, unreachable), the batch is tried
again once after RETRY_DELAY_S, then dropped and counted.

With a spool (server.usage.spool), `record` also writes the row to disk before it returns, which is before the request's
last byte leaves: the writer fsyncs the rows of each flush together before inserting them, and rows the database
could not take (or the queue had no room for) stay on disk and are inserted at the next start (`replay`), each at
most once by its `row_id`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

from sqlalchemy import Engine, insert, select
from sqlalchemy.exc import DBAPIError, OperationalError

from server.ids import id_sequence
from server.metrics import Metrics
from server.storage.models import UsageRecord
from server.usage.spool import UsageSpool

# One usage row: UsageRecord's columns by name (all but the id).
UsageRow = dict[str, Any]

log = logging.getLogger(__name__)

# Unique across processes and restarts: replay at start skips the rows already in the database by it.
_new_row_id = id_sequence()

# How long the writer waits before trying a batch again when the database itself failed (locked, unreachable).
RETRY_DELAY_S = 0.5
# Request ids named in the log line about refused rows.
LOGGED_ROWS = 5
# Rows looked up (are they in the database already?) and inserted together when the spool is replayed.
REPLAY_BATCH = 500


class UsageInsert:
    """UsageRecord's INSERT, compiled once for the engine's dialect, and the bind processors SQLAlchemy would
    apply to each column (SQLite's datetimes and booleans). The writer hands the driver ready parameters:
    per-row statement compilation and parameter building by SQLAlchemy were most of the writer thread's time,
    and that thread shares the GIL with the request loop."""

    def __init__(self, engine: Engine) -> None:
        table = UsageRecord.__table__  # type: ignore[attr-defined]
        columns = [column for column in table.columns if column.name != "id"]
        compiled = insert(table).compile(dialect=engine.dialect, column_keys=[column.name for column in columns])
        self.sql = str(compiled)
        processors = {column.name: column.type.bind_processor(engine.dialect) for column in columns}
        # qmark drivers (sqlite3) take tuples in the statement's order; pyformat ones (psycopg) take dicts.
        self.names: Sequence[str] = list(compiled.positiontup or ()) if compiled.positional else list(processors)
        self.positional = compiled.positional
        self.processors: list[tuple[str, Callable[[Any], Any] | None]] = [(n, processors[n]) for n in self.names]

    def parameters(self, rows: list[UsageRow]) -> list[Any]:
        processed = [[p(row[name]) if p else row[name] for name, p in self.processors] for row in rows]
        if self.positional:
            return [tuple(values) for values in processed]
        return [dict(zip(self.names, values, strict=True)) for values in processed]


class UsageWriter:
    def __init__(
        self,
        engine: Engine,
        metrics: Metrics,
        *,
        queue_size: int,
        flush_interval_s: float,
        # Small batches: the writer thread holds the GIL while SQLAlchemy prepares a batch, and requests wait
        # meanwhile. 100 rows keep each hold short; what 500 cost the p99 is in bench/README.md.
        batch_size: int = 100,
        spool: UsageSpool | None = None,
    ) -> None:
        self.engine = engine
        self.insert = UsageInsert(engine)
        self.metrics = metrics
        self.flush_interval_s = flush_interval_s
        self.batch_size = batch_size
        self.queue: asyncio.Queue[UsageRow] = asyncio.Queue(maxsize=queue_size)
        self.spool = spool
        self.rows_written = 0
        self.rows_dropped = 0
        self.rows_replayed = 0
        self._spool_failed = False
        self._task: asyncio.Task[None] | None = None
        self._closing = asyncio.Event()
        # Held while a batch is written, so `flush` returns only once every row taken so far is in the database.
        self._writing = asyncio.Lock()

    def __repr__(self) -> str:
        return f"UsageWriter(written={self.rows_written}, dropped={self.rows_dropped}, queued={self.queue.qsize()})"

    def record(self, row: UsageRow) -> None:
        row["row_id"] = _new_row_id()
        if self.spool is not None and self.spool.current is not None:
            self._spool(self.spool, row)
        try:
            self.queue.put_nowait(row)
        except asyncio.QueueFull:
            # Never make a request wait for accounting; a dropped row is counted and visible in /metrics (with a
            # spool it is on disk still, and inserted at the next start).
            if self.spool is not None:
                self.spool.settle([row], kept=True)
            self._dropped(1)

    def _spool(self, spool: UsageSpool, row: UsageRow) -> None:
        try:
            spool.append(row)
        except OSError as exc:
            # A full or failing disk must not fail requests: the row still goes to the database, as without a spool.
            if not self._spool_failed:
                log.error("usage spool: cannot write (%s); rows are kept in memory only until it can", exc)
            self._spool_failed = True
        else:
            self._spool_failed = False

    async def flush(self) -> None:
        """Write every row recorded so far, including a batch being written now (off the request path: for a
        reader that must see them, e.g. a quota set mid-day that starts from the day's usage)."""
        while not self.queue.empty():
            await self._flush()
        async with self._writing:
            pass  # a batch the writer took before the queue emptied is written once the lock is free

    def _dropped(self, count: int) -> None:
        self.rows_dropped += count
        self.metrics.usage_dropped.inc(count)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="usage-writer")

    async def stop(self) -> None:
        """Let the writer finish the batch in hand, then write every row still queued."""
        self._closing.set()
        if self._task is not None:
            await self._task
            self._task = None
        await self.flush()
        if self.spool is not None:
            self.spool.close()

    async def _run(self) -> None:
        # Never cancelled: stopping is a flag, so a batch is never lost between the queue and the database.
        while not self._closing.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._closing.wait(), timeout=self.flush_interval_s)
            await self._sync_spool()
            while not self.queue.empty():
                await self._flush()

    async def _sync_spool(self) -> None:
        """Group commit: the rows spooled since the last flush are fsynced together, off the event loop."""
        if self.spool is None:
            return
        segment = self.spool.seal()
        if segment is None:
            return
        try:
            await asyncio.to_thread(self.spool.sync, segment)
        except OSError as exc:
            log.error("usage spool: fsync failed (%s); the last interval's rows may not survive a machine crash", exc)
        self.spool.synced(segment)

    def _take(self, limit: int) -> list[UsageRow]:
        batch: list[UsageRow] = []
        while len(batch) < limit and not self.queue.empty():
            batch.append(self.queue.get_nowait())
        return batch

    async def _flush(self) -> None:
        async with self._writing:
            # Taken under the lock: once `flush` holds it with the queue empty, every row taken is written.
            batch = self._take(self.batch_size)
            if not batch:
                return
            try:
                refused = await asyncio.to_thread(self._write, batch)
            except Exception as exc:
                self._dropped(len(batch))
                kept = ""
                if self.spool is not None:
                    self.spool.settle(batch, kept=True)
                    kept = " (kept in the usage spool: inserted at the next start)"
                log.error(
                    "usage writer: dropped %d rows, the database failed twice%s: %s", len(batch), kept, _clip(exc)
                )
                return
            if self.spool is not None:
                # Refused rows too: the database would refuse them again at the next start.
                self.spool.settle(batch)
        written = len(batch) - len(refused)
        self.rows_written += written
        self.metrics.usage_written.inc(written)
        if refused:
            self._dropped(len(refused))
            ids = ", ".join(str(row.get("request_id"))[:64] for row, _ in refused[:LOGGED_ROWS])
            more = f" and {len(refused) - LOGGED_ROWS} more" if len(refused) > LOGGED_ROWS else ""
            log.error(
                "usage writer: the database refused %d of %d rows, dropped (requests %s%s): %s",
                len(refused),
                len(batch),
                ids,
                more,
                _clip(refused[0][1]),
            )

    def replay(self) -> int:
        """Insert the rows the spool recovered from processes that died, those not in the database yet (by
        `row_id`), then delete their files; the number inserted. Blocking: at start, before quotas are read."""
        if self.spool is None:
            return 0
        recovered = self.spool.recovered
        rows = list({row["row_id"]: row for row in recovered.rows}.values())
        for row in rows:
            for name in self.insert.names:
                # A row spooled by an earlier version lacks the columns added since: the database decides.
                row.setdefault(name, None)
        column = UsageRecord.__table__.c.row_id  # type: ignore[attr-defined]
        already = refused = 0
        for start in range(0, len(rows), REPLAY_BATCH):
            chunk = rows[start : start + REPLAY_BATCH]
            with self.engine.connect() as connection:
                found = set(
                    connection.execute(select(column).where(column.in_([r["row_id"] for r in chunk]))).scalars()
                )
            missing = [row for row in chunk if row["row_id"] not in found]
            already += len(chunk) - len(missing)
            refused += len(self._write(missing)) if missing else 0
            self.rows_replayed += len(missing)
        self.rows_replayed -= refused
        if rows or recovered.torn:
            log.warning(
                "usage spool: replayed %d rows of a plane that stopped without writing them (%d already in the "
                "database, %d refused by it, %d torn lines skipped)",
                self.rows_replayed,
                already,
                refused,
                recovered.torn,
            )
        self.spool.release()
        return self.rows_replayed

    def _write(self, batch: list[UsageRow]) -> list[tuple[UsageRow, BaseException]]:
        """Write a batch (in the writer's thread); return the rows the database refused, each with its error.
        Raises when the database itself failed twice."""
        for retry in (False, True):
            try:
                self._insert(batch)
                return []
            except OperationalError:
                # The database's state, not the rows (locked, gone): once more, then the batch is lost.
                if retry:
                    raise
                time.sleep(RETRY_DELAY_S)
            except Exception as exc:
                return self._isolate(batch, exc)
        raise AssertionError("unreachable: the second try returns or raises")

    def _isolate(self, batch: list[UsageRow], error: Exception) -> list[tuple[UsageRow, BaseException]]:
        """Write what the database accepts of a batch it refused (with `error`): halves in their own transactions,
        down to single rows. One bad row among N costs about 2*log2(N) transactions."""
        if len(batch) == 1:
            return [(batch[0], error)]
        half = len(batch) // 2
        refused: list[tuple[UsageRow, BaseException]] = []
        for part in (batch[:half], batch[half:]):
            try:
                self._insert(part)
            except OperationalError:
                raise
            except Exception as exc:
                refused.extend(self._isolate(part, exc))
        return refused

    def _insert(self, rows: list[UsageRow]) -> None:
        with self.engine.begin() as connection:
            connection.exec_driver_sql(self.insert.sql, self.insert.parameters(rows))


def _clip(error: BaseException) -> str:
    """An error's message on one bounded line: it may quote a row's values."""
    text = str(error.orig if isinstance(error, DBAPIError) and error.orig is not None else error)
    text = " ".join(text.split())
    return f"{type(error).__name__}: {text[:300]}"
