"""The plane: every long-lived part of the control plane, with one owner that opens and closes them."""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import socket
from collections import defaultdict
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
from sqlalchemy import Engine

from proto.contract import NODE_MESSAGE_MAX_BYTES, PLANE_MESSAGE_MAX_BYTES, keepalive_options
from proto.hatchway.node.v1 import node_pb2_grpc
from server.config import Config
from server.credentials import Vault
from server.metrics import Metrics
from server.nodes.registry import NodeRegistry
from server.nodes.service import NodeService
from server.nodes.tls import load_or_create, load_provided
from server.policy.cache import AnswerCache, ResponseCache
from server.policy.changes import Changes
from server.policy.declarative import apply_declared
from server.policy.limits import Limiter, key_scope, new_quotas, org_scope
from server.policy.snapshot import Snapshot, SnapshotHolder
from server.relay import Relay
from server.routing.catalog import Catalog
from server.routing.health import Health
from server.routing.rules import Router
from server.serving.overload import LoadShedder
from server.storage.audit import AuditLog
from server.storage.db import make_engine, migrate, startup_lock
from server.storage.nodes import NodeStore
from server.storage.notify import ConfigWatcher, announce_changes, listen_url
from server.storage.policy import PolicyStore
from server.storage.probe import Probe, StorageProbe
from server.storage.store import Store
from server.targets.node import pool_key
from server.targets.provider import UpstreamPool
from server.usage.spool import SPOOL_DIR, UsageSpool
from server.usage.writer import UsageWriter

if TYPE_CHECKING:
    from server.fleet.broker import Fleet
    from server.shared.redis_limits import SharedLimiter

log = logging.getLogger(__name__)

# The shortest interval between an agent's keepalive pings the node service accepts (agents ping every 5 s).
NODE_MIN_PING_INTERVAL_MS = 1000
# The audit log's actor for an admin key change made by the configuration (HATCHWAY_ADMIN_KEY) at startup.
ADMIN_KEY_SETTING = "admin-key-setting"


