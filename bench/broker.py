"""Which broker carries node jobs between planes: `python bench/broker.py [--rounds N] [--json PATH]`.

A node's gRPC stream lives in one plane (A); a request arriving at another plane (B) sends A a job (a ~2 KB
protobuf), A answers with a stream of small events (token batches, ~120 bytes) and an end event, and B may send a
cancel that A acknowledges. This measures that hop, one transport beside the other in one run, B in this process
and A in a child process of its own per transport (a real cross-process hop), each on one uvloop loop:

    queue     the same-plane path: an asyncio.Queue hand-off inside B's process (the baseline)
    nats      NATS core: B publishes the job on A's subject with a reply subject under B's inbox wildcard, A
              publishes the events there (no persistence; no-responders status when A is gone)
    streams   Redis Streams: B XADDs the job to A's stream, A XREADs it (BLOCK) and XADDs each event to B's
              per-plane reply stream, which B XREADs (BLOCK) and routes by job id
    pubsub    Redis pub/sub: PUBLISH to A's channel, events PUBLISHed to B's channel

Figures: time from B's send to B's first event (the added time to first token), p50/p99, idle and while 32 paced
streams flow (an event every 10 ms each, as a node generates); a 100-event stream sent flat out, alone and 16 at a
time (capacity); the cancel round trip (B sends cancel, A's acknowledgement arrives); CPU per job and per event in
B, in A and in the broker's server (/proc schedstat); how fast B learns that no plane listens; and, as a side
figure, what a JetStream PubAck (persisting a message) costs. Blocks of each measurement rotate over the
transports so a noisy neighbour costs them alike. Subjects and keys carry a per-run prefix; the Redis keys are
deleted at the end. Figures and the choice they led to: docs (Running several planes).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import os
import secrets
import struct
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import nats
import psutil  # type: ignore[import-untyped, unused-ignore]
import redis.asyncio as aioredis
from harness import BenchError, cpu_seconds, log, machine_info, percentile, run_async, write_json
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg

NATS_URL = os.environ.get("HATCHWAY_NATS_URL", "nats://127.0.0.1:4222")
REDIS_URL = os.environ.get("HATCHWAY_REDIS_URL", "redis://127.0.0.1:6379/0")
TRANSPORTS = ("queue", "nats", "streams", "pubsub")
JOB_BYTES = 2048  # a job request: the chat body and routing facts as protobuf, 1-4 KB
EVENT_BYTES = 120  # one token batch
STREAM_EVENTS = 100
CONCURRENCY = 16
PACE_S = 0.01  # a paced job's event interval: a token batch every 10 ms
PACED_EVENTS = 50
BACKGROUND = 32  # paced streams flowing while the loaded first-event probes run
TIMEOUT_S = 10.0
STREAM_MAXLEN = 10_000  # Redis streams are trimmed (approximately) so a long run stays bounded

# -- the wire: one header, then padding standing in for the protobuf -------------------------------------------

HEADER = struct.Struct("!cQI")  # kind, job id, events wanted (a job) or sequence number (an event)
# B -> A: a job of N events at once; N events one per PACE_S (a node generating); a job that waits; cancel
STREAM, PACED, HOLD, CANCEL = b"S", b"P", b"H", b"C"
EVENT, DONE, CANCELLED, NO_RESPONDERS = b"E", b"D", b"X", b"N"  # A -> B (NO_RESPONDERS: made up by B's side)
JOB_PADDING = b"j" * (JOB_BYTES - HEADER.size)
EVENT_PADDING = b"e" * (EVENT_BYTES - HEADER.size)
REPLY_LENGTH = struct.Struct("!H")  # pub/sub carries the reply channel in the message

Send = Callable[[str, bytes], Awaitable[Any]]
StreamBatches = list[tuple[bytes, list[tuple[bytes, dict[bytes, bytes]]]]]  # XREAD's answer


def job_message(kind: bytes, job_id: int, events: int = 0) -> bytes:
    return HEADER.pack(kind, job_id, events) + (JOB_PADDING if kind != CANCEL else b"")


def event_message(kind: bytes, job_id: int, seq: int = 0) -> bytes:
    return HEADER.pack(kind, job_id, seq) + (EVENT_PADDING if kind == EVENT else b"")


def names(prefix: str) -> dict[str, str]:
    """Subjects, stream keys and channels of this run: A's inbox for jobs and B's inbox for events."""
    return {
        "nats_jobs": f"{prefix}.plane.a",
        "nats_nobody": f"{prefix}.plane.gone",
        "nats_reply": f"{prefix}.reply.b",
        "streams_jobs": f"{prefix}:jobs:a",
        "streams_reply": f"{prefix}:reply:b",
        "pubsub_jobs": f"{prefix}:chan:a",
        "pubsub_nobody": f"{prefix}:chan:gone",
        "pubsub_reply": f"{prefix}:chan:b",
    }


# -- plane A: the side that holds the node --------------------------------------------------------------------


class Responder:
    """Plane A's job handling, the same over every transport: a task per job (as a node dispatch would be),
    events sent in order through `send`, and a cancel that sets the job's stop flag; the job stops before its
    next event and sends its acknowledgement (the real one would first tell the agent to stop).

    A flag, not `Task.cancel()`: a cancel landing while redis-py 8.2 awaited a command's reply was lost (about
    one cancel in a hundred here, Python 3.11), and the job then ran on for ever."""

    def __init__(self, send: Send) -> None:
        self.send = send
        self.stops: dict[int, asyncio.Event] = {}
        self.tasks: set[asyncio.Task[None]] = set()

    def receive(self, message: bytes, reply: str) -> None:
        kind, job_id, events = HEADER.unpack_from(message)
        if kind == CANCEL:
            stop = self.stops.get(job_id)
            if stop is not None:
                stop.set()
            return
        self.stops[job_id] = asyncio.Event()
        task = asyncio.create_task(self.run(kind, job_id, events, reply))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def run(self, kind: bytes, job_id: int, events: int, reply: str) -> None:
        stop = self.stops[job_id]
        try:
            if kind == HOLD:
                await self.send(reply, event_message(EVENT, job_id))
                await stop.wait()  # generating until cancelled
            for seq in range(events):
                if stop.is_set():
                    break
                await self.send(reply, event_message(EVENT, job_id, seq))
                if kind == PACED:
                    await asyncio.sleep(PACE_S)
            end = CANCELLED if stop.is_set() else DONE
            await self.send(reply, event_message(end, job_id, events))
        except Exception as exc:  # B would wait for its timeout: say why here
            log(f"responder: job {job_id} failed: {exc!r}")
        finally:
            del self.stops[job_id]


async def serve_nats(prefix: str) -> None:
    nc = await nats.connect(NATS_URL, name="bench-broker-plane-a")
    responder = Responder(lambda reply, event: nc.publish(reply, event))

    async def on_job(msg: Msg) -> None:
        responder.receive(msg.data, msg.reply)

    await nc.subscribe(names(prefix)["nats_jobs"], cb=on_job)
    await nc.flush()  # the server has the subscription before B is told to go
    await announce_ready()


async def serve_streams(prefix: str) -> None:
    client: aioredis.Redis = aioredis.Redis.from_url(REDIS_URL)
    jobs = names(prefix)["streams_jobs"]

    async def send(reply: str, event: bytes) -> None:
        await client.xadd(reply, {b"m": event}, maxlen=STREAM_MAXLEN, approximate=True)

    responder = Responder(send)
    ready = asyncio.create_task(announce_ready())
    async for fields in read_stream(client, jobs):
        responder.receive(fields[b"m"], fields[b"r"].decode())
    await ready


async def serve_pubsub(prefix: str) -> None:
    client: aioredis.Redis = aioredis.Redis.from_url(REDIS_URL)
    responder = Responder(lambda reply, event: client.publish(reply, event))
    async with client.pubsub() as pubsub:
        await pubsub.subscribe(names(prefix)["pubsub_jobs"])
        ready = asyncio.create_task(announce_ready())
        async for message in pubsub.listen():
            if message["type"] == "message":
                (length,) = REPLY_LENGTH.unpack_from(message["data"])
                start = REPLY_LENGTH.size
                reply = message["data"][start : start + length].decode()
                responder.receive(message["data"][start + length :], reply)
        await ready


async def read_stream(client: aioredis.Redis, key: str) -> AsyncIterator[dict[bytes, bytes]]:
    """Every entry of `key` from its beginning (the key is new in each run), XREAD with BLOCK, in order.

    BLOCK is 1 s, not 0 (for ever): redis-py's default socket timeout (5 s since redis-py 8) would end an idle
    blocking read with a TimeoutError."""
    last = b"0-0"
    while True:
        batches = cast(StreamBatches, await client.xread({key: last}, count=512, block=1000))
        for _stream, entries in batches:
            for entry_id, fields in entries:
                last = entry_id
                yield fields


async def announce_ready() -> None:
    print("ready", flush=True)
    await asyncio.Event().wait()  # until B terminates this process


def responder_main(transport: str, prefix: str) -> None:
    serve = {"nats": serve_nats, "streams": serve_streams, "pubsub": serve_pubsub}[transport]
    run_async(serve(prefix))


# -- plane B: the side that received the request --------------------------------------------------------------


class Router:
    """B's one reader per transport hands each event to the job waiting for it, by job id (as the plane would,
    with one inbox per plane rather than a subscription per job)."""

    def __init__(self) -> None:
        self.waiting: dict[int, asyncio.Queue[bytes]] = {}
        self.ids = itertools.count(1)

    def open(self) -> tuple[int, asyncio.Queue[bytes]]:
        job_id = next(self.ids)
        queue: asyncio.Queue[bytes] = asyncio.Queue()
        self.waiting[job_id] = queue
        return job_id, queue

    def close(self, job_id: int) -> None:
        self.waiting.pop(job_id, None)

    def deliver(self, event: bytes) -> None:
        _kind, job_id, _seq = HEADER.unpack_from(event)
        queue = self.waiting.get(job_id)
        if queue is not None:
            queue.put_nowait(event)


class Transport:
    """B's end of one transport: `send` a job or cancel to plane A; events come back through the router."""

    name = ""
    responder: asyncio.subprocess.Process | None = None
    server_pid: int | None = None

    def __init__(self, prefix: str, router: Router) -> None:
        self.prefix = prefix
        self.names = names(prefix)
        self.router = router

    async def open(self) -> None:
        raise NotImplementedError

    async def send(self, job_id: int, message: bytes) -> None:
        raise NotImplementedError

    async def send_nowhere(self, job_id: int, message: bytes) -> None:
        """Send a job to a plane that is not there (no-responders); only where the transport can tell."""
        raise NotImplementedError

    async def close(self) -> None:
        if self.responder is not None and self.responder.returncode is None:
            self.responder.terminate()
            await self.responder.wait()

    async def start_responder(self) -> None:
        argv = [sys.executable, __file__, "--responder", self.name, "--prefix", self.prefix]
        self.responder = await asyncio.create_subprocess_exec(*argv, stdout=asyncio.subprocess.PIPE)
        assert self.responder.stdout is not None
        try:
            line = await asyncio.wait_for(self.responder.stdout.readline(), 15.0)
        except TimeoutError:
            line = b""
        if line.strip() != b"ready":
            raise BenchError(f"the {self.name} responder did not start (it said {line!r})")


