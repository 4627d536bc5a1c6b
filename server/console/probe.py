"""POST /admin/v1/providers/{ref}/test: does this provider answer, with its stored keys, through its egress?

The plane has no call that costs an upstream nothing and proves a key works on every OpenAI-compatible server
(`GET /models` is missing or unauthenticated on some), so the test is the smallest real request: a chat
completion of one token for the provider's first model, sent by the provider's own target (its keys in turn,
proxy, CA and timeouts). The answer tells what happened and how long it took; it is not a tenant's request, so
it is not in the usage report (the upstream bills its one token), and it changes nothing, so it is not audited.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import orjson
from aiohttp import web

from server.accounts import admin_principal
from server.api.middleware import REQUEST_ID
from server.api.resources import SNAPSHOTS, STORE
from server.errors import NotFoundError, UpstreamError, UpstreamStatusError
from server.targets.base import Attempt, Call
from server.targets.provider import ProviderTarget

PROBE_BODY: dict[str, Any] = {"messages": [{"role": "user", "content": "ping"}], "max_tokens": 1, "stream": False}


async def test_provider(request: web.Request) -> web.Response:
    principal = await admin_principal(request)
    principal.require("providers.write")  # before any lookup: a role without it learns nothing of providers
    # A name is looked up in the caller's own org unless it names one (provider names are unique per org only).
    ref, org_ref = request.match_info["ref"], request.query.get("org") or principal.org_scope
    provider = await asyncio.to_thread(request.app[STORE].listed_provider, ref, org_ref)
    if provider is None:
        raise NotFoundError(f"no provider {ref!r}")
    principal.require("providers.write", org_id=provider["org_id"])
    snapshot = request.app[SNAPSHOTS].current
    target = next(
        (
            t
            for (org_id, _), targets in snapshot.routes.items()
            if org_id == provider["org_id"]
            for t in targets
            if isinstance(t, ProviderTarget) and t.provider_id == provider["id"]
        ),
        None,
    )
    if target is None:
        raise NotFoundError(f"provider {provider['name']!r} serves no model to test with")
    started = time.perf_counter()
    result: dict[str, Any] = {"object": "provider.test", "provider": provider["name"], "model": target.upstream_model}
    try:
        body = await target.complete(Call("chat/completions", PROBE_BODY, request[REQUEST_ID]), Attempt(1))
    except UpstreamError as exc:
        # The tenant-safe message: the provider's name and what went wrong, never its address or its keys. The
        # status is the upstream's own when it answered (UpstreamStatusError), else the plane's (502, 504).
        status = exc.upstream_status if isinstance(exc, UpstreamStatusError) else exc.status
        result |= {"ok": False, "status": status, "error": exc.message}
    else:
        try:
            answer = orjson.loads(body)
        except orjson.JSONDecodeError:
            answer = None
        model = answer.get("model") if isinstance(answer, dict) else None
        result |= {"ok": True, "status": 200, "answered_model": model}
    result["latency_ms"] = round((time.perf_counter() - started) * 1000, 1)
    return web.json_response(result)
