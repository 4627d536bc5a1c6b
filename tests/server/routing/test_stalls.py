"""Stalls are judged by the stream's own pace, and the target that broke a stream is tried last: seen from
outside, through a real plane, real sockets and the fault-injecting upstream (or a node over the real gRPC link).
The idle limit is 60 s here, as by default, and the request's deadline 30 s: a rescue can only come from the
stream's pace, since one at the idle limit would find the deadline passed and end in an error."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass

import httpx
import pytest

from proto.hatchway.node.v1 import node_pb2 as pb
from server.config import Config
from server.routing.failover import FailoverPolicy
from server.routing.pace import Pace
from tests.conftest import MODEL, RunningPlane
from tests.server.routing.test_failover import REPLY, read_stream
from tests.support.hostile_agent import HostileAgent, Session, hello, model
from tests.support.loop_thread import LoopThread
from tests.support.mock_upstream import Fault, MockUpstream

FALLBACK_MODEL = "large-model"


@pytest.fixture
def plane_config(plane_config: Config) -> Config:
    return plane_config.replace(
        stream_idle_timeout_s=60.0,
        ttft_timeout_s=60.0,
        request_deadline_s=30.0,
        stream_stall_floor_s=1.0,
        stream_stall_factor=4.0,
        stream_stall_ceiling_s=3.0,
        hedge="off",
    )


@dataclass
class Chain:
    """`primary` serves MODEL; `backup` serves only FALLBACK_MODEL, MODEL's fallback."""

    plane: RunningPlane
    primary: MockUpstream
    backup: MockUpstream
    key: str

    def stream(self) -> httpx.Response:
        return httpx.post(
            f"{self.plane.v1}/chat/completions",
            json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "stream": True},
            headers={"Authorization": f"Bearer {self.key}"},
            timeout=120,
        )


@pytest.fixture
def chain(plane: RunningPlane, make_upstream: Callable[..., MockUpstream]) -> Chain:
    plane.create_org()
    primary, backup = make_upstream("primary", reply=REPLY), make_upstream("backup", reply=REPLY)
    plane.add_provider("primary", primary)
    plane.add_provider("backup", backup, models=[FALLBACK_MODEL])
    plane.admin.put("/routes", {"org": "acme", "model": MODEL, "fallbacks": [FALLBACK_MODEL]})
    return Chain(plane, primary, backup, plane.create_key())


def test_a_stream_that_falls_silent_is_rescued_at_its_own_pace_not_at_the_idle_limit(chain: Chain) -> None:
    chain.primary.faults.append(Fault("stall", after_chunks=2, delay_s=120))
    stream = read_stream(chain.stream())
    assert stream.text == REPLY and stream.done and stream.error is None


@pytest.mark.parametrize("fault", ["stall", "cut"])
def test_the_target_that_broke_a_stream_is_tried_after_every_fallback_model(chain: Chain, fault: str) -> None:
    chain.primary.faults.append(Fault(fault, after_chunks=2, delay_s=120))
    stream = read_stream(chain.stream())
    assert stream.text == REPLY and stream.done
    assert len(chain.primary.requests) == 1, "the primary was asked to rescue its own broken stream first"
    assert len(chain.backup.requests) == 1


def test_the_target_that_broke_a_stream_still_rescues_it_when_every_other_target_fails(chain: Chain) -> None:
    chain.backup.always = Fault("status", status=503)
    chain.primary.faults.append(Fault("stall", after_chunks=2, delay_s=120))
    stream = read_stream(chain.stream())
    assert stream.text == REPLY and stream.done
    assert len(chain.primary.requests) == 2
    assert chain.backup.requests, "the fallback model was asked first"


def test_a_pause_is_a_stall_only_when_long_for_the_streams_own_pace() -> None:
    pace = Pace(FailoverPolicy(stall_floor_s=1.0, stall_factor=4.0, stall_ceiling_s=10.0, idle_timeout_s=60.0))
    assert pace.limit_s == 1.0  # no gap seen yet: the floor
    pace.observe(0.05)
    assert pace.limit_s == 1.0  # a fast stream: still the floor
    pace.observe(1.5)
    assert pace.limit_s == 6.0  # a stream that pauses 1.5 s may pause four times as long
    pace.observe(5.0)
    assert pace.limit_s == 10.0  # never past the ceiling
    assert Pace(FailoverPolicy(stall_ceiling_s=10.0, idle_timeout_s=2.0)).limit_s == 2.0  # nor the idle limit


# -- a node that stops answering mid-job ----------------------------------------------------------------


def node_then_cloud(
    plane: RunningPlane, make_upstream: Callable[..., MockUpstream], agent_loop: LoopThread
) -> tuple[Session, MockUpstream, str]:
    """Org acme's MODEL routed to its node pool (one agent this test drives), then provider `cloud`; an API key."""
    plane.create_org()
    cloud = make_upstream("cloud", reply=REPLY)
    plane.add_provider("cloud", cloud)
    token = plane.admin.post("/node-tokens", {"org": "acme"})["token"]
    agent = HostileAgent(f"127.0.0.1:{plane.server.plane.grpc_port}", token)
    agent_loop.run(agent.enroll(name="driven", machine_id="driven"))
    session: Session = agent_loop.run(agent.connect(hello([model(MODEL, slots=2)])))
    agent_loop.run(session.start_reading())
    plane.admin.put("/routes", {"org": "acme", "model": MODEL, "targets": ["nodes", "cloud"]})
    return session, cloud, plane.create_key()


def test_a_node_that_stops_answering_mid_job_is_left_after_the_stall_limit(
    plane: RunningPlane, make_upstream: Callable[..., MockUpstream], agent_loop: LoopThread
) -> None:
    session, cloud, key = node_then_cloud(plane, make_upstream, agent_loop)

    async def answer_then_fall_silent() -> str:
        job = await asyncio.wait_for(session.jobs.get(), 30)
        for text in ("The quick", " brown"):
            tokens = pb.TokenBatch(text=text, tokens=1)
            await session.send(pb.AgentMessage(job=pb.JobEvent(job_id=job.job_id, tokens=tokens)))
        return str(job.job_id)

    mute = asyncio.run_coroutine_threadsafe(answer_then_fall_silent(), agent_loop.loop)
    response = httpx.post(
        f"{plane.v1}/chat/completions",
        json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "stream": True},
        headers={"Authorization": f"Bearer {key}"},
        timeout=120,
    )
    mute.result(30)
    stream = read_stream(response)
    assert stream.text == REPLY and stream.done and stream.error is None
    assert len(cloud.requests) == 1
    assert session.jobs.empty(), "the node that went silent was not asked again"
    agent_loop.run(session.close())