class Plane:
    """Parameters: `config`, and optionally an `engine` (tests pass one to watch its statements)."""

    # Whether the node service's port is shared with other processes (server.serving.workers sets it for its workers).
    reuse_port = False

    def __init__(self, config: Config, engine: Engine | None = None) -> None:
        self.config = config
        if not config.database_url:
            config.data_dir.mkdir(parents=True, exist_ok=True)
        self.engine = engine or make_engine(config.sqlalchemy_url)
        self.store = Store(self.engine, Vault.from_settings(config.secret_key, config.data_dir))
        self.metrics = Metrics()
        self.pool = UpstreamPool(max_body_bytes=config.max_upstream_body_bytes)
        self.health = Health()
        self.router = Router(self.health)
        self.snapshots = SnapshotHolder(
            self.store, self.pool, self.health, config.failover_policy(), node_pools=self._node_pool_keys
        )
        self.usage = UsageWriter(
            self.engine,
            self.metrics,
            queue_size=config.usage_queue_size,
            flush_interval_s=config.usage_flush_interval_s,
            spool=UsageSpool(config.data_dir / SPOOL_DIR) if config.usage_spool else None,
        )
        self.snapshots.prepare = self.seed_new_quotas
        self.snapshots.applied = self.follow_node_changes
        # This plane's name in the change announcements of a shared database (server.storage.notify).
        self.origin = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"
        # Its name where operators see it: nodes listings, /metrics.
        self.name = config.plane_name or f"{socket.gethostname()}:{os.getpid()}"
        announce_changes(self.engine, self.origin)
        self.config_watcher = ConfigWatcher(
            self.snapshots.reload,
            listen_url(self.engine),
            origin=self.origin,
            reload_interval_s=config.config_reload_s,
        )
        self.storage_probe = StorageProbe(self.store.ping)
        self.relay = Relay(self.metrics, self.usage, self.health, max_attempts=config.max_attempts, hedge=config.hedge)
        self.shedder = LoadShedder(
            max_in_flight=config.max_in_flight,
            lag_limit_s=config.overload_lag_ms / 1000,
            lag_floor=config.overload_lag_floor,
            on_shed=self.metrics.requests_shed.inc,
        )
        self.metrics.watch(self.shedder)
        # Shared by every plane through Redis when one is configured (server.shared), this process's otherwise.
        self.limiter: Limiter
        self.cache: AnswerCache
        # Whether Redis answers, for /readyz (None without Redis).
        self.redis_probe: Probe | None = None
        if config.redis_url:
            shared = self._shared_limiter()
            self.limiter, self.cache = shared, self._shared_cache(shared)
            self.redis_probe = Probe(shared.redis.ping)
        else:
            self.limiter, self.cache = Limiter(), ResponseCache(config.cache_max_bytes)
        self.policies = PolicyStore(self.engine)
        self.nodes = NodeStore(self.engine)
        self.audit = AuditLog(self.engine)
        self.registry = NodeRegistry(
            queue_size=config.node_queue_size,
            queue_timeout_s=config.node_queue_timeout_s,
            cancel_timeout_s=config.node_cancel_timeout_s,
            plane_name=self.name,
        )
        self.metrics.watch_nodes(self.registry)
        # The nodes of other planes, through NATS when one is configured (server.fleet).
        self.fleet = self._fleet() if config.nats_url else None
        self.node_policy = config.failover_policy()
        self.tls = (
            load_provided(Path(config.grpc_tls_cert), Path(config.grpc_tls_key))
            if config.grpc_tls_cert
            else load_or_create(config.data_dir)
        )
        self.grpc_server: grpc.aio.Server | None = None
        self.grpc_port = 0
        self.changes = Changes(self.audit, self.snapshots)
        # Set on the first start when no admin key existed: shown once, never stored in clear.
        self.generated_admin_key: str | None = None

    def _shared_limiter(self) -> SharedLimiter:
        # Imported here: the Redis client (and the cryptography it loads) is memory a plane without Redis never needs.
        from server.shared.redis_limits import SharedLimiter

        return SharedLimiter(
            self.config.redis_url,
            prefix=self.config.redis_prefix,
            failure=self.config.redis_failure,
            lease_s=self.config.request_deadline_s + 60,
            usage_so_far=self.usage_so_far,
        )

    def _shared_cache(self, limiter: SharedLimiter) -> AnswerCache:
        from server.shared.redis_cache import RedisCache

        # On the limiter's connection pool: one per plane.
        return RedisCache(limiter.redis, prefix=self.config.redis_prefix, max_bytes=self.config.cache_max_bytes)

    def _fleet(self) -> Fleet:
        from server.fleet.broker import Fleet  # nats-py: loaded only by planes that use it

        return Fleet(self.registry, self.config.nats_url, prefix=self.config.nats_prefix, name=self.name)

    def prepare_storage(self) -> None:
        with startup_lock(self.engine):
            migrate(self.engine)
            if self.config.admin_key:
                self._configure_admin_key()
            else:
                self.generated_admin_key = self.store.ensure_admin_key()
            apply_declared(self.store, self.config.declared, self.config.config_file, self.audit)

    def _configure_admin_key(self) -> None:
        """The configured admin key replaces every other: a new value and a restart is how operators rotate."""
        configured = self.store.configure_admin_key(self.config.admin_key)
        if configured["revoked"]:
            log.warning("a new admin key is configured: %d previous admin key(s) revoked", len(configured["revoked"]))
            self.audit.append(
                actor=ADMIN_KEY_SETTING,
                action="admin_key.rotate",
                target=configured["id"],
                before={"admin_keys": configured["revoked"]},
                after={"admin_keys": [configured["id"]]},
                request_id="",
            )

    def _node_pool_keys(self) -> set[str]:
        return {pool_key(s.org_id, model) for s in self.registry.every_session() for model in s.models}

    def catalog(self) -> Catalog:
        """What can serve requests right now; take one per request so it sees one snapshot throughout."""
        return Catalog(self.snapshots.current, self.registry, self.node_policy)

    def recover_usage(self) -> None:
        """Open this process's usage spool and insert what dead processes' spools hold (server.usage.spool)."""
        if self.usage.spool is not None:
            self.usage.spool.open()
            self.usage.replay()

    def seed_limits(self) -> None:
        """What quotas already used this day and month, so a restart does not hand them out again."""
        self.limiter.seed(self.used_this_window())

    async def seed_new_quotas(self, current: Snapshot, upcoming: Snapshot) -> None:
        """Before a snapshot goes live: a quota it sets that was not set starts from the window's usage so far."""
        added = new_quotas(current.limits, upcoming.limits) if self.snapshots.loaded else None
        if added:  # at start-up, `seed_limits` did it
            await self.limiter.reseed(await self.usage_so_far(), added)

    async def usage_so_far(self) -> dict[tuple[str, str], tuple[float, float]]:
        """`used_this_window`, the rows of requests already answered included."""
        await self.usage.flush()
        return await asyncio.to_thread(self.used_this_window)

    def follow_node_changes(self, snapshot: Snapshot) -> None:
        """A node revoked, re-enrolled or drained through another plane: its session on this one ends or drains."""
        for node_id, session in list(self.registry.sessions.items()):
            node = snapshot.nodes.get(session.credential_hash)
            if node is None:  # revoked, or its credential replaced by a re-enrollment
                self.registry.disconnect(node_id)
            elif node.drained != session.drained:
                self.registry.set_drained(node_id, node.drained)

    def used_this_window(self) -> dict[tuple[str, str], tuple[float, float]]:
        """{(scope, "day"|"month"): (tokens, USD)} served so far this UTC day and month, by the usage table."""
        now = datetime.fromtimestamp(self.limiter.clock(), UTC)
        day = now.replace(hour=0, minute=0, second=0, microsecond=0)
        used: dict[tuple[str, str], tuple[float, float]] = defaultdict(lambda: (0.0, 0.0))
        for window, since in (("month", day.replace(day=1)), ("day", day)):
            for org_id, key_id, tokens, usd in self.policies.used_since(since):
                for scope in (org_scope(org_id), key_scope(key_id)):
                    old_tokens, old_usd = used[(scope, window)]
                    used[(scope, window)] = (old_tokens + tokens, old_usd + usd)
        return dict(used)

    async def startup(self) -> None:
        await asyncio.to_thread(self.prepare_storage)
        # Rows a killed plane left in the spool count before quotas are read from the usage table.
        await asyncio.to_thread(self.recover_usage)
        await asyncio.to_thread(self.seed_limits)
        await self.limiter.start()
        await self.cache.start()
        await self.snapshots.reload()
        self.config_watcher.start()
        self.usage.start()
        self.shedder.start()
        await self._start_node_service()
        if self.fleet is not None:
            await self.fleet.start()

    async def _start_node_service(self) -> None:
        server = grpc.aio.server(
            options=[
                # The plane pings every node_keepalive_s and drops a link whose ping goes unanswered as long: the
                # node's session ends and its jobs fail over.
                *keepalive_options(self.config.node_keepalive_s),
                # An agent's own pings (every agent.connection.KEEPALIVE_S) are welcome down to one a second;
                # faster, three times over with nothing sent between, is a flood that ends the connection.
                ("grpc.http2.min_ping_interval_without_data_ms", NODE_MIN_PING_INTERVAL_MS),
                ("grpc.http2.max_ping_strikes", 2),
                # No second process may share the port (gRPC's default on Linux): agents would be split between
                # two planes. Only the workers of one gateway (server.serving.workers) share it, as they share the
                # HTTP port.
                ("grpc.so_reuseport", int(self.reuse_port)),
                # Explicit caps both ways (proto/contract.py says why these sizes): a message over the receive cap
                # ends its stream with RESOURCE_EXHAUSTED before the plane parses it.
                ("grpc.max_receive_message_length", NODE_MESSAGE_MAX_BYTES),
                ("grpc.max_send_message_length", PLANE_MESSAGE_MAX_BYTES),
            ]
        )
        service = NodeService(
            self.registry,
            self.nodes,
            lambda: self.snapshots.current,
            self.snapshots.reload,
            self.config.node_heartbeat_s,
        )
        node_pb2_grpc.add_NodeServiceServicer_to_server(service, server)
        address = f"{self.config.host}:{self.config.grpc_port}"
        if self.config.grpc_insecure:
            self.grpc_port = server.add_insecure_port(address)
        else:
            credentials = grpc.ssl_server_credentials([(self.tls.key_pem, self.tls.cert_pem)])
            self.grpc_port = server.add_secure_port(address, credentials)
        await server.start()
        self.grpc_server = server

    async def cleanup(self) -> None:
        # Each step logged: a shutdown that takes long should say where it waits.
        await self.shedder.stop()
        await self.config_watcher.stop()
        if self.fleet is not None:
            await self.fleet.close(self.config.shutdown_grace_s)
        await self.registry.close()
        await self.relay.close()  # bills waiting on a node's count: every job was just released
        await self.cache.close()  # before the limiter, which closes the Redis pool they share
        await self.limiter.close()  # settlements on their way to a shared limiter's store
        if self.grpc_server is not None:
            await self.grpc_server.stop(grace=1.0)
        log.info("node service stopped; flushing %d queued usage rows", self.usage.queue.qsize())
        await self.usage.stop()
        await self.pool.close()
        self.engine.dispose()
        log.info("plane stopped: %r", self.usage)