class QueueTransport(Transport):
    """The same-plane path: the job goes through an asyncio.Queue to a responder task on B's own loop."""

    name = "queue"

    async def open(self) -> None:
        self.jobs: asyncio.Queue[bytes] = asyncio.Queue()

        async def deliver(_reply: str, event: bytes) -> None:
            self.router.deliver(event)

        responder = Responder(deliver)

        async def consume() -> None:
            while True:
                responder.receive(await self.jobs.get(), "")

        self.consumer = asyncio.create_task(consume())

    async def send(self, job_id: int, message: bytes) -> None:
        self.jobs.put_nowait(message)

    async def close(self) -> None:
        self.consumer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.consumer


class NatsTransport(Transport):
    name = "nats"

    async def open(self) -> None:
        self.server_pid = server_pid("nats-server", 4222)
        await self.start_responder()
        self.nc: NatsClient = await nats.connect(NATS_URL, name="bench-broker-plane-b")

        async def on_event(msg: Msg) -> None:
            if not msg.data and msg.headers and msg.headers.get("Status") == "503":
                # The server's no-responders status: nobody subscribes to the subject the job went to.
                job_id = int(msg.subject.rsplit(".", 1)[1])
                self.router.deliver(event_message(NO_RESPONDERS, job_id))
            else:
                self.router.deliver(msg.data)

        await self.nc.subscribe(f"{self.names['nats_reply']}.*", cb=on_event)
        await self.nc.flush()

    async def send(self, job_id: int, message: bytes) -> None:
        await self.nc.publish(self.names["nats_jobs"], message, reply=f"{self.names['nats_reply']}.{job_id}")

    async def send_nowhere(self, job_id: int, message: bytes) -> None:
        await self.nc.publish(self.names["nats_nobody"], message, reply=f"{self.names['nats_reply']}.{job_id}")

    async def close(self) -> None:
        await self.nc.close()
        await super().close()


