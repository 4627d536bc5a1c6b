"""The seed's smoke check, end to end with real processes: a 200 from each route, then provider A's process is
killed while clients keep sending, and failover keeps every client request whole."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import MODEL
from tests.support.plane_process import PlaneProcess
from tests.support.upstream_process import UpstreamProcess

REPLY = "Paris is the capital and largest city of France"
ADMIN = {"Authorization": "Bearer hwa-smoke"}


@pytest.fixture
def processes(tmp_path: Path) -> Iterator[tuple[PlaneProcess, UpstreamProcess, UpstreamProcess]]:
    a, b = UpstreamProcess("a", REPLY), UpstreamProcess("b", REPLY)
    plane = PlaneProcess(tmp_path, env={"HATCHWAY_ADMIN_KEY": "hwa-smoke", "HATCHWAY_LOG_LEVEL": "error"})
    yield plane, a, b
    plane.kill()
    a.kill()
    b.kill()


def admin(plane: PlaneProcess, method: str, path: str, body: dict[str, object]) -> dict[str, object]:
    response = httpx.request(method, f"{plane.url}/admin/v1{path}", json=body, headers=ADMIN)
    response.raise_for_status()
    return response.json()  # type: ignore[no-any-return]


def ask(plane: PlaneProcess, key: str, *, stream: bool) -> tuple[int, str, str]:
    """Status, served route, and the whole answer text (for a stream: only when it ended with [DONE])."""
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Capital of France?"}], "stream": stream}
    response = httpx.post(
        f"{plane.url}/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"}, timeout=30
    )
    route = response.headers.get("x-hatchway-route", "")
    if response.status_code != 200:
        return response.status_code, route, ""
    if not stream:
        return 200, route, response.json()["choices"][0]["message"]["content"]
    frames = [f.removeprefix("data: ") for f in response.text.split("\n\n") if f]
    if frames[-1] != "[DONE]":
        return 599, route, ""  # an honest error event: a failed request all the same
    chunks = [json.loads(f) for f in frames[:-1]]
    return 200, route, "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])


def test_smoke_each_route_answers_and_killing_provider_a_fails_no_request(processes) -> None:
    plane, a, b = processes
    admin(plane, "POST", "/orgs", {"name": "acme"})
    for name, upstream in (("provider-a", a), ("provider-b", b)):
        provider = {"org": "acme", "name": name, "base_url": upstream.url, "api_keys": ["sk"], "models": [MODEL]}
        admin(plane, "POST", "/providers", provider)
    key = str(admin(plane, "POST", "/keys", {"org": "acme"})["key"])

    for first in ("provider-a", "provider-b"):
        other = "provider-b" if first == "provider-a" else "provider-a"
        admin(plane, "PUT", "/routes", {"org": "acme", "model": MODEL, "targets": [first, other]})
        for stream in (False, True):
            assert ask(plane, key, stream=stream) == (200, first, REPLY)

    admin(plane, "PUT", "/routes", {"org": "acme", "model": MODEL, "targets": ["provider-a", "provider-b"]})
    results: list[tuple[int, str, str]] = []
    lock = threading.Lock()
    sent = threading.Semaphore(0)

    def client(index: int) -> None:
        for i in range(30):
            outcome = ask(plane, key, stream=(index + i) % 2 == 0)
            with lock:
                results.append(outcome)
            sent.release()

    clients = [threading.Thread(target=client, args=(i,)) for i in range(4)]
    for thread in clients:
        thread.start()
    for _ in range(20):  # let traffic flow through provider A first
        sent.acquire(timeout=30)
    a.kill()
    for thread in clients:
        thread.join(60)

    assert len(results) == 120
    assert [r for r in results if r[0] != 200 or r[2] != REPLY] == []
    routes = [r[1] for r in results]
    assert "provider-a" in routes[:20] and routes[-10:] == ["provider-b"] * 10
