"""idle-only mode keeps to the configured delays: the owner's load is read about once a second, whatever the
heartbeat, and a pending change is decided the moment its delay runs out.

`IdleGate` is driven by a scripted clock and load; then a real agent (agent.connection.Agent, in this process, no
model loaded) with a scripted load source is connected to a real plane over TLS whose heartbeat is 30 s."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from agent.config import IdleThresholds
from agent.idle import SAMPLE_INTERVAL_S, IdleGate, OwnerLoad
from server.config import Config
from tests.conftest import RunningPlane, eventually
from tests.support.live_agent import LiveAgent, ScriptedLoad

IDLE = OwnerLoad(cpu_percent=5)
BUSY = OwnerLoad(cpu_percent=95)
THRESHOLDS = IdleThresholds(cpu_percent=50, gpu_percent=50, pause_after_s=1.0, resume_after_s=2.0)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def run_gate(gate: IdleGate, clock: Clock, load: ScriptedLoad, until_s: float) -> list[tuple[float, bool]]:
    """Read the gate when it says the next reading is due, as the agent does; (time, paused) at each change."""
    changes = []
    start = clock.now
    while clock.now - start < until_s:
        clock.now += gate.due_in()
        load.now = clock.now - start
        if gate.update():
            changes.append((round(clock.now - start, 3), gate.paused))
    return changes


def test_a_pause_comes_within_a_reading_of_its_delay() -> None:
    clock, load = Clock(), ScriptedLoad([(0.0, IDLE), (3.3, BUSY)])
    changes = run_gate(IdleGate(THRESHOLDS, load, clock), clock, load, until_s=10)
    ((at, paused),) = changes
    assert paused and 3.3 + 1.0 <= at <= 3.3 + 1.0 + SAMPLE_INTERVAL_S


def test_a_resume_comes_within_a_reading_of_its_delay() -> None:
    clock, load = Clock(), ScriptedLoad([(0.0, BUSY), (5.5, IDLE)])
    changes = run_gate(IdleGate(THRESHOLDS, load, clock), clock, load, until_s=12)
    assert changes[0][1] is True and changes[1][1] is False
    assert 5.5 + 2.0 <= changes[1][0] <= 5.5 + 2.0 + SAMPLE_INTERVAL_S


def test_a_spike_shorter_than_the_pause_delay_changes_nothing() -> None:
    clock, load = Clock(), ScriptedLoad([(0.0, IDLE), (2.2, BUSY), (2.9, IDLE)])
    assert run_gate(IdleGate(THRESHOLDS, load, clock), clock, load, until_s=10) == []


def test_a_spike_of_a_few_seconds_pauses_then_resumes() -> None:
    clock, load = Clock(), ScriptedLoad([(0.0, IDLE), (2.0, BUSY), (5.0, IDLE)])
    changes = run_gate(IdleGate(THRESHOLDS, load, clock), clock, load, until_s=12)
    assert [paused for _, paused in changes] == [True, False]


@pytest.fixture
def plane_config(plane_config: Config) -> Config:
    # A heartbeat far longer than the delays: a gate read on the heartbeat would take 30 s to pause.
    return plane_config.replace(node_heartbeat_s=30.0)


@pytest.fixture
def live_agent(plane: RunningPlane) -> Iterator[LiveAgent]:
    plane.create_org("acme")
    thresholds = IdleThresholds(cpu_percent=50, gpu_percent=50, pause_after_s=1.0, resume_after_s=1.0)
    agent = LiveAgent.enrolled(plane, mode="idle-only", idle=thresholds, load=ScriptedLoad([(0.0, IDLE)]))
    yield agent
    agent.stop()


def test_an_idle_only_node_pauses_and_resumes_within_seconds_of_its_delays(live_agent: LiveAgent) -> None:
    live_agent.start()
    session = live_agent.session()
    assert session.state == "ready"
    live_agent.load.set(BUSY)
    started = time.monotonic()
    eventually(lambda: live_agent.session().state == "idle-paused", timeout_s=20, what="the pause")
    paused_after = time.monotonic() - started
    live_agent.load.set(IDLE)
    started = time.monotonic()
    eventually(lambda: live_agent.session().state == "ready", timeout_s=20, what="the resume")
    resumed_after = time.monotonic() - started
    # 1 s delays, read every second: well inside 10 s on a loaded machine, and a third of the 30 s heartbeat.
    assert paused_after < 10 and resumed_after < 10, (paused_after, resumed_after)
