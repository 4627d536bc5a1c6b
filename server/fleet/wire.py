"""What planes say to each other over NATS: subjects, and the frames of advertisements, jobs and events."""

from __future__ import annotations

import base64
from dataclasses import dataclass
from typing import Any

import orjson

from proto.hatchway.node.v1 import node_pb2 as pb

# Replies to a job request.
ACCEPTED = b"ok"
REFUSED = b"busy"
# Event frames: a node's JobEvent (whose job_id is the asking plane's), or the end of the node's session.
EVENT = b"E"
LOST = b"L"


@dataclass(frozen=True)
class Subjects:
    prefix: str

    @property
    def ads(self) -> str:
        return f"{self.prefix}.fleet.ads"

    def jobs(self, plane_id: str) -> str:
        return f"{self.prefix}.plane.{plane_id}.jobs"

    def cancels(self, plane_id: str) -> str:
        return f"{self.prefix}.plane.{plane_id}.cancels"

    def events(self, plane_id: str) -> str:
        return f"{self.prefix}.plane.{plane_id}.events"


@dataclass(frozen=True)
class JobOrder:
    """A job one plane asks another to run on one of its nodes."""

    node_id: str
    model: str
    endpoint: str
    origin: str  # the asking plane's id
    job_id: str  # the asking plane's job id: events and cancels name it
    body: bytes

    def encode(self) -> bytes:
        head = {"node": self.node_id, "model": self.model, "endpoint": self.endpoint, "from": self.origin}
        return orjson.dumps({**head, "job": self.job_id}) + b"\n" + self.body

    @classmethod
    def decode(cls, data: bytes) -> JobOrder:
        head, _, body = data.partition(b"\n")
        doc = orjson.loads(head)
        return cls(doc["node"], doc["model"], doc["endpoint"], doc["from"], doc["job"], body)


def encode_cancel(origin: str, job_id: str) -> bytes:
    return orjson.dumps({"from": origin, "job": job_id})


def decode_cancel(data: bytes) -> tuple[str, str]:
    doc = orjson.loads(data)
    return doc["from"], doc["job"]


def encode_ad(plane_id: str, name: str, nodes: list[dict[str, Any]], *, bye: bool = False) -> bytes:
    return orjson.dumps({"plane": plane_id, "name": name, "nodes": nodes, "bye": bye})


def describe(session: Any, *, full: bool) -> dict[str, Any]:
    """A local node as other planes see it; `full` adds its Hello (hardware, versions) for their admin views."""
    doc: dict[str, Any] = {
        "id": session.node_id,
        "org": session.org_id,
        "name": session.name,
        "accepting": session.accepting,
        "state": session.state,
        "connected_at": session.connected_at,
        "models": [
            [m.name, m.slots_total, m.busy, m.context, m.price_in, m.price_out, m.chat, m.embeddings]
            for m in session.models.values()
        ],
        # Measured speeds apart from `models`, whose rows older planes unpack by position: {model: [tokens/s, jobs]}.
        "speeds": {m.name: [m.tokens_per_s, m.jobs_measured] for m in session.models.values() if m.tokens_per_s},
    }
    if full:
        doc["hello"] = base64.b64encode(session.hello.SerializeToString()).decode()
    return doc


def hello_of(doc: dict[str, Any]) -> pb.Hello | None:
    encoded = doc.get("hello")
    return pb.Hello.FromString(base64.b64decode(encoded)) if encoded else None
