"""Operator endpoints: liveness, readiness and Prometheus metrics (no authentication, no secrets)."""

from __future__ import annotations

import asyncio

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from server.errors import ServiceUnavailableError
from server.plane import PLANE


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    plane = request.app[PLANE]
    if not plane.snapshots.loaded:
        raise ServiceUnavailableError("snapshot not loaded yet")
    try:
        await asyncio.wait_for(asyncio.to_thread(plane.store.ping), timeout=5)
    except Exception as exc:
        raise ServiceUnavailableError(f"storage unreachable: {type(exc).__name__}") from exc
    return web.json_response({"status": "ready", "snapshot_version": plane.snapshots.current.version})


async def metrics(request: web.Request) -> web.Response:
    body = generate_latest(request.app[PLANE].metrics.registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})
