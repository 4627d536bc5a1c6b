"""A hostile node gets nothing: an enrolled agent that says absurd things over the real gRPC protocol is refused
or cut off with a status naming the bound, and the plane keeps serving everyone else meanwhile."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import grpc
import httpx
import pytest

from proto.hatchway.node.v1 import node_pb2 as pb
from server.nodes import bounds
from server.nodes.registry import NodeRegistry, NodeSession
from tests.conftest import MODEL, Gateway
from tests.support.hostile_agent import MAX_UINT32, HostileAgent, Refused, Session, hello, model
from tests.support.loop_thread import LoopThread

# "Stays responsive": answered within this while the attack runs (a frozen plane answers nothing for minutes).
RESPONSIVE_S = 10.0
MB = 1_000_000


@dataclass
class Attack:
    gateway: Gateway
    agent: HostileAgent
    loop: LoopThread

    @property
    def registry(self) -> NodeRegistry:
        return self.gateway.plane.server.plane.registry

    def run(self, coro: Any) -> Any:
        return self.loop.run(coro)

    def assert_responsive(self) -> None:
        """Another org's chat completion (through the mock provider) and /healthz, each answered in time."""
        started = time.monotonic()
        with httpx.Client(timeout=RESPONSIVE_S) as http:
            health = http.get(f"{self.gateway.plane.url}/healthz")
            chat = http.post(
                f"{self.gateway.plane.v1}/chat/completions",
                json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}]},
                headers=self.gateway.auth(),
            )
        assert health.status_code == 200 and chat.status_code == 200, chat.text
        assert chat.json()["choices"][0]["message"]["content"] == "Hello from mock"
        assert time.monotonic() - started < RESPONSIVE_S


@pytest.fixture
def attack(gateway: Gateway) -> Iterator[Attack]:
    """Org `evil` with one enrolled hostile agent; org `acme` is the gateway's, served by a mock provider."""
    plane = gateway.plane
    plane.create_org("evil")
    token = plane.admin.post("/node-tokens", {"org": "evil", "uses": 5})["token"]
    loop = LoopThread(timeout_s=60)
    agent = HostileAgent(f"127.0.0.1:{plane.server.plane.grpc_port}", token)
    loop.run(agent.enroll())
    yield Attack(gateway, agent, loop)
    loop.close()


def why_closed(caplog: pytest.LogCaptureFixture) -> str:
    """The plane's reason for ending a flooding node's session, from its log. The flooder itself often sees only
    INTERNAL: grpc-python's client reports its own write failing on the closed stream, not the plane's status."""
    return next(r.getMessage() for r in caplog.records if "broke the protocol" in r.getMessage())


def refused_hello(attack: Attack, greeting: pb.Hello) -> Refused:
    with pytest.raises(Refused) as refused:
        attack.run(attack.agent.connect(greeting))
    return refused.value


ABSURD = {
    "slots": (lambda: hello([model(slots=MAX_UINT32)]), grpc.StatusCode.INVALID_ARGUMENT, "Hello.models[0].slots"),
    "models": (
        lambda: hello([model(f"m{i}") for i in range(10_000)]),
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "Hello.models: 10000 entries, at most 64",
    ),
    "name": (
        lambda: hello([model("x" * (3 * MB))]),
        grpc.StatusCode.INVALID_ARGUMENT,
        "Hello.models[0].name: 3000000 bytes, at most 256",
    ),
    "together": (
        lambda: hello(
            [model("x" * (3 * MB), slots=MAX_UINT32)] + [model(f"m{i}", slots=MAX_UINT32) for i in range(9_999)]
        ),
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "Hello.models: 10000 entries",
    ),
}


