"""A hostile agent speaking the real gRPC protocol: it enrolls and connects like an agent (TLS, the plane's
certificate pinned by the token's fingerprint), then says whatever a test tells it to: absurd capacity, floods of
Status messages or job events, another node's machine id. It can also behave, answering jobs with a fixed text.

It runs on an event loop of its own (a LoopThread), so a plane it manages to freeze cannot freeze it too.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import Iterable
from typing import Any

import grpc

from proto.contract import AUTHORIZATION, PLANE_TLS_NAME, certificate_fingerprint, split_enrollment_token
from proto.hatchway.node.v1 import node_pb2 as pb
from proto.hatchway.node.v1 import node_pb2_grpc

# No cap of its own on what it sends: the plane's are what is under test.
GRPC_OPTIONS = [
    ("grpc.enable_http_proxy", 0),
    ("grpc.ssl_target_name_override", PLANE_TLS_NAME),
    ("grpc.use_local_subchannel_pool", 1),
    ("grpc.max_send_message_length", -1),
    ("grpc.max_receive_message_length", -1),
]
MAX_UINT32 = 2**32 - 1


def model(name: str = "fake", slots: int = 1, **fields: Any) -> pb.ModelInfo:
    return pb.ModelInfo(
        name=name, slots=slots, context_per_slot=fields.pop("context_per_slot", 1024), chat=True, **fields
    )


def hello(models: Iterable[pb.ModelInfo] = (), **fields: Any) -> pb.Hello:
    return pb.Hello(agent_version="hostile", models=list(models) or [model()], **fields)


class Refused(Exception):
    """The plane ended the call: `code` and `details` are its gRPC status."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code.name}: {details[:300]}")
        self.code = code
        self.details = details


class Session:
    """One Connect stream, after the plane's Welcome."""

    def __init__(self, channel: grpc.aio.Channel, call: Any) -> None:
        self.channel = channel
        self.call = call  # the generated stubs are untyped
        self.jobs: asyncio.Queue[pb.JobRequest] = asyncio.Queue()
        # The job ids the plane cancelled.
        self.cancels: asyncio.Queue[str] = asyncio.Queue()
        self._reader: asyncio.Task[None] | None = None

    async def start_reading(self) -> None:
        """Collect the jobs the plane sends (in `jobs`) and the cancels (in `cancels`) until the stream ends."""
        self._reader = asyncio.get_running_loop().create_task(self._read())

    async def _read(self) -> None:
        with contextlib.suppress(grpc.aio.AioRpcError):
            while (message := await self.call.read()) is not grpc.aio.EOF:
                if message.HasField("job"):
                    self.jobs.put_nowait(message.job)
                elif message.HasField("cancel"):
                    self.cancels.put_nowait(message.cancel.job_id)

    async def send(self, message: pb.AgentMessage) -> None:
        await self.call.write(message)

    async def flood(self, messages: Iterable[pb.AgentMessage]) -> int:
        """Write `messages` until the plane ends the stream; how many were written."""
        sent = 0
        try:
            for message in messages:
                await self.call.write(message)
                sent += 1
        except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
            pass  # the plane ended the call: its status says why
        return sent

    async def ended(self, timeout_s: float = 30) -> Refused:
        """The status the plane ended the stream with (read once what it sent before)."""
        async with asyncio.timeout(timeout_s):
            if self._reader is not None:
                await asyncio.wait([self._reader])
            else:
                with contextlib.suppress(grpc.aio.AioRpcError):
                    while await self.call.read() is not grpc.aio.EOF:
                        pass
            code = await self.call.code()
        return Refused(code, await self.call.details() or "")

    async def serve(self, text: str, jobs: int = 1) -> None:
        """Answer the next `jobs` jobs with `text`, like a well-behaved agent."""
        for _ in range(jobs):
            job = await self.jobs.get()
            await self.send(
                pb.AgentMessage(job=pb.JobEvent(job_id=job.job_id, tokens=pb.TokenBatch(text=text, tokens=1)))
            )
            end = pb.JobEnd(finish_reason="stop", prompt_tokens=1, completion_tokens=1)
            await self.send(pb.AgentMessage(job=pb.JobEvent(job_id=job.job_id, end=end)))

    async def close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
        self.call.cancel()
        await self.channel.close()


class HostileAgent:
    """Parameters: the plane's node `address` (HOST:PORT) and an enrollment `token` of the org it joins."""

    def __init__(self, address: str, token: str) -> None:
        self.address = address
        self.token = token
        self.credential = ""
        self._ca_pem = b""

    def _channel(self) -> grpc.aio.Channel:
        credentials = grpc.ssl_channel_credentials(root_certificates=self._ca_pem)
        return grpc.aio.secure_channel(self.address, credentials, options=GRPC_OPTIONS)

    async def _pin(self) -> None:
        if self._ca_pem:
            return
        _, fingerprint = split_enrollment_token(self.token)
        host, _, port = self.address.rpartition(":")
        pem = await asyncio.to_thread(ssl.get_server_certificate, (host, int(port)), timeout=10)
        assert certificate_fingerprint(pem) == fingerprint, "the plane's certificate is not the token's"
        self._ca_pem = pem.encode()

    async def enroll(
        self, *, name: str = "hostile", machine_id: str = "hostile-machine", previous_credential: str = ""
    ) -> pb.EnrollResponse:
        """Enroll with the token; raises Refused with the plane's status when it says no."""
        await self._pin()
        secret, _ = split_enrollment_token(self.token)
        request = pb.EnrollRequest(
            token=secret, name=name, machine_id=machine_id, previous_credential=previous_credential
        )
        async with self._channel() as channel:
            try:
                response = await node_pb2_grpc.NodeServiceStub(channel).Enroll(request, timeout=30)
            except grpc.aio.AioRpcError as exc:
                raise Refused(exc.code(), exc.details() or "") from exc
        self.credential = response.credential
        return response  # type: ignore[no-any-return]

    async def _refusal(self, metadata: tuple[tuple[str, str], ...]) -> tuple[grpc.StatusCode, str]:
        """The status the plane ends a Connect call with before reading anything from it."""
        async with self._channel() as channel:
            call = node_pb2_grpc.NodeServiceStub(channel).Connect(metadata=metadata)
            with contextlib.suppress(grpc.aio.AioRpcError):
                await asyncio.wait_for(call.read(), 30)
            return await call.code(), await call.details() or ""

    async def connect(self, greeting: pb.Hello, credential: str | None = None) -> Session:
        """Open a session with `greeting` as its Hello; raises Refused when the plane answers with a status."""
        await self._pin()
        channel = self._channel()
        metadata = ((AUTHORIZATION, f"Bearer {credential or self.credential}"),)
        call = node_pb2_grpc.NodeServiceStub(channel).Connect(metadata=metadata)
        try:
            await call.write(pb.AgentMessage(hello=greeting))
            first = await asyncio.wait_for(call.read(), 30)
        except grpc.aio.AioRpcError as exc:
            code, details = await call.code(), await call.details() or ""
            await channel.close()
            if code == grpc.StatusCode.INTERNAL:
                # The Hello was written as the plane refused the call, and gRPC core answered for it: ask again
                # without writing, for the plane's own status (a refusal comes before any Hello is read).
                code, details = await self._refusal(metadata)
            raise Refused(code, details) from exc
        except asyncio.InvalidStateError:
            first = grpc.aio.EOF  # the plane ended the call while the Hello was being written
        if first is grpc.aio.EOF:
            refused = Refused(await call.code(), await call.details() or "")
            await channel.close()
            raise refused
        assert first.HasField("welcome"), first
        return Session(channel, call)
