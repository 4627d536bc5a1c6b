"""The same plane on PostgreSQL (this machine runs one on its standard port): migrations, admin changes, a served
request's usage row, the audit chain and node enrollment tokens, on a scratch database dropped afterwards."""

from __future__ import annotations

import concurrent.futures
import contextlib
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import psycopg
import pytest
from sqlalchemy import func
from sqlmodel import Session, select

from server.config import Config
from server.plane import Plane
from server.storage.db import make_engine
from server.storage.models import AdminKey, UsageRecord
from tests.conftest import ADMIN_KEY, MODEL, RunningPlane
from tests.server.storage.test_storage import assert_empty_database_gets_the_migrations_schema
from tests.support.mock_upstream import MockUpstream

SERVER = "postgresql://postgres@127.0.0.1:5432/postgres"


@contextlib.contextmanager
def scratch_database() -> Iterator[str]:
    name = f"hatchway_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(SERVER, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"
    finally:  # an interrupted run leaves no database behind
        with psycopg.connect(SERVER, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def database() -> Iterator[str]:
    with scratch_database() as url:
        yield url


@pytest.fixture
def plane_config(plane_config: Config, database: str) -> Config:
    return plane_config.replace(database_url=database)


def test_the_plane_runs_on_postgresql(plane: RunningPlane, upstream: MockUpstream) -> None:
    plane.create_org("acme")
    plane.add_provider("mock-a", upstream, price_in=1.0, price_out=1.0)
    plane.admin.put("/routes", {"org": "acme", "model": MODEL, "strategy": "cheapest"})
    key = plane.create_key("acme")
    response = httpx.post(
        f"{plane.v1}/chat/completions",
        json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}]},
        headers={"Authorization": f"Bearer {key}"},
    )
    assert response.status_code == 200
    engine = plane.server.plane.engine
    assert engine.dialect.name == "postgresql"
    deadline = time.monotonic() + 5
    while True:
        with Session(engine) as session:
            rows = session.exec(select(func.count()).select_from(UsageRecord)).one()
        if rows == 1 or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert rows == 1
    assert plane.admin.get("/usage", by="route")["data"][0]["cost_usd"] > 0
    assert plane.admin.get("/audit/verify")["ok"] is True
    assert plane.admin.post("/node-tokens", {"org": "acme"})["token"]


def test_an_empty_database_gets_the_schema_the_migrations_build(database: str) -> None:
    with scratch_database() as other:
        migrated, created = make_engine(database), make_engine(other)
        try:
            assert_empty_database_gets_the_migrations_schema(migrated, created)
        finally:
            migrated.dispose()
            created.dispose()


@pytest.mark.parametrize("backend", ["postgresql", "sqlite"])
def test_planes_starting_together_on_an_empty_database_build_it_once_and_make_one_admin_key(
    backend: str, database: str, tmp_path: Path
) -> None:
    url = database if backend == "postgresql" else f"sqlite:///{tmp_path / 'shared.db'}"
    configs = [Config(data_dir=tmp_path / f"plane-{n}", database_url=url) for n in range(4)]
    planes = [Plane(config) for config in configs]
    with concurrent.futures.ThreadPoolExecutor(len(planes)) as pool:
        list(pool.map(Plane.prepare_storage, planes))  # raises what any of them raised
    generated = [p.generated_admin_key for p in planes if p.generated_admin_key]
    assert len(generated) == 1
    with Session(planes[0].engine) as session:
        assert session.exec(select(func.count()).select_from(AdminKey)).one() == 1
    for plane in planes:
        plane.engine.dispose()


def test_a_quota_of_billions_of_tokens_is_stored_and_one_past_64_bits_is_refused(plane: RunningPlane) -> None:
    plane.create_org("acme")
    three_billion = 3_000_000_000
    limits = plane.admin.put("/limits", {"org": "acme", "tokens_per_month": three_billion, "tpm": 2**63 - 1})
    assert (limits["tokens_per_month"], limits["tpm"]) == (three_billion, 2**63 - 1)
    response = httpx.put(
        f"{plane.url}/admin/v1/limits",
        json={"org": "acme", "tokens_per_day": 2**63},
        headers={"Authorization": f"Bearer {ADMIN_KEY}"},
    )
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "tokens_per_day"
