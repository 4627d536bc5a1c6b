"""Load shedding: past what it can serve, the plane answers new API requests with a 503 and Retry-After at once,
and keeps its health, metrics and admin endpoints reachable."""

from __future__ import annotations

import asyncio
import threading
import time

import httpx
import openai
import pytest

from server.config import Config
from server.errors import ServiceUnavailableError
from server.serving.overload import LoadShedder
from tests.conftest import ADMIN_KEY, MODEL, Gateway

# /metrics takes the admin key.
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
BODY = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}


@pytest.fixture
def plane_config(plane_config: Config) -> Config:
    return plane_config.replace(max_in_flight=2, overload_lag_ms=50, overload_lag_floor=0)


async def test_requests_beyond_max_in_flight_get_503_before_the_admitted_ones_finish(gateway: Gateway) -> None:
    gateway.upstream.delay_s = 1.0
    finished: list[int] = []
    async with httpx.AsyncClient(timeout=30) as client:

        async def call() -> httpx.Response:
            response = await client.post(f"{gateway.plane.v1}/chat/completions", json=BODY, headers=gateway.auth())
            finished.append(response.status_code)
            return response

        responses = await asyncio.gather(*(call() for _ in range(5)))
    assert sorted(r.status_code for r in responses) == [200, 200, 503, 503, 503]
    assert finished == [503, 503, 503, 200, 200]  # refused at once, not after waiting their turn
    refused = next(r for r in responses if r.status_code == 503)
    assert refused.json()["error"]["code"] == "overloaded"
    assert refused.headers["Retry-After"] == "1"


def test_health_metrics_and_admin_stay_reachable_while_api_requests_are_shed(gateway: Gateway) -> None:
    gateway.upstream.delay_s = 2.0
    with httpx.Client(timeout=30) as client:
        held = [
            client.build_request("POST", f"{gateway.plane.v1}/chat/completions", json=BODY, headers=gateway.auth())
            for _ in range(2)
        ]
        threads = [threading.Thread(target=client.send, args=(request,)) for request in held]
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + 10
        while gateway.plane.server.plane.shedder.in_flight < 2:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        assert client.post(f"{gateway.plane.v1}/chat/completions", json=BODY, headers=gateway.auth()).status_code == 503
        assert client.get(f"{gateway.plane.url}/healthz").status_code == 200
        metrics = client.get(f"{gateway.plane.url}/metrics", headers=ADMIN).text
        assert "hatchway_requests_shed_total 1.0" in metrics
        assert gateway.plane.admin.get("/orgs")["data"]
        for thread in threads:
            thread.join()


def test_a_late_event_loop_sheds_api_requests_until_it_catches_up(gateway: Gateway) -> None:
    plane = gateway.plane.server.plane
    loop = gateway.plane.loop_thread.loop
    # Stall the plane's loop 100 ms at a time, twenty times: every tick of the lag watcher comes late.
    for _ in range(20):
        loop.call_soon_threadsafe(time.sleep, 0.1)
    deadline = time.monotonic() + 30
    while plane.shedder.lag_s <= plane.shedder.lag_limit_s:
        assert time.monotonic() < deadline, "the lag never showed"
        time.sleep(0.01)
    refused = httpx.post(f"{gateway.plane.v1}/chat/completions", json=BODY, headers=gateway.auth(), timeout=30)
    assert refused.status_code == 503 and "late" in refused.json()["error"]["message"]
    while plane.shedder.lag_s > plane.shedder.lag_limit_s:
        assert time.monotonic() < deadline, "the lag never went away"
        time.sleep(0.05)
    served = httpx.post(f"{gateway.plane.v1}/chat/completions", json=BODY, headers=gateway.auth(), timeout=30)
    assert served.status_code == 200


def test_a_late_event_loop_sheds_only_once_the_floor_of_requests_in_flight_is_reached() -> None:
    shedder = LoadShedder(max_in_flight=100, lag_limit_s=0.03, lag_floor=2)
    shedder.lag_s = 0.5  # far later than the limit
    shedder.admit()
    shedder.admit()  # a fixed pool of two clients is served, however late the loop
    assert shedder.in_flight == 2
    with pytest.raises(ServiceUnavailableError, match="event loop runs 500 ms late"):
        shedder.admit()
    shedder.release()
    shedder.lag_s = 0.0
    shedder.admit()
    assert shedder.in_flight == 2


