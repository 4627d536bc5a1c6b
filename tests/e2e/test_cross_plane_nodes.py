"""A node connected to one plane serves requests made to another (issue 17), with the real agent and model,
two planes on one PostgreSQL database, and the real NATS between them (server.fleet)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest

from server.config import Config
from tests.conftest import NATS, Planes, RunningPlane, abandon_request, eventually, usage_report
from tests.support.agent_process import DEMO_MODEL, AgentProcess, describe
from tests.support.served_nodes import COUNTING, QUESTION

# Far longer than the tests wait for a slot to be free: a slot free in time was freed by the node's own JobEnd,
# sent when it stopped generating, not by the plane giving up on it.
CANCEL_TIMEOUT_S = 60.0
CONTEXT = 1024  # tests/support/agent_process.py runs agents with --context 1024


@pytest.fixture
def plane_config(plane_config: Config, nats_prefix: str) -> Config:
    return plane_config.replace(
        nats_url=NATS,
        nats_prefix=nats_prefix,
        node_heartbeat_s=0.5,
        node_queue_timeout_s=2.0,
        ttft_timeout_s=20.0,
        node_cancel_timeout_s=CANCEL_TIMEOUT_S,
        metrics_public=True,
    )


@dataclass
class CrossPlane:
    a: RunningPlane  # the node's plane
    b: RunningPlane  # the plane the requests go to
    agent: AgentProcess
    node_id: str
    key: str

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.b.v1, api_key=self.key, max_retries=0)


@pytest.fixture
def cross(planes: Planes, tmp_path: Path) -> Iterator[CrossPlane]:
    a, b = planes.start(plane_name="plane-a"), planes.start(plane_name="plane-b")
    a.create_org("acme")
    key = b.create_key("acme")
    agent = AgentProcess(tmp_path, "node-a")
    token = a.admin.post("/node-tokens", {"org": "acme"})["token"]
    enrolled = agent.enroll(f"127.0.0.1:{a.server.plane.grpc_port}", token)
    assert enrolled.returncode == 0, describe(enrolled)
    agent.start()
    try:
        eventually(lambda: len(a.server.plane.registry.sessions) == 1, what=f"the agent to connect:\n{agent.output}")
        node_id = next(iter(a.server.plane.registry.sessions))
        eventually(lambda: node_id in b.server.plane.registry.remote, timeout_s=5, what="plane b to see the node")
        yield CrossPlane(a, b, agent, node_id, key)
    finally:
        agent.stop()


def test_a_node_connected_to_one_plane_answers_a_streamed_request_made_to_another(cross: CrossPlane) -> None:
    raw = cross.client().chat.completions.with_raw_response.create(
        model=DEMO_MODEL, messages=QUESTION, temperature=0, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(raw.parse())
    assert raw.headers["x-hatchway-route"] == cross.node_id
    assert "Paris" in "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0
    eventually(lambda: cross.a.server.plane.registry.busy_slots() == 0, timeout_s=5, what="the node's slot to be free")


def test_a_node_connected_to_one_plane_answers_a_whole_request_made_to_another(cross: CrossPlane) -> None:
    completion = cross.client().completions.create(model=DEMO_MODEL, prompt="The capital of France is", max_tokens=8)
    assert completion.choices[0].text and completion.usage is not None


def test_a_client_leaving_the_other_plane_stops_the_generation_on_the_node(cross: CrossPlane) -> None:
    body = {"model": DEMO_MODEL, "prompt": COUNTING, "max_tokens": 4000, "stream": True, "temperature": 0}
    abandon_request(f"{cross.b.v1}/completions", body, cross.key, after_s=1.5)
    left = time.monotonic()
    registry = cross.a.server.plane.registry
    eventually(lambda: registry.busy_slots() == 0, timeout_s=10, what="the node to stop generating")
    assert time.monotonic() - left < CANCEL_TIMEOUT_S  # freed by the node's JobEnd, not the plane's timeout
    remote = cross.b.server.plane.registry.remote[cross.node_id]
    eventually(lambda: remote.models[DEMO_MODEL].busy == 0, timeout_s=5, what="plane b to count the slot free")
    # Billed by the plane the client left, from the node's own count: it stopped long before its context (1,024
    # tokens for this agent) would have ended the generation.
    [report] = usage_report(cross.b, 1, by="node")
    assert 0 < report["completion_tokens"] < CONTEXT // 2


def test_every_plane_lists_the_node_with_the_plane_it_is_connected_to(cross: CrossPlane) -> None:
    for plane in (cross.a, cross.b):
        listed = {n["id"]: n for n in plane.admin.get("/nodes")["data"]}
        assert listed[cross.node_id]["plane"] == "plane-a"
        assert listed[cross.node_id]["state"] == "ready"
        metrics = httpx.get(f"{plane.url}/metrics").text
        assert f'hatchway_node_connected{{node="{cross.node_id}",org=' in metrics
        assert 'plane="plane-a"' in metrics
