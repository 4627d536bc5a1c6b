"""Several planes on one database are one gateway: a change made through any plane is in force on every other
within a second (PostgreSQL LISTEN/NOTIFY, server/storage/notify.py), a lost listener comes back and catches up,
and /readyz tells a load balancer when a plane lost its database.

Each test gets its own PostgreSQL database (the one this machine runs on its standard port) and starts its
planes in this process, on the test's loop thread, with their own data dirs and the same secret key.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest

from server.cli.client import AdminClient
from server.config import Config
from server.serving.serve import Server
from tests.conftest import ADMIN_KEY, MODEL, RunningPlane
from tests.server.storage.test_postgres import SERVER, scratch_database
from tests.support.hostile_agent import HostileAgent, Session, hello
from tests.support.loop_thread import LoopThread
from tests.support.mock_upstream import MockUpstream
from tests.support.plane_process import PlaneProcess

# The promise is one second; the polls allow half as much again so a busy machine does not fail the test, and
# the failure message says how long it took.
PROPAGATION_LIMIT_S = 1.5
SECRET = "one-secret-for-every-plane"
BODY = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}

MakePlane = Callable[..., RunningPlane]


@pytest.fixture
def database() -> Iterator[str]:
    with scratch_database() as url:
        yield url


@pytest.fixture
def make_plane(plane_config: Config, database: str, loop_thread: LoopThread, tmp_path: Path) -> Iterator[MakePlane]:
    started: list[RunningPlane] = []

    def make(**changes: Any) -> RunningPlane:
        # Notifications alone are under test (config_reload_s=0): the periodic rebuild would hide a lost one.
        shared = {"database_url": database, "secret_key": SECRET, "config_reload_s": 0}
        config = plane_config.replace(data_dir=tmp_path / f"plane-{len(started)}", **(shared | changes))

        async def start() -> Server:
            server = Server(config)
            await server.startup()
            return server

        server = loop_thread.run(start())
        running = RunningPlane(server, loop_thread, AdminClient(server.url, ADMIN_KEY))
        started.append(running)
        return running

    yield make
    for running in started:
        running.admin.close()
        if running.server.runner.server is not None:
            running.stop()


def seconds_until(check: Callable[[], bool], limit_s: float = PROPAGATION_LIMIT_S) -> float:
    """How long `check` took to hold, polled every 5 ms; fails past `limit_s`."""
    start = time.monotonic()
    while not check():
        elapsed = time.monotonic() - start
        assert elapsed < limit_s, f"not in force after {elapsed:.3f}s"
        time.sleep(0.005)
    return time.monotonic() - start


def chat_status_at(url: str, api_key: str) -> int:
    response = httpx.post(f"{url}/v1/chat/completions", json=BODY, headers={"Authorization": f"Bearer {api_key}"})
    return response.status_code


def chat_status(plane: RunningPlane, api_key: str) -> int:
    return chat_status_at(plane.url, api_key)


def admin_status(plane: RunningPlane, admin_key: str) -> int:
    response = httpx.get(f"{plane.url}/admin/v1/orgs", headers={"Authorization": f"Bearer {admin_key}"})
    return response.status_code


def set_up_org(plane: RunningPlane, upstream: MockUpstream) -> str:
    plane.create_org("acme")
    plane.add_provider("mock-a", upstream)
    return plane.create_key("acme")


def listener_pid(plane: RunningPlane) -> int:
    watcher = plane.server.plane.config_watcher
    seconds_until(lambda: watcher.backend_pid is not None, limit_s=10)
    assert watcher.backend_pid is not None
    return watcher.backend_pid


def terminate_backend(pid: int) -> None:
    with psycopg.connect(SERVER, autocommit=True) as conn:
        conn.execute("SELECT pg_terminate_backend(%s)", (pid,))


def test_a_provider_added_through_one_plane_is_served_by_another_within_a_second(
    make_plane: MakePlane, upstream: MockUpstream
) -> None:
    a, b = make_plane(), make_plane()
    a.create_org("acme")
    key = a.create_key("acme")
    seconds_until(lambda: chat_status(b, key) == 404)  # B knows the key; no provider serves the model yet
    a.add_provider("mock-a", upstream)
    seconds_until(lambda: chat_status(b, key) == 200)


def test_a_provider_added_through_one_plane_process_is_served_by_another_within_a_second(
    database: str, upstream: MockUpstream, tmp_path: Path
) -> None:
    env = {"HATCHWAY_DATABASE_URL": database, "HATCHWAY_SECRET_KEY": SECRET, "HATCHWAY_ADMIN_KEY": ADMIN_KEY}
    with contextlib.ExitStack() as stack:
        a = PlaneProcess(tmp_path / "a", env=env)
        stack.callback(a.terminate)
        b = PlaneProcess(tmp_path / "b", env=env)
        stack.callback(b.terminate)
        admin = AdminClient(a.url, ADMIN_KEY)
        stack.callback(admin.close)
        admin.post("/orgs", {"name": "acme"})
        key = admin.post("/keys", {"org": "acme"})["key"]
        seconds_until(lambda: chat_status_at(b.url, key) == 404)
        provider = {"org": "acme", "name": "mock-a", "base_url": upstream.url, "api_keys": ["sk"], "models": [MODEL]}
        admin.post("/providers", provider)
        seconds_until(lambda: chat_status_at(b.url, key) == 200)


def test_a_key_revoked_on_one_plane_is_refused_by_another_within_a_second(
    make_plane: MakePlane, upstream: MockUpstream
) -> None:
    a, b = make_plane(), make_plane()
    key = set_up_org(a, upstream)
    seconds_until(lambda: chat_status(b, key) == 200)
    key_id = a.admin.get("/keys")["data"][0]["id"]
    a.admin.post(f"/keys/{key_id}/revoke", {})
    seconds_until(lambda: chat_status(b, key) == 401)


def test_an_admin_key_rotated_on_one_plane_is_refused_by_another_within_a_second(make_plane: MakePlane) -> None:
    a = make_plane(admin_key="")
    first = a.server.plane.generated_admin_key
    assert first is not None
    b = make_plane(admin_key="")
    assert admin_status(b, first) == 200
    rotated = httpx.post(f"{a.url}/admin/v1/admin-key/rotate", headers={"Authorization": f"Bearer {first}"})
    assert rotated.status_code == 201
    seconds_until(lambda: admin_status(b, first) == 401)
    assert admin_status(b, rotated.json()["key"]) == 200


@dataclass
class ConnectedNode:
    """Planes A and B, and a node enrolled and connected through B (with B's certificate pinned)."""

    a: RunningPlane
    b: RunningPlane
    node_id: str
    credential: str
    session: Session
    agent_loop: LoopThread


@pytest.fixture
def connected_node(make_plane: MakePlane) -> Iterator[ConnectedNode]:
    a, b = make_plane(), make_plane()
    a.create_org("acme")
    token = b.admin.post("/node-tokens", {"org": "acme"})["token"]
    agent_loop = LoopThread()
    agent = HostileAgent(f"127.0.0.1:{b.server.plane.grpc_port}", token)
    enrolled = agent_loop.run(agent.enroll())
    session = agent_loop.run(agent.connect(hello()))
    yield ConnectedNode(a, b, enrolled.node_id, enrolled.credential, session, agent_loop)
    agent_loop.run(session.close())
    agent_loop.close()


def test_a_node_revoked_through_one_plane_is_dropped_by_the_plane_it_is_connected_to(
    connected_node: ConnectedNode,
) -> None:
    node = connected_node
    node.a.admin.post(f"/nodes/{node.node_id}/revoke", {})
    node.agent_loop.run(node.session.ended(timeout_s=PROPAGATION_LIMIT_S))
    assert node.node_id not in node.b.server.plane.registry.sessions


def test_a_node_re_enrolled_through_one_plane_loses_the_session_its_old_credential_holds_on_another(
    connected_node: ConnectedNode,
) -> None:
    node = connected_node
    token = node.a.admin.post("/node-tokens", {"org": "acme"})["token"]
    again = HostileAgent(f"127.0.0.1:{node.a.server.plane.grpc_port}", token)
    enrolled = node.agent_loop.run(again.enroll(previous_credential=node.credential))
    assert enrolled.node_id == node.node_id
    node.agent_loop.run(node.session.ended(timeout_s=PROPAGATION_LIMIT_S))
    assert node.node_id not in node.b.server.plane.registry.sessions


def test_a_node_drained_through_one_plane_is_drained_by_the_plane_it_is_connected_to(
    connected_node: ConnectedNode,
) -> None:
    node = connected_node
    node.a.admin.post(f"/nodes/{node.node_id}/drain", {})
    seconds_until(lambda: node.b.server.plane.registry.sessions[node.node_id].drained)


def test_a_plane_does_not_rebuild_for_its_own_announcements(make_plane: MakePlane, upstream: MockUpstream) -> None:
    a, b = make_plane(), make_plane()
    key = set_up_org(a, upstream)
    seconds_until(lambda: chat_status(b, key) == 200)
    assert b.server.plane.config_watcher.notifications > 0
    assert a.server.plane.config_watcher.notifications == 0


def test_the_listener_comes_back_after_its_connection_is_killed_and_still_propagates(
    make_plane: MakePlane, upstream: MockUpstream
) -> None:
    a, b = make_plane(), make_plane()
    a.create_org("acme")
    key = a.create_key("acme")
    watcher = b.server.plane.config_watcher
    terminate_backend(listener_pid(b))
    seconds_until(lambda: watcher.reconnects == 1 and watcher.connected, limit_s=10)
    a.add_provider("mock-a", upstream)
    seconds_until(lambda: chat_status(b, key) == 200)


def test_a_change_nobody_announced_is_picked_up_when_the_listener_reconnects(
    make_plane: MakePlane, upstream: MockUpstream, database: str
) -> None:
    a, b = make_plane(), make_plane()
    key = set_up_org(a, upstream)
    seconds_until(lambda: chat_status(b, key) == 200)
    # Written by hand, as in psql: no plane announces it, so B only learns it by reading everything again.
    with psycopg.connect(database.replace("+psycopg", ""), autocommit=True) as conn:
        conn.execute("UPDATE api_key SET revoked_at = now()")
    assert chat_status(b, key) == 200
    terminate_backend(listener_pid(b))
    seconds_until(lambda: chat_status(b, key) == 401, limit_s=10)


def test_planes_sharing_a_sqlite_file_see_each_others_changes_at_the_periodic_reload(
    make_plane: MakePlane, upstream: MockUpstream, tmp_path: Path
) -> None:
    shared = f"sqlite:///{tmp_path / 'shared.db'}"
    a = make_plane(database_url=shared, config_reload_s=0.2)
    b = make_plane(database_url=shared, config_reload_s=0.2)
    key = set_up_org(a, upstream)
    seconds_until(lambda: chat_status(b, key) == 200, limit_s=5)
    assert b.server.plane.config_watcher.url is None  # SQLite: no listener, the period alone


def test_readyz_fails_while_the_database_refuses_connections_and_recovers(make_plane: MakePlane, database: str) -> None:
    plane = make_plane()
    name = database.rsplit("/", 1)[1]
    assert httpx.get(f"{plane.url}/readyz").status_code == 200
    with psycopg.connect(SERVER, autocommit=True) as conn:
        conn.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false')
        conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (name,))
        try:
            seconds_until(lambda: httpx.get(f"{plane.url}/readyz").status_code == 503, limit_s=10)
            answer = httpx.get(f"{plane.url}/readyz").json()
            assert answer["error"]["message"].startswith("storage unreachable")
        finally:
            conn.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')
    seconds_until(lambda: httpx.get(f"{plane.url}/readyz").status_code == 200, limit_s=10)


def test_readyz_asks_the_database_at_most_once_a_second_however_often_it_is_probed(make_plane: MakePlane) -> None:
    plane = make_plane()
    probe = plane.server.plane.storage_probe
    before = probe.checks
    start = time.monotonic()
    with httpx.Client() as client:
        for _ in range(50):
            assert client.get(f"{plane.url}/readyz").status_code == 200
    elapsed = time.monotonic() - start
    assert probe.checks - before <= elapsed + 1
