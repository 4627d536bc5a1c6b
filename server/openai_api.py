"""The OpenAI endpoints. Each request runs the same named steps:

    authenticate -> read body -> validate -> authorize model -> route -> relay (complete | stream)

Everything before `relay` reads only the in-memory snapshot.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from aiohttp import web

from server.auth import authenticate, authorize_model
from server.errors import BodyTooLargeError, InvalidRequestError, ModelNotFoundError
from server.middleware import REQUEST_ID
from server.plane import PLANE
from server.relay import Exchange
from server.validation import Validator, parse_body, validate_chat, validate_completion, validate_embedding


@dataclass(frozen=True)
class Endpoint:
    path: str
    validate: Validator
    streamable: bool


CHAT = Endpoint("chat/completions", validate_chat, streamable=True)
COMPLETIONS = Endpoint("completions", validate_completion, streamable=True)
EMBEDDINGS = Endpoint("embeddings", validate_embedding, streamable=False)


async def read_body(request: web.Request, limit: int) -> dict[str, Any]:
    if request.content_length is not None and request.content_length > limit:
        raise BodyTooLargeError(f"Request body is {request.content_length} bytes; the limit is {limit}.")
    return parse_body(await request.read())


async def serve(request: web.Request, endpoint: Endpoint) -> web.StreamResponse:
    plane = request.app[PLANE]
    catalog = plane.catalog()
    key = authenticate(request.headers, catalog.snapshot)
    body = await read_body(request, plane.config.max_body_bytes)
    endpoint.validate(body)
    if body.get("stream") and not endpoint.streamable:
        raise InvalidRequestError(f"/v1/{endpoint.path} cannot be streamed", param="stream")
    authorize_model(key, catalog, body["model"])
    plans = plane.router.plan(
        catalog.snapshot.rules.get(key.org_id, ()),
        lambda model: catalog.targets_for(key.org_id, model),
        body["model"],
        streaming=bool(body.get("stream")),
    )
    exchange = Exchange(
        request_id=request[REQUEST_ID],
        key=key,
        endpoint=endpoint.path,
        body=body,
        plans=plans,
        deadline_s=plane.config.request_deadline_s,
    )
    if exchange.streaming:
        return await plane.relay.stream(request, exchange)
    return await plane.relay.complete(exchange)


async def chat_completions(request: web.Request) -> web.StreamResponse:
    return await serve(request, CHAT)


async def completions(request: web.Request) -> web.StreamResponse:
    return await serve(request, COMPLETIONS)


async def embeddings(request: web.Request) -> web.StreamResponse:
    return await serve(request, EMBEDDINGS)


def _model_object(model: str, created: int, owner: str) -> dict[str, Any]:
    return {"id": model, "object": "model", "created": created, "owned_by": owner}


async def list_models(request: web.Request) -> web.Response:
    catalog = request.app[PLANE].catalog()
    snapshot = catalog.snapshot
    key = authenticate(request.headers, snapshot)
    owner = snapshot.org_names.get(key.org_id, "hatchway")
    data = [_model_object(m, snapshot.created, owner) for m in catalog.models_for(key)]
    return web.json_response({"object": "list", "data": data})


async def retrieve_model(request: web.Request) -> web.Response:
    catalog = request.app[PLANE].catalog()
    snapshot = catalog.snapshot
    key = authenticate(request.headers, snapshot)
    model = request.match_info["model"]
    if model not in catalog.models_for(key):
        raise ModelNotFoundError(f"The model '{model}' does not exist or you do not have access to it.")
    return web.json_response(_model_object(model, snapshot.created, snapshot.org_names.get(key.org_id, "")))
