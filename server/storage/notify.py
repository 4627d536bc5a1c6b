"""Config changes everywhere: every plane on one database serves the configuration that database holds.

Two halves, both on PostgreSQL's LISTEN/NOTIFY (no broker, no home-made gossip):

- **Announcing.** A transaction that inserts, updates or deletes a row the snapshot is built from (the tables of
  `SnapshotRows`) also runs `pg_notify(CHANNEL, origin)`, from an ORM flush hook, so every writer is covered (the
  admin API, node enrollment, the admin key and declarative config applied at start) without each remembering
  to. PostgreSQL delivers a notification only when its transaction commits, and never one of a rollback: a
  plane never reloads for a change that did not happen, nor misses one that did while its listener was up.
  `origin` names the plane that wrote: it rebuilt its own snapshot after the commit, so it skips the echo.
- **Listening.** `ConfigWatcher` holds one dedicated connection that LISTENs on CHANNEL and rebuilds the snapshot
  when told, coalescing a burst into one rebuild at a time (the one running plus at most one more). It
  checks the connection every LISTENER_CHECK_S, reconnects after an outage with capped backoff and rebuilds in
  full on each (re)connect, since what changed while it was not listening was announced to nobody.

NOTIFY is scoped to one database, so planes of different gateways on one PostgreSQL server (each with its own
database) never hear each other. As a safety net for anything a notification cannot cover (a write made by hand
in psql, a plane whose connection died between commit and delivery) every plane also rebuilds in full each
`config_reload_s`. SQLite has no notifications: planes sharing one SQLite file see each other's changes through
that periodic rebuild only. (`PRAGMA data_version` would tell cheaply that the file changed, but the plane's own
usage writer changes it several times a second under load: it would rebuild as often.)
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
import weakref
from collections.abc import Awaitable, Callable, Coroutine
from itertools import chain
from typing import TYPE_CHECKING, Any, get_args, get_type_hints

from sqlalchemy import Connection, Engine, event, make_url, text
from sqlalchemy.orm import ORMExecuteState, Session, SessionTransaction, UOWTransaction

from server.storage.store import SnapshotRows

if TYPE_CHECKING:
    import psycopg

log = logging.getLogger(__name__)

# One channel per database (NOTIFY does not cross databases), named for what it carries.
CHANNEL = "hatchway_config"
# How the listener's connection shows in pg_stat_activity.
LISTENER_APPLICATION_NAME = "hatchway-config-listener"
# A connection that stays silent is checked with a query this often: a peer gone without a FIN (a partition,
# a failover to a standby) would otherwise leave the plane listening to nothing until the next full rebuild.
LISTENER_CHECK_S = 10.0
LISTENER_QUERY_TIMEOUT_S = 5.0
# Reconnect backoff: the first retry at once-ish, then doubling, capped so a restarted database is heard within
# seconds; jittered so many planes do not knock in step.
BACKOFF_FIRST_S = 0.1
BACKOFF_MAX_S = 5.0

# The tables whose rows the snapshot is built from: a write to any other (usage, audit) changes no snapshot.
SNAPSHOT_TABLES = frozenset(get_args(hint)[0].__table__.name for hint in get_type_hints(SnapshotRows).values())

# The origin each plane's engine announces with; an engine not registered announces with an empty origin.
_origins: weakref.WeakKeyDictionary[Engine, str] = weakref.WeakKeyDictionary()
# session.info key: this transaction already announced (PostgreSQL folds duplicates, this saves the round trips).
_ANNOUNCED = "hatchway_config_announced"


def announce_changes(engine: Engine, origin: str) -> None:
    """Name the plane whose engine this is, so that its listener can tell its own announcements apart."""
    _origins[engine] = origin


def listen_url(engine: Engine) -> str | None:
    """The libpq URL the listener connects to (the engine's database), or None on a database without NOTIFY."""
    if engine.dialect.name != "postgresql":
        return None
    return make_url(engine.url).set(drivername="postgresql").render_as_string(hide_password=False)


def _table_of(row: object) -> str | None:
    table = getattr(type(row), "__table__", None)
    return getattr(table, "name", None)


def _announce(session: Session) -> None:
    if session.info.get(_ANNOUNCED):
        return
    bind = session.get_bind()
    engine = bind.engine if isinstance(bind, Connection) else bind
    if engine.dialect.name != "postgresql":
        return
    session.connection().execute(
        text("SELECT pg_notify(:channel, :origin)"), {"channel": CHANNEL, "origin": _origins.get(engine, "")}
    )
    session.info[_ANNOUNCED] = True


@event.listens_for(Session, "after_flush")
def _after_flush(session: Session, _context: UOWTransaction) -> None:
    # `dirty` holds every row an attribute was assigned on, changed or not (the admin key configured at start
    # is assigned its own values): only a real change is announced.
    changed = any(_table_of(row) in SNAPSHOT_TABLES for row in chain(session.new, session.deleted)) or any(
        _table_of(row) in SNAPSHOT_TABLES and session.is_modified(row) for row in session.dirty
    )
    if changed:
        _announce(session)


@event.listens_for(Session, "do_orm_execute")
def _on_bulk_write(state: ORMExecuteState) -> None:
    # `update(Model)` / `delete(Model)` statements bypass the flush.
    if state.is_update or state.is_delete or state.is_insert:
        table = getattr(state.statement, "table", None)
        if getattr(table, "name", None) in SNAPSHOT_TABLES:
            _announce(state.session)


@event.listens_for(Session, "after_transaction_end")
def _forget_announced(session: Session, transaction: SessionTransaction) -> None:
    if transaction.parent is None:
        session.info.pop(_ANNOUNCED, None)


class ConfigWatcher:
    """Rebuilds a plane's snapshot when another plane changes the configuration, and every `reload_interval_s`.

    Parameters: `reload` (rebuilds and swaps the snapshot), `url` (libpq URL to LISTEN on; None: periodic
    rebuilds only, as on SQLite), `origin` (this plane's name in announcements: its own are skipped),
    `reload_interval_s` (full rebuild this often whatever was heard; 0: never).
    """

    def __init__(
        self,
        reload: Callable[[], Awaitable[object]],
        url: str | None,
        *,
        origin: str,
        reload_interval_s: float,
    ) -> None:
        self.reload = reload
        self.url = url
        self.origin = origin
        self.reload_interval_s = reload_interval_s
        self.connected = False
        # The listener's server process, while connected (operators find it in pg_stat_activity; tests kill it).
        self.backend_pid: int | None = None
        self.notifications = 0
        self.reloads = 0
        self.reloads_failed = 0
        self.reconnects = 0
        self._changed = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()

    def __repr__(self) -> str:
        return (
            f"<ConfigWatcher connected={self.connected} notifications={self.notifications} reloads={self.reloads} "
            f"reloads_failed={self.reloads_failed} reconnects={self.reconnects}>"
        )

    def start(self) -> None:
        self._spawn(self._rebuild_loop(), "config-rebuild")
        if self.url is not None:
            self._spawn(self._listen_loop(self.url), "config-listener")

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()

    def _spawn(self, coro: Coroutine[Any, Any, None], name: str) -> None:
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _rebuild_loop(self) -> None:
        interval = self.reload_interval_s or None
        while True:
            with contextlib.suppress(TimeoutError):  # the period is up: the periodic rebuild
                await asyncio.wait_for(self._changed.wait(), timeout=interval)
            # Cleared before the rebuild: a change announced while it reads the tables sets it again, so the
            # burst ends with one more rebuild that sees everything.
            self._changed.clear()
            try:
                await self.reload()
            except Exception as exc:  # the next announcement, reconnect or period tries again
                self.reloads_failed += 1
                log.warning("configuration reload failed: %s: %s", type(exc).__name__, exc)
            else:
                self.reloads += 1

    async def _listen_loop(self, url: str) -> None:
        # Imported here: a plane on SQLite never listens, and psycopg is a large import (bench/README.md).
        import psycopg

        delay = BACKOFF_FIRST_S
        lost_at: float | None = None
        while True:
            try:
                async with await psycopg.AsyncConnection.connect(
                    url,
                    autocommit=True,
                    connect_timeout=int(LISTENER_QUERY_TIMEOUT_S),
                    application_name=LISTENER_APPLICATION_NAME,
                ) as conn:
                    await conn.execute(f"LISTEN {CHANNEL}")
                    self.backend_pid = conn.info.backend_pid
                    self.connected = True
                    if lost_at is not None:
                        self.reconnects += 1
                        log.info("configuration listener reconnected after %.1fs", time.monotonic() - lost_at)
                    lost_at, delay = None, BACKOFF_FIRST_S
                    # Listening from now on; what changed before was announced to nobody: rebuild in full.
                    self._changed.set()
                    await self._listen(conn)
            except (psycopg.Error, OSError, TimeoutError) as exc:
                if lost_at is None:
                    lost_at = time.monotonic()
                    log.warning(
                        "configuration listener lost the database (%s: %s); retrying with backoff",
                        type(exc).__name__,
                        exc,
                    )
            finally:
                self.connected = False
                self.backend_pid = None
            await asyncio.sleep(delay * random.uniform(0.5, 1.0))
            delay = min(delay * 2, BACKOFF_MAX_S)

    async def _listen(self, conn: psycopg.AsyncConnection[Any]) -> None:
        while True:
            async for notice in conn.notifies(timeout=LISTENER_CHECK_S):
                if notice.payload != self.origin:
                    self.notifications += 1
                    self._changed.set()
            await asyncio.wait_for(conn.execute("SELECT 1"), LISTENER_QUERY_TIMEOUT_S)