class StreamsTransport(Transport):
    name = "streams"

    async def open(self) -> None:
        self.server_pid = server_pid("redis-server", 6379)
        await self.start_responder()
        self.client: aioredis.Redis = aioredis.Redis.from_url(REDIS_URL)

        async def read() -> None:
            async for fields in read_stream(self.client, self.names["streams_reply"]):
                self.router.deliver(fields[b"m"])

        self.reader = asyncio.create_task(read())

    async def send(self, job_id: int, message: bytes) -> None:
        await self.client.xadd(
            self.names["streams_jobs"],
            {b"m": message, b"r": self.names["streams_reply"].encode()},
            maxlen=STREAM_MAXLEN,
            approximate=True,
        )

    async def close(self) -> None:
        self.reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.reader
        await self.client.aclose()
        await super().close()


class PubsubTransport(Transport):
    name = "pubsub"

    async def open(self) -> None:
        self.server_pid = server_pid("redis-server", 6379)
        await self.start_responder()
        self.client: aioredis.Redis = aioredis.Redis.from_url(REDIS_URL)
        self.pubsub = self.client.pubsub()
        await self.pubsub.subscribe(self.names["pubsub_reply"])
        reply = self.names["pubsub_reply"].encode()
        self.reply_prefix = REPLY_LENGTH.pack(len(reply)) + reply

        async def read() -> None:
            async for message in self.pubsub.listen():
                if message["type"] == "message":
                    self.router.deliver(message["data"])

        self.reader = asyncio.create_task(read())

    async def send(self, job_id: int, message: bytes) -> None:
        await self.publish(self.names["pubsub_jobs"], job_id, message)

    async def send_nowhere(self, job_id: int, message: bytes) -> None:
        await self.publish(self.names["pubsub_nobody"], job_id, message)

    async def publish(self, channel: str, job_id: int, message: bytes) -> None:
        # PUBLISH answers how many subscribers got it: 0 is pub/sub's no-responders.
        if await self.client.publish(channel, self.reply_prefix + message) == 0:
            self.router.deliver(event_message(NO_RESPONDERS, job_id))

    async def close(self) -> None:
        self.reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.reader
        await self.pubsub.aclose()
        await self.client.aclose()
        await super().close()


