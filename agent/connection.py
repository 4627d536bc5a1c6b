"""The agent's side of the wire: enrollment, and the session it keeps open to the plane.

`Agent.run` dials out (nodes need no inbound port), authenticates with the node credential, says Hello with its
hardware and models, then serves the jobs the plane sends until the stream drops; then it dials the next of the
config's planes (they share one database, so each knows the node's credential, and one node certificate, so the
pinned one holds for all) and registers there. The next plane is dialled at once (a fraction of a second): a
plane killed resets its connections, so a node is served by another plane well within 5 s. Only a round in which
every plane failed waits, with exponential backoff (1 s to 60 s, with jitter), before the next round.

Tokens go back in batches: the first at once, then every `token_batch_ms` or `token_batch_max` tokens, whichever
comes first. The engine forms the batches (see `agent.engine.Job`), so that the tokens inside a batch do not each
wake the event loop; each becomes one TokenBatch.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import platform
import random
import ssl
import threading
import time
from collections.abc import AsyncIterator

import grpc
from cryptography import x509

from agent import __version__
from agent.config import AgentConfig
from agent.engine import End, Engine, EngineError, Job, Result, Text
from agent.gpufit import backend
from agent.hardware import Hardware, collect
from agent.idle import IdleGate, LoadProbe
from agent.sampling import TokenLogprob
from proto.contract import (
    AUTHORIZATION,
    NODE_MESSAGE_MAX_BYTES,
    PLANE_MESSAGE_MAX_BYTES,
    PLANE_TLS_NAME,
    certificate_fingerprint,
    keepalive_options,
    split_enrollment_token,
)
from proto.hatchway.node.v1 import node_pb2 as pb
from proto.hatchway.node.v1 import node_pb2_grpc

log = logging.getLogger("hatchway.agent")

BACKOFF_FIRST_S = 1.0
BACKOFF_MAX_S = 60.0
# Between one plane failing and dialling the next: a pause (with jitter) so that the agents of a plane that died
# do not all land on the next one in the same instant, short beside the 5 s in which a node must be back.
NEXT_PLANE_S = 0.2
# A session that lasted this long after its Welcome was a healthy one: whatever ends it starts a fresh round with no
# backoff. Shorter ones count as failures, so a plane that welcomes the node and drops it at once is not dialled in a
# tight loop (at most once per this long, per agent).
HEALTHY_SESSION_S = 5.0
# How long a plane has to welcome the node once dialled: an address that swallows packets (a host gone, a
# firewall) would otherwise hold the agent for gRPC's 20 s connect timeout before it tries the next plane.
WELCOME_TIMEOUT_S = 10.0
# How long a leaving agent waits for the plane to acknowledge the end of its stream.
CLOSE_TIMEOUT_S = 5.0
# Keepalive pings find a silently dead connection (a NAT that forgot it, a plane gone without a reset) long before
# TCP would: one every KEEPALIVE_S, and a ping unanswered for as long closes the channel, so the agent reconnects
# within about twice that. The plane accepts pings down to one a second (server.plane).
KEEPALIVE_S = 5.0


def channel_options(keepalive_s: float = KEEPALIVE_S) -> list[tuple[str, int]]:
    """The channel's options: keepalive, and message caps that match the plane's (proto/contract.py says why)."""
    return [
        *keepalive_options(keepalive_s),
        ("grpc.max_send_message_length", NODE_MESSAGE_MAX_BYTES),
        ("grpc.max_receive_message_length", PLANE_MESSAGE_MAX_BYTES),
    ]


# Room in an agent message for what surrounds a job's result (job id, usage, protobuf framing).
RESULT_OVERHEAD_BYTES = 4096


class CredentialRefused(Exception):
    """The plane refused this node's credential (revoked, or enrolled elsewhere): retrying cannot help."""


class EnrollmentError(Exception):
    """Enrollment failed; the message says why (bad token, plane certificate mismatch, unreachable plane)."""


class PlaneUnreachable(EnrollmentError):
    """The plane did not answer (down, or a wrong address)."""


