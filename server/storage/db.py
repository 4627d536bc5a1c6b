"""The engine: SQLite (WAL) by default, any SQLAlchemy URL otherwise, and the schema.

Schema changes are alembic migrations (`migrations/versions`). Alembic, with mako and the DDL modules of every
dialect, weighs much in a process's memory for as long as it runs (bench/README.md), so the plane imports it
only on a start that finds an older schema to upgrade:

- a database already at the newest revision costs one SELECT of `alembic_version`;
- an empty database gets the models' tables (`create_all`) and is stamped with the newest revision, as alembic's
  cookbook does; tests/server/storage/test_storage.py checks that this builds the schema the migrations build;
- anything else (an older revision, tables without a version) goes through `alembic upgrade head`.
"""

from __future__ import annotations

import ast
import contextlib
import fcntl
import functools
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from sqlalchemy import (
    Column,
    Connection,
    Engine,
    MetaData,
    PrimaryKeyConstraint,
    String,
    Table,
    event,
    inspect,
    text,
)
from sqlmodel import SQLModel, create_engine

import server.storage.models  # noqa: F401  (registers the tables on SQLModel.metadata)

MIGRATIONS_DIR = Path(__file__).parent / "migrations"

# The table alembic keeps the applied revision in, declared as alembic declares it.
VERSION_TABLE = Table(
    "alembic_version",
    MetaData(),
    Column("version_num", String(32), nullable=False),
    PrimaryKeyConstraint("version_num", name="alembic_version_pkc"),
)


def make_engine(url: str) -> Engine:
    if url.startswith("sqlite"):
        # One file shared by the request loop's helper threads and the usage writer.
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    return create_engine(url, pool_pre_ping=True)


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cursor = dbapi_conn.cursor()
    # WAL lets the admin API read while the usage writer writes; NORMAL is durable enough with WAL.
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    # The page cache is per connection, 2 MiB by default, and the usage writer's fills all of it as the usage table
    # grows. 512 KiB still holds a batch's pages at the same insert time, for less resident memory (bench/README.md).
    cursor.execute("PRAGMA cache_size=-512")
    cursor.close()


# The PostgreSQL advisory lock planes hold while they prepare a shared database (any fixed 64-bit number).
STARTUP_LOCK_ID = 0x48_61_74_63_68_77_61_79  # "Hatchway"


@contextlib.contextmanager
def startup_lock(engine: Engine) -> Iterator[None]:
    """One plane at a time migrates the schema and creates the first admin key: planes (or workers) starting
    together on an empty database would each create the tables, and each print an admin key of its own.
    PostgreSQL: a session advisory lock; SQLite: an exclusive flock on a file beside the database."""
    if engine.dialect.name == "postgresql":
        with engine.connect() as connection:
            connection.execute(text("SELECT pg_advisory_lock(:id)"), {"id": STARTUP_LOCK_ID})
            try:
                yield
            finally:
                connection.execute(text("SELECT pg_advisory_unlock(:id)"), {"id": STARTUP_LOCK_ID})
        return
    database = engine.url.database
    if engine.dialect.name != "sqlite" or not database or database == ":memory:":
        yield
        return
    with open(f"{database}.startup-lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def migrate(engine: Engine) -> None:
    """Bring the schema to the newest migration; a no-op when it is already there."""
    with engine.begin() as connection:
        if current_revision(connection) == head_revision():
            return
        if not inspect(connection).get_table_names():
            create_at_head(connection)
            return
    upgrade(engine)


def current_revision(connection: Connection) -> str | None:
    """The revision alembic recorded, or None when there is none (a new database, or one never migrated)."""
    if not inspect(connection).has_table(VERSION_TABLE.name):
        return None
    versions = connection.execute(VERSION_TABLE.select()).scalars().all()
    # More than one row means several branch heads: not a state this code ever creates, so let alembic judge it.
    return versions[0] if len(versions) == 1 else None


def create_at_head(connection: Connection) -> None:
    """Build an empty database's schema from the models and record it as the newest revision."""
    SQLModel.metadata.create_all(connection)
    VERSION_TABLE.create(connection)
    connection.execute(VERSION_TABLE.insert().values(version_num=head_revision()))


def upgrade(engine: Engine) -> None:
    # Imported here, not at the top: only a start that finds an older schema needs alembic (see the docstring).
    from alembic import command
    from alembic.config import Config as AlembicConfig

    cfg = AlembicConfig()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    with engine.begin() as connection:
        cfg.attributes["connection"] = connection
        command.upgrade(cfg, "head")


@functools.cache
def head_revision() -> str:
    """The newest migration's revision, read from the version files without importing alembic (or them)."""
    parents: dict[str, tuple[str, ...]] = {}
    for path in (MIGRATIONS_DIR / "versions").glob("*.py"):
        found = _revision_of(path)
        if found is not None:
            parents[found[0]] = found[1]
    children = {parent for down in parents.values() for parent in down}
    heads = sorted(set(parents) - children)
    if len(heads) != 1:
        raise RuntimeError(f"migrations must have exactly one head, found {heads} in {MIGRATIONS_DIR}")
    return heads[0]


def _revision_of(path: Path) -> tuple[str, tuple[str, ...]] | None:
    """A version file's `revision` and its `down_revision`s (a merge has several), or None for other files."""
    constants = dict(_assignments(ast.parse(path.read_text(encoding="utf-8"))))
    if "revision" not in constants:
        return None
    down = constants.get("down_revision")
    return constants["revision"], (down,) if isinstance(down, str) else tuple(down or ())


def _assignments(module: ast.Module) -> Iterator[tuple[str, Any]]:
    """The module-level `name = literal` (or `name: type = literal`) lines that name a revision."""
    for node in module.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1:
            target, value = node.targets[0], node.value
        elif isinstance(node, ast.AnnAssign) and node.value is not None:
            target, value = node.target, node.value
        else:
            continue
        if isinstance(target, ast.Name) and target.id in ("revision", "down_revision"):
            yield target.id, ast.literal_eval(value)