def server_pid(name: str, port: int) -> int | None:
    """The broker server's pid (its CPU per job is part of the cost), or None where it cannot be seen."""
    for proc in psutil.process_iter(["name"]):
        if proc.info["name"] != name:
            continue
        with contextlib.suppress(psutil.Error):
            if any(c.laddr.port == port and c.status == "LISTEN" for c in proc.net_connections("tcp")):
                return int(proc.pid)
    return None


def cpu_s(pid: int) -> float:
    """CPU seconds of every thread of `pid`, from /proc's schedstat in nanoseconds: psutil's 10 ms clock ticks
    are too coarse for one block's share. psutil where schedstat cannot be read."""
    try:
        threads = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return cpu_seconds(pid)
    total = 0
    for tid in threads:
        with contextlib.suppress(OSError, ValueError, IndexError), open(f"/proc/{pid}/task/{tid}/schedstat") as f:
            total += int(f.read().split()[0])
    return total / 1e9


# -- B's side of one job ---------------------------------------------------------------------------------------


async def stream_job(transport: Transport, events: int, kind: bytes = STREAM) -> tuple[float, float]:
    """(s to the first event, s to the end event) of a job of `events` events."""
    router = transport.router
    job_id, queue = router.open()
    first = 0.0
    try:
        async with asyncio.timeout(TIMEOUT_S):
            start = time.perf_counter()
            await transport.send(job_id, job_message(kind, job_id, events))
            while True:
                kind = (await queue.get())[:1]
                if kind == EVENT and not first:
                    first = time.perf_counter() - start
                elif kind == DONE:
                    return first, time.perf_counter() - start
                elif kind == NO_RESPONDERS:
                    raise BenchError(f"{transport.name}: nobody answered job {job_id}")
    except TimeoutError:
        raise BenchError(f"{transport.name}: job {job_id} did not end within {TIMEOUT_S:.0f}s") from None
    finally:
        router.close(job_id)