# -- enrollment -----------------------------------------------------------------------------------------


def fetch_plane_certificate(plane: str, fingerprint: str) -> str:
    """The plane's certificate, accepted only if it is the one the token names."""
    host, _, port = plane.rpartition(":")
    try:
        pem = ssl.get_server_certificate((host.strip("[]"), int(port)), timeout=10)
    except (OSError, ValueError) as exc:
        raise PlaneUnreachable(f"cannot reach the plane at {plane}: {exc}") from exc
    if not fingerprint:
        raise EnrollmentError("the token carries no CA fingerprint: ask the admin for a new one")
    if certificate_fingerprint(pem) != fingerprint:
        raise EnrollmentError(
            f"the plane at {plane} presented a certificate that does not match the token: refusing to enroll"
        )
    return pem


def tls_name(cert_pem: str) -> str:
    """The name to check the plane's certificate against: `hatchway-plane` for the plane's own certificate,
    else (an operator's certificate) "" for the address dialled."""
    try:
        names = x509.load_pem_x509_certificate(cert_pem.encode()).extensions.get_extension_for_class(
            x509.SubjectAlternativeName
        )
    except (ValueError, x509.ExtensionNotFound):
        return ""
    return PLANE_TLS_NAME if PLANE_TLS_NAME in names.value.get_values_for_type(x509.DNSName) else ""


def open_channel(plane: str, ca_pem: str, insecure: bool, keepalive_s: float = KEEPALIVE_S) -> grpc.aio.Channel:
    options: list[tuple[str, int | str]] = [*channel_options(keepalive_s)]
    if insecure:
        return grpc.aio.insecure_channel(plane, options=options)
    credentials = grpc.ssl_channel_credentials(root_certificates=ca_pem.encode())
    if name := tls_name(ca_pem):
        options.append(("grpc.ssl_target_name_override", name))
    return grpc.aio.secure_channel(plane, credentials, options=options)


def previous_credential(config: AgentConfig, plane: str, token: str, insecure: bool) -> str:
    """The credential `config` holds for the gateway this token enrolls with, or "".

    Sent with the enrollment as proof that this machine is the node it was, so it keeps its node id. Only to the
    same gateway: the one whose certificate the token pins (every plane of a gateway presents the same one), or,
    without TLS, one of the addresses the config lists, so no other gateway ever learns a credential it could use
    against this one."""
    if not config.credential:
        return ""
    if insecure or config.insecure:
        return config.credential if insecure and config.insecure and plane in config.planes else ""
    _, fingerprint = split_enrollment_token(token)
    try:
        same = bool(config.ca_pem) and certificate_fingerprint(config.ca_pem) == fingerprint
    except ValueError:
        same = False  # an unreadable certificate in the config pins nothing
    return config.credential if same else ""


def plane_certificate_problem(plane: str, fingerprint: str) -> str:
    """What keeps the agent from failing over to `plane`, if it can tell: "" when the plane presents the certificate
    the token pins, else why it cannot be checked. Raises EnrollmentError when it presents another.

    Every plane of a gateway presents the same node certificate (a shared data dir, or the same grpc_tls_cert):
    a plane that presents another would refuse the agent's TLS handshake at the moment it is needed, so enrolling
    stops, before the token is spent, while the admin is there to fix it."""
    try:
        fetch_plane_certificate(plane, fingerprint)
    except PlaneUnreachable as exc:
        return f"not answering now, so its certificate is unchecked ({exc.__cause__})"
    return ""


