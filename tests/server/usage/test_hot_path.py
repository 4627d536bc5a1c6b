"""Serving a request does no database I/O; usage rows leave through the batch writer and survive shutdown."""

from __future__ import annotations

import threading
from typing import Any

import httpx
import pytest
from sqlalchemy import event, func
from sqlmodel import Session, select

from server.config import Config
from server.storage.models import UsageRecord
from tests.conftest import MODEL, Gateway


@pytest.fixture
def plane_config(plane_config: Config) -> Config:
    # The writer would flush during the test otherwise; here it must wait for shutdown.
    return plane_config.replace(usage_flush_interval_s=3600)


class StatementCounter:
    def __init__(self) -> None:
        self.statements: list[str] = []
        self._lock = threading.Lock()

    def __call__(self, _conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        with self._lock:
            self.statements.append(statement)


def test_serving_requests_executes_no_sql(gateway: Gateway) -> None:
    engine = gateway.plane.server.plane.engine
    counter = StatementCounter()
    event.listen(engine, "before_cursor_execute", counter)
    try:
        client = gateway.client()
        for _ in range(5):
            client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}])
            list(client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], stream=True))
        client.embeddings.create(model=MODEL, input="hi", encoding_format="float")
        client.models.list()
        httpx.post(f"{gateway.plane.v1}/chat/completions", json={"model": MODEL}, headers=gateway.auth())
    finally:
        event.remove(engine, "before_cursor_execute", counter)
    assert counter.statements == []


def test_graceful_shutdown_flushes_every_queued_usage_row(gateway: Gateway) -> None:
    client = gateway.client()
    for _ in range(7):
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}])
    engine = gateway.plane.server.plane.engine
    with Session(engine) as session:
        assert session.exec(select(func.count()).select_from(UsageRecord)).one() == 0
    gateway.plane.stop()
    with Session(engine) as session:
        rows = session.exec(select(UsageRecord)).all()
    assert len(rows) == 7
    assert {r.target for r in rows} == {"mock-a"}
    assert all(r.status == 200 and r.completion_tokens == 3 and r.cost_usd for r in rows)