async def cancel_job(transport: Transport) -> float:
    """s from sending a cancel (after the job's first event) to A's acknowledgement."""
    router = transport.router
    job_id, queue = router.open()
    try:
        async with asyncio.timeout(TIMEOUT_S):
            await transport.send(job_id, job_message(HOLD, job_id))
            assert (await queue.get())[:1] == EVENT
            start = time.perf_counter()
            await transport.send(job_id, job_message(CANCEL, job_id))
            assert (await queue.get())[:1] == CANCELLED
            return time.perf_counter() - start
    except TimeoutError:
        raise BenchError(f"{transport.name}: cancel of job {job_id} was not acknowledged") from None
    finally:
        router.close(job_id)


async def nobody_job(transport: Transport) -> float:
    """s from sending a job to a plane nobody listens for to B knowing so."""
    router = transport.router
    job_id, queue = router.open()
    try:
        async with asyncio.timeout(TIMEOUT_S):
            start = time.perf_counter()
            await transport.send_nowhere(job_id, job_message(STREAM, job_id, 1))
            assert (await queue.get())[:1] == NO_RESPONDERS
            return time.perf_counter() - start
    finally:
        router.close(job_id)


# -- measurements ----------------------------------------------------------------------------------------------


@dataclass
class Tally:
    """One measurement of one transport, summed over its blocks."""

    samples: list[float] = field(default_factory=list)  # seconds, one per job
    firsts: list[float] = field(default_factory=list)
    jobs: int = 0
    events: int = 0
    wall_s: float = 0.0
    cpu_b_s: float = 0.0
    cpu_a_s: float = 0.0
    cpu_server_s: float = 0.0

    def cpu_us(self, side: str, per: str = "job") -> float:
        count = self.jobs if per == "job" else self.events
        return float(getattr(self, f"cpu_{side}_s")) / count * 1e6 if count else 0.0


Block = Callable[[Transport], Awaitable[tuple[list[float], list[float], int]]]


async def measure(transports: Sequence[Transport], blocks: int, block: Block) -> dict[str, Tally]:
    """`blocks` rounds; in each, every transport runs `block` once, starting from a different transport each
    round. CPU is read around each block: B's process, A's process and the broker server's."""
    tallies = {t.name: Tally() for t in transports}
    for round_ in range(blocks):
        turn = round_ % len(transports)
        for transport in [*transports[turn:], *transports[:turn]]:
            tally = tallies[transport.name]
            a_pid = transport.responder.pid if transport.responder else None
            a0 = cpu_s(a_pid) if a_pid else 0.0
            s0 = cpu_s(transport.server_pid) if transport.server_pid else 0.0
            b0, w0 = time.process_time(), time.perf_counter()
            samples, firsts, events = await block(transport)
            b1, w1 = time.process_time(), time.perf_counter()
            tally.cpu_a_s += (cpu_s(a_pid) - a0) if a_pid else 0.0
            tally.cpu_server_s += (cpu_s(transport.server_pid) - s0) if transport.server_pid else 0.0
            tally.cpu_b_s += b1 - b0
            tally.wall_s += w1 - w0
            tally.samples += samples
            tally.firsts += firsts
            tally.jobs += len(samples)
            tally.events += events
    return tallies


