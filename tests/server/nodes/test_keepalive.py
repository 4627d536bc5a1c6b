"""A node link whose peer vanished without a reset is found dead within seconds, from either end, by gRPC
keepalive pings: the plane drops the session (its jobs fail over), the agent reconnects.

Between the two sits tests/support/freezing_proxy.py, which stops forwarding without closing anything."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from agent.idle import OwnerLoad
from server.config import Config
from tests.conftest import RunningPlane, eventually
from tests.support.freezing_proxy import FreezingProxy
from tests.support.hostile_agent import HostileAgent, hello
from tests.support.live_agent import LiveAgent, ScriptedLoad
from tests.support.loop_thread import LoopThread

# "Within seconds": pings every second or two, answered within as long; generous for a loaded machine, and far
# below what TCP alone takes to notice (minutes, or never for an idle connection).
FOUND_WITHIN_S = 15.0


@pytest.fixture
def plane_config(plane_config: Config) -> Config:
    return plane_config.replace(node_keepalive_s=1.0)


@pytest.fixture
def proxy(plane: RunningPlane, loop_thread: LoopThread) -> Iterator[FreezingProxy]:
    proxy = FreezingProxy(f"127.0.0.1:{plane.server.plane.grpc_port}")
    loop_thread.run(proxy.start())
    yield proxy
    loop_thread.run(proxy.stop())


def test_the_plane_drops_a_session_whose_agent_vanished_without_a_reset(
    plane: RunningPlane, proxy: FreezingProxy
) -> None:
    plane.create_org("acme")
    token = plane.admin.post("/node-tokens", {"org": "acme"})["token"]
    # The hostile agent sends no pings of its own and no heartbeats: only the plane's pings can find it gone.
    agent, loop = HostileAgent(proxy.address, token), LoopThread(timeout_s=60)
    try:
        loop.run(agent.enroll())
        session = loop.run(agent.connect(hello()))
        registry = plane.server.plane.registry
        eventually(lambda: len(registry.sessions) == 1, what="the session")
        proxy.freeze()
        frozen = time.monotonic()
        eventually(lambda: not registry.sessions, timeout_s=FOUND_WITHIN_S, what="the plane to drop the session")
        assert time.monotonic() - frozen < FOUND_WITHIN_S
        loop.run(session.close())
    finally:
        loop.close()


def test_an_agent_whose_plane_vanished_without_a_reset_reconnects(plane: RunningPlane, proxy: FreezingProxy) -> None:
    # The plane's own pings are slow here (its config's default), so it is the agent that must notice.
    plane.restart(plane.server.config.replace(node_keepalive_s=60.0))
    plane.create_org("acme")
    agent = LiveAgent.enrolled(plane, address=proxy.address, load=ScriptedLoad([(0.0, OwnerLoad(0.0))]))
    try:
        agent.start(keepalive_s=2.0)
        first, dialled = agent.session(), proxy.connections
        proxy.freeze()
        frozen = time.monotonic()
        eventually(
            lambda: agent.connected() and agent.session() is not first,
            timeout_s=FOUND_WITHIN_S,
            what="the agent to reconnect",
        )
        assert time.monotonic() - frozen < FOUND_WITHIN_S and proxy.connections == dialled + 1
    finally:
        agent.stop()
