"""The usage spool: every usage row on disk before its request completes, until the row is in the database.

A row is appended to the spool (one `write(2)` of one JSON line: bench/spool.py) when it is made, on the request's
path, before the client can read the request's last byte; the batch writer (server.usage.writer) inserts it later. The
kernel keeps what was written whatever becomes of the process, so a plane killed (SIGKILL, OOM) loses no row of a
request that completed: at the next start, rows still in the spool are inserted before quotas are read from the
usage table. Against a crash of the machine itself the spool is fsynced in batches (group commit, once per flush
of the writer): rows of the last flush interval may be lost with the machine, never with the process.

Layout: DATA_DIR/usage-spool/<slot>/<segment>.jsonl. A plane process holds its slot with an exclusive `flock` (so
the workers of one machine each have their own, and a slot whose lock is free belongs to a process that died).
The writer seals the current segment at each flush (fsync, close; new rows go to a new one) and deletes a sealed
segment once each of its rows is settled: in the database, or refused by it for what the row holds. A row the
database could not take (unreachable) or the queue had no room for keeps its segment until the next start.

Replay reads every segment of every free slot, in order; a line that does not parse (the last one, torn by a
kill mid-write) is skipped and counted. Each row carries a unique `row_id`, so a row already inserted (the plane
died between the insert and the segment's deletion) is not inserted twice.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import orjson

log = logging.getLogger(__name__)

SPOOL_DIR = "usage-spool"
LOCK_FILE = "lock"
SEGMENT_SUFFIX = ".jsonl"
# The key under which a queued row remembers its segment; not a column, so the writer's INSERT ignores it.
SEGMENT_KEY = "_segment"


@dataclass
class Segment:
    number: int
    fd: int
    rows: int = 0
    # Rows of this segment not yet settled.
    pending: int = 0
    sealed: bool = False
    # Set when one of its rows is neither in the database nor refused by it: kept for the next start's replay.
    kept: bool = False


@dataclass
class Recovered:
    """The rows found in the spools of processes that died, and the files they came from."""

    rows: list[dict[str, Any]] = field(default_factory=list)
    torn: int = 0
    files: list[Path] = field(default_factory=list)
    slots: list[tuple[Path, int]] = field(default_factory=list)


class UsageSpool:
    """Parameters: `root`, the spool directory (DATA_DIR/usage-spool). `open` claims a slot and gathers what the
    slots of dead processes hold (`recovered`); `release` deletes them once their rows are in the database."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.slot: Path | None = None
        self._lock_fd = -1
        self.segments: dict[int, Segment] = {}
        self.current: Segment | None = None
        self.rows_spooled = 0
        self.recovered = Recovered()

    def __repr__(self) -> str:
        return f"UsageSpool(slot={self.slot}, spooled={self.rows_spooled}, segments={len(self.segments)})"

    # -- start ------------------------------------------------------------------------------------

    def open(self) -> None:
        """Claim a slot (the first free one, else a new one) and read every free slot's rows."""
        # Rows name orgs, keys and requests (no prompt, no secret): the plane's user only.
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        for slot in sorted(p for p in self.root.iterdir() if p.is_dir()):
            fd = _try_lock(slot)
            if fd < 0:
                continue  # a live process's slot
            self.recovered.slots.append((slot, fd))
            for path in sorted(slot.glob(f"*{SEGMENT_SUFFIX}")):
                self.recovered.files.append(path)
                rows, torn = read_segment(path)
                self.recovered.rows.extend(rows)
                self.recovered.torn += torn
        if self.recovered.slots:
            self.slot, self._lock_fd = self.recovered.slots.pop(0)
        else:
            self.slot, self._lock_fd = self._new_slot()
        first = 1 + max((_segment_number(p) for p in self.recovered.files if p.parent == self.slot), default=0)
        self.current = self._open_segment(first)

    def release(self) -> None:
        """Delete the recovered segments (their rows are in the database now) and free the other dead slots.
        Their directories stay, empty, for later processes: removing one could race a process starting now."""
        for path in self.recovered.files:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        for _, fd in self.recovered.slots:
            os.close(fd)
        self.recovered = Recovered()

    def _new_slot(self) -> tuple[Path, int]:
        number = 1 + max((int(p.name) for p in self.root.iterdir() if p.name.isdigit()), default=-1)
        while True:
            slot = self.root / str(number)
            try:
                slot.mkdir(mode=0o700)
            except FileExistsError:
                number += 1  # another process of this machine took it meanwhile
                continue
            fd = _try_lock(slot)
            if fd >= 0:
                return slot, fd
            number += 1

    # -- the request path -------------------------------------------------------------------------

    def append(self, row: dict[str, Any]) -> None:
        """Write the row to the current segment (one write, no fsync) and tag it with its segment."""
        segment = self.current
        assert segment is not None, "the spool is not open"
        os.write(segment.fd, orjson.dumps(row) + b"\n")
        segment.rows += 1
        segment.pending += 1
        self.rows_spooled += 1
        row[SEGMENT_KEY] = segment.number

    # -- the writer -------------------------------------------------------------------------------

    def seal(self) -> Segment | None:
        """Start a new segment for the rows to come; the sealed one, to `sync` (None when it holds no row)."""
        segment = self.current
        if segment is None or segment.rows == 0:
            return None
        segment.sealed = True
        self.current = self._open_segment(segment.number + 1)
        return segment

    def sync(self, segment: Segment) -> None:
        """Make a sealed segment durable, its name included (in the writer's thread: fsync is slow)."""
        os.fsync(segment.fd)
        assert self.slot is not None
        directory = os.open(self.slot, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)

    def synced(self, segment: Segment) -> None:
        """Close a segment `sync` made durable; delete it at once when its rows are all in the database."""
        os.close(segment.fd)
        segment.fd = -1
        if segment.pending == 0:
            self._delete(segment)

    def settle(self, rows: list[dict[str, Any]], *, kept: bool = False) -> None:
        """These rows are in the database or refused by it for what they hold; or, `kept`, neither: their
        segments stay on disk for the next start's replay."""
        for row in rows:
            segment = self.segments.get(row.pop(SEGMENT_KEY, -1))
            if segment is None:
                continue
            segment.pending -= 1
            segment.kept |= kept
            if segment.pending == 0 and segment.fd < 0:
                self._delete(segment)

    def close(self) -> None:
        """Seal what is left (segments with rows not in the database stay for the next start); free the slot."""
        segment = self.current
        self.current = None
        if segment is not None:
            segment.sealed = True
            self.sync(segment)
            self.synced(segment)
        if self._lock_fd >= 0:
            os.close(self._lock_fd)  # the slot is free for the next process
            self._lock_fd = -1

    def _open_segment(self, number: int) -> Segment:
        assert self.slot is not None
        path = self.slot / f"{number:012d}{SEGMENT_SUFFIX}"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        segment = Segment(number, fd)
        self.segments[number] = segment
        return segment

    def _delete(self, segment: Segment) -> None:
        if segment.kept or not segment.sealed:
            return
        assert self.slot is not None
        with contextlib.suppress(FileNotFoundError):
            (self.slot / f"{segment.number:012d}{SEGMENT_SUFFIX}").unlink()
        self.segments.pop(segment.number, None)


def read_segment(path: Path) -> tuple[list[dict[str, Any]], int]:
    """A segment's rows, and how many lines could not be read (a line torn by a kill mid-write)."""
    rows: list[dict[str, Any]] = []
    torn = 0
    for line in _lines(path):
        try:
            row = orjson.loads(line)
            if not isinstance(row, dict) or not row.get("row_id"):
                raise ValueError("not a usage row")
            if isinstance(row.get("created_at"), str):
                row["created_at"] = datetime.fromisoformat(row["created_at"])
        except ValueError:
            torn += 1
            continue
        rows.append(row)
    return rows, torn


def _lines(path: Path) -> Iterator[bytes]:
    with path.open("rb") as file:
        for line in file:
            if line.strip():
                yield line


def _try_lock(slot: Path) -> int:
    """The slot's lock file, held exclusively; -1 when another process holds it."""
    fd = os.open(slot / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return -1
    return fd


def _segment_number(path: Path) -> int:
    try:
        return int(path.stem)
    except ValueError:
        return 0
