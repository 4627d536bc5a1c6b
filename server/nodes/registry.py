"""Connected nodes, and the plane's own account of their slots.

The plane never trusts a node's report to decide whether a slot is free: it claims a slot before it dispatches
a job and releases it when the job ends, is cancelled (or its cancel times out), or the node's stream drops.
Node reports only change capacity. After any sequence of faults every counter is back at zero.

When every slot of a model is busy a request waits in a bounded per-pool queue, first come first served, for at
most `queue_timeout_s` (about a second: the attempt loop only lets a pool wait when no target after it can start
at once, `has_capacity`); when the queue is full or the wait times out the pool is busy, which the attempt loop
treats like any other target failure (the next target, or a 503 with Retry-After). A pool none of whose nodes takes
jobs (draining, paused by its owner, unresponsive) is not waited on at all: NodesUnavailableError at once, and
requests already waiting are woken to hear it.

No loop here goes by a number a node chose: a slot frees up at most as many waiters as are queued, and every
per-node loop is over its models (at most `bounds.MAX_MODELS`, checked at Hello). The events a node sends for a
job are bounded too (`bounds.MAX_QUEUED_EVENTS_PER_JOB` waiting, `bounds.MAX_JOB_BYTES` in all): over either,
`on_event` raises ProtocolViolation and the node's service ends its session.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import itertools
import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import grpc

from proto.contract import JOB_REQUEST_OVERHEAD_BYTES, PLANE_MESSAGE_MAX_BYTES
from proto.hatchway.node.v1 import node_pb2 as pb
from server.errors import UpstreamConnectError, UpstreamError
from server.nodes.bounds import (
    MAX_JOB_BYTES,
    MAX_QUEUED_EVENTS_PER_JOB,
    MessageRate,
    ProtocolViolation,
    clamp_job_event,
    loggable,
)
from server.routing.waiters import Waiters

log = logging.getLogger(__name__)

MISSED_HEARTBEATS = 3


class NodesBusyError(UpstreamError):
    status = 503
    code = "nodes_busy"

    def __init__(self, message: str) -> None:
        super().__init__(message, headers={"Retry-After": "1"})


class NodesUnavailableError(NodesBusyError):
    """No node of the pool takes jobs now (drained, paused by its owner, unresponsive): no slot will free up."""

    code = "nodes_unavailable"


class SessionLost:
    """Put on a job's queue when the node's stream dropped."""


@dataclass
class ModelSlots:
    name: str
    slots_total: int
    context: int
    price_in: float | None
    price_out: float | None
    chat: bool
    embeddings: bool
    busy: int = 0
    # Generation speed the node measured on its own jobs (agent.speed), from its Status; None until measured.
    tokens_per_s: float | None = None
    jobs_measured: int = 0

    @classmethod
    def from_info(cls, info: pb.ModelInfo) -> ModelSlots:
        return cls(
            name=info.name,
            slots_total=info.slots,
            context=info.context_per_slot,
            price_in=info.price_in if info.has_price else None,
            price_out=info.price_out if info.has_price else None,
            chat=info.chat,
            embeddings=info.embeddings,
        )


@dataclass(eq=False)
class Job:
    job_id: str
    session: NodeSession
    model: str
    events: asyncio.Queue[pb.JobEvent | SessionLost] = field(default_factory=asyncio.Queue)
    finished: bool = False
    released: bool = False
    cancel_sent: bool = False
    # Bytes of the events the node sent for this job so far (bounded by bounds.MAX_JOB_BYTES).
    received_bytes: int = 0
    # UTF-8 bytes of the text the node generated for this job, read or not: what bounds its token count.
    text_bytes: int = 0
    # The node's JobEnd (its own token counts), once it came; and set once the job's slot is released.
    end: pb.JobEnd | None = None
    over: asyncio.Event = field(default_factory=asyncio.Event)
    # Set for a job run for another plane (server.fleet): its events go there rather than onto `events`.
    forward: Callable[[pb.JobEvent | SessionLost], None] | None = None

    def deliver(self, event: pb.JobEvent | SessionLost) -> None:
        if self.forward is not None:
            self.forward(event)
        else:
            self.events.put_nowait(event)


@dataclass(eq=False)
class NodeSession:
    """One agent's live stream."""

    node_id: str
    org_id: str
    name: str
    hello: pb.Hello
    heartbeat_s: float
    drained: bool = False
    models: dict[str, ModelSlots] = field(default_factory=dict)
    outbound: asyncio.Queue[pb.PlaneMessage | None] = field(default_factory=asyncio.Queue)
    jobs: dict[str, Job] = field(default_factory=dict)
    connected_at: float = field(default_factory=time.time)
    last_seen: float = field(default_factory=time.monotonic)
    status: pb.Status = field(default_factory=pb.Status)
    closed: bool = False
    # Status and Heartbeat messages this node may still send (bounds.STATUS_RATE_PER_S).
    rate: MessageRate = field(default_factory=MessageRate)
    # The plane whose node service holds the node's stream (this one, unless the session is a server.fleet view).
    plane: str = ""
    # The hash of the credential the stream was opened with: a session whose credential is gone (revoked, or
    # superseded by a re-enrollment made through any plane) ends.
    credential_hash: str = ""

    def __post_init__(self) -> None:
        self.models = {m.name: ModelSlots.from_info(m) for m in self.hello.models}

    @property
    def stale(self) -> bool:
        return time.monotonic() - self.last_seen > MISSED_HEARTBEATS * self.heartbeat_s

    @property
    def accepting(self) -> bool:
        return not (self.closed or self.drained or self.status.draining or self.status.idle_paused or self.stale)

    def free_slots(self, model: str) -> int:
        slots = self.models.get(model)
        return 0 if slots is None or not self.accepting else slots.slots_total - slots.busy

    @property
    def state(self) -> str:
        if self.closed:
            return "offline"
        if self.drained or self.status.draining:
            return "draining"
        if self.status.idle_paused:
            return "idle-paused"
        if self.stale:
            return "unresponsive"
        if any(m.busy for m in self.models.values()):
            return "busy"
        return "ready"

    def apply_status(self, status: pb.Status) -> None:
        if status.version < self.status.version:
            return  # an older report that arrived late
        self.status = status
        for load in status.models:
            slots = self.models.get(load.name)
            if slots is not None:
                # The node may change its capacity; the plane keeps counting its own busy slots.
                slots.slots_total = load.slots_total
                if load.jobs_measured:  # bounds.check_status: a measured speed is finite and positive
                    slots.tokens_per_s, slots.jobs_measured = float(load.tokens_per_s), load.jobs_measured

    def send(self, message: pb.PlaneMessage) -> None:
        if not self.closed:
            self.outbound.put_nowait(message)

    async def start(self, job: Job, request: pb.JobRequest) -> bool:
        """Send a job whose slot the registry claimed; False when the node's own plane refused it (a node on
        another plane, server.fleet: its plane is the one that claims its slots)."""
        self.send(pb.PlaneMessage(job=request))
        return True


