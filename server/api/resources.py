"""What the handlers take from the plane: one typed application key per resource.

A handler names the resources it uses (`request.app[STORE]`), not the plane that owns them, so what each endpoint
can reach is visible where it is written. The plane (server.plane) owns every one of them and their lifetime;
`provide` puts them on the application once, before it starts.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from aiohttp import web
from sqlalchemy import Engine

from server.config import Config
from server.metrics import Metrics
from server.nodes.registry import NodeRegistry
from server.nodes.tls import NodeTLS
from server.policy.cache import AnswerCache
from server.policy.changes import Changes
from server.policy.limits import Limiter
from server.policy.snapshot import SnapshotHolder
from server.relay import Relay
from server.routing.catalog import Catalog
from server.routing.rules import Router
from server.storage.audit import AuditLog
from server.storage.nodes import NodeStore
from server.storage.policy import PolicyStore
from server.storage.probe import Probe
from server.storage.store import Store

if TYPE_CHECKING:
    from server.plane import Plane

CONFIG = web.AppKey("config", Config)
# The request path: what may be called and how it is served.
SNAPSHOTS = web.AppKey("snapshots", SnapshotHolder)
CATALOG = web.AppKey[Callable[[], Catalog]]("catalog")  # one per request: it sees one snapshot throughout
ROUTER = web.AppKey("router", Router)
CACHE = web.AppKey[AnswerCache]("cache")
LIMITER = web.AppKey("limiter", Limiter)
RELAY = web.AppKey("relay", Relay)
METRICS = web.AppKey("metrics", Metrics)
# The admin side: stored state, how it is changed, the nodes as they are now.
STORE = web.AppKey("store", Store)
POLICIES = web.AppKey("policies", PolicyStore)
NODE_STORE = web.AppKey("node_store", NodeStore)
AUDIT = web.AppKey("audit", AuditLog)
CHANGES = web.AppKey("changes", Changes)
REGISTRY = web.AppKey("registry", NodeRegistry)
ENGINE = web.AppKey("engine", Engine)
NODE_TLS = web.AppKey("node_tls", NodeTLS)
NODE_PORT = web.AppKey[Callable[[], int]]("node_port")  # bound when the node service starts
# Readiness.
STORAGE_PROBE = web.AppKey("storage_probe", Probe)
REDIS_PROBE = web.AppKey[Probe | None]("redis_probe")  # None: no Redis configured


def provide(app: web.Application, plane: Plane) -> None:
    app[CONFIG] = plane.config
    app[SNAPSHOTS] = plane.snapshots
    app[CATALOG] = plane.catalog
    app[ROUTER] = plane.router
    app[CACHE] = plane.cache
    app[LIMITER] = plane.limiter
    app[RELAY] = plane.relay
    app[METRICS] = plane.metrics
    app[STORE] = plane.store
    app[POLICIES] = plane.policies
    app[NODE_STORE] = plane.nodes
    app[AUDIT] = plane.audit
    app[CHANGES] = plane.changes
    app[REGISTRY] = plane.registry
    app[ENGINE] = plane.engine
    app[NODE_TLS] = plane.tls
    app[NODE_PORT] = lambda: plane.grpc_port
    app[STORAGE_PROBE] = plane.storage_probe
    app[REDIS_PROBE] = plane.redis_probe