@pytest.mark.parametrize("absurd", list(ABSURD))
def test_a_node_advertising_absurd_capacity_is_refused_while_the_plane_serves_everyone_else(
    attack: Attack, absurd: str
) -> None:
    make, code, message = ABSURD[absurd]
    greeting = make()
    stop = asyncio.Event()

    async def keep_attacking() -> list[Refused]:
        refusals: list[Refused] = []
        while not stop.is_set():
            try:
                session = await attack.agent.connect(greeting)
            except Refused as exc:
                refusals.append(exc)
            else:
                await session.close()
                raise AssertionError("the plane accepted the Hello")
        return refusals

    attacker = asyncio.run_coroutine_threadsafe(keep_attacking(), attack.loop.loop)
    try:
        for _ in range(3):
            attack.assert_responsive()
    finally:
        attack.loop.loop.call_soon_threadsafe(stop.set)
    refusals = attacker.result(60)
    assert refusals and all(r.code == code and message in r.details for r in refusals), refusals[:1]
    assert attack.registry.sessions == {}


def test_a_hello_over_the_message_cap_is_refused_by_grpc_before_the_plane_parses_it(attack: Attack) -> None:
    greeting = hello(hardware=pb.Hardware(hostname="h" * (17 * 1024 * 1024)))
    assert refused_hello(attack, greeting).code == grpc.StatusCode.RESOURCE_EXHAUSTED
    attack.assert_responsive()


def test_descriptions_over_their_bounds_are_clamped_not_refused(attack: Attack) -> None:
    # 5 MB: over gRPC's default 4 MiB receive cap, under the plane's explicit one.
    issues = [pb.Issue(code="load_failed", message="e" * (5 * MB), model="fake")]
    issues += [pb.Issue(code="load_failed", message="e", model="fake")] * 99
    gpus = [pb.Gpu(name="g" * 1000, utilization_percent=float("nan"))] * 100
    greeting = hello(issues=issues, hardware=pb.Hardware(hostname="h" * 1000, gpus=gpus))
    session = attack.run(attack.agent.connect(greeting))
    try:
        node = attack.gateway.plane.admin.get(f"/nodes/{next(iter(attack.registry.sessions))}")
        assert len(node["issues"]) == bounds.MAX_ISSUES
        assert len(node["issues"][0]["message"]) == bounds.MAX_ISSUE_MESSAGE_BYTES
        assert len(node["hardware"]["gpus"]) == bounds.MAX_GPUS
        assert len(node["hardware"]["hostname"]) == bounds.MAX_TEXT_BYTES
    finally:
        attack.run(session.close())


def test_a_status_beyond_the_bounds_ends_the_session(attack: Attack) -> None:
    session: Session = attack.run(attack.agent.connect(hello()))
    status = pb.Status(version=1, models=[pb.ModelLoad(name="fake", slots_total=MAX_UINT32)])
    attack.run(session.send(pb.AgentMessage(status=status)))
    ended = attack.run(session.ended())
    assert ended.code == grpc.StatusCode.INVALID_ARGUMENT and "Status.models[0].slots_total" in ended.details
    assert attack.registry.sessions == {}
    attack.assert_responsive()
    attack.run(session.close())


def test_status_and_heartbeats_over_their_rate_end_the_session(
    attack: Attack, caplog: pytest.LogCaptureFixture
) -> None:
    session: Session = attack.run(attack.agent.connect(hello()))
    beats = (pb.AgentMessage(heartbeat=pb.Heartbeat(sent_unix_ms=i)) for i in range(bounds.STATUS_BURST * 20))
    sent = attack.run(session.flood(beats))
    assert attack.run(session.ended()).code != grpc.StatusCode.OK and sent < bounds.STATUS_BURST * 20
    assert "Status and Heartbeat messages: more than 200 a second on average" in why_closed(caplog)
    assert attack.registry.sessions == {}
    attack.run(session.close())


def test_node_input_in_log_lines_is_cut_and_escaped(attack: Attack, caplog: pytest.LogCaptureFixture) -> None:
    names = ["evil\x00\nFAKE LOG LINE" + "x" * 200] + [f"m{i}" for i in range(bounds.MAX_MODELS - 1)]
    with caplog.at_level(logging.INFO, logger="server.nodes.service"):
        session = attack.run(attack.agent.connect(hello([model(n) for n in names])))
        attack.run(session.close())
    connected = next(r.getMessage() for r in caplog.records if "connected" in r.getMessage())
    assert "\n" not in connected and "\x00" not in connected and "\\x00\\nFAKE" in connected
    assert f"and {bounds.MAX_MODELS - bounds.LOG_MODELS} more" in connected
    assert len(connected) < 600