class NodeRegistry:
    def __init__(
        self, *, queue_size: int, queue_timeout_s: float, cancel_timeout_s: float, plane_name: str = ""
    ) -> None:
        self.plane_name = plane_name
        self.queue_size = queue_size
        self.queue_timeout_s = queue_timeout_s
        self.cancel_timeout_s = cancel_timeout_s
        # The nodes connected to this plane, and (server.fleet) those connected to other planes of the gateway.
        self.sessions: dict[str, NodeSession] = {}
        self.remote: dict[str, NodeSession] = {}
        # Called when a local node's capacity, state or busy slots change: server.fleet tells the other planes.
        self.changed: Callable[[], None] = lambda: None
        # Requests queued for a slot of one (org, model), woken in arrival order as slots free up.
        self._pools: dict[tuple[str, str], Waiters] = collections.defaultdict(Waiters)
        self._job_ids = itertools.count(1)
        self._tasks: set[asyncio.Task[None]] = set()

    # -- sessions ---------------------------------------------------------------------------------

    def register(self, session: NodeSession) -> None:
        previous = self.sessions.get(session.node_id)
        if previous is not None:
            log.info("node %s reconnected; closing its previous stream", session.node_id)
            self.unregister(previous)
        session.plane = self.plane_name
        self.sessions[session.node_id] = session
        self._wake(session)
        self.changed()

    def unregister(self, session: NodeSession) -> None:
        if session.closed:
            return
        session.closed = True
        session.outbound.put_nowait(None)
        if self.sessions.get(session.node_id) is session:
            del self.sessions[session.node_id]
        for job in list(session.jobs.values()):
            self.lose(job)
        self._wake(session)  # requests waiting for a slot of a pool it leaves without a node fail over now
        self.changed()

    def disconnect(self, node_id: str) -> None:
        """Close a node's stream (revoked): its jobs fail over, its agent is refused on reconnect."""
        session = self.sessions.get(node_id)
        if session is not None:
            self.unregister(session)

    def set_drained(self, node_id: str, drained: bool) -> None:
        session = self.sessions.get(node_id)
        if session is None:
            return
        session.drained = drained
        if drained:
            session.send(pb.PlaneMessage(drain=pb.Drain(reason="drained by an admin")))
        else:
            session.send(pb.PlaneMessage(resume=pb.Resume()))
        self._wake(session)
        self.changed()

    def touch(self, session: NodeSession) -> None:
        session.last_seen = time.monotonic()

    def update_status(self, session: NodeSession, status: pb.Status) -> None:
        session.apply_status(status)
        self._wake(session)
        self.changed()

    # -- nodes on other planes (server.fleet) ------------------------------------------------------

    def update_remote(self, session: NodeSession) -> None:
        """Another plane's latest account of one of its nodes (slots, state): replaces the previous one."""
        previous = self.remote.get(session.node_id)
        if previous is not None and previous is not session:
            session.jobs = previous.jobs
        self.remote[session.node_id] = session
        self._wake(session)

    def drop_remote(self, node_id: str) -> None:
        """A node another plane no longer holds (gone, or that plane is): its jobs here fail over."""
        session = self.remote.pop(node_id, None)
        if session is not None:
            session.closed = True
            for job in list(session.jobs.values()):
                self.lose(job)
            self._wake(session)

    def session(self, node_id: str) -> NodeSession | None:
        """The node's live session, on this plane or another."""
        return self.sessions.get(node_id) or self.remote.get(node_id)

    def every_session(self) -> Iterator[NodeSession]:
        """Each node of the gateway once: this plane's own, then those on other planes."""
        yield from self.sessions.values()
        yield from (s for s in self.remote.values() if s.node_id not in self.sessions)

    # -- what is served ---------------------------------------------------------------------------

    def sessions_for(self, org_id: str) -> Iterator[NodeSession]:
        return (s for s in self.every_session() if s.org_id == org_id)

    def models_for(self, org_id: str) -> set[str]:
        return {m for s in self.sessions_for(org_id) for m in s.models}

    def serves(self, org_id: str, model: str) -> bool:
        return any(model in s.models for s in self.sessions_for(org_id))

    def accepting(self, org_id: str, model: str) -> bool:
        """Whether a node of the pool takes jobs, free or busy: a slot of it may free up."""
        return any(s.accepting and model in s.models for s in self.sessions_for(org_id))

    def has_capacity(self, org_id: str, model: str) -> bool:
        """Whether a job would get a slot now, without waiting."""
        return any(s.free_slots(model) > 0 for s in self.sessions_for(org_id))

    def tokens_per_s(self, org_id: str, model: str) -> float | None:
        """The pool's expected generation speed: the best measured by a node that takes jobs (the one `_pick`
        prefers while it has a free slot); None when no such node measured one yet."""
        speeds = [s.models[model].tokens_per_s for s in self.sessions_for(org_id) if s.accepting and model in s.models]
        return max((v for v in speeds if v is not None), default=None)

    def prices(self, org_id: str, model: str) -> list[tuple[float | None, float | None]]:
        return [
            (s.models[model].price_in, s.models[model].price_out)
            for s in self.sessions_for(org_id)
            if model in s.models
        ]

    # -- jobs -------------------------------------------------------------------------------------

    async def dispatch(self, org_id: str, model: str, endpoint: str, body: bytes, affinity: str | None) -> Job:
        """Claim a slot (waiting in the pool's queue if need be), then send the job to that node."""
        if len(body) > PLANE_MESSAGE_MAX_BYTES - JOB_REQUEST_OVERHEAD_BYTES:
            # gRPC would refuse to send it and end the node's stream, every other job on it included.
            raise UpstreamConnectError(f"the request body is too large for a node ({len(body)} bytes)")
        deadline = time.monotonic() + self.queue_timeout_s
        while True:
            session = await self._claim(org_id, model, affinity, deadline)
            job = Job(job_id=f"job-{next(self._job_ids)}", session=session, model=model)
            session.jobs[job.job_id] = job
            if await session.start(job, pb.JobRequest(job_id=job.job_id, endpoint=endpoint, body=body)):
                return job
            # The node's plane gave its last slot to a request of another plane first: pick again.
            self.release(job)

    def can_start(self, session: NodeSession, model: str, body: bytes) -> bool:
        """Whether `start_now` would run this job on the node now."""
        return session.free_slots(model) > 0 and len(body) <= PLANE_MESSAGE_MAX_BYTES - JOB_REQUEST_OVERHEAD_BYTES

    def start_now(
        self,
        session: NodeSession,
        model: str,
        endpoint: str,
        body: bytes,
        forward: Callable[[pb.JobEvent | SessionLost], None],
    ) -> Job | None:
        """Run a job another plane asks for on this plane's node, if it has a free slot now (server.fleet)."""
        if not self.can_start(session, model, body):
            return None
        session.models[model].busy += 1
        job = Job(job_id=f"job-{next(self._job_ids)}", session=session, model=model, forward=forward)
        session.jobs[job.job_id] = job
        session.send(pb.PlaneMessage(job=pb.JobRequest(job_id=job.job_id, endpoint=endpoint, body=body)))
        self._changed(session)
        return job

    async def _claim(self, org_id: str, model: str, affinity: str | None, deadline: float) -> NodeSession:
        waiters = self._pools[(org_id, model)]
        while True:
            session = self._pick(org_id, model, affinity)
            if session is not None:
                session.models[model].busy += 1
                self._changed(session)
                return session
            if not self.serves(org_id, model):
                raise UpstreamConnectError(f"no node serves '{model}' any more")
            if not self.accepting(org_id, model):
                raise NodesUnavailableError(f"no node for '{model}' takes jobs now (draining, paused or unresponsive)")
            if len(waiters) >= self.queue_size:
                raise NodesBusyError(f"every node slot for '{model}' is busy and the queue is full")
            try:
                async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
                    await waiters.wait()
            except TimeoutError:
                raise NodesBusyError(f"no node slot for '{model}' freed up in time") from None

    def _pick(self, org_id: str, model: str, affinity: str | None) -> NodeSession | None:
        serving = [s for s in self.sessions_for(org_id) if s.accepting and model in s.models]
        candidates = [s for s in serving if s.free_slots(model) > 0]
        if not candidates:
            return None
        if affinity is not None:
            # A conversation's home: the same node on every plane, without asking any, by weighted rendezvous
            # hashing over the nodes that serve the model (weighted by slots times measured speed: a bigger or
            # faster node is home to more).
            home = max(serving, key=lambda s: _rendezvous(affinity, s.node_id, _weight(s.models[model])))
            if home.free_slots(model) > 0:
                return home
        unmeasured = [s for s in candidates if s.models[model].tokens_per_s is None]
        if unmeasured:
            # A node that has not measured its speed yet goes first, so that its first jobs measure it; among
            # those, the one with the most free slots: spreads load across agents.
            return max(unmeasured, key=lambda s: s.free_slots(model))
        # The fastest measured speed, scaled by the share of the node's slots that are free (its jobs share its
        # compute): an idle fast node first, a busy one less so; then the most free slots.
        return max(candidates, key=lambda s: (_free_speed(s, model), s.free_slots(model)))

    def on_event(self, session: NodeSession, event: pb.JobEvent) -> None:
        """Queue a node's event for its job; raises ProtocolViolation when the job's events exceed their bounds."""
        job = session.jobs.get(event.job_id)
        if job is None:
            return  # a job already released (cancel timed out, or it ended)
        job.received_bytes += event.ByteSize()
        if job.received_bytes > MAX_JOB_BYTES:
            raise ProtocolViolation(
                grpc.StatusCode.RESOURCE_EXHAUSTED, f"job {job.job_id}: events over {MAX_JOB_BYTES} bytes in all"
            )
        if job.events.qsize() >= MAX_QUEUED_EVENTS_PER_JOB:
            raise ProtocolViolation(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"job {job.job_id}: more than {MAX_QUEUED_EVENTS_PER_JOB} events waiting to be read",
            )
        clamp_job_event(event)
        job.deliver(event)
        kind = event.WhichOneof("kind")
        if kind == "tokens":
            job.text_bytes += len(event.tokens.text.encode("utf-8", "surrogatepass"))
            # A call's name and arguments are generated text too (server.usage.metering counts them delivered).
            for call in event.tokens.tool_calls:
                job.text_bytes += len(call.name.encode("utf-8", "surrogatepass"))
                job.text_bytes += len(call.arguments.encode("utf-8", "surrogatepass"))
        elif kind == "end":
            job.end = event.end  # read by the bill of a job whose client left (server.targets.node)
        if kind in ("end", "error"):
            job.finished = True
            self.release(job)

    def cancel(self, job: Job) -> None:
        """The client left: tell the node to stop, and free the slot when it confirms (or after a timeout)."""
        if job.finished or job.released or job.cancel_sent:
            return
        job.cancel_sent = True
        job.session.send(pb.PlaneMessage(cancel=pb.Cancel(job_id=job.job_id)))
        task = asyncio.get_running_loop().create_task(self._release_after_timeout(job))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _release_after_timeout(self, job: Job) -> None:
        await asyncio.sleep(self.cancel_timeout_s)
        if not job.released:
            log.warning(
                "node %s did not confirm the cancel of %s; releasing its slot", loggable(job.session.name), job.job_id
            )
            self.release(job)

    def lose(self, job: Job) -> None:
        """The job's node went away (or its plane did): whoever reads it hears so, and its slot is freed."""
        job.deliver(SessionLost())
        job.finished = True  # told: release sends no second SessionLost
        self.release(job)

    def release(self, job: Job) -> None:
        if job.released:
            return
        job.released = True
        job.over.set()
        if job.forward is not None and not job.finished:
            job.forward(SessionLost())  # released unfinished (cancel unconfirmed): the asking plane stops waiting
        job.session.jobs.pop(job.job_id, None)
        slots = job.session.models.get(job.model)
        if slots is not None:
            slots.busy = max(slots.busy - 1, 0)  # a node on another plane: its plane's count may have come first
        self._wake(job.session)
        self._changed(job.session)

    def _changed(self, session: NodeSession) -> None:
        """Only this plane's own nodes are its to advertise: another plane's claims it counts need no news."""
        if self.sessions.get(session.node_id) is session:
            self.changed()

    def _wake(self, session: NodeSession) -> None:
        """Wake as many queued requests as this node has free slots, and never more than are queued; all of them
        when no node of the pool takes jobs any more, so that they fail over now rather than at their timeout."""
        for model in session.models:
            waiters = self._pools.get((session.org_id, model))  # .get: a node's model names create no pools
            if waiters:
                closed = not self.accepting(session.org_id, model)
                for _ in range(len(waiters) if closed else min(session.free_slots(model), len(waiters))):
                    waiters.wake_one()

    def busy_slots(self) -> int:
        """Slots claimed across this plane's nodes: zero whenever no job is running."""
        return sum(m.busy for s in self.sessions.values() for m in s.models.values())

    async def close(self) -> None:
        for session in list(self.sessions.values()):
            self.unregister(session)
        for node_id in list(self.remote):
            self.drop_remote(node_id)
        for task in list(self._tasks):
            task.cancel()


def _weight(slots: ModelSlots) -> float:
    """A node's rendezvous weight: its slots, times its measured tokens/s rounded to a power of two (so that the
    average's drift from job to job moves no conversation's home; only a real change of speed does). A node that
    measured nothing yet counts 1 token/s: it is home to few until measured, and gets measured by the jobs whose
    home is busy (`_pick` sends those to unmeasured nodes first). Without any measurement: weighted by slots."""
    if not slots.tokens_per_s:
        return float(slots.slots_total)
    return max(slots.slots_total, 1) * 2.0 ** round(math.log2(max(slots.tokens_per_s, 1.0)))


def _free_speed(session: NodeSession, model: str) -> float:
    slots = session.models[model]
    return (slots.tokens_per_s or 0.0) * session.free_slots(model) / max(slots.slots_total, 1)


def _rendezvous(key: str, node_id: str, weight: float) -> float:
    """The weighted rendezvous score of `node_id` for `key`: the highest score wins, the same on every plane."""
    digest = hashlib.blake2b(f"{key}/{node_id}".encode(), digest_size=8).digest()
    unit = (int.from_bytes(digest, "big") + 1) / (2**64 + 1)  # uniform in (0, 1)
    return max(weight, 1) / -math.log(unit)
