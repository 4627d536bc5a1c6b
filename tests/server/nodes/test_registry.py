"""The plane's own slot accounting: claim before dispatch, release exactly once, a bounded wait queue."""

from __future__ import annotations

import asyncio

import pytest

from proto.hatchway.node.v1 import node_pb2 as pb
from server.errors import UpstreamConnectError
from server.nodes.registry import NodeRegistry, NodesBusyError, NodeSession, NodesUnavailableError, SessionLost

MODEL = "m"


def session(node_id: str = "n1", slots: int = 1) -> NodeSession:
    hello = pb.Hello(models=[pb.ModelInfo(name=MODEL, slots=slots, context_per_slot=512)])
    return NodeSession(node_id=node_id, org_id="org", name=node_id, hello=hello, heartbeat_s=5)


def registry(**overrides: float) -> NodeRegistry:
    options = {"queue_size": 2, "queue_timeout_s": 1.0, "cancel_timeout_s": 0.2, **overrides}
    return NodeRegistry(queue_size=int(options["queue_size"]), queue_timeout_s=options["queue_timeout_s"],
                        cancel_timeout_s=options["cancel_timeout_s"])  # fmt: skip


def end(job_id: str) -> pb.JobEvent:
    return pb.JobEvent(job_id=job_id, end=pb.JobEnd(finish_reason="stop"))


async def test_a_job_claims_a_slot_and_its_end_releases_it() -> None:
    nodes, node = registry(), session()
    nodes.register(node)
    job = await nodes.dispatch("org", MODEL, "chat/completions", b"{}", None)
    assert nodes.busy_slots() == 1
    sent = node.outbound.get_nowait()
    assert sent is not None and sent.job.job_id == job.job_id
    nodes.on_event(node, end(job.job_id))
    nodes.on_event(node, end(job.job_id))  # a duplicate end changes nothing
    assert nodes.busy_slots() == 0


async def test_a_request_waits_for_a_busy_slot_and_gets_it_when_freed() -> None:
    nodes, node = registry(), session()
    nodes.register(node)
    first = await nodes.dispatch("org", MODEL, "chat/completions", b"{}", None)
    waiting = asyncio.create_task(nodes.dispatch("org", MODEL, "chat/completions", b"{}", None))
    await asyncio.sleep(0.05)
    assert not waiting.done()
    nodes.on_event(node, end(first.job_id))
    second = await asyncio.wait_for(waiting, 1)
    assert second.session is node and nodes.busy_slots() == 1


async def test_a_full_queue_is_busy_at_once() -> None:
    nodes, node = registry(queue_size=1), session()
    nodes.register(node)
    await nodes.dispatch("org", MODEL, "chat/completions", b"{}", None)
    waiter = asyncio.create_task(nodes.dispatch("org", MODEL, "chat/completions", b"{}", None))
    await asyncio.sleep(0.05)
    with pytest.raises(NodesBusyError):
        await nodes.dispatch("org", MODEL, "chat/completions", b"{}", None)
    waiter.cancel()


async def test_a_wait_that_times_out_is_busy() -> None:
    nodes, node = registry(queue_timeout_s=0.1), session()
    nodes.register(node)
    await nodes.dispatch("org", MODEL, "chat/completions", b"{}", None)
    with pytest.raises(NodesBusyError):
        await nodes.dispatch("org", MODEL, "chat/completions", b"{}", None)


async def test_a_lost_session_fails_its_jobs_and_frees_every_slot() -> None:
    nodes, node = registry(), session(slots=2)
    nodes.register(node)
    jobs = [await nodes.dispatch("org", MODEL, "chat/completions", b"{}", None) for _ in range(2)]
    nodes.unregister(node)
    assert nodes.busy_slots() == 0
    assert all(isinstance(job.events.get_nowait(), SessionLost) for job in jobs)
    with pytest.raises(UpstreamConnectError):
        await nodes.dispatch("org", MODEL, "chat/completions", b"{}", None)


