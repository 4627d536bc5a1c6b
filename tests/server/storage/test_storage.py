"""What lands on disk: hashes instead of keys, ciphertext instead of provider keys, and a migrated schema."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

from alembic.autogenerate import compare_metadata
from alembic.command import upgrade as alembic_upgrade
from alembic.config import Config as AlembicConfig
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, inspect
from sqlmodel import SQLModel

from server.credentials import Vault, hash_key
from server.storage.db import MIGRATIONS_DIR, head_revision, make_engine, migrate, upgrade
from tests.conftest import Gateway


def database_bytes(gateway: Gateway) -> bytes:
    data_dir = gateway.plane.server.config.data_dir
    return b"".join(p.read_bytes() for p in data_dir.glob("hatchway.db*"))


def test_provider_keys_are_encrypted_at_rest(gateway: Gateway) -> None:
    gateway.plane.add_provider("secretive", gateway.upstream, api_keys=["sk-very-secret-provider-key"], models=["m"])
    assert b"sk-very-secret-provider-key" not in database_bytes(gateway)
    ciphertexts = [row["ciphertext"] for row in gateway.plane.sql("SELECT ciphertext FROM provider_key")]
    vault = Vault.from_settings("", gateway.plane.server.config.data_dir)
    assert "sk-very-secret-provider-key" in {vault.decrypt(c) for c in ciphertexts}


def test_secret_file_is_private_to_its_owner(gateway: Gateway) -> None:
    secret = gateway.plane.server.config.data_dir / "secret.key"
    assert secret.stat().st_mode & 0o777 == 0o600


def test_provider_keys_are_never_returned_by_the_api(gateway: Gateway) -> None:
    listing = gateway.plane.admin.get("/providers")
    assert "sk-mock-a" not in str(listing)
    assert listing["data"][0]["api_keys"][0]["hint"] == "...ck-a"


def test_api_keys_are_stored_only_as_hashes(gateway: Gateway) -> None:
    assert gateway.api_key.encode() not in database_bytes(gateway)
    hashes = {row["key_hash"] for row in gateway.plane.sql("SELECT key_hash FROM api_key")}
    assert hash_key(gateway.api_key) in hashes


def test_migrations_build_exactly_the_models_schema(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'm.db'}")
    upgrade(engine)  # alembic itself: `migrate` would build an empty database from the models
    with engine.connect() as conn:
        assert compare_metadata(MigrationContext.configure(conn), SQLModel.metadata) == []


def test_migrating_twice_is_harmless(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'm.db'}")
    migrate(engine)
    migrate(engine)


def alembic_revision(engine: Engine) -> str | None:
    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def schema(engine: Engine) -> dict[str, Any]:
    """Every table as the database describes it. Columns are compared by name: a migration that adds a column
    appends it, where `create_all` puts it where the model declares it, and nothing reads columns by position."""
    found = inspect(engine)
    return {
        table: {
            "columns": {c["name"]: (str(c["type"]), c["nullable"], c.get("default")) for c in found.get_columns(table)},
            "primary_key": found.get_pk_constraint(table),
            "indexes": sorted(found.get_indexes(table), key=str),
            "unique": sorted(found.get_unique_constraints(table), key=str),
            "foreign_keys": sorted(found.get_foreign_keys(table), key=str),
        }
        for table in found.get_table_names()
    }


def assert_empty_database_gets_the_migrations_schema(migrated: Engine, created: Engine) -> None:
    upgrade(migrated)  # through alembic, every migration in turn
    migrate(created)  # an empty database: the models' tables, stamped with the newest revision
    assert schema(created) == schema(migrated)
    assert alembic_revision(created) == alembic_revision(migrated) == head_revision()


def test_an_empty_database_gets_the_schema_the_migrations_build(tmp_path: Path) -> None:
    assert_empty_database_gets_the_migrations_schema(
        make_engine(f"sqlite:///{tmp_path / 'migrated.db'}"), make_engine(f"sqlite:///{tmp_path / 'created.db'}")
    )


def alembic_config() -> AlembicConfig:
    cfg = AlembicConfig()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    return cfg


def test_the_head_revision_read_from_the_files_is_alembics() -> None:
    assert [head_revision()] == ScriptDirectory.from_config(alembic_config()).get_heads()


def test_an_older_database_is_upgraded_to_the_newest_revision(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'old.db'}")
    cfg = alembic_config()
    head = ScriptDirectory.from_config(cfg).get_revision(head_revision())
    assert head is not None and isinstance(head.down_revision, str)
    with engine.begin() as connection:
        cfg.attributes["connection"] = connection
        alembic_upgrade(cfg, head.down_revision)
    migrate(engine)
    assert alembic_revision(engine) == head_revision()
    with engine.connect() as conn:
        assert compare_metadata(MigrationContext.configure(conn), SQLModel.metadata) == []


def test_new_and_current_databases_start_without_alembic(tmp_path: Path) -> None:
    current = f"sqlite:///{tmp_path / 'current.db'}"
    migrate(make_engine(current))  # this process has alembic loaded anyway; the plane's must not
    urls = [current, f"sqlite:///{tmp_path / 'new.db'}"]
    check = (
        "import sys; from server.storage.db import make_engine, migrate\n"
        f"for url in {urls!r}: migrate(make_engine(url))\n"
        "assert 'alembic' not in sys.modules, 'alembic was imported'"
    )
    result = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_sqlite_runs_in_wal_mode(gateway: Gateway) -> None:
    with gateway.plane.server.plane.engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"


def test_a_different_secret_cannot_read_provider_keys(tmp_path: Path) -> None:
    ciphertext = Vault("one secret").encrypt("sk-x")
    try:
        Vault("another secret").decrypt(ciphertext)
    except ValueError as exc:
        assert "HATCHWAY_SECRET_KEY" in str(exc)
    else:
        raise AssertionError("decrypting with the wrong secret must fail")
