"""The circuit breaker from outside: a target whose breaker opened comes back after any probe, and what the
plane learnt about a node pool (breaker, latency) outlives a configuration reload."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pytest

from server.config import Config
from server.routing.health import Breaker, BreakerState
from server.targets.node import pool_key
from tests.conftest import MODEL, RunningPlane, abandon_request, eventually
from tests.server.routing.test_failover import Pair
from tests.support.agent_process import DEMO_MODEL
from tests.support.mock_upstream import Fault, MockUpstream
from tests.support.served_nodes import QUESTION, Nodes

COOLDOWN_S = 1.0


@pytest.fixture
def plane_config(plane_config: Config) -> Config:
    return plane_config.replace(breaker_cooldown_s=COOLDOWN_S, request_deadline_s=20.0)


@pytest.fixture
def pair(plane: RunningPlane, make_upstream: Callable[..., MockUpstream]) -> Pair:
    """`primary` then `backup`; the primary's breaker opens after two failures, and nothing is retried."""
    plane.create_org()
    primary, backup = make_upstream("primary"), make_upstream("backup")
    plane.add_provider("primary", primary, policy={"breaker_failures": 2, "max_retries": 0})
    plane.add_provider("backup", backup)
    return Pair(plane, primary, backup, plane.create_key())


def open_primary_breaker(pair: Pair) -> None:
    """Fail the primary until its breaker opens (the backup serves meanwhile), then let the cool-down pass."""
    pair.primary.always = Fault("status", status=503)
    for _ in range(2):
        assert pair.chat().headers["x-hatchway-route"] == "backup"
    tried = len(pair.primary.requests)
    assert pair.chat().headers["x-hatchway-route"] == "backup"
    assert len(pair.primary.requests) == tried, "the breaker should be open"
    pair.primary.always = None
    time.sleep(COOLDOWN_S + 0.1)


@pytest.mark.parametrize("status", [400, 401, 403, 404])
def test_a_probe_answered_with_a_client_error_brings_the_target_back(pair: Pair, status: int) -> None:
    open_primary_breaker(pair)
    pair.primary.faults = [Fault("status", status=status)]
    tried = len(pair.primary.requests)
    pair.chat()  # the probe: the primary answers, with an error about the request
    assert len(pair.primary.requests) == tried + 1
    for _ in range(3):
        assert pair.chat().headers["x-hatchway-route"] == "primary"


def test_a_probe_answered_with_a_server_error_opens_the_breaker_for_another_cool_down(pair: Pair) -> None:
    open_primary_breaker(pair)
    pair.primary.faults = [Fault("status", status=503)]
    assert pair.chat().headers["x-hatchway-route"] == "backup"  # the probe failed over
    tried = len(pair.primary.requests)
    assert pair.chat().headers["x-hatchway-route"] == "backup"
    assert len(pair.primary.requests) == tried
    time.sleep(COOLDOWN_S + 0.1)
    assert pair.chat().headers["x-hatchway-route"] == "primary"


def test_a_probe_whose_client_left_lets_the_next_request_probe(pair: Pair) -> None:
    pair.plane.admin.patch("/providers/primary", {"policy": {"header_timeout_s": 30}})
    open_primary_breaker(pair)
    pair.primary.delay_s = 10
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}
    abandon_request(f"{pair.plane.v1}/chat/completions", body, pair.key, after_s=0.5)
    eventually(lambda: pair.primary.disconnects == 1, what="the abandoned probe to be closed upstream")
    pair.primary.delay_s = 0
    assert pair.chat().headers["x-hatchway-route"] == "primary"


def test_a_probe_that_never_reports_back_holds_the_target_for_one_cool_down_at_most() -> None:
    breaker = Breaker()
    breaker.failed(0.0, threshold=1)
    assert breaker.admits(10.0, cooldown_s=10)  # a probe whose verdict is lost
    assert not breaker.admits(15.0, cooldown_s=10)
    assert breaker.admits(20.0, cooldown_s=10)
    breaker.succeeded()
    assert breaker.state is BreakerState.CLOSED


def test_a_node_pools_breaker_and_latency_survive_a_configuration_reload(plane: RunningPlane, tmp_path: Path) -> None:
    org = plane.create_org("acme")
    nodes = Nodes(plane, tmp_path, plane.create_key("acme"))
    try:
        nodes.started("node-a")
        nodes.client().chat.completions.create(model=DEMO_MODEL, messages=QUESTION, max_tokens=4)
        health = plane.server.plane.health
        learnt = health.stats(pool_key(org["id"], DEMO_MODEL))
        assert learnt.latency_s is not None
        plane.create_org("other")  # any admin change rebuilds the snapshot
        assert health.stats(pool_key(org["id"], DEMO_MODEL)) is learnt
    finally:
        nodes.close()
