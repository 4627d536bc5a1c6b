"""Generation speed measured on a node's own jobs: the agent's average (agent.speed, a real llama.cpp job), and the
plane's use of it: kept bounded from Status, shown by the admin API and /metrics, carried to other planes, used to
prefer the faster of two free nodes and to order node pools under `fastest` (server.routing.rules)."""

from __future__ import annotations

import math
from collections.abc import Iterator

import pytest

from agent.config import AgentConfig
from agent.connection import Agent
from agent.engine import End, Engine, Job
from agent.models import ModelConfig
from agent.speed import MIN_TOKENS, SpeedMeter
from proto.hatchway.node.v1 import node_pb2 as pb
from server.api.admin_api import _with_live_state
from server.fleet.remote import RemoteSession
from server.fleet.wire import describe
from server.metrics import NodeCollector
from server.nodes.bounds import MAX_TOKENS_PER_S, check_status
from server.nodes.registry import NodeRegistry, NodeSession
from server.routing.failover import FailoverPolicy
from server.routing.health import Health
from server.routing.rules import NOMINAL_ANSWER_TOKENS, Router, RouteRule
from server.targets.node import NodePoolTarget
from tests.agent.conftest import SMOLLM2, started

MODEL = "m"
# SmolLM2's special tokens (<|endoftext|>, <|im_start|>, <|im_end|>), banned so that a job generates max_tokens.
NO_END = {"0": -100, "1": -100, "2": -100}


# -- the agent ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def engine() -> Iterator[Engine]:
    with started(ModelConfig(SMOLLM2, name="smol", slots=1, context=512, threads=2)) as engine:
        yield engine


async def complete(engine: Engine, max_tokens: int) -> End:
    body = {"model": "smol", "prompt": "1, 2, 3,", "max_tokens": max_tokens, "temperature": 0, "logit_bias": NO_END}
    events = [event async for event in engine.generate(Job("completions", body))]
    end = events[-1]
    assert isinstance(end, End)
    return end


async def test_a_long_enough_job_updates_the_model_s_measured_speed(engine: Engine) -> None:
    before = engine.speed.get("smol")
    end = await complete(engine, MIN_TOKENS + 2)
    assert end.completion_tokens == MIN_TOKENS + 2
    (status,) = engine.status()
    assert status.speed is not None and status.speed.tokens_per_s > 0
    assert status.speed.jobs == (before.jobs if before else 0) + 1


async def test_a_short_job_is_not_measured(engine: Engine) -> None:
    before = engine.speed.get("smol")
    end = await complete(engine, MIN_TOKENS - 2)
    assert end.completion_tokens == MIN_TOKENS - 2
    assert engine.speed.get("smol") == before


async def test_the_status_carries_the_measured_speed(engine: Engine) -> None:
    await complete(engine, MIN_TOKENS + 2)
    agent = Agent(AgentConfig(), engine)
    sent: list[pb.AgentMessage] = []
    agent._send = lambda message, written=None: sent.append(message)  # type: ignore[method-assign]
    agent._send_status()
    (load,) = sent[0].status.models
    speed = engine.speed.get("smol")
    assert speed is not None and load.jobs_measured == speed.jobs >= 1
    assert load.tokens_per_s == pytest.approx(speed.tokens_per_s)


def test_the_average_weighs_recent_jobs_most() -> None:
    meter = SpeedMeter(alpha=0.5)
    assert meter.record("m", 11, 1.0)  # 10 tokens after the first in one second
    assert meter.record("m", 31, 1.0)
    speed = meter.get("m")
    assert speed is not None and speed.jobs == 2 and speed.tokens_per_s == pytest.approx(20.0)
    assert not meter.record("m", 100, 0.0) and not meter.record("m", 100, math.nan)


# -- the plane ------------------------------------------------------------------------------------


def session(node_id: str, slots: int = 2) -> NodeSession:
    hello = pb.Hello(models=[pb.ModelInfo(name=MODEL, slots=slots, context_per_slot=512)])
    return NodeSession(node_id=node_id, org_id="org", name=node_id, hello=hello, heartbeat_s=5)


def status(version: int, tokens_per_s: float, jobs: int = 3, slots: int = 2) -> pb.Status:
    load = pb.ModelLoad(name=MODEL, slots_total=slots, tokens_per_s=tokens_per_s, jobs_measured=jobs)
    return pb.Status(version=version, models=[load])


def registry(*sessions: NodeSession) -> NodeRegistry:
    nodes = NodeRegistry(queue_size=2, queue_timeout_s=0.5, cancel_timeout_s=0.2)
    for s in sessions:
        nodes.register(s)
    return nodes


def measured(nodes: NodeRegistry, node: NodeSession, version: int, tokens_per_s: float) -> None:
    report = status(version, tokens_per_s)
    check_status(report)
    nodes.update_status(node, report)