async def enroll(
    plane: str, token: str, *, name: str, machine_id: str, insecure: bool, previous: str = ""
) -> tuple[pb.EnrollResponse, str]:
    """Trade the token (and `previous`, this machine's current credential, if any) for a node id and credential;
    returns them with the plane's pinned certificate."""
    secret, fingerprint = split_enrollment_token(token)
    ca_pem = "" if insecure else await asyncio.to_thread(fetch_plane_certificate, plane, fingerprint)
    hardware = await asyncio.to_thread(collect)
    request = pb.EnrollRequest(
        token=secret,
        name=name,
        machine_id=machine_id,
        hardware=hardware_message(hardware),
        previous_credential=previous,
    )
    async with open_channel(plane, ca_pem, insecure) as channel:
        try:
            response = await node_pb2_grpc.NodeServiceStub(channel).Enroll(request, timeout=30)
        except grpc.aio.AioRpcError as exc:
            raise EnrollmentError(f"the plane refused the enrollment: {exc.details()}") from exc
    return response, ca_pem


def hardware_message(hardware: Hardware) -> pb.Hardware:
    return pb.Hardware(
        hostname=hardware.hostname,
        os=hardware.os,
        cpu_model=hardware.cpu_model,
        cpu_count=hardware.cpu_count,
        ram_total_bytes=hardware.ram_total_bytes,
        ram_available_bytes=hardware.ram_available_bytes,
        gpus=[
            pb.Gpu(
                name=g.name,
                vram_total_bytes=g.vram_total_bytes or 0,
                vram_free_bytes=g.vram_free_bytes or 0,
                utilization_percent=g.utilization_percent or 0.0,
                driver=g.driver or "",
            )
            for g in hardware.gpus
        ],
        nvml_status=hardware.nvml_status,
    )


def _wire_logprobs(entries: tuple[TokenLogprob, ...]) -> list[pb.TokenLogprob]:
    return [
        pb.TokenLogprob(
            token=e.token, logprob=e.logprob, top=[pb.TopLogprob(token=t.token, logprob=t.logprob) for t in e.top]
        )
        for e in entries
    ]


# -- the session ------------------------------------------------------------------------------------------


