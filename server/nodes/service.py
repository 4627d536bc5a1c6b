"""The node service agents dial: `Enroll` once, then one `Connect` stream for as long as they run.

Every stream is opened by the agent (nodes behind NAT need no inbound port). `Connect` authenticates the node
credential from the call's metadata against the in-memory snapshot, waits for the agent's Hello, registers the
session, and from then on reads agent messages (status, heartbeats, job events) while a writer task sends what
the plane queued for that node (jobs, cancels, drains).

What the agent sends is checked against server.nodes.bounds before the registry sees it: a Hello out of bounds
is refused, and a Status out of bounds, Status and Heartbeat messages over their rate, or a job's events over
theirs end the session; each with a gRPC status whose message names the field and the bound. Log lines show
node-chosen strings cut and escaped (`bounds.loggable`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

import grpc

from proto.contract import AUTHORIZATION, split_enrollment_token
from proto.hatchway.node.v1 import node_pb2 as pb
from proto.hatchway.node.v1 import node_pb2_grpc
from server.credentials import hash_key
from server.nodes.bounds import (
    ProtocolViolation,
    check_enroll,
    check_hello,
    check_status,
    loggable,
    model_list,
    over_rate,
)
from server.nodes.registry import NodeRegistry, NodeSession
from server.policy.snapshot import NodeEntry, Snapshot
from server.storage.nodes import EnrollmentRefused, NodeStore

log = logging.getLogger(__name__)

HELLO_TIMEOUT_S = 10.0
# Settings pushed to every agent after Welcome: flush the first token at once, then every 50 ms or 64 tokens.
# Every batch wakes the agent's and the plane's loops, which take a core from llama.cpp for a moment, so fewer
# wakeups leave llama.cpp more of its tokens/s (figures: bench/README.md), and 20 updates a second still read as a
# smooth stream. A batch costs the plane and the agent about the same CPU whatever it holds
# (bench/results/node-path.md), so the cap on tokens is only a size bound: 64 leaves the pace to the interval up
# to 1,280 tokens/s, where 16 would send a GPU's stream in more, smaller batches.
TOKEN_BATCH_MS = 50
TOKEN_BATCH_MAX = 64


# The generated servicer base is untyped (see pyproject: proto.*_pb2_grpc is skipped).
class NodeService(node_pb2_grpc.NodeServiceServicer):  # type: ignore[misc]
    def __init__(
        self,
        registry: NodeRegistry,
        nodes: NodeStore,
        snapshot: Callable[[], Snapshot],
        reload: Callable[[], Awaitable[object]],
        heartbeat_s: float,
    ) -> None:
        self.registry = registry
        self.nodes = nodes
        self.snapshot = snapshot
        self.reload = reload
        self.heartbeat_s = heartbeat_s

    async def Enroll(self, request: pb.EnrollRequest, context: grpc.aio.ServicerContext) -> pb.EnrollResponse:  # type: ignore[type-arg]
        try:
            name = check_enroll(request)
        except ProtocolViolation as exc:
            await context.abort(exc.code, exc.message)
        secret, _ = split_enrollment_token(request.token)
        try:
            enrolled = await asyncio.to_thread(
                self.nodes.enroll, secret, name, request.machine_id, request.previous_credential
            )
        except EnrollmentRefused as exc:
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, str(exc))
        await self.reload()  # the new credential must be known before the agent connects with it
        node = enrolled.node
        if enrolled.superseded:
            # The node's earlier credential is gone: a session opened with it ends (its agent is refused next time).
            self.registry.disconnect(node["id"])
        how = "re-enrolled (new credential)" if enrolled.superseded else "enrolled"
        log.info("node %s (%s) %s in org %s", node["id"], loggable(node["name"]), how, node["org"])
        return pb.EnrollResponse(node_id=node["id"], credential=enrolled.credential, org=node["org"])

    async def Connect(self, request_iterator: object, context: grpc.aio.ServicerContext) -> None:  # type: ignore[type-arg]
        node, credential_hash = await self._authenticate(context)
        try:
            first = await asyncio.wait_for(context.read(), HELLO_TIMEOUT_S)
        except TimeoutError:
            await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, "no Hello from the agent")
        if first is grpc.aio.EOF or not isinstance(first, pb.AgentMessage) or not first.HasField("hello"):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "the first message must be Hello")
        try:
            check_hello(first.hello)
        except ProtocolViolation as exc:
            log.warning("node %s (%s) refused: %s", node.id, loggable(node.name), loggable(exc.message, 200))
            await context.abort(exc.code, exc.message)
        session = NodeSession(
            node_id=node.id,
            org_id=node.org_id,
            name=node.name,
            hello=first.hello,
            heartbeat_s=self.heartbeat_s,
            drained=node.drained,
            credential_hash=credential_hash,
        )
        self.registry.register(session)
        log.info("node %s (%s) connected: %s", node.id, loggable(node.name), model_list(session.models))
        interval_ms = int(self.heartbeat_s * 1000)
        session.send(pb.PlaneMessage(welcome=pb.Welcome(node_id=node.id, heartbeat_interval_ms=interval_ms)))
        session.send(
            pb.PlaneMessage(
                config=pb.Config(
                    heartbeat_interval_ms=interval_ms, token_batch_ms=TOKEN_BATCH_MS, token_batch_max=TOKEN_BATCH_MAX
                )
            )
        )
        if node.drained:
            session.send(pb.PlaneMessage(drain=pb.Drain(reason="drained by an admin")))
        reader = asyncio.create_task(self._read(session, context))
        writer = asyncio.create_task(self._write(session, context))
        try:
            # The writer ends when the plane closes the session (revoked, re-enrolled, replaced by a reconnect):
            # that ends the call at once, not at the agent's next message.
            await asyncio.wait({reader, writer}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            self.registry.unregister(session)  # its jobs fail over (or end with an error once committed)
            for task in (reader, writer):
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
            log.info("node %s (%s) disconnected", node.id, loggable(node.name))
        violation = reader.result() if reader.done() and not reader.cancelled() and not reader.exception() else None
        if violation is not None:
            log.warning(
                "node %s (%s) broke the protocol: %s", node.id, loggable(node.name), loggable(violation.message, 200)
            )
            await context.abort(violation.code, violation.message)

    async def _read(self, session: NodeSession, context: grpc.aio.ServicerContext) -> ProtocolViolation | None:  # type: ignore[type-arg]
        """Apply the agent's messages until its stream ends; the violation that ended it early, if any."""
        while True:
            message = await context.read()
            if message is grpc.aio.EOF:
                return None
            try:
                self._handle(session, message)
            except ProtocolViolation as exc:
                return exc

    async def _authenticate(self, context: grpc.aio.ServicerContext) -> tuple[NodeEntry, str]:  # type: ignore[type-arg]
        """The node the call's credential names, and the credential's hash."""
        metadata = dict(context.invocation_metadata() or ())
        scheme, _, credential = str(metadata.get(AUTHORIZATION, "")).partition(" ")
        credential_hash = hash_key(credential.strip())
        node = self.snapshot().nodes.get(credential_hash) if scheme.lower() == "bearer" else None
        if node is None:
            await context.abort(
                grpc.StatusCode.UNAUTHENTICATED,
                "unknown or revoked node credential: enroll this machine again with a new token",
            )
        assert node is not None
        return node, credential_hash

    def _handle(self, session: NodeSession, message: pb.AgentMessage) -> None:
        """Apply one agent message; raises ProtocolViolation when it is out of bounds."""
        self.registry.touch(session)
        kind = message.WhichOneof("kind")
        if kind in ("status", "heartbeat") and not session.rate.allow():
            raise over_rate()
        if kind == "job":
            self.registry.on_event(session, message.job)
        elif kind == "status":
            check_status(message.status)
            self.registry.update_status(session, message.status)

    async def _write(self, session: NodeSession, context: grpc.aio.ServicerContext) -> None:  # type: ignore[type-arg]
        while True:
            message = await session.outbound.get()
            if message is None:
                return
            await context.write(message)
