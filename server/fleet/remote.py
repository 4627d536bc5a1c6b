"""A node connected to another plane, as this plane's registry sees it."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from proto.hatchway.node.v1 import node_pb2 as pb
from server.nodes.bounds import clamp_speed
from server.nodes.registry import Job, ModelSlots, NodeSession

# How a RemoteSession reaches the node's plane (server.fleet.broker.Fleet).
Start = Callable[["RemoteSession", Job, pb.JobRequest], Awaitable[bool]]
Cancel = Callable[["RemoteSession", str], None]


@dataclass(eq=False)
class RemoteSession(NodeSession):
    """Slots and state as the node's plane last advertised them. `busy` counts that plane's claims plus this
    plane's own since that advertisement; only the node's plane claims, so the sum may run ahead, never short."""

    owner: str = ""  # the node's plane's id
    advertised_accepting: bool = True
    advertised_state: str = "ready"
    starter: Start | None = None
    canceller: Cancel | None = None

    @property
    def stale(self) -> bool:
        return False  # the node's plane says when it is; the fleet drops a plane that stops advertising

    @property
    def accepting(self) -> bool:
        return not self.closed and self.advertised_accepting

    @property
    def state(self) -> str:
        return "offline" if self.closed else self.advertised_state

    def advertise(self, doc: dict[str, Any], plane_name: str, hello: pb.Hello | None) -> None:
        """Apply the node's plane's latest account of it."""
        self.name = doc["name"]
        self.plane = plane_name
        self.advertised_accepting = bool(doc["accepting"])
        self.advertised_state = str(doc["state"])
        self.connected_at = float(doc["connected_at"])
        if hello is not None:
            self.hello = hello
        models: dict[str, ModelSlots] = {}
        for name, total, busy, context, price_in, price_out, chat, embeddings in doc["models"]:
            models[name] = ModelSlots(name, total, context, price_in, price_out, chat, embeddings, busy=busy)
        speeds = doc.get("speeds")  # absent from an older plane's advertisement
        for name, (tokens_per_s, jobs) in speeds.items() if isinstance(speeds, dict) else ():
            if name in models and isinstance(tokens_per_s, int | float) and isinstance(jobs, int):
                # Another plane of the same gateway checked it (bounds.check_status); clamped again all the same.
                models[name].tokens_per_s = clamp_speed(float(tokens_per_s)) or None
                models[name].jobs_measured = jobs if models[name].tokens_per_s else 0
        self.models = models

    def send(self, message: pb.PlaneMessage) -> None:
        # Drains and resumes reach the node through its own plane (server.plane.follow_node_changes).
        if message.HasField("cancel") and self.canceller is not None and not self.closed:
            self.canceller(self, message.cancel.job_id)

    async def start(self, job: Job, request: pb.JobRequest) -> bool:
        if self.starter is None or self.closed:
            return False
        return await self.starter(self, job, request)
