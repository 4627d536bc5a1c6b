"""Operator endpoints: liveness, readiness (no authentication, no secrets) and Prometheus metrics.

/metrics tells the plane's traffic by route, status and target, its load and its errors: operators' business,
not tenants'. It takes the admin key or the metrics token (`metrics_token`, compared by its hash like every
key; the config keeps only that hash), unless `metrics_public` opens it to anyone who can reach the port.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from server.api.resources import METRICS, REDIS_PROBE, SNAPSHOTS, STORAGE_PROBE
from server.config import TOKEN_HASH_PREFIX, Config
from server.credentials import hash_key
from server.errors import AuthenticationError, ServiceUnavailableError
from server.policy.auth import bearer_token


@dataclass(frozen=True)
class MetricsAccess:
    """Who may read /metrics: anyone (`public`), or the admin key and the token hashing to `token_hash`."""

    public: bool
    token_hash: str | None

    @classmethod
    def from_config(cls, config: Config) -> MetricsAccess:
        token_hash = config.metrics_token.removeprefix(TOKEN_HASH_PREFIX).lower() if config.metrics_token else None
        return cls(config.metrics_public, token_hash)


METRICS_ACCESS = web.AppKey("metrics_access", MetricsAccess)


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    snapshots, redis_probe = request.app[SNAPSHOTS], request.app[REDIS_PROBE]
    if not snapshots.loaded:
        raise ServiceUnavailableError("snapshot not loaded yet")
    failure = await request.app[STORAGE_PROBE].failure()
    if failure is not None:
        raise ServiceUnavailableError(f"storage unreachable: {failure}")
    # A plane that lost Redis still answers (limits per redis_failure, cache misses), but not as one gateway.
    if redis_probe is not None and (failure := await redis_probe.failure()) is not None:
        raise ServiceUnavailableError(f"redis unreachable: {failure}")
    return web.json_response({"status": "ready", "snapshot_version": snapshots.current.version})


async def metrics(request: web.Request) -> web.Response:
    access = request.app[METRICS_ACCESS]
    if not access.public:
        token_hash = hash_key(bearer_token(request.headers))
        is_token = access.token_hash is not None and hmac.compare_digest(token_hash, access.token_hash)
        if not is_token and token_hash not in request.app[SNAPSHOTS].current.admin_keys:
            raise AuthenticationError("/metrics takes the admin key or the metrics token.")
    body = generate_latest(request.app[METRICS].registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})