def sequential(jobs: int, events: int) -> Block:
    async def block(transport: Transport) -> tuple[list[float], list[float], int]:
        firsts, totals = [], []
        for _ in range(jobs):
            first, total = await stream_job(transport, events)
            firsts.append(first)
            totals.append(total)
        return totals, firsts, jobs * events

    return block


def concurrent(jobs: int, events: int, concurrency: int) -> Block:
    async def block(transport: Transport) -> tuple[list[float], list[float], int]:
        firsts: list[float] = []
        totals: list[float] = []
        left = iter(range(jobs))

        async def worker() -> None:
            for _ in left:
                first, total = await stream_job(transport, events)
                firsts.append(first)
                totals.append(total)

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return totals, firsts, jobs * events

    return block


def loaded(probes: int, background: int) -> Block:
    """1-event probe jobs, one at a time, while `background` paced streams flow (staggered so their events
    interleave): the first event's time on a plane that is busy relaying, and the CPU per relayed event."""

    async def block(transport: Transport) -> tuple[list[float], list[float], int]:
        stop = asyncio.Event()
        relayed = 0

        async def flow(offset_s: float) -> None:
            nonlocal relayed
            await asyncio.sleep(offset_s)
            while not stop.is_set():
                await stream_job(transport, PACED_EVENTS, PACED)
                relayed += PACED_EVENTS

        flows = [asyncio.create_task(flow(i * PACE_S / background)) for i in range(background)]
        await asyncio.sleep(PACE_S * 3)
        firsts = []
        for _ in range(probes):
            firsts.append((await stream_job(transport, 1))[0])
            await asyncio.sleep(0.001)  # probes land at different points of the flows' cycle
        stop.set()
        await asyncio.gather(*flows)
        return firsts, firsts, relayed + probes

    return block


def cancels(jobs: int) -> Block:
    async def block(transport: Transport) -> tuple[list[float], list[float], int]:
        return [await cancel_job(transport) for _ in range(jobs)], [], 0

    return block


def nobodies(jobs: int) -> Block:
    async def block(transport: Transport) -> tuple[list[float], list[float], int]:
        return [await nobody_job(transport) for _ in range(jobs)], [], 0

    return block


