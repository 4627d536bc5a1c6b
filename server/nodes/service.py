"""The node service agents dial: `Enroll` once, then one `Connect` stream for as long as they run.

Every stream is opened by the agent (nodes behind NAT need no inbound port). `Connect` authenticates the node
credential from the call's metadata against the in-memory snapshot, waits for the agent's Hello, registers the
session, and from then on reads agent messages (status, heartbeats, job events) while a writer task sends what
the plane queued for that node (jobs, cancels, drains).
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
from server.nodes.registry import NodeRegistry, NodeSession
from server.snapshot import NodeEntry, Snapshot
from server.storage.nodes import EnrollmentRefused, NodeStore

log = logging.getLogger(__name__)

HELLO_TIMEOUT_S = 10.0
# Settings pushed to every agent after Welcome: flush the first token at once, then every 50 ms or 16 tokens.
# Every batch wakes the agent's and the plane's loops, which take a core from llama.cpp for a moment: with
# 30 ms, a 2-core node generated at 95.5 % of llama.cpp's own tokens/s; with 50 ms, 97.3-100.5 % in three runs
# (bench/node.py). 20 updates a second still read as a smooth stream.
TOKEN_BATCH_MS = 50
TOKEN_BATCH_MAX = 16


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
        secret, _ = split_enrollment_token(request.token)
        try:
            enrolled = await asyncio.to_thread(
                self.nodes.enroll, secret, request.name or request.hardware.hostname, request.machine_id
            )
        except EnrollmentRefused as exc:
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, str(exc))
        await self.reload()  # the new credential must be known before the agent connects with it
        log.info("node %s (%s) enrolled in org %s", enrolled.node["id"], enrolled.node["name"], enrolled.node["org"])
        return pb.EnrollResponse(node_id=enrolled.node["id"], credential=enrolled.credential, org=enrolled.node["org"])

    async def Connect(self, request_iterator: object, context: grpc.aio.ServicerContext) -> None:  # type: ignore[type-arg]
        node = await self._authenticate(context)
        try:
            first = await asyncio.wait_for(context.read(), HELLO_TIMEOUT_S)
        except TimeoutError:
            await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, "no Hello from the agent")
        if first is grpc.aio.EOF or not isinstance(first, pb.AgentMessage) or not first.HasField("hello"):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "the first message must be Hello")
        session = NodeSession(
            node_id=node.id,
            org_id=node.org_id,
            name=node.name,
            hello=first.hello,
            heartbeat_s=self.heartbeat_s,
            drained=node.drained,
        )
        self.registry.register(session)
        log.info(
            "node %s (%s) connected: %s",
            node.id,
            node.name,
            ", ".join(m.name for m in first.hello.models) or "no model",
        )
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
        writer = asyncio.create_task(self._write(session, context))
        try:
            while True:
                message = await context.read()
                if message is grpc.aio.EOF:
                    break
                self._handle(session, message)
                if writer.done():
                    break  # the plane closed the session (revoked, replaced by a reconnect)
        finally:
            self.registry.unregister(session)
            writer.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await writer
            log.info("node %s (%s) disconnected", node.id, node.name)

    async def _authenticate(self, context: grpc.aio.ServicerContext) -> NodeEntry:  # type: ignore[type-arg]
        metadata = dict(context.invocation_metadata() or ())
        scheme, _, credential = str(metadata.get(AUTHORIZATION, "")).partition(" ")
        node = self.snapshot().nodes.get(hash_key(credential.strip())) if scheme.lower() == "bearer" else None
        if node is None:
            await context.abort(
                grpc.StatusCode.UNAUTHENTICATED,
                "unknown or revoked node credential: enroll this machine again with a new token",
            )
        assert node is not None
        return node

    def _handle(self, session: NodeSession, message: pb.AgentMessage) -> None:
        self.registry.touch(session)
        kind = message.WhichOneof("kind")
        if kind == "job":
            self.registry.on_event(session, message.job)
        elif kind == "status":
            self.registry.update_status(session, message.status)

    async def _write(self, session: NodeSession, context: grpc.aio.ServicerContext) -> None:  # type: ignore[type-arg]
        while True:
            message = await session.outbound.get()
            if message is None:
                return
            await context.write(message)