# -- a job's events -------------------------------------------------------------------------------------


def flood_one_job(attack: Attack, events: Callable[[str], Iterator[pb.AgentMessage]]) -> tuple[httpx.Response, Refused]:
    """Org acme's model goes to the hostile node first (then the mock provider); the node floods the job."""
    plane = attack.gateway.plane
    token = plane.admin.post("/node-tokens", {"org": "acme"})["token"]
    flooder = HostileAgent(attack.agent.address, token)
    attack.run(flooder.enroll(name="flooder", machine_id="flooder"))
    session: Session = attack.run(flooder.connect(hello([model(MODEL, slots=4)])))
    attack.run(session.start_reading())
    plane.admin.put("/routes", {"org": "acme", "model": MODEL, "targets": ["nodes", "mock-a"]})

    async def flood() -> Refused:
        job = await asyncio.wait_for(session.jobs.get(), 30)
        await session.flood(events(job.job_id))
        return await session.ended()

    flooding = asyncio.run_coroutine_threadsafe(flood(), attack.loop.loop)
    response = httpx.post(
        f"{plane.v1}/chat/completions",
        json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}]},
        headers=attack.gateway.auth(),
        timeout=60,
    )
    ended = flooding.result(60)
    attack.run(session.close())
    return response, ended


def test_a_node_sending_too_many_bytes_for_one_job_loses_its_session_and_the_job_fails_over(
    attack: Attack, caplog: pytest.LogCaptureFixture
) -> None:
    def megabytes(job_id: str) -> Iterator[pb.AgentMessage]:
        for _ in range(bounds.MAX_JOB_BYTES // MB + 10):
            yield pb.AgentMessage(job=pb.JobEvent(job_id=job_id, tokens=pb.TokenBatch(text="x" * MB, tokens=1)))

    response, ended = flood_one_job(attack, megabytes)
    assert ended.code != grpc.StatusCode.OK and f"over {bounds.MAX_JOB_BYTES} bytes in all" in why_closed(caplog)
    assert response.status_code == 200 and response.headers["x-hatchway-route"] == "mock-a"
    assert response.json()["choices"][0]["message"]["content"] == "Hello from mock"
    assert attack.registry.busy_slots() == 0


async def test_events_of_one_job_waiting_beyond_the_bound_end_the_session() -> None:
    nodes = NodeRegistry(queue_size=2, queue_timeout_s=1.0, cancel_timeout_s=0.2)
    node = NodeSession(node_id="n", org_id="org", name="n", hello=hello(), heartbeat_s=5)
    nodes.register(node)
    job = await nodes.dispatch("org", "fake", "chat/completions", b"{}", None)
    batch = pb.JobEvent(job_id=job.job_id, tokens=pb.TokenBatch(text="x", tokens=1))
    for _ in range(bounds.MAX_QUEUED_EVENTS_PER_JOB):
        nodes.on_event(node, batch)
    with pytest.raises(bounds.ProtocolViolation, match="events waiting to be read"):
        nodes.on_event(node, batch)


async def test_freeing_slots_wakes_only_the_requests_that_wait() -> None:
    # A registry fed directly (the service refuses such a Hello): waking must not loop over 2^32-1 free slots.
    nodes = NodeRegistry(queue_size=2, queue_timeout_s=5.0, cancel_timeout_s=0.2)
    busy = NodeSession(node_id="busy", org_id="org", name="busy", hello=hello([model(slots=1)]), heartbeat_s=5)
    nodes.register(busy)
    await nodes.dispatch("org", "fake", "chat/completions", b"{}", None)
    waiting = asyncio.create_task(nodes.dispatch("org", "fake", "chat/completions", b"{}", None))
    await asyncio.sleep(0.05)
    huge = NodeSession(node_id="huge", org_id="org", name="huge", hello=hello([model(slots=MAX_UINT32)]), heartbeat_s=5)
    nodes.register(huge)
    job = await asyncio.wait_for(waiting, 5)
    assert job.session is huge