def test_a_slow_connection_handover_refuses_only_once_the_floor_of_requests_in_flight_is_reached() -> None:
    shedder = LoadShedder(max_in_flight=100, lag_limit_s=0.01, lag_floor=2)
    shedder.admit()  # one client, on a loop busy enough that new connections wait 50 ms for it: served
    assert shedder.overload(loop_wait_s=0.05) is None
    shedder.admit()
    refusal = shedder.overload(loop_wait_s=0.05)
    assert refusal is not None
    assert refusal.message == (
        "The plane is overloaded (the plane's event loop takes 50 ms to take a connection); retry shortly."
    )
    assert shedder.overload(loop_wait_s=0.005) is None  # within the limit


def test_connections_the_loop_holds_count_towards_the_floor_for_a_new_connection() -> None:
    shedder = LoadShedder(max_in_flight=100, lag_limit_s=0.01, lag_floor=100)
    # Nothing in flight yet: at twice the capacity the backlog is requests the loop has not read.
    assert shedder.overload(loop_wait_s=0.05, connections=lambda: 99) is None
    assert shedder.overload(loop_wait_s=0.05, connections=lambda: 100) is not None


async def test_the_lag_watcher_looks_often_once_requests_in_flight_reach_half_the_floor() -> None:
    shedder = LoadShedder(max_in_flight=100, lag_limit_s=0.01, lag_floor=4)
    shedder.start()
    try:
        await asyncio.sleep(0.05)  # few requests: the watcher looks 4 times a second
        shedder.admit()
        shedder.admit()  # half the floor: it wakes, and looks every tick from now on
        await asyncio.sleep(0)
        time.sleep(0.1)  # noqa: ASYNC251 -- the loop stalls, long before the slow look would have come
        await asyncio.sleep(0.05)
        assert shedder.lag_s > shedder.lag_limit_s
    finally:
        await shedder.stop()


def test_new_connections_of_an_overloaded_plane_are_refused_by_the_acceptor_without_the_loop(
    gateway: Gateway,
) -> None:
    server = gateway.plane.server
    assert server.acceptor is not None
    server.plane.shedder.max_in_flight = 0  # overloaded until restored, whatever the loop is doing
    # The loop is stalled until the refusal has come: only the acceptor thread can have answered it.
    stalled, released = threading.Event(), threading.Event()

    def stall() -> None:
        stalled.set()
        released.wait(60)

    gateway.plane.loop_thread.loop.call_soon_threadsafe(stall)
    assert stalled.wait(10)
    try:
        with pytest.raises(openai.APIStatusError) as refused:
            gateway.client(max_retries=0, timeout=30).chat.completions.create(**BODY)
    finally:
        released.set()
    assert refused.value.status_code == 503
    assert refused.value.response.headers["Retry-After"] == "1"
    assert refused.value.response.headers["X-Request-Id"]
    assert refused.value.body == {
        "message": "The plane is overloaded (0 requests in flight, the most this plane takes); retry shortly.",
        "type": "api_error",
        "param": None,
        "code": "overloaded",
    }
    assert server.acceptor.refused == 1
    # Not an API request: handed to the loop, which answers once it is free again.
    assert httpx.get(f"{gateway.plane.url}/healthz", timeout=30).status_code == 200
    metrics = httpx.get(f"{gateway.plane.url}/metrics", headers=ADMIN, timeout=30).text
    assert "hatchway_requests_shed_total 1.0" in metrics
    server.plane.shedder.max_in_flight = 4096
    deadline = time.monotonic() + 30
    while server.plane.shedder.lag_s > server.plane.shedder.lag_limit_s:  # the stall showed as loop lag
        assert time.monotonic() < deadline, "the lag never went away"
        time.sleep(0.05)
    served = gateway.client().chat.completions.create(**BODY)
    assert served.choices[0].message.content
    assert server.acceptor.refused == 1
