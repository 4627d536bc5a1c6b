"""Usage reports aggregate in the database (server.usage.reports) and still say exactly what they said when every row
was loaded into Python: counts, sums, unpriced groups, and latency percentiles as `statistics.quantiles`
computes them. On SQLite and on the local PostgreSQL."""

from __future__ import annotations

import random
import statistics
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import Engine
from sqlmodel import Session

from server.storage.db import make_engine, migrate
from server.storage.models import ApiKey, Node, Org, UsageRecord
from server.usage.reports import earnings_report, usage_report
from tests.server.storage.test_postgres import scratch_database

DAY = datetime(2025, 3, 1, 12, tzinfo=UTC)


@pytest.fixture(params=["sqlite", "postgresql"])
def engine(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Engine]:
    if request.param == "sqlite":
        made = make_engine(f"sqlite:///{tmp_path / 'usage.db'}")
        migrate(made)
        yield made
        made.dispose()
        return
    with scratch_database() as url:
        made = make_engine(url)
        migrate(made)
        yield made
        made.dispose()


def fill(engine: Engine) -> list[UsageRecord]:
    """Three routes over two days: served, failed-over and refused rows, priced and unpriced, one node."""
    rng = random.Random(15)
    rows = []
    for i in range(600):
        route = ("alpha", "beta", "free")[i % 3]
        rows.append(
            UsageRecord(
                request_id=f"r{i}",
                created_at=DAY + timedelta(hours=rng.randint(0, 30)),
                org_id="org_a",
                key_id="key_a" if i % 2 else "key_gone",
                endpoint="chat/completions",
                model="m",
                target=route,
                status=rng.choice((200, 200, 200, 502)),
                prompt_tokens=rng.randint(0, 50),
                completion_tokens=rng.randint(0, 50),
                cost_usd=None if route == "free" else rng.random() / 1000,
                latency_ms=rng.random() * 1000,
                final=rng.random() < 0.9,
                node_id="node_a" if route == "beta" else None,
                cache=rng.choice(("hit", "miss", "bypass")),
            )
        )
    with Session(engine) as session:
        session.add(Org(id="org_a", name="acme"))
        session.commit()  # no relationship tells the session to insert the org first
        session.add(ApiKey(id="key_a", org_id="org_a", name="ci", prefix="hw-ci", key_hash="h"))
        session.add(Node(id="node_a", org_id="org_a", name="box", machine_id="m", credential_hash="c"))
        session.add_all(rows)
        session.commit()
        for row in rows:
            session.refresh(row)
            session.expunge(row)
    return rows


def test_percentiles_and_sums_match_the_rows_they_summarise(engine: Engine) -> None:
    rows = fill(engine)
    report = {r["route"]: r for r in usage_report(engine, org_ref=None, since=None, by=["route"])}
    assert sorted(report) == ["alpha", "beta", "free"]
    for route, summary in report.items():
        mine = [r for r in rows if r.target == route]
        final = [r for r in mine if r.final]
        served = [r for r in final if r.status == 200]
        latencies = [r.latency_ms for r in served]
        assert summary["requests"] == len(final)
        assert summary["failed_attempts"] == len(mine) - len(final)
        assert summary["errors"] == len(final) - len(served)
        assert summary["completion_tokens"] == sum(r.completion_tokens for r in served)
        assert summary["cache_hits"] == sum(r.cache == "hit" for r in served)
        quantiles = statistics.quantiles(latencies, n=100, method="inclusive")
        assert summary["latency_p50_ms"] == round(quantiles[49], 2)
        assert summary["latency_p95_ms"] == round(quantiles[94], 2)
        if route == "free":
            assert summary["cost_usd"] is None and summary["unpriced_requests"] == len(served)
        else:
            assert summary["cost_usd"] == pytest.approx(sum(r.cost_usd or 0.0 for r in served))


def test_groups_by_key_name_and_day_with_a_deleted_key_shown_by_its_id(engine: Engine) -> None:
    fill(engine)
    report = usage_report(engine, org_ref="acme", since=None, by=["key", "day"])
    assert {(r["key"], r["day"]) for r in report} == {
        (key, day) for key in ("ci", "key_gone") for day in ("2025-03-01", "2025-03-02")
    }
    assert report == sorted(report, key=lambda r: (r["key"], r["day"]))


def test_earnings_are_the_recorded_costs_of_what_each_node_served(engine: Engine) -> None:
    rows = fill(engine)
    (earned,) = earnings_report(engine, org_ref=None, since=None, by="node")
    served = [r for r in rows if r.node_id == "node_a" and r.final and r.status == 200]
    assert (earned["node_id"], earned["node"], earned["org"]) == ("node_a", "box", "acme")
    assert earned["requests"] == len(served)
    assert earned["prompt_tokens"] == sum(r.prompt_tokens for r in served)
    assert earned["earned_usd"] == pytest.approx(sum(r.cost_usd or 0.0 for r in served))