async def jetstream_publish(prefix: str, rounds: int) -> dict[str, dict[str, float]]:
    """What durability would add per message: a JetStream publish and its PubAck, memory and file storage."""
    nc = await nats.connect(NATS_URL, name="bench-broker-jetstream")
    js = nc.jetstream()
    out: dict[str, dict[str, float]] = {}
    try:
        for storage in ("memory", "file"):
            stream = f"{prefix}-{storage}".replace(".", "-").upper()
            subject = f"{prefix}.js.{storage}"
            await js.add_stream(name=stream, subjects=[subject], storage=storage, max_msgs=STREAM_MAXLEN)
            try:
                times = []
                message = job_message(STREAM, 0, 1)
                for i in range(rounds + rounds // 10):
                    start = time.perf_counter()
                    await js.publish(subject, message)
                    if i >= rounds // 10:  # the first tenth warms up
                        times.append(time.perf_counter() - start)
                out[storage] = {"p50_us": percentile(times, 50) * 1e6, "p99_us": percentile(times, 99) * 1e6}
            finally:
                await js.delete_stream(stream)
    finally:
        await nc.close()
    return out


async def bench(args: argparse.Namespace) -> dict[str, Any]:
    prefix = f"bench-broker-{os.getpid()}-{secrets.token_hex(3)}"
    router = Router()
    kinds = {"queue": QueueTransport, "nats": NatsTransport, "streams": StreamsTransport, "pubsub": PubsubTransport}
    transports: list[Transport] = [kinds[name](prefix, router) for name in args.transports]
    rounds = args.rounds
    report: dict[str, Any] = {"prefix": prefix, "rounds": rounds}
    try:
        for transport in transports:
            await transport.open()
        log(f"broker: warming up {', '.join(args.transports)} (prefix {prefix})")
        await measure(transports, 2, sequential(max(rounds // 20, 10), 1))
        await measure(transports, 2, sequential(5, STREAM_EVENTS))
        log(f"broker: first event, {rounds} jobs of 1 event each per transport")
        report["first"] = await measure(transports, 20, sequential(max(rounds // 20, 1), 1))
        streams = max(rounds // 10, 10)
        log(f"broker: {streams} streams of {STREAM_EVENTS} events per transport, one at a time")
        report["stream"] = await measure(transports, 10, sequential(max(streams // 10, 1), STREAM_EVENTS))
        log(f"broker: {streams * 2} streams of {STREAM_EVENTS} events, {CONCURRENCY} at a time")
        report["concurrent"] = await measure(
            transports, 10, concurrent(max(streams // 5, CONCURRENCY), STREAM_EVENTS, CONCURRENCY)
        )
        log(f"broker: {rounds // 2} first events while {BACKGROUND} paced streams flow, per transport")
        report["loaded"] = await measure(transports, 10, loaded(max(rounds // 20, 1), BACKGROUND))
        cancelled = max(rounds // 4, 10)
        log(f"broker: {cancelled} cancels per transport")
        report["cancel"] = await measure(transports, 10, cancels(max(cancelled // 10, 1)))
        able = [t for t in transports if t.name in ("nats", "pubsub")]
        if able:
            report["nobody"] = await measure(able, 10, nobodies(max(rounds // 100, 5)))
        if "nats" in args.transports:
            report["jetstream"] = await jetstream_publish(prefix, max(rounds // 2, 100))
    finally:
        for transport in transports:
            with contextlib.suppress(Exception):
                await transport.close()
        await delete_keys(prefix)
    return report


async def delete_keys(prefix: str) -> None:
    client: aioredis.Redis = aioredis.Redis.from_url(REDIS_URL)
    try:
        keys = [key async for key in client.scan_iter(match=f"{prefix}:*")]
        if keys:
            await client.delete(*keys)
    finally:
        await client.aclose()


# -- the tables ------------------------------------------------------------------------------------------------


def us(values: Sequence[float], q: float) -> str:
    return f"{percentile(values, q) * 1e6:.0f}" if values else "-"


def format_tables(report: dict[str, Any]) -> str:
    first: dict[str, Tally] = report["first"]
    stream: dict[str, Tally] = report["stream"]
    burst: dict[str, Tally] = report["concurrent"]
    busy: dict[str, Tally] = report["loaded"]
    cancel: dict[str, Tally] = report["cancel"]
    nobody: dict[str, Tally] = report.get("nobody", {})

    def added(phase: dict[str, Tally], name: str, q: float) -> str:
        if "queue" not in phase:
            return "-"
        return f"{(percentile(phase[name].firsts, q) - percentile(phase['queue'].firsts, q)) * 1e6:+.0f}"

    lines = [
        "First event (µs from B's send; added = over the same-process queue's), idle and while "
        f"{BACKGROUND} streams flow ({PACED_EVENTS} events each, one per {PACE_S * 1e3:.0f} ms); cancel round trip",
        "| transport | idle p50 | p99 | added p50 | added p99 | loaded p50 | p99 | added p50 | added p99 "
        "| cancel ack p50 | p99 | no-responders p50 |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, tally in first.items():
        nob = us(nobody[name].samples, 50) if name in nobody else "none"
        lines.append(
            f"| {name} | {us(tally.firsts, 50)} | {us(tally.firsts, 99)} | {added(first, name, 50)} "
            f"| {added(first, name, 99)} | {us(busy[name].firsts, 50)} | {us(busy[name].firsts, 99)} "
            f"| {added(busy, name, 50)} | {added(busy, name, 99)} "
            f"| {us(cancel[name].samples, 50)} | {us(cancel[name].samples, 99)} | {nob} |"
        )
    lines += [
        "",
        f"Streams of {STREAM_EVENTS} events of {EVENT_BYTES} B sent as fast as A can (capacity, not a node's pace)",
        f"| transport | one stream ms p50 | p99 | events/s, one at a time | events/s, {CONCURRENCY} at a time |",
        "|---|---|---|---|---|",
    ]
    for name, tally in stream.items():
        lines.append(
            f"| {name} | {percentile(tally.samples, 50) * 1e3:.2f} | {percentile(tally.samples, 99) * 1e3:.2f} "
            f"| {tally.events / tally.wall_s:,.0f} | {burst[name].events / burst[name].wall_s:,.0f} |"
        )
    lines += [
        "",
        "CPU (µs): B = requester, A = responder (queue: both in B), srv = nats-server / redis-server",
        f"| transport | per 1-event job: B | A | srv | per {STREAM_EVENTS}-event job: B | A | srv "
        f"| per event, {CONCURRENCY} bursting: B | A | srv | per event, {BACKGROUND} paced: B | A | srv |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, tally in first.items():
        cells = [f"{t.cpu_us(side):.0f}" for t in (tally, stream[name]) for side in ("b", "a", "server")]
        cells += [f"{t.cpu_us(side, 'event'):.1f}" for t in (burst[name], busy[name]) for side in ("b", "a", "server")]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    if "jetstream" in report:
        js = report["jetstream"]
        lines += [
            "",
            "JetStream publish awaiting its PubAck (what persisting each message would cost, µs): "
            + "; ".join(f"{storage} p50 {v['p50_us']:.0f}, p99 {v['p99_us']:.0f}" for storage, v in js.items()),
        ]
    return "\n".join(lines)


def to_json(report: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {"prefix": report["prefix"], "rounds": report["rounds"]}
    for phase in ("first", "stream", "concurrent", "loaded", "cancel", "nobody"):
        for name, tally in report.get(phase, {}).items():
            out.setdefault(phase, {})[name] = {
                "samples_us": {q: round(percentile(tally.samples, q) * 1e6, 1) for q in (50, 90, 99)},
                "first_us": {q: round(percentile(tally.firsts, q) * 1e6, 1) for q in (50, 90, 99)},
                "jobs": tally.jobs,
                "events_per_s": round(tally.events / tally.wall_s) if tally.wall_s else 0,
                "events": tally.events,
                "cpu_us_per_job": {side: round(tally.cpu_us(side), 1) for side in ("b", "a", "server")},
                "cpu_us_per_event": {side: round(tally.cpu_us(side, "event"), 2) for side in ("b", "a", "server")},
            }
    out["jetstream"] = report.get("jetstream")
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2000, help="1-event jobs per transport (others scale)")
    parser.add_argument("--transports", type=lambda s: s.split(","), default=list(TRANSPORTS))
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    parser.add_argument("--responder", choices=("nats", "streams", "pubsub"), help=argparse.SUPPRESS)
    parser.add_argument("--prefix", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.responder:
        responder_main(args.responder, args.prefix)
        return 0
    unknown = set(args.transports) - set(TRANSPORTS)
    if unknown:
        raise SystemExit(f"unknown transport(s) {', '.join(sorted(unknown))}; choose from {', '.join(TRANSPORTS)}")
    machine = machine_info()
    report = run_async(bench(args))
    print(format_tables(report))
    print(
        f"\n{machine['cpu_model']}, {machine['cpu_count']} CPUs; Python {machine['python']}; uvloop on both "
        f"sides; load average at start {machine['load_average_at_start']}"
    )
    if args.json:
        write_json(args.json, {"machine": machine, **to_json(report)})
    return 0


if __name__ == "__main__":
    sys.exit(main())
