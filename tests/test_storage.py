"""What lands on disk: hashes instead of keys, ciphertext instead of provider keys, and a migrated schema."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlmodel import SQLModel

from server.credentials import Vault, hash_key
from server.storage.db import make_engine, migrate
from tests.conftest import Gateway


def database_bytes(gateway: Gateway) -> bytes:
    data_dir = gateway.plane.server.config.data_dir
    return b"".join(p.read_bytes() for p in data_dir.glob("hatchway.db*"))


def test_provider_keys_are_encrypted_at_rest(gateway: Gateway) -> None:
    gateway.plane.add_provider("secretive", gateway.upstream, api_keys=["sk-very-secret-provider-key"], models=["m"])
    assert b"sk-very-secret-provider-key" not in database_bytes(gateway)
    path = gateway.plane.server.config.data_dir / "hatchway.db"
    with sqlite3.connect(path) as db:
        ciphertexts = [row[0] for row in db.execute("SELECT ciphertext FROM provider_key")]
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
    path = gateway.plane.server.config.data_dir / "hatchway.db"
    assert gateway.api_key.encode() not in database_bytes(gateway)
    with sqlite3.connect(path) as db:
        hashes = {row[0] for row in db.execute("SELECT key_hash FROM api_key")}
    assert hash_key(gateway.api_key) in hashes


def test_migrations_build_exactly_the_models_schema(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'm.db'}")
    migrate(engine)
    with engine.connect() as conn:
        assert compare_metadata(MigrationContext.configure(conn), SQLModel.metadata) == []


def test_migrating_twice_is_harmless(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'm.db'}")
    migrate(engine)
    migrate(engine)


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