def test_a_status_s_measured_speed_is_kept_per_model() -> None:
    node = session("n1")
    nodes = registry(node)
    measured(nodes, node, 1, 42.5)
    assert node.models[MODEL].tokens_per_s == pytest.approx(42.5) and node.models[MODEL].jobs_measured == 3


@pytest.mark.parametrize("sent", [math.inf, math.nan, -5.0])
def test_a_speed_that_is_no_number_or_negative_counts_as_unmeasured(sent: float) -> None:
    node = session("n1")
    nodes = registry(node)
    measured(nodes, node, 1, sent)
    assert node.models[MODEL].tokens_per_s is None and node.models[MODEL].jobs_measured == 0


def test_a_speed_over_the_bound_is_clamped() -> None:
    report = status(1, 1e12)
    check_status(report)
    assert report.models[0].tokens_per_s == MAX_TOKENS_PER_S


def test_the_admin_view_and_metrics_show_the_measured_speed() -> None:
    node = session("n1")
    nodes = registry(node)
    measured(nodes, node, 1, 42.5)
    shown = _with_live_state(nodes, {"id": "n1", "revoked_at": None})
    assert shown["models"][0]["tokens_per_s"] == 42.5 and shown["models"][0]["jobs_measured"] == 3
    families = {family.name: family for family in NodeCollector(nodes).collect()}
    (sample,) = families["hatchway_node_tokens_per_second"].samples
    assert sample.labels == {"node": "n1", "model": MODEL, "plane": ""} and sample.value == pytest.approx(42.5)


async def test_the_faster_of_two_free_nodes_gets_the_job() -> None:
    slow, fast = session("slow"), session("fast")
    nodes = registry(slow, fast)
    measured(nodes, slow, 1, 10.0)
    measured(nodes, fast, 1, 80.0)
    job = await nodes.dispatch("org", MODEL, "chat/completions", b"{}", None)
    assert job.session is fast


async def test_a_node_without_a_measurement_gets_jobs_first_so_that_it_is_measured() -> None:
    known, new = session("known"), session("new")
    nodes = registry(known, new)
    measured(nodes, known, 1, 80.0)
    job = await nodes.dispatch("org", MODEL, "chat/completions", b"{}", None)
    assert job.session is new


async def test_a_conversation_keeps_its_node_as_the_measured_speed_drifts() -> None:
    a, b = session("a"), session("b")
    nodes = registry(a, b)
    measured(nodes, a, 1, 40.0)
    measured(nodes, b, 1, 40.0)
    homes = {}
    for i in range(20):
        job = await nodes.dispatch("org", MODEL, "chat/completions", b"{}", f"conversation-{i}")
        homes[i] = job.session.node_id
        nodes.release(job)
    measured(nodes, a, 2, 44.0)  # the same power of two: no home moves
    for i in range(20):
        job = await nodes.dispatch("org", MODEL, "chat/completions", b"{}", f"conversation-{i}")
        assert job.session.node_id == homes[i]
        nodes.release(job)


def test_another_plane_sees_the_measured_speed() -> None:
    node = session("n1")
    nodes = registry(node)
    measured(nodes, node, 1, 42.5)
    remote = RemoteSession(node_id="n1", org_id="org", name="n1", hello=pb.Hello(), heartbeat_s=5)
    remote.advertise(describe(node, full=False), "plane-a", None)
    assert remote.models[MODEL].tokens_per_s == pytest.approx(42.5) and remote.models[MODEL].jobs_measured == 3


def test_an_advertisement_without_speeds_leaves_them_unmeasured() -> None:
    doc = describe(session("n1"), full=False)
    assert "speeds" in doc and not doc["speeds"]
    del doc["speeds"]  # an older plane's
    remote = RemoteSession(node_id="n1", org_id="org", name="n1", hello=pb.Hello(), heartbeat_s=5)
    remote.advertise(doc, "plane-a", None)
    assert remote.models[MODEL].tokens_per_s is None


def test_fastest_places_an_unmeasured_node_pool_by_its_nodes_speed() -> None:
    health = Health()
    fast_node, slow_node = session("fast"), session("slow")
    fast_node.org_id = "fast-org"
    nodes = registry(fast_node, slow_node)
    measured(nodes, fast_node, 1, 100.0)
    measured(nodes, slow_node, 1, 10.0)
    fast = NodePoolTarget(nodes, "fast-org", MODEL, FailoverPolicy())
    slow = NodePoolTarget(nodes, "org", MODEL, FailoverPolicy())
    router = Router(health)
    rule = RouteRule(MODEL, strategy="fastest")
    assert router.order((slow, fast), rule, streaming=True) == (fast, slow)
    # Whole answers: as the latency of a nominal answer at that speed, against a target's measured latency.
    assert router._speed(fast, streaming=False) == (NOMINAL_ANSWER_TOKENS / 100.0, 0.0)
    assert router.order((slow, fast), rule, streaming=False) == (fast, slow)
