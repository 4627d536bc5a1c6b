"""The console's own endpoints (server.console), without a browser: the overview's figures against the exact
ones, and what each endpoint refuses."""

from __future__ import annotations

import random
import statistics
from datetime import UTC, datetime, timedelta

import httpx
import pytest
from sqlmodel import Session

from server.console.stats import BIN_GROWTH
from server.storage.models import UsageRecord
from tests.conftest import ADMIN_KEY, MODEL, Gateway, RunningPlane, usage_report

ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}


def store_rows(plane: RunningPlane, rows: list[dict[str, object]]) -> None:
    with Session(plane.server.plane.engine) as session:
        for i, row in enumerate(rows):
            defaults: dict[str, object] = {
                "request_id": f"req-{i}",
                "org_id": "org-x",
                "key_id": "key-x",
                "endpoint": "chat/completions",
                "model": MODEL,
                "status": 200,
            }
            session.add(UsageRecord(**(defaults | row)))
        session.commit()


@pytest.fixture(params=["sqlite", "postgresql"])
def any_store(request: pytest.FixtureRequest) -> RunningPlane:
    """A plane on SQLite, then one on PostgreSQL: the histograms are SQL both must run alike."""
    if request.param == "sqlite":
        plane: RunningPlane = request.getfixturevalue("plane")
        return plane
    return request.getfixturevalue("planes").start()  # type: ignore[no-any-return]


def stats(plane: RunningPlane, **query: str) -> httpx.Response:
    return httpx.get(f"{plane.url}/admin/v1/console/stats", params=query, headers=ADMIN)


def test_percentiles_are_within_one_bin_of_the_exact_ones(any_store: RunningPlane) -> None:
    plane = any_store
    rng = random.Random(7)
    now = datetime.now(UTC)
    latencies = [rng.lognormvariate(5, 1.2) for _ in range(2000)]
    ttfts = [value / 3 for value in latencies]
    rows: list[dict[str, object]] = [
        {"created_at": now - timedelta(minutes=rng.uniform(1, 50)), "latency_ms": lat, "ttft_ms": ttft, "stream": True}
        for lat, ttft in zip(latencies, ttfts, strict=True)
    ]
    store_rows(plane, rows)
    totals = stats(plane, period="1h").json()["totals"]
    for name, values in (("latency", latencies), ("ttft", ttfts)):
        exact = statistics.quantiles(values, n=100, method="inclusive")
        for q in (50, 95, 99):
            shown = totals[f"{name}_p{q}_ms"]
            assert abs(shown - exact[q - 1]) <= (BIN_GROWTH - 1) * exact[q - 1], (name, q, shown, exact[q - 1])


def test_requests_errors_and_cost_land_in_their_time_buckets(any_store: RunningPlane) -> None:
    plane = any_store
    now = datetime.now(UTC)
    store_rows(
        plane,
        [
            {"created_at": now - timedelta(minutes=30, seconds=30), "cost_usd": 0.5, "prompt_tokens": 3},
            {"created_at": now - timedelta(minutes=30, seconds=20), "cost_usd": 0.25, "completion_tokens": 4},
            {"created_at": now - timedelta(minutes=5, seconds=30), "status": 502, "error_code": "upstream"},
            # Outside the hour: in no bucket and no total.
            {"created_at": now - timedelta(hours=2), "cost_usd": 100.0},
        ],
    )
    answer = stats(plane, period="1h", by="model").json()
    assert (answer["bucket_s"], len(answer["series"])) == (60, 60)
    busy = [(i, p["requests"], p["errors"], p["cost_usd"]) for i, p in enumerate(answer["series"]) if p["requests"]]
    assert busy == [(29, 2, 0, 0.75), (54, 1, 1, None)]
    totals = answer["totals"]
    assert (totals["requests"], totals["errors"], totals["cost_usd"]) == (3, 1, 0.75)
    assert (totals["prompt_tokens"], totals["completion_tokens"]) == (3, 4)
    assert answer["groups"][0]["name"] == MODEL


@pytest.mark.parametrize(
    ("query", "param"), [({"period": "2h"}, "period"), ({"by": "colour"}, "by"), ({"org": "nobody"}, "org")]
)
def test_a_bad_query_is_a_400_naming_its_parameter(plane: RunningPlane, query: dict[str, str], param: str) -> None:
    answer = stats(plane, **query)
    assert answer.status_code == 400
    assert answer.json()["error"]["param"] == param


def test_the_console_endpoints_need_a_credential(plane: RunningPlane) -> None:
    for path in ("/admin/v1/console/stats", "/admin/v1/console/info", "/admin/v1/console/requests/x"):
        assert httpx.get(plane.url + path).status_code == 401, path


def test_a_request_is_found_by_its_id_once_stored(gateway: Gateway) -> None:
    answer = gateway.client().chat.completions.with_raw_response.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}]
    )
    request_id = answer.headers["x-request-id"]
    usage_report(gateway.plane, 1, org="acme")
    row = httpx.get(f"{gateway.plane.url}/admin/v1/console/requests/{request_id}", headers=ADMIN).json()
    assert (row["model"], row["target"], row["status"], row["attempts"]) == (MODEL, "mock-a", 200, 1)
    # 1 prompt and 3 completion tokens (the mock counts words) at $1 and $2 per 1M.
    assert row["cost_usd"] == pytest.approx((1 * 1.0 + 3 * 2.0) / 1e6)
    missing = httpx.get(f"{gateway.plane.url}/admin/v1/console/requests/no-such-request", headers=ADMIN)
    assert missing.status_code == 404


def test_a_provider_test_of_an_unknown_provider_is_a_404(gateway: Gateway) -> None:
    answer = httpx.post(f"{gateway.plane.url}/admin/v1/providers/nobody/test", headers=ADMIN)
    assert answer.status_code == 404
