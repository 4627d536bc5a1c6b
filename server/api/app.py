"""The aiohttp application: every route in one place, and the plane's lifetime tied to the app's."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

from aiohttp import web

from server import accounts, console
from server.api import admin_api, openai_api, ops
from server.api.middleware import make_middleware, stamp_response
from server.api.resources import provide
from server.openapi import reference as openapi_reference
from server.plane import Plane

log = logging.getLogger(__name__)


def _routes(app: web.Application) -> None:
    app.router.add_post("/v1/chat/completions", openai_api.chat_completions)
    app.router.add_post("/v1/completions", openai_api.completions)
    app.router.add_post("/v1/embeddings", openai_api.embeddings)
    app.router.add_post("/v1/responses", openai_api.responses)
    app.router.add_route("*", "/v1/responses/{tail:.+}", openai_api.stored_response)
    app.router.add_get("/v1/models", openai_api.list_models)
    app.router.add_get("/v1/models/{model:.+}", openai_api.retrieve_model)

    app.router.add_get("/healthz", ops.healthz)
    app.router.add_get("/readyz", ops.readyz)
    app.router.add_get("/metrics", ops.metrics)

    app.router.add_get("/admin/v1/orgs", admin_api.list_orgs)
    app.router.add_post("/admin/v1/orgs", admin_api.create_org)
    app.router.add_get("/admin/v1/keys", admin_api.list_keys)
    app.router.add_post("/admin/v1/keys", admin_api.create_key)
    app.router.add_post("/admin/v1/keys/{id}/revoke", admin_api.revoke_key)
    app.router.add_post("/admin/v1/admin-key/rotate", admin_api.rotate_admin_key)
    app.router.add_get("/admin/v1/providers", admin_api.list_providers)
    app.router.add_post("/admin/v1/providers", admin_api.add_provider)
    app.router.add_patch("/admin/v1/providers/{ref}", admin_api.update_provider)
    app.router.add_delete("/admin/v1/providers/{ref}", admin_api.remove_provider)
    app.router.add_get("/admin/v1/routes", admin_api.list_routes)
    app.router.add_put("/admin/v1/routes", admin_api.set_route)
    app.router.add_delete("/admin/v1/routes", admin_api.remove_route)
    app.router.add_get("/admin/v1/models", admin_api.list_models)
    app.router.add_get("/admin/v1/usage", admin_api.usage)
    app.router.add_get("/admin/v1/audit", admin_api.list_audit)
    app.router.add_get("/admin/v1/audit/verify", admin_api.verify_audit)
    app.router.add_get("/admin/v1/limits", admin_api.list_limits)
    app.router.add_put("/admin/v1/limits", admin_api.set_limits)
    app.router.add_delete("/admin/v1/limits", admin_api.remove_limits)
    app.router.add_get("/admin/v1/cache", admin_api.list_cache_policies)
    app.router.add_put("/admin/v1/cache", admin_api.set_cache_policy)
    app.router.add_delete("/admin/v1/cache", admin_api.clear_cache)
    app.router.add_get("/admin/v1/prices", admin_api.list_prices)
    app.router.add_put("/admin/v1/prices", admin_api.set_price)
    app.router.add_get("/admin/v1/earnings", admin_api.node_earnings)
    app.router.add_get("/admin/v1/node-tokens", admin_api.list_node_tokens)
    app.router.add_post("/admin/v1/node-tokens", admin_api.create_node_token)
    app.router.add_post("/admin/v1/node-tokens/{id}/revoke", admin_api.revoke_node_token)
    app.router.add_get("/admin/v1/nodes", admin_api.list_nodes)
    app.router.add_get("/admin/v1/nodes/{ref}", admin_api.show_node)
    app.router.add_post("/admin/v1/nodes/{ref}/drain", admin_api.drain_node)
    app.router.add_post("/admin/v1/nodes/{ref}/resume", admin_api.resume_node)
    app.router.add_post("/admin/v1/nodes/{ref}/revoke", admin_api.revoke_node)
    accounts.add_routes(app)
    openapi_reference.add_routes(app)
    console.add_routes(app)


def create_app(plane: Plane) -> web.Application:
    app = web.Application(
        middlewares=[make_middleware(plane.metrics, plane.shedder)],
        # aiohttp enforces this while reading; the handlers also refuse a too-large Content-Length up front.
        client_max_size=plane.config.max_body_bytes,
    )
    provide(app, plane)
    app[ops.METRICS_ACCESS] = ops.MetricsAccess.from_config(plane.config)

    async def plane_lifetime(app: web.Application) -> AsyncIterator[None]:
        await plane.startup()
        yield
        log.info("HTTP requests drained; stopping the plane")
        await plane.cleanup()

    app.cleanup_ctx.append(plane_lifetime)
    app.on_response_prepare.append(stamp_response)
    _routes(app)
    return app
