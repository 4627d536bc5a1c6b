"""A fake agent speaking the real gRPC protocol: enrolls, connects over TLS, says Hello, heartbeats, and
answers every job with `messages` one-token batches and a JobEnd. The node benchmark uses one to measure the
plane's job stream; the fleet benchmark runs a thousand in one process.
"""

from __future__ import annotations

import asyncio
import ssl
import string
import time
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any

import grpc
from harness import BenchError

from proto.contract import AUTHORIZATION, PLANE_TLS_NAME, certificate_fingerprint, split_enrollment_token
from proto.hatchway.node.v1 import node_pb2 as pb
from proto.hatchway.node.v1 import node_pb2_grpc

FAKE_MODEL = "fake"
FAKE_SLOTS = 64
CONTEXT = 1024
# One character per batch, cycling so the client can tell a reordered or lost batch.
LETTERS = string.ascii_lowercase
# Loopback only: a proxy configured in the environment must not see the gRPC channel; and a channel of its own
# per agent (no shared subchannel pool), so every fake agent is one TCP connection, like a real fleet.
GRPC_OPTIONS = [
    ("grpc.enable_http_proxy", 0),
    ("grpc.ssl_target_name_override", PLANE_TLS_NAME),
    ("grpc.use_local_subchannel_pool", 1),
]


async def plane_certificate(address: str, token: str) -> bytes:
    """The plane's certificate, pinned like the real agent pins it: the one the token's fingerprint names."""
    _, fingerprint = split_enrollment_token(token)
    host, _, port = address.rpartition(":")
    pem = await asyncio.to_thread(ssl.get_server_certificate, (host, int(port)), timeout=10)
    if certificate_fingerprint(pem) != fingerprint:
        raise BenchError("the plane's certificate does not match the enrollment token's fingerprint")
    return pem.encode()


@dataclass
class SendWindow:
    """Job messages the fake agent wrote to its gRPC stream since the last reset, and when."""

    messages: int = 0
    first_at: float | None = None
    last_at: float = 0.0

    def record(self) -> None:
        now = time.perf_counter()
        if self.first_at is None:
            self.first_at = now
        self.last_at = now
        self.messages += 1

    @property
    def elapsed_s(self) -> float:
        return self.last_at - self.first_at if self.first_at is not None else 0.0


class FakeAgent:
    """Enough of an agent for the plane to dispatch to: Hello, heartbeats, and scripted answers to jobs."""

    def __init__(self, address: str, ca_pem: bytes, name: str, messages: int = 1) -> None:
        self.address = address
        self.name = name
        self.messages = messages
        self.window = SendWindow()
        self.jobs_answered = 0
        self.heartbeats_sent = 0
        self._ca_pem = ca_pem
        self._credential = ""
        self._channel: grpc.aio.Channel | None = None
        self._call: Any = None  # the generated stubs are untyped
        # Bounded, so a job that outruns the gRPC stream waits instead of piling messages up in memory; small, so
        # concurrent jobs take turns (waiting putters are woken in order) as a real agent's slots would.
        self._outbox: asyncio.Queue[pb.AgentMessage] = asyncio.Queue(maxsize=64)
        self._cancelled: set[str] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._heartbeat_s = 5.0

    def _open_channel(self) -> grpc.aio.Channel:
        credentials = grpc.ssl_channel_credentials(root_certificates=self._ca_pem)
        return grpc.aio.secure_channel(self.address, credentials, options=GRPC_OPTIONS)

    async def enroll(self, token: str) -> None:
        secret, _ = split_enrollment_token(token)
        request = pb.EnrollRequest(token=secret, name=self.name, machine_id=self.name)
        async with self._open_channel() as channel:
            response = await node_pb2_grpc.NodeServiceStub(channel).Enroll(request, timeout=60)
        self._credential = response.credential

    async def connect(self) -> None:
        self._channel = self._open_channel()
        metadata = ((AUTHORIZATION, f"Bearer {self._credential}"),)
        # No request iterator: write() applies gRPC's flow control to every message, so the send rate is real.
        self._call = node_pb2_grpc.NodeServiceStub(self._channel).Connect(metadata=metadata)
        model = pb.ModelInfo(name=FAKE_MODEL, slots=FAKE_SLOTS, context_per_slot=CONTEXT, chat=True)
        await self._call.write(pb.AgentMessage(hello=pb.Hello(agent_version="bench", models=[model])))
        first = await asyncio.wait_for(self._call.read(), 30.0)
        if not isinstance(first, pb.PlaneMessage) or not first.HasField("welcome"):
            raise BenchError(f"the plane answered Hello with {first!r}, not Welcome")
        self._heartbeat_s = max(0.2, first.welcome.heartbeat_interval_ms / 1000)
        for work in (self._read(), self._write(), self._beat()):
            self._spawn(work)

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(work)
        self._tasks.add(task)  # held, or the loop may collect a running task
        task.add_done_callback(self._tasks.discard)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        if self._call is not None:
            self._call.cancel()
        if self._channel is not None:
            await self._channel.close()

    async def _read(self) -> None:
        while (message := await self._call.read()) is not grpc.aio.EOF:
            kind = message.WhichOneof("kind")
            if kind == "job":
                self._spawn(self._answer(message.job.job_id))
            elif kind == "cancel":
                self._cancelled.add(message.cancel.job_id)

    async def _answer(self, job_id: str) -> None:
        sent = 0
        while sent < self.messages and job_id not in self._cancelled:
            batch = pb.TokenBatch(text=LETTERS[sent % len(LETTERS)], tokens=1)
            await self._outbox.put(pb.AgentMessage(job=pb.JobEvent(job_id=job_id, tokens=batch)))
            sent += 1
        finish = "cancelled" if job_id in self._cancelled else "length"
        end = pb.JobEnd(finish_reason=finish, prompt_tokens=1, completion_tokens=sent)
        await self._outbox.put(pb.AgentMessage(job=pb.JobEvent(job_id=job_id, end=end)))
        self._cancelled.discard(job_id)
        self.jobs_answered += 1

    async def _write(self) -> None:
        # The only writer: gRPC allows one write in flight per call.
        while True:
            message = await self._outbox.get()
            await self._call.write(message)
            if message.HasField("job"):
                self.window.record()

    async def _beat(self) -> None:
        while True:
            await asyncio.sleep(self._heartbeat_s)
            heartbeat = pb.Heartbeat(sent_unix_ms=int(time.time() * 1000))
            await self._outbox.put(pb.AgentMessage(heartbeat=heartbeat))
            self.heartbeats_sent += 1
