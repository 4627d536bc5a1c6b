"""Enrolled machines as capacity: real agent processes with the real model, over real gRPC with TLS."""

from __future__ import annotations

import json
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from server.config import Config
from tests.conftest import RunningPlane, abandon_request, eventually
from tests.support.agent_process import DEMO_MODEL, AgentProcess, describe
from tests.support.mock_upstream import MockUpstream
from tests.support.served_nodes import COUNTING, QUESTION, Nodes, enrolling, for_agents


@pytest.fixture
def plane_config(plane_config: Config) -> Config:
    return for_agents(plane_config)


@pytest.fixture
def nodes(plane: RunningPlane, tmp_path: Path) -> Iterator[Nodes]:
    with enrolling(plane, tmp_path) as nodes:
        yield nodes


def test_agent_answers_through_the_plane_whole_and_streamed(nodes: Nodes) -> None:
    agent = nodes.started("node-a")
    client = nodes.client()
    assert DEMO_MODEL in [m.id for m in client.models.list()]
    raw = client.chat.completions.with_raw_response.create(model=DEMO_MODEL, messages=QUESTION, temperature=0)
    completion = raw.parse()
    assert "Paris" in (completion.choices[0].message.content or "")
    assert raw.headers["x-hatchway-route"] == nodes.node_id(agent)
    assert completion.usage is not None and completion.usage.completion_tokens > 0
    stream = client.chat.completions.create(
        model=DEMO_MODEL, messages=QUESTION, temperature=0, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    assert "Paris" in "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert chunks[-1].usage is not None
    assert nodes.registry.busy_slots() == 0


def test_completions_through_a_node(nodes: Nodes) -> None:
    nodes.started("node-a")
    completion = nodes.client().completions.create(model=DEMO_MODEL, prompt="The capital of France is", max_tokens=8)
    assert completion.choices[0].text


def test_admin_sees_the_node_its_hardware_models_and_slots(nodes: Nodes) -> None:
    agent = nodes.started("node-a", slots=2)
    listing = nodes.plane.admin.get("/nodes")["data"]
    assert [n["name"] for n in listing] == ["node-a"]
    node = nodes.plane.admin.get(f"/nodes/{nodes.node_id(agent)}")
    assert node["state"] == "ready"
    assert node["hardware"]["cpu_count"] > 0 and node["hardware"]["nvml_status"]
    (model,) = node["models"]
    expected = {"name": DEMO_MODEL, "slots_total": 2, "slots_busy": 0, "context": 1024}
    expected |= {"price_in": None, "price_out": None}
    assert {key: model[key] for key in expected} == expected  # and what the node measured or placed (other tests)
    assert node["last_heartbeat_s"] < 5


def test_two_agents_share_the_load(nodes: Nodes) -> None:
    first, second = nodes.started("node-a"), nodes.started("node-b")
    routes: list[str] = []

    def ask() -> None:
        raw = nodes.client().completions.with_raw_response.create(
            model=DEMO_MODEL, prompt=COUNTING, max_tokens=40, temperature=0
        )
        routes.append(raw.headers["x-hatchway-route"])

    callers = [threading.Thread(target=ask) for _ in range(2)]
    for caller in callers:
        caller.start()
    for caller in callers:
        caller.join(120)
    assert sorted(routes) == sorted([nodes.node_id(first), nodes.node_id(second)])
    assert nodes.registry.busy_slots() == 0


def test_client_leaving_a_stream_stops_generation_and_frees_the_slot(nodes: Nodes) -> None:
    nodes.started("node-a")
    body = {"model": DEMO_MODEL, "prompt": COUNTING, "max_tokens": 1000, "temperature": 0, "stream": True}
    with httpx.stream(
        "POST", f"{nodes.plane.v1}/completions", json=body, headers={"Authorization": f"Bearer {nodes.key}"}
    ) as response:
        lines = response.iter_lines()
        for _ in range(4):
            next(lines)
        assert nodes.registry.busy_slots() == 1
    eventually(lambda: nodes.registry.busy_slots() == 0, timeout_s=10, what="the slot to be released")
    session = next(iter(nodes.registry.sessions.values()))
    eventually(lambda: session.status.models[0].slots_busy == 0, timeout_s=10, what="the agent to stop generating")


def test_client_leaving_a_whole_answer_stops_generation_too(nodes: Nodes) -> None:
    nodes.started("node-a")
    # A count the model keeps going with for far longer than the client waits.
    body = {"model": DEMO_MODEL, "prompt": COUNTING, "max_tokens": 1000, "temperature": 0}
    abandon_request(f"{nodes.plane.v1}/completions", body, nodes.key, after_s=1.0)
    eventually(lambda: nodes.registry.busy_slots() == 0, timeout_s=5, what="the slot to be released")
    session = next(iter(nodes.registry.sessions.values()))
    eventually(lambda: session.status.models[0].slots_busy == 0, timeout_s=5, what="the agent to stop generating")


def test_agent_lost_before_its_first_token_fails_over_to_a_provider(
    nodes: Nodes, make_upstream: Callable[..., MockUpstream]
) -> None:
    agent = nodes.started("node-a")
    nodes.plane.add_provider("backup", make_upstream("backup", reply="from the provider"), models=[DEMO_MODEL])
    nodes.plane.admin.put("/routes", {"org": "acme", "model": DEMO_MODEL, "targets": ["nodes", "backup"]})
    agent.signal(signal.SIGSTOP)  # frozen: the job reaches it but no token ever comes back
    result: dict[str, Any] = {}

    def ask() -> None:
        result["raw"] = nodes.client().chat.completions.with_raw_response.create(model=DEMO_MODEL, messages=QUESTION)

    caller = threading.Thread(target=ask)
    caller.start()
    eventually(lambda: nodes.registry.busy_slots() == 1, what="the job to be dispatched")
    agent.kill()
    caller.join(30)
    raw = result["raw"]
    assert raw.headers["x-hatchway-route"] == "backup"
    assert raw.parse().choices[0].message.content == "from the provider"
    assert nodes.registry.busy_slots() == 0


def test_agent_lost_mid_stream_ends_in_an_error_event_without_done(nodes: Nodes) -> None:
    agent = nodes.started("node-a")
    # Counting at temperature 0 goes on for all 1000 tokens: the answer cannot end before the kill.
    body = {"model": DEMO_MODEL, "prompt": COUNTING, "max_tokens": 1000, "temperature": 0, "stream": True}
    frames = nodes.stream(body, after=5, then=agent.kill)
    assert frames[-1] != "data: [DONE]"
    assert "error" in json.loads(frames[-1].removeprefix("data: "))
    assert nodes.registry.busy_slots() == 0


def test_plane_restart_and_agents_reconnect_by_themselves(nodes: Nodes) -> None:
    agent = nodes.started("node-a")
    nodes.plane.restart()
    eventually(lambda: bool(nodes.registry.sessions), timeout_s=20, what=f"the agent to reconnect:\n{agent.output}")
    completion = nodes.client().chat.completions.create(model=DEMO_MODEL, messages=QUESTION, temperature=0)
    assert "Paris" in (completion.choices[0].message.content or "")


def test_a_wrong_token_is_refused(nodes: Nodes) -> None:
    agent = AgentProcess(nodes.workdir, "intruder")
    fingerprint = nodes.token().rpartition(".")[2]
    result = agent.enroll(nodes.address, f"hwt-made-up.{fingerprint}")
    assert result.returncode == 1
    assert "invalid, expired or revoked" in result.stderr


def test_a_token_for_another_plane_is_refused_before_anything_is_sent(nodes: Nodes) -> None:
    secret = nodes.token().rpartition(".")[0]
    result = AgentProcess(nodes.workdir, "elsewhere").enroll(nodes.address, f"{secret}.{'0' * 64}")
    assert result.returncode == 1
    assert "does not match the token" in result.stderr


def test_an_expired_token_is_refused(nodes: Nodes) -> None:
    token = nodes.token(ttl_s=0.5)
    time.sleep(0.6)
    result = AgentProcess(nodes.workdir, "late").enroll(nodes.address, token)
    assert result.returncode == 1 and "invalid, expired or revoked" in result.stderr


def test_a_used_up_token_is_refused(nodes: Nodes) -> None:
    token = nodes.token(uses=1)
    assert AgentProcess(nodes.workdir, "first").enroll(nodes.address, token).returncode == 0
    result = AgentProcess(nodes.workdir, "second").enroll(nodes.address, token)
    assert result.returncode == 1 and "used up" in result.stderr


def test_re_enrolling_the_same_machine_keeps_its_node_id(nodes: Nodes) -> None:
    agent = nodes.enrolled("node-a")
    first = nodes.node_id(agent)
    result = agent.enroll(nodes.address, nodes.token())
    assert result.returncode == 0, describe(result)
    assert nodes.node_id(agent) == first
    assert len(nodes.plane.admin.get("/nodes")["data"]) == 1


def test_a_revoked_node_is_disconnected_and_its_credential_refused(nodes: Nodes) -> None:
    agent = nodes.started("node-a")
    nodes.plane.admin.post(f"/nodes/{nodes.node_id(agent)}/revoke", {})
    assert agent.wait(30) == 2
    assert "refused this node's credential" in agent.output
    assert nodes.plane.admin.get(f"/nodes/{nodes.node_id(agent)}")["state"] == "revoked"


def test_a_drained_node_gets_no_new_jobs_until_resumed(nodes: Nodes) -> None:
    agent = nodes.started("node-a")
    node_id = nodes.node_id(agent)
    assert nodes.plane.admin.post(f"/nodes/{node_id}/drain", {})["state"] == "draining"
    with pytest.raises(openai.APIStatusError) as refused:
        nodes.client().chat.completions.create(model=DEMO_MODEL, messages=QUESTION, max_tokens=4)
    refused.value.response.close()  # the error keeps its response (and connection) alive otherwise
    assert refused.value.status_code == 503
    nodes.plane.admin.post(f"/nodes/{node_id}/resume", {})
    # In force once the agent confirms it no longer drains (its next Status, milliseconds later).
    eventually(lambda: nodes.plane.admin.get(f"/nodes/{node_id}")["state"] == "ready", timeout_s=5, what="the resume")
    assert nodes.client().chat.completions.create(model=DEMO_MODEL, messages=QUESTION, max_tokens=4).choices


def test_idle_only_mode_pauses_while_the_owner_is_busy_and_resumes(nodes: Nodes) -> None:
    agent = nodes.enrolled("node-a")
    agent.set_idle(cpu_percent=50, gpu_percent=50, pause_after_s=0.5, resume_after_s=1.0)
    load = nodes.workdir / "load.json"
    load.write_text('{"cpu_percent": 5}')
    agent.start("--mode", "idle-only", "--load-probe", str(load))
    eventually(lambda: bool(nodes.registry.sessions), what=f"the agent to connect:\n{agent.output}")
    node_id = nodes.node_id(agent)
    load.write_text('{"cpu_percent": 95}')
    eventually(lambda: nodes.plane.admin.get(f"/nodes/{node_id}")["state"] == "idle-paused", what="the pause")
    with pytest.raises(openai.APIStatusError) as refused:
        nodes.client().chat.completions.create(model=DEMO_MODEL, messages=QUESTION, max_tokens=4)
    refused.value.response.close()
    load.write_text('{"cpu_percent": 5}')
    eventually(lambda: nodes.plane.admin.get(f"/nodes/{node_id}")["state"] == "ready", what="the resume")
    assert nodes.client().chat.completions.create(model=DEMO_MODEL, messages=QUESTION, max_tokens=4).choices


def test_sigterm_drains_the_agent_running_jobs_finish_then_it_exits(nodes: Nodes) -> None:
    agent = nodes.started("node-a")
    body = {
        "model": DEMO_MODEL,
        "prompt": COUNTING,
        "max_tokens": 150,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    frames = nodes.stream(body, after=3, then=lambda: agent.signal(signal.SIGTERM))
    assert frames[-1] == "data: [DONE]", agent.output
    assert json.loads(frames[-2].removeprefix("data: "))["usage"]["completion_tokens"] == 150
    assert agent.wait(30) == 0


def test_the_same_prompt_through_two_providers_and_a_node_costs_side_by_side_and_the_node_earns(
    nodes: Nodes, make_upstream: Callable[..., MockUpstream]
) -> None:
    agent = nodes.started("node-a", "--price-in", "0.5", "--price-out", "0.5")
    for name, price in (("provider-a", 1.0), ("provider-b", 3.0)):
        nodes.plane.add_provider(name, make_upstream(name), models=[DEMO_MODEL], price_in=price, price_out=price)
    prompt = {"model": DEMO_MODEL, "messages": QUESTION, "max_tokens": 8}
    for target in ("provider-a", "provider-b", "nodes"):
        nodes.plane.admin.put("/routes", {"org": "acme", "model": DEMO_MODEL, "targets": [target]})
        response = httpx.post(
            f"{nodes.plane.v1}/chat/completions", json=prompt, headers={"Authorization": f"Bearer {nodes.key}"}
        )
        assert response.status_code == 200, response.text
    node_id = nodes.node_id(agent)

    def report() -> dict[str, dict[str, Any]]:
        return {r["route"]: r for r in nodes.plane.admin.get("/usage", by="route")["data"]}

    eventually(lambda: len(report()) == 3, timeout_s=5, what="three usage rows")
    rows = report()
    assert set(rows) == {"provider-a", "provider-b", node_id}
    for route, price in (("provider-a", 1.0), ("provider-b", 3.0), (node_id, 0.5)):
        row = rows[route]
        assert row["cost_usd"] == pytest.approx((row["prompt_tokens"] + row["completion_tokens"]) * price / 1e6)
    (earned,) = nodes.plane.admin.get("/earnings")["data"]
    assert (earned["node_id"], earned["org"], earned["requests"]) == (node_id, "acme", 1)
    assert earned["completion_tokens"] == rows[node_id]["completion_tokens"]
    assert earned["earned_usd"] == pytest.approx(rows[node_id]["cost_usd"])
    (by_org,) = nodes.plane.admin.get("/earnings", by="org")["data"]
    assert by_org["earned_usd"] == earned["earned_usd"]