async def test_a_cancel_sends_cancel_and_frees_the_slot_after_the_timeout_if_unconfirmed() -> None:
    nodes, node = registry(cancel_timeout_s=0.05), session()
    nodes.register(node)
    job = await nodes.dispatch("org", MODEL, "chat/completions", b"{}", None)
    node.outbound.get_nowait()
    nodes.cancel(job)
    sent = node.outbound.get_nowait()
    assert sent is not None and sent.cancel.job_id == job.job_id
    assert nodes.busy_slots() == 1
    await asyncio.sleep(0.1)
    assert nodes.busy_slots() == 0


async def test_without_a_conversation_load_spreads_to_the_node_with_more_free_slots() -> None:
    nodes = registry()
    a, b = session("a", slots=1), session("b", slots=2)
    nodes.register(a)
    nodes.register(b)
    first = await nodes.dispatch("org", MODEL, "completions", b"{}", None)
    second = await nodes.dispatch("org", MODEL, "completions", b"{}", None)
    assert first.session is b and second.session in (a, b) and nodes.busy_slots() == 2


async def test_a_conversation_returns_to_its_node_while_it_has_a_free_slot() -> None:
    nodes = registry()
    a, b = session("a", slots=2), session("b", slots=2)
    nodes.register(a)
    nodes.register(b)
    first = await nodes.dispatch("org", MODEL, "chat/completions", b"{}", "conversation")
    nodes.on_event(first.session, end(first.job_id))
    again = await nodes.dispatch("org", MODEL, "chat/completions", b"{}", "conversation")
    assert again.session is first.session  # the node whose prompt cache holds the conversation
    busy = await nodes.dispatch("org", MODEL, "chat/completions", b"{}", "conversation")
    assert busy.session is first.session
    elsewhere = await nodes.dispatch("org", MODEL, "chat/completions", b"{}", "conversation")
    assert elsewhere.session is not first.session  # its node is full: another serves rather than a wait


async def test_paused_or_drained_nodes_get_no_jobs() -> None:
    nodes, node = registry(queue_timeout_s=0.05), session()
    nodes.register(node)
    nodes.update_status(node, pb.Status(version=1, idle_paused=True))
    with pytest.raises(NodesBusyError):
        await nodes.dispatch("org", MODEL, "chat/completions", b"{}", None)
    nodes.update_status(node, pb.Status(version=0, idle_paused=False))  # older than what was applied: ignored
    assert node.status.idle_paused


async def test_a_pool_whose_only_node_is_paused_is_unavailable_at_once() -> None:
    nodes, node = registry(queue_timeout_s=30), session()
    nodes.register(node)
    nodes.update_status(node, pb.Status(version=1, idle_paused=True))
    assert not nodes.has_capacity("org", MODEL)
    with pytest.raises(NodesUnavailableError):
        await asyncio.wait_for(nodes.dispatch("org", MODEL, "chat/completions", b"{}", None), 5)


@pytest.mark.parametrize("leaves", ["drained", "paused", "gone"])
async def test_requests_waiting_for_a_slot_fail_over_at_once_when_the_pool_stops_taking_jobs(leaves: str) -> None:
    nodes, node = registry(queue_timeout_s=30), session()
    nodes.register(node)
    await nodes.dispatch("org", MODEL, "chat/completions", b"{}", None)
    waiting = asyncio.create_task(nodes.dispatch("org", MODEL, "chat/completions", b"{}", None))
    await asyncio.sleep(0.05)
    assert not waiting.done()
    if leaves == "drained":
        nodes.set_drained(node.node_id, True)
    elif leaves == "paused":
        nodes.update_status(node, pb.Status(version=1, idle_paused=True))
    else:
        nodes.unregister(node)
    with pytest.raises(NodesUnavailableError if leaves != "gone" else UpstreamConnectError):
        await asyncio.wait_for(waiting, 5)
