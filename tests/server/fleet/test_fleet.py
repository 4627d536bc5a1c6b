"""Nodes across planes (server.fleet) over the real NATS: what one plane's registry sees of another's nodes, and
how a job crosses: slots claimed once by the node's own plane, events back, cancels across, planes that leave.

Each test has two or three registries, each with a Fleet of its own on a subject prefix of its own, and nodes
scripted in the test (their outbound queue is what the agent would read; `on_event` is what it would send).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable

import pytest

from proto.hatchway.node.v1 import node_pb2 as pb
from server.errors import UpstreamConnectError
from server.fleet import broker
from server.fleet.broker import Fleet
from server.nodes.registry import Job, NodeRegistry, NodesBusyError, NodeSession, SessionLost
from tests.conftest import NATS

MODEL = "m"
CHAT = "chat/completions"


def node(node_id: str, slots: int = 1) -> NodeSession:
    hello = pb.Hello(models=[pb.ModelInfo(name=MODEL, slots=slots, context_per_slot=512, chat=True)])
    return NodeSession(node_id=node_id, org_id="org", name=node_id, hello=hello, heartbeat_s=5)


class Planes:
    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.fleets: list[Fleet] = []

    async def plane(self, name: str, queue_timeout_s: float = 2.0) -> Fleet:
        registry = NodeRegistry(queue_size=8, queue_timeout_s=queue_timeout_s, cancel_timeout_s=1.0, plane_name=name)
        fleet = Fleet(registry, NATS, prefix=self.prefix, name=name)
        await fleet.start()
        await until(lambda: fleet.connected, "the plane to reach NATS")
        self.fleets.append(fleet)
        return fleet

    async def close(self) -> None:
        for fleet in self.fleets:
            await fleet.close(0)
            await fleet.registry.close()


@pytest.fixture
async def planes(nats_prefix: str) -> AsyncIterator[Planes]:
    started = Planes(nats_prefix)
    yield started
    await started.close()


async def until(check: Callable[[], bool], what: str, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.005)


async def job_sent(session: NodeSession) -> pb.JobRequest:
    """The next job the node is sent (what its agent would read)."""
    while True:
        message = await asyncio.wait_for(session.outbound.get(), 5)
        assert message is not None
        if message.HasField("job"):
            return message.job


def tokens(job_id: str, text: str) -> pb.JobEvent:
    return pb.JobEvent(job_id=job_id, tokens=pb.TokenBatch(text=text))


def end(job_id: str) -> pb.JobEvent:
    return pb.JobEvent(job_id=job_id, end=pb.JobEnd(finish_reason="stop", prompt_tokens=3, completion_tokens=2))


async def sees(fleet: Fleet, node_id: str, busy: int | None = None) -> None:
    def seen() -> bool:
        session = fleet.registry.remote.get(node_id)
        return session is not None and (busy is None or session.models[MODEL].busy == busy)

    await until(seen, f"{fleet.name} to see {node_id}" + ("" if busy is None else f" with {busy} busy"))


async def test_a_plane_sees_the_nodes_connected_to_another_with_their_plane(planes: Planes) -> None:
    a, b = await planes.plane("a"), await planes.plane("b")
    a.registry.register(node("n1", slots=3))
    await sees(b, "n1")
    seen = b.registry.remote["n1"]
    assert (seen.plane, seen.models[MODEL].slots_total, seen.state) == ("a", 3, "ready")
    assert b.registry.serves("org", MODEL) and b.registry.has_capacity("org", MODEL)
    assert "n1" not in b.registry.sessions  # not this plane's: it does not count in its busy slots


async def test_a_job_asked_for_by_another_plane_runs_on_the_node_and_its_events_come_back(planes: Planes) -> None:
    a, b = await planes.plane("a"), await planes.plane("b")
    n1 = node("n1")
    a.registry.register(n1)
    await sees(b, "n1")
    job = await b.registry.dispatch("org", MODEL, CHAT, b'{"model": "m"}', None)
    sent = await job_sent(n1)
    assert sent.body == b'{"model": "m"}' and sent.endpoint == CHAT
    assert a.registry.busy_slots() == 1  # claimed by the node's own plane
    a.registry.on_event(n1, tokens(sent.job_id, "Hello"))
    a.registry.on_event(n1, end(sent.job_id))
    first = await asyncio.wait_for(job.events.get(), 5)
    last = await asyncio.wait_for(job.events.get(), 5)
    assert isinstance(first, pb.JobEvent) and first.tokens.text == "Hello"
    assert isinstance(last, pb.JobEvent) and last.end.completion_tokens == 2
    assert job.job_id == first.job_id  # the asking plane's own id
    await until(lambda: job.released and a.registry.busy_slots() == 0, "both planes to free the slot")


async def test_a_cancel_on_the_asking_plane_reaches_the_node(planes: Planes) -> None:
    a, b = await planes.plane("a"), await planes.plane("b")
    n1 = node("n1")
    a.registry.register(n1)
    await sees(b, "n1")
    job = await b.registry.dispatch("org", MODEL, CHAT, b"{}", None)
    sent = await job_sent(n1)
    b.registry.cancel(job)
    message = await asyncio.wait_for(n1.outbound.get(), 5)
    assert message is not None and message.cancel.job_id == sent.job_id
    a.registry.on_event(n1, end(sent.job_id))  # the agent confirms the cancel with its JobEnd
    await until(lambda: job.released and a.registry.busy_slots() == 0, "the slot to be freed on both planes")


async def test_a_slot_is_claimed_once_across_planes(planes: Planes) -> None:
    a, b, c = await planes.plane("a"), await planes.plane("b"), await planes.plane("c")
    n1 = node("n1", slots=1)
    a.registry.register(n1)
    await sees(b, "n1")
    await sees(c, "n1")
    asked = [asyncio.create_task(p.registry.dispatch("org", MODEL, CHAT, b"{}", None)) for p in (a, b, c) * 3]
    running: list[pb.JobRequest] = []
    for _ in range(len(asked)):
        running.append(await job_sent(n1))
        await asyncio.sleep(0.05)  # whoever else was sent a job now would show here, holding a second slot
        assert a.registry.busy_slots() == 1 and n1.outbound.empty()
        a.registry.on_event(n1, end(running[-1].job_id))
    jobs = await asyncio.gather(*asked)
    assert len({j.job_id for j in running}) == len(asked) == len(jobs)
    await until(lambda: a.registry.busy_slots() == 0, "every slot to be free")


async def test_the_node_s_plane_refuses_a_slot_another_plane_took_and_the_asker_picks_again(planes: Planes) -> None:
    a, b = await planes.plane("a"), await planes.plane("b", queue_timeout_s=0.3)
    n1 = node("n1", slots=1)
    a.registry.register(n1)
    await sees(b, "n1")
    taken = await a.registry.dispatch("org", MODEL, CHAT, b"{}", None)
    b.registry.remote["n1"].models[MODEL].busy = 0  # b has not heard yet that the slot is gone
    with pytest.raises(NodesBusyError):
        await b.registry.dispatch("org", MODEL, CHAT, b"{}", None)
    assert a.registry.busy_slots() == 1 and not n1.jobs.keys() - {taken.job_id}


async def test_a_conversation_goes_to_the_same_node_from_every_plane(planes: Planes) -> None:
    a, b = await planes.plane("a"), await planes.plane("b")
    nodes = [node(f"n{i}", slots=4) for i in range(4)]
    for n in nodes:
        a.registry.register(n)
    for n in nodes:
        await sees(b, n.node_id)
    for conversation in ("alpha", "beta", "gamma", "delta", "epsilon"):
        here = await a.registry.dispatch("org", MODEL, CHAT, b"{}", conversation)
        there = await b.registry.dispatch("org", MODEL, CHAT, b"{}", conversation)
        assert here.session.node_id == there.session.node_id


async def test_a_plane_that_leaves_takes_its_nodes_out_of_every_pool_at_once(planes: Planes) -> None:
    a, b = await planes.plane("a"), await planes.plane("b")
    a.registry.register(node("n1"))
    await sees(b, "n1")
    planes.fleets.remove(a)
    await a.close(0)
    await until(lambda: "n1" not in b.registry.remote, "the node to leave with its plane", timeout_s=1.0)
    with pytest.raises(UpstreamConnectError):
        await b.registry.dispatch("org", MODEL, CHAT, b"{}", None)


async def silence(fleet: Fleet) -> None:
    """The plane dies without a word: its NATS connection and tasks stop."""
    for task in fleet._tasks:
        task.cancel()
    assert fleet.nc is not None
    await fleet.nc.close()
    fleet.nc = None


async def test_the_jobs_of_a_node_whose_plane_went_silent_fail_over(planes: Planes) -> None:
    a, b = await planes.plane("a"), await planes.plane("b")
    n1 = node("n1")
    a.registry.register(n1)
    await sees(b, "n1")
    job = await b.registry.dispatch("org", MODEL, CHAT, b"{}", None)
    await job_sent(n1)
    await silence(a)
    limit = broker.AD_INTERVAL_S * (broker.AD_EXPIRY + 2)
    assert isinstance(await asyncio.wait_for(job.events.get(), limit), SessionLost)
    assert "n1" not in b.registry.remote


async def test_the_jobs_a_silent_plane_asked_for_are_cancelled_on_the_node(planes: Planes) -> None:
    a, b = await planes.plane("a"), await planes.plane("b")
    n1 = node("n1")
    a.registry.register(n1)
    await sees(b, "n1")
    await b.registry.dispatch("org", MODEL, CHAT, b"{}", None)
    sent = await job_sent(n1)
    await silence(b)
    limit = broker.AD_INTERVAL_S * (broker.AD_EXPIRY + 2)
    message = await asyncio.wait_for(n1.outbound.get(), limit)
    assert message is not None and message.cancel.job_id == sent.job_id


async def test_a_node_lost_by_its_plane_fails_the_jobs_other_planes_asked_for(planes: Planes) -> None:
    a, b = await planes.plane("a"), await planes.plane("b")
    n1 = node("n1")
    a.registry.register(n1)
    await sees(b, "n1")
    job: Job = await b.registry.dispatch("org", MODEL, CHAT, b"{}", None)
    await job_sent(n1)
    a.registry.unregister(n1)
    assert isinstance(await asyncio.wait_for(job.events.get(), 5), SessionLost)
    await until(lambda: "n1" not in b.registry.remote, "the node to leave b's pools")