class Agent:
    def __init__(
        self,
        config: AgentConfig,
        engine: Engine,
        *,
        probe: LoadProbe | None = None,
        drain_timeout_s: float = 30.0,
        keepalive_s: float = KEEPALIVE_S,
    ) -> None:
        self.config = config
        self.keepalive_s = keepalive_s
        self.engine = engine
        self.gate = IdleGate(config.idle, probe) if config.mode == "idle-only" and probe is not None else None
        self.drain_timeout_s = drain_timeout_s
        self.draining = False
        self.hardware = collect()
        self._jobs: dict[str, tuple[asyncio.Task[None], threading.Event]] = {}
        self._outbox: asyncio.Queue[_Outgoing | None] | None = None
        self._status_version = 0
        self._heartbeat_s = 5.0
        self._batch_ms = 50
        self._batch_max = 64
        self.connected = asyncio.Event()
        # The plane of the current (or last) session, the one that welcomed this node, and when it did.
        self.plane = ""
        self._welcomed_at: float | None = None

    @property
    def paused(self) -> bool:
        return self.gate is not None and self.gate.paused

    async def run(self, stop: asyncio.Event) -> None:
        """Keep a session open until `stop` is set; then drain running jobs and leave."""
        watcher = asyncio.create_task(self._watch_owner(self.gate)) if self.gate is not None else None
        try:
            await self._keep_session(stop)
        finally:
            if watcher is not None:
                watcher.cancel()

    async def _keep_session(self, stop: asyncio.Event) -> None:
        planes = self.config.planes
        backoff = BACKOFF_FIRST_S
        index = 0
        failures = 0  # sessions that failed (or were short) since the last healthy one, whichever the plane
        refusal: grpc.aio.AioRpcError | None = None
        while not stop.is_set():
            plane = planes[index]
            self._welcomed_at = None
            session = asyncio.create_task(self._session(plane))
            stopper = asyncio.create_task(stop.wait())
            await asyncio.wait({session, stopper}, return_when=asyncio.FIRST_COMPLETED)
            if stop.is_set():
                await self._drain()
                await self._close_session(session)
                break
            stopper.cancel()
            try:
                session.result()
                log.warning("the plane at %s closed the session", plane)
            except TimeoutError:
                log.warning("the plane at %s did not welcome this node within %.0fs", plane, WELCOME_TIMEOUT_S)
            except grpc.aio.AioRpcError as exc:
                if exc.code() == grpc.StatusCode.UNAUTHENTICATED:
                    refusal = exc
                log.warning("session to %s lost: %s %s", plane, exc.code().name, exc.details())
            self._abandon_jobs()
            if self._welcomed_at is not None and time.monotonic() - self._welcomed_at > HEALTHY_SESSION_S:
                failures, refusal, backoff = 0, None, BACKOFF_FIRST_S  # a healthy session: start over quickly
            failures += 1
            index = (index + 1) % len(planes)
            if failures < len(planes):
                delay = NEXT_PLANE_S * random.uniform(0.5, 1.0)
            else:
                # A whole round without a lasting session. The planes share one database, so a refusal is the
                # gateway's answer; it is final once no other plane of the round took the node instead (one that
                # had not yet heard of a new enrollment gets its chance).
                if refusal is not None:
                    raise CredentialRefused(refusal.details() or "credential refused") from refusal
                delay = backoff * random.uniform(0.5, 1.0)
                backoff = min(BACKOFF_MAX_S, backoff * 2)
                failures = 0
            log.info("reconnecting to %s in %.1fs", planes[index], delay)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=delay)

    async def _session(self, plane: str) -> None:
        outbox: asyncio.Queue[_Outgoing | None] = asyncio.Queue()
        self._outbox = outbox
        self._send(pb.AgentMessage(hello=self._hello()))
        metadata = ((AUTHORIZATION, f"Bearer {self.config.credential}"),)
        async with open_channel(plane, self.config.ca_pem, self.config.insecure, self.keepalive_s) as channel:
            call = node_pb2_grpc.NodeServiceStub(channel).Connect(_drain_queue(outbox), metadata=metadata)
            ticker = asyncio.create_task(self._tick())
            try:
                async with asyncio.timeout(WELCOME_TIMEOUT_S) as welcome:
                    async for message in call:
                        self._handle(message, plane)
                        if self.connected.is_set() and welcome.when() is not None:
                            welcome.reschedule(None)  # welcomed: the session lasts as long as the stream
            finally:
                ticker.cancel()
                self.connected.clear()
                self._outbox = None
                # Ends the request iterator gRPC may still be reading: a stream that died (a ping timeout) would
                # leave it waiting on a queue no one fills any more.
                outbox.put_nowait(None)

    def _send(self, message: pb.AgentMessage, written: threading.Event | None = None) -> None:
        """Queue `message` for the plane; `written` is set once gRPC has written it (or it never will be)."""
        if self._outbox is not None:
            self._outbox.put_nowait((message, written))
        elif written is not None:
            written.set()

    def _handle(self, message: pb.PlaneMessage, plane: str) -> None:
        kind = message.WhichOneof("kind")
        if kind == "welcome":
            self._heartbeat_s = max(0.2, message.welcome.heartbeat_interval_ms / 1000)
            log.info("connected to the plane at %s as node %s", plane, message.welcome.node_id)
            self.plane = plane
            self._welcomed_at = time.monotonic()
            self.connected.set()
            self._send_status()
        elif kind == "config":
            self._batch_ms = message.config.token_batch_ms or self._batch_ms
            self._batch_max = message.config.token_batch_max or self._batch_max
        elif kind == "job":
            self._start_job(message.job)
        elif kind == "cancel":
            running = self._jobs.get(message.cancel.job_id)
            if running is not None:
                running[1].set()  # the engine stops between two tokens
        elif kind == "drain":
            log.info("draining: %s", message.drain.reason)
            self.draining = True
            self._send_status()
        elif kind == "resume":
            log.info("resuming: taking jobs again")
            self.draining = False
            self._send_status()

    async def _tick(self) -> None:
        """Heartbeats, on the plane's interval."""
        # The interval comes with Welcome: ticking before it, at the default 5 s, left a plane that asks for
        # heartbeats more often counting this node unresponsive for its first seconds.
        await self.connected.wait()
        while True:
            await asyncio.sleep(self._heartbeat_s)
            self._send(pb.AgentMessage(heartbeat=pb.Heartbeat(sent_unix_ms=int(time.time() * 1000))))

    async def _watch_owner(self, gate: IdleGate) -> None:
        """idle-only: read the owner's load on the gate's own cadence (about a second, agent.idle), connected or
        not, and tell the plane at once when the node pauses or resumes. On the heartbeat (5 s), a 1 s delay took
        up to 7.6 s and a 3 s spike could pass unseen."""
        while True:
            await asyncio.sleep(gate.due_in())
            if await asyncio.to_thread(gate.update):
                log.info("owner %s: %s jobs", *(("busy", "pausing") if gate.paused else ("idle", "resuming")))
                self._send_status()

    # -- jobs ---------------------------------------------------------------------------------------

    def _start_job(self, request: pb.JobRequest) -> None:
        cancel = threading.Event()
        task = asyncio.create_task(self._run_job(request, cancel), name=f"job-{request.job_id}")
        self._jobs[request.job_id] = (task, cancel)

    async def _run_job(self, request: pb.JobRequest, cancel: threading.Event) -> None:
        # The Status that shows this job's slot busy follows its first batch instead of preceding its start: the
        # plane counts its slots itself, and the first token should not wait behind a report, nor llama.cpp's first
        # decode share the CPU with the plane reading one.
        job_id = request.job_id
        reported = False
        first_sent = threading.Event()
        try:
            if self.draining or self.paused:
                raise EngineError("busy", "this node is not taking jobs right now")
            try:
                body = json.loads(request.body)
            except ValueError as exc:
                raise EngineError("invalid_request", f"job body is not JSON: {exc}") from exc
            job = Job(
                request.endpoint,
                body,
                cancel,
                batch_s=self._batch_ms / 1000,
                batch_max=self._batch_max,
                first_sent=first_sent,
            )
            async for event in self.engine.generate(job):
                if isinstance(event, Text):
                    batch = pb.TokenBatch(
                        text=event.text,
                        tokens=event.pieces,
                        logprobs=_wire_logprobs(event.logprobs),
                        choice=event.choice,
                        tool_calls=[
                            pb.ToolCallDelta(index=c.index, id=c.id, name=c.name, arguments=c.arguments)
                            for c in event.tool_calls
                        ],
                    )
                    message = pb.AgentMessage(job=pb.JobEvent(job_id=job_id, tokens=batch))
                    if reported:
                        self._send(message)
                    else:
                        self._send(message, first_sent)  # the engine holds the next token until it is written
                        self._send_status()
                        reported = True
                elif isinstance(event, End):
                    end = pb.JobEnd(
                        finish_reason="cancelled" if cancel.is_set() else event.finish_reason,
                        prompt_tokens=event.prompt_tokens,
                        completion_tokens=event.completion_tokens,
                        choices=[
                            pb.ChoiceEnd(
                                index=c.index, finish_reason=c.finish_reason, completion_tokens=c.completion_tokens
                            )
                            for c in event.choices
                        ],
                    )
                    self._send(pb.AgentMessage(job=pb.JobEvent(job_id=job_id, end=end)))
                elif isinstance(event, Result):
                    usage = event.body.get("usage") or {}
                    result = json.dumps(event.body).encode()
                    if len(result) > NODE_MESSAGE_MAX_BYTES - RESULT_OVERHEAD_BYTES:
                        # Over the plane's message cap it would end the whole session, every other job with it.
                        raise EngineError(
                            "invalid_request",
                            f"the result is {len(result)} bytes, more than a node may send: ask for fewer inputs",
                        )
                    end = pb.JobEnd(
                        finish_reason="stop", prompt_tokens=int(usage.get("prompt_tokens", 0)), result=result
                    )
                    self._send(pb.AgentMessage(job=pb.JobEvent(job_id=job_id, end=end)))
        except EngineError as exc:
            error = pb.JobError(code=exc.code, message=exc.message)
            self._send(pb.AgentMessage(job=pb.JobEvent(job_id=job_id, error=error)))
        except Exception as exc:
            log.exception("job %s failed", job_id)
            error = pb.JobError(code="internal", message=f"{type(exc).__name__}: {exc}")
            self._send(pb.AgentMessage(job=pb.JobEvent(job_id=job_id, error=error)))
        finally:
            first_sent.set()
            self._jobs.pop(job_id, None)
            self._send_status()

    def _abandon_jobs(self) -> None:
        """The session is gone, and with it whoever waited for these jobs: stop them."""
        for task, cancel in list(self._jobs.values()):
            cancel.set()
            task.cancel()

    async def _drain(self) -> None:
        self.draining = True
        self._send_status()
        tasks = [task for task, _ in self._jobs.values()]
        if tasks:
            log.info("draining: waiting for %d running job(s)", len(tasks))
            await asyncio.wait(tasks, timeout=self.drain_timeout_s)
        self._abandon_jobs()

    async def _close_session(self, session: asyncio.Task[None]) -> None:
        """Half-close after everything queued (the last JobEnd above all) went out, and let the plane end the
        stream; cancelling at once could drop those messages and fail a job that had in fact finished."""
        if self._outbox is not None:
            self._outbox.put_nowait(None)
        with contextlib.suppress(TimeoutError, asyncio.CancelledError, grpc.aio.AioRpcError):
            await asyncio.wait_for(session, timeout=CLOSE_TIMEOUT_S)

    # -- what the plane is told ---------------------------------------------------------------------

    def _hello(self) -> pb.Hello:
        return pb.Hello(
            agent_version=__version__,
            os=f"{platform.system()} {platform.release()}",
            hardware=hardware_message(self.hardware),
            models=[
                pb.ModelInfo(
                    name=info.name,
                    slots=info.slots,
                    context_per_slot=info.context,
                    has_price=info.price_in is not None or info.price_out is not None,
                    price_in=info.price_in or 0.0,
                    price_out=info.price_out or 0.0,
                    chat=info.has_chat_template,
                    embeddings=info.embeddings,
                    file_bytes=info.size_bytes,
                    gpu_layers=info.gpu.offloaded if info.gpu else 0,
                    layers_total=info.gpu.total_layers if info.gpu else 0,
                    gpu_layers_reason=info.gpu.reason if info.gpu else "",
                )
                for info in self.engine.infos()
            ],
            backend=backend().name,
            gpu_offload=backend().offload,
            mode=pb.MODE_IDLE_ONLY if self.config.mode == "idle-only" else pb.MODE_ALWAYS_ON,
            issues=self._issues(),
        )

    def _issues(self) -> list[pb.Issue]:
        return [pb.Issue(code=i.code, message=i.message, model=i.model) for i in self.engine.issues]

    def _send_status(self) -> None:
        self._status_version += 1
        status = pb.Status(
            version=self._status_version,
            models=[
                pb.ModelLoad(
                    name=s.name,
                    slots_total=s.slots_total,
                    slots_busy=s.slots_busy,
                    tokens_per_s=s.speed.tokens_per_s if s.speed else 0.0,
                    jobs_measured=s.speed.jobs if s.speed else 0,
                )
                for s in self.engine.status()
            ],
            idle_paused=self.paused,
            draining=self.draining,
            issues=self._issues(),
        )
        self._send(pb.AgentMessage(status=status))


_Outgoing = tuple[pb.AgentMessage, threading.Event | None]  # a message, and what to set once it is written


async def _drain_queue(queue: asyncio.Queue[_Outgoing | None]) -> AsyncIterator[pb.AgentMessage]:
    """The session's outgoing messages; None ends them, which half-closes the stream once all were sent.

    gRPC asks for the next message once it has written the last one, so that is when the last one's event is set;
    a stream that ends leaves the events of unsent messages unset (the job's own `finally` sets them)."""
    while (item := await queue.get()) is not None:
        message, written = item
        yield message
        if written is not None:
            written.set()
