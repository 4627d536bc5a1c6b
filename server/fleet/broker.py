"""The fleet: this plane's part in serving every node of the gateway from every plane (see the package doc)."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import secrets
import time
import weakref
from typing import Any

import nats
import nats.errors
import orjson
from nats.aio.client import Client
from nats.aio.msg import Msg

from proto.hatchway.node.v1 import node_pb2 as pb
from server.fleet.remote import RemoteSession
from server.fleet.wire import (
    ACCEPTED,
    EVENT,
    LOST,
    REFUSED,
    JobOrder,
    Subjects,
    decode_cancel,
    describe,
    encode_ad,
    encode_cancel,
    hello_of,
)
from server.nodes.bounds import ProtocolViolation
from server.nodes.registry import Job, NodeRegistry, SessionLost

log = logging.getLogger(__name__)

# Every plane advertises its nodes this often (and at once on a change); one silent for AD_EXPIRY intervals is gone.
AD_INTERVAL_S = 1.0
AD_EXPIRY = 3
# How long a plane waits for another to take a job before it counts that plane as gone.
ORDER_TIMEOUT_S = 2.0
# Between attempts to reach NATS while it is down at start (nats-py reconnects by itself once connected).
CONNECT_RETRY_S = 1.0
# NATS's failures are logged once in this long while they go on (nats-py reports each reconnect attempt).
LOG_EVERY_S = 60.0


class Fleet:
    """Parameters: the plane's `registry`, the NATS `url`, the subject `prefix`, and this plane's `name` (shown
    in other planes' node listings)."""

    def __init__(self, registry: NodeRegistry, url: str, *, prefix: str, name: str) -> None:
        self.registry = registry
        self.url = url
        self.subjects = Subjects(prefix)
        self.name = name
        # A NATS subject token: no dots, unlike host names.
        self.id = secrets.token_hex(8)
        self.nc: Client | None = None
        # Other planes: id -> (name, when last heard).
        self.planes: dict[str, tuple[str, float]] = {}
        # Jobs this plane runs for others: (asking plane, its job id) -> the local job.
        self.served: dict[tuple[str, str], Job] = {}
        # Jobs this plane asked others to run, by job id (gone with the job), and those not yet accepted.
        self._asked: weakref.WeakValueDictionary[str, Job] = weakref.WeakValueDictionary()
        self._ordering: set[Job] = set()
        self._outbox: collections.deque[tuple[str, bytes]] = collections.deque()
        self._outbox_ready = asyncio.Event()
        self._ad_pending = False
        self._tasks: list[asyncio.Task[None]] = []
        # Set when the plane shuts down: it takes no more jobs from others, and advertises its nodes as closed.
        self.closing = False
        self._all_served = asyncio.Event()
        self._logged_at = -LOG_EVERY_S
        self._last_ad = b""

    @property
    def connected(self) -> bool:
        return self.nc is not None and self.nc.is_connected

    # -- lifecycle --------------------------------------------------------------------------------

    async def start(self) -> None:
        self.registry.changed = self._schedule_ad
        self._tasks = [
            asyncio.create_task(self._connect(), name="fleet-connect"),
            asyncio.create_task(self._send_outbox(), name="fleet-outbox"),
            asyncio.create_task(self._tick(), name="fleet-tick"),
        ]

    async def _connect(self) -> None:
        while True:
            try:
                nc = await nats.connect(
                    self.url,
                    name=f"hatchway-plane {self.name}",
                    connect_timeout=2,
                    allow_reconnect=True,
                    max_reconnect_attempts=-1,
                    reconnect_time_wait=0.5,
                    error_cb=self._on_error,
                )
                break
            except Exception as exc:  # nats-py raises several kinds: each means "not yet"
                self._warn("cannot reach NATS (%s); until it answers, this plane serves only its own nodes", exc)
                await asyncio.sleep(CONNECT_RETRY_S)
        await nc.subscribe(self.subjects.ads, cb=self._on_ad)
        await nc.subscribe(self.subjects.jobs(self.id), cb=self._on_order)
        await nc.subscribe(self.subjects.cancels(self.id), cb=self._on_cancel)
        await nc.subscribe(self.subjects.events(self.id), cb=self._on_event)
        self.nc = nc
        self._schedule_ad()
        log.info("fleet: plane %s (%s) joined through %s", self.name, self.id, self.url)

    async def _on_error(self, exc: Exception) -> None:
        self._warn("NATS: %s (reconnecting)", exc)

    def _warn(self, message: str, *args: object) -> None:
        now = time.monotonic()
        if now - self._logged_at >= LOG_EVERY_S:
            self._logged_at = now
            log.warning(message, *args)

    async def close(self, grace_s: float) -> None:
        """Take no more jobs from other planes, let those running end (up to `grace_s`), then leave."""
        self.closing = True
        self._advertise(False)
        if self.served:
            self._all_served.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(grace_s):
                    await self._all_served.wait()
        nc, self.nc = self.nc, None
        if nc is not None and nc.is_connected:
            # The others drop this plane's nodes now rather than at the expiry.
            with contextlib.suppress(Exception):
                await nc.publish(self.subjects.ads, encode_ad(self.id, self.name, [], bye=True))
                await nc.flush(timeout=1)
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if nc is not None:
            with contextlib.suppress(Exception):
                await nc.close()

    # -- advertising this plane's nodes ----------------------------------------------------------

    def _schedule_ad(self) -> None:
        """Coalesce the changes of one loop turn into one advertisement."""
        if not self._ad_pending:
            self._ad_pending = True
            asyncio.get_running_loop().call_soon(self._advertise, False)

    def _advertise(self, full: bool) -> None:
        self._ad_pending = False
        nodes = [describe(s, full=full) for s in self.registry.sessions.values()]
        if self.closing:
            for node in nodes:
                node["accepting"] = False
        payload = encode_ad(self.id, self.name, nodes)
        if not full and payload == self._last_ad:
            return  # nothing the others do not know: every plane would decode it for nothing
        self._last_ad = payload
        self._post(self.subjects.ads, payload)

    async def _tick(self) -> None:
        while True:
            await asyncio.sleep(AD_INTERVAL_S)
            self._advertise(True)
            self._expire()

    def _expire(self) -> None:
        deadline = time.monotonic() - AD_EXPIRY * AD_INTERVAL_S
        for plane_id, (name, heard) in list(self.planes.items()):
            if heard < deadline:
                log.warning("fleet: plane %s went silent; its nodes leave this plane's pools", name)
                self._forget(plane_id)

    def _forget(self, plane_id: str) -> None:
        self.planes.pop(plane_id, None)
        for node_id, session in list(self.registry.remote.items()):
            if isinstance(session, RemoteSession) and session.owner == plane_id:
                self.registry.drop_remote(node_id)
        for (origin, _), job in list(self.served.items()):
            if origin == plane_id:
                self.registry.cancel(job)  # nobody reads it any more

    async def _on_ad(self, msg: Msg) -> None:
        doc = _json(msg.data)
        if doc is None or doc.get("plane") == self.id:
            return
        plane_id, name = str(doc["plane"]), str(doc["name"])
        if doc.get("bye"):
            self._forget(plane_id)
            return
        self.planes[plane_id] = (name, time.monotonic())
        listed = set()
        for node in doc["nodes"]:
            listed.add(node["id"])
            session = self.registry.remote.get(node["id"])
            if not isinstance(session, RemoteSession) or session.owner != plane_id:
                if session is not None:
                    self.registry.drop_remote(node["id"])  # it moved to this plane from another
                session = RemoteSession(
                    node_id=node["id"],
                    org_id=node["org"],
                    name=node["name"],
                    hello=pb.Hello(),
                    heartbeat_s=AD_INTERVAL_S,
                    owner=plane_id,
                    starter=self._order,
                    canceller=self._cancel,
                )
            session.advertise(node, name, hello_of(node))
            # This plane's claims that the node's plane has not taken yet stay counted.
            for job in session.jobs.values():
                slots = session.models.get(job.model)
                if slots is not None and job in self._ordering:
                    slots.busy += 1
            self.registry.update_remote(session)
        for node_id, session in list(self.registry.remote.items()):
            if isinstance(session, RemoteSession) and session.owner == plane_id and node_id not in listed:
                self.registry.drop_remote(node_id)

    # -- asking another plane to run a job ------------------------------------------------------

    async def _order(self, session: RemoteSession, job: Job, request: pb.JobRequest) -> bool:
        nc = self.nc
        if nc is None or not nc.is_connected:
            return False
        order = JobOrder(session.node_id, job.model, request.endpoint, self.id, job.job_id, request.body)
        payload = order.encode()
        if len(payload) > nc.max_payload:
            log.warning("fleet: a %d-byte job is over NATS's max_payload; not sent to another plane", len(payload))
            _mark_full(session, job.model)
            return False
        self._asked[job.job_id] = job
        self._ordering.add(job)
        try:
            reply = await nc.request(self.subjects.jobs(session.owner), payload, timeout=ORDER_TIMEOUT_S)
        except (nats.errors.NoRespondersError, nats.errors.TimeoutError):
            self._forget(session.owner)
            return False
        finally:
            self._ordering.discard(job)
        if reply.data != ACCEPTED:
            _mark_full(session, job.model)
            return False
        return True

    def _cancel(self, session: RemoteSession, job_id: str) -> None:
        self._post(self.subjects.cancels(session.owner), encode_cancel(self.id, job_id))

    async def _on_event(self, msg: Msg) -> None:
        kind, data = msg.data[:1], msg.data[1:]
        if kind == LOST:
            job = self._job(data.decode())
            if job is not None:
                self.registry.lose(job)
            return
        event = pb.JobEvent.FromString(data)
        job = self._job(event.job_id)
        if job is None:
            return
        try:
            self.registry.on_event(job.session, event)
        except ProtocolViolation as exc:  # the node's plane checked the same bounds: it cannot happen
            log.warning("fleet: job %s: %s", job.job_id, exc.message)
            self.registry.lose(job)

    def _job(self, job_id: str) -> Job | None:
        job = self._asked.get(job_id)
        return None if job is None or job.released else job

    # -- running jobs for other planes ------------------------------------------------------------

    async def _on_order(self, msg: Msg) -> None:
        order = JobOrder.decode(msg.data)
        session = None if self.closing else self.registry.sessions.get(order.node_id)
        if session is None or not self.registry.can_start(session, order.model, order.body):
            await msg.respond(REFUSED)
            return
        # The reply before the job: sent after it, its flush waited behind the node's gRPC write, which delayed
        # the asking plane's first token (bench/cross_plane.py; the figure is in bench/README.md).
        await msg.respond(ACCEPTED)
        key = (order.origin, order.job_id)
        job = self.registry.start_now(session, order.model, order.endpoint, order.body, self._forwarder(key))
        if job is None:  # the slot went while the reply was flushed: the asking plane fails over
            self._post(self.subjects.events(order.origin), LOST + order.job_id.encode())
            return
        self.served[key] = job

    def _forwarder(self, key: tuple[str, str]) -> Any:
        origin, job_id = key
        subject = self.subjects.events(origin)

        def forward(event: pb.JobEvent | SessionLost) -> None:
            if isinstance(event, SessionLost):
                self._post(subject, LOST + job_id.encode())
                self._served_out(key)
                return
            event.job_id = job_id
            self._post(subject, EVENT + event.SerializeToString())
            if event.WhichOneof("kind") in ("end", "error"):
                self._served_out(key)

        return forward

    def _served_out(self, key: tuple[str, str]) -> None:
        self.served.pop(key, None)
        if not self.served:
            self._all_served.set()

    async def _on_cancel(self, msg: Msg) -> None:
        job = self.served.get(decode_cancel(msg.data))
        if job is not None:
            self.registry.cancel(job)

    # -- sending ----------------------------------------------------------------------------------

    def _post(self, subject: str, payload: bytes) -> None:
        """Queue a message for NATS without waiting (callers are the registry's synchronous paths)."""
        if self.nc is not None:
            self._outbox.append((subject, payload))
            self._outbox_ready.set()

    async def _send_outbox(self) -> None:
        while True:
            await self._outbox_ready.wait()
            self._outbox_ready.clear()
            nc = self.nc
            while self._outbox:
                subject, payload = self._outbox.popleft()
                if nc is None:
                    continue
                try:
                    await nc.publish(subject, payload)
                except Exception as exc:  # a lost event: that job times out
                    log.warning("fleet: cannot publish to %s: %s", subject, exc)


def _mark_full(session: RemoteSession, model: str) -> None:
    """Until its plane's next advertisement, count the node full: another plane's request took its slot."""
    slots = session.models.get(model)
    if slots is not None:
        slots.busy = max(slots.busy, slots.slots_total + 1)  # + 1: the refused job's release takes one off


def _json(data: bytes) -> dict[str, Any] | None:
    try:
        doc = orjson.loads(data)
    except orjson.JSONDecodeError:
        return None
    return doc if isinstance(doc, dict) else None
