"""A graceful shutdown under load loses no usage row: after SIGTERM, every response a client received has
exactly one final row in the database, and there is no row for a request nobody answered."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import httpx
from sqlmodel import Session, col, create_engine, select

from server.storage.models import UsageRecord
from tests.conftest import MODEL
from tests.support.plane_process import PlaneProcess
from tests.support.upstream_process import UpstreamProcess

ADMIN = {"Authorization": "Bearer hwa-shutdown"}
CLIENTS = 8


def configure(plane: PlaneProcess, upstream: UpstreamProcess) -> str:
    def call(path: str, body: dict[str, Any]) -> dict[str, Any]:
        response = httpx.post(f"{plane.url}/admin/v1{path}", json=body, headers=ADMIN)
        response.raise_for_status()
        return response.json()  # type: ignore[no-any-return]

    call("/orgs", {"name": "acme"})
    provider = {"org": "acme", "name": "mock", "base_url": upstream.url, "api_keys": ["sk-mock"], "models": [MODEL]}
    call("/providers", provider | {"price_in": 1})
    return str(call("/keys", {"org": "acme"})["key"])


def client_loop(url: str, key: str, index: int, stop: threading.Event, answered: dict[str, int]) -> None:
    """Send requests back to back (streams and whole answers, some refused) until the plane stops answering."""
    headers = {"Authorization": f"Bearer {key}"}
    with httpx.Client(timeout=30) as http:
        sent = 0
        while not stop.is_set():
            sent += 1
            body: dict[str, Any] = {"model": MODEL, "messages": [{"role": "user", "content": f"hi {index} {sent}"}]}
            if sent % 2:
                body["stream"] = True
            if sent % 7 == 0:
                body["model"] = "no-such-model"  # refused before routing: no usage row, by design
            try:
                response = http.post(f"{url}/v1/chat/completions", json=body, headers=headers)
            except httpx.HTTPError:
                return  # the plane stopped accepting: this request was never answered
            if body["model"] == MODEL:
                answered[response.headers["x-request-id"]] = response.status_code


def test_every_answered_request_has_exactly_one_final_usage_row_after_sigterm_under_load(tmp_path: Path) -> None:
    # Plane and upstream in processes of their own: the test's client threads share nothing with either.
    upstream = UpstreamProcess("mock")
    plane = PlaneProcess(
        tmp_path,
        # Rows stay queued for up to a second: the shutdown must flush them, not an earlier tick.
        env={
            "HATCHWAY_ADMIN_KEY": "hwa-shutdown",
            "HATCHWAY_LOG_LEVEL": "info",
            "HATCHWAY_USAGE_FLUSH_INTERVAL_S": "1",
            # Under this load a connection sometimes keeps the drain waiting for the whole grace period (not yet
            # understood; see the closing note of the policy issue): the test then waits that out, and still
            # requires every answered request to have its row.
            "HATCHWAY_SHUTDOWN_GRACE_S": "10",
        },
    )
    try:
        key = configure(plane, upstream)
        stop = threading.Event()
        answered: dict[str, int] = {}
        clients = [
            threading.Thread(target=client_loop, args=(plane.url, key, i, stop, answered)) for i in range(CLIENTS)
        ]
        for client in clients:
            client.start()
        time.sleep(2.0)
        assert plane.terminate(timeout_s=60) == 0
        stop.set()
        for client in clients:
            client.join(30)
    finally:
        plane.kill()
        upstream.kill()
    engine = create_engine(f"sqlite:///{tmp_path / 'hatchway.db'}")
    with Session(engine) as session:
        rows = list(session.exec(select(UsageRecord).where(col(UsageRecord.final))))
    engine.dispose()
    assert len(answered) > 50, "the load never got going"
    assert sorted(r.request_id for r in rows) == sorted(answered)
    assert {r.request_id: r.status for r in rows} == answered
