"""A node that lies about its usage: it speaks the real protocol (enrolls over TLS with a real token, connects,
says Hello, heartbeats) and answers every job with a short text and a `JobEnd` whose token counts it chooses.

Runs on the test's loop thread (tests/support/loop_thread.py), beside the plane.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from typing import Any

import grpc

from proto.contract import AUTHORIZATION, PLANE_TLS_NAME, certificate_fingerprint, split_enrollment_token
from proto.hatchway.node.v1 import node_pb2 as pb
from proto.hatchway.node.v1 import node_pb2_grpc

# Loopback only: a proxy in the environment must not see the channel.
GRPC_OPTIONS = [("grpc.enable_http_proxy", 0), ("grpc.ssl_target_name_override", PLANE_TLS_NAME)]


class LyingNode:
    """Parameters: the plane's gRPC `address`, the node's `name`, the model it serves (`model`, with `context`
    and prices), the `text` it answers, and the `prompt_tokens` / `completion_tokens` it claims for it."""

    def __init__(
        self,
        address: str,
        *,
        name: str = "liar",
        model: str = "liar-model",
        text: str = "Paris.",
        prompt_tokens: int = 7,
        completion_tokens: int = 2**32 - 1,
        price_in: float = 1.0,
        price_out: float = 2.0,
        context: int = 2048,
    ) -> None:
        self.address = address
        self.name = name
        self.model = model
        self.text = text
        self.prompt_tokens = prompt_tokens
        self.completion_tokens = completion_tokens
        self.price_in = price_in
        self.price_out = price_out
        self.context = context
        self.jobs_answered = 0
        self.node_id = ""
        self._credential = ""
        self._ca_pem = b""
        self._channel: grpc.aio.Channel | None = None
        self._call: Any = None  # the generated stubs are untyped
        self._tasks: set[asyncio.Task[None]] = set()
        self._send = asyncio.Lock()

    async def enroll(self, token: str) -> None:
        secret, fingerprint = split_enrollment_token(token)
        host, _, port = self.address.rpartition(":")
        pem = await asyncio.to_thread(ssl.get_server_certificate, (host, int(port)), timeout=10)
        assert certificate_fingerprint(pem) == fingerprint, "not the plane the token names"
        self._ca_pem = pem.encode()
        request = pb.EnrollRequest(token=secret, name=self.name, machine_id=f"machine-{self.name}")
        async with self._open_channel() as channel:
            response = await node_pb2_grpc.NodeServiceStub(channel).Enroll(request, timeout=30)
        self._credential, self.node_id = response.credential, response.node_id

    async def connect(self) -> None:
        self._channel = self._open_channel()
        metadata = ((AUTHORIZATION, f"Bearer {self._credential}"),)
        self._call = node_pb2_grpc.NodeServiceStub(self._channel).Connect(metadata=metadata)
        info = pb.ModelInfo(
            name=self.model,
            slots=2,
            context_per_slot=self.context,
            has_price=True,
            price_in=self.price_in,
            price_out=self.price_out,
            chat=True,
        )
        await self._call.write(pb.AgentMessage(hello=pb.Hello(agent_version="liar", models=[info])))
        welcome = await asyncio.wait_for(self._call.read(), 30)
        assert welcome.HasField("welcome"), f"the plane answered Hello with {welcome!r}"
        heartbeat_s = max(0.2, welcome.welcome.heartbeat_interval_ms / 1000)
        for work in (self._read(), self._beat(heartbeat_s)):
            task = asyncio.create_task(work)
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        if self._call is not None:
            self._call.cancel()
        if self._channel is not None:
            await self._channel.close()

    def _open_channel(self) -> grpc.aio.Channel:
        credentials = grpc.ssl_channel_credentials(root_certificates=self._ca_pem)
        return grpc.aio.secure_channel(self.address, credentials, options=GRPC_OPTIONS)

    async def _write(self, message: pb.AgentMessage) -> None:
        async with self._send:  # gRPC allows one write in flight per call
            await self._call.write(message)

    async def _read(self) -> None:
        while (message := await self._call.read()) is not grpc.aio.EOF:
            if message.WhichOneof("kind") == "job":
                await self._answer(message.job.job_id)

    async def _answer(self, job_id: str) -> None:
        batch = pb.TokenBatch(text=self.text, tokens=1)
        await self._write(pb.AgentMessage(job=pb.JobEvent(job_id=job_id, tokens=batch)))
        end = pb.JobEnd(
            finish_reason="stop", prompt_tokens=self.prompt_tokens, completion_tokens=self.completion_tokens
        )
        await self._write(pb.AgentMessage(job=pb.JobEvent(job_id=job_id, end=end)))
        self.jobs_answered += 1

    async def _beat(self, every_s: float) -> None:
        while True:
            await asyncio.sleep(every_s)
            await self._write(pb.AgentMessage(heartbeat=pb.Heartbeat(sent_unix_ms=int(time.time() * 1000))))
