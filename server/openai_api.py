"""The OpenAI endpoints. Each request runs the same named steps:

    authenticate -> read body -> validate -> authorize model -> route -> cache lookup -> admit (limits)
        -> replay (a cache hit) | relay (complete | stream) -> store in cache -> settle limits

Everything before `relay` reads only the in-memory snapshot and the plane's in-memory counters, or with Redis
configured one round trip for the cache lookup and one for the limits (server.shared).

/v1/responses takes the same steps: its body is also turned into its chat completions form at `validate`
(server.responses), which is what its tokens are estimated from and what a target without the Responses API is
sent; the relay sends each attempt in its own target's form.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from aiohttp import web

from server.accounts.playground import playground_key
from server.auth import authenticate, authorize_model
from server.cache import StreamAssembler, parse_directives
from server.errors import BodyTooLargeError, HatchwayError, InvalidRequestError, ModelNotFoundError, NotFoundError
from server.limits import Estimate, estimate_tokens
from server.middleware import RATE_LIMIT_HEADERS, REQUEST_ID
from server.plane import PLANE, Plane
from server.relay import Exchange
from server.responses.dialect import ResponsesDialect
from server.responses.request import validate_responses
from server.routing import ModelPlan
from server.schema import clip
from server.snapshot import KeyEntry, Snapshot
from server.validation import (
    Validator,
    check_content_type,
    parse_body,
    validate_chat,
    validate_completion,
    validate_embedding,
)

# Per-request cache control: `bypass`, `no-store`, `ttl=SECONDS` (server.cache.parse_directives).
CACHE_HEADER = "X-Hatchway-Cache"


@dataclass(frozen=True)
class Endpoint:
    path: str
    validate: Validator
    streamable: bool
    # Whether requests go through the Responses dialect (server.responses.dialect).
    responses: bool = False


CHAT = Endpoint("chat/completions", validate_chat, streamable=True)
COMPLETIONS = Endpoint("completions", validate_completion, streamable=True)
EMBEDDINGS = Endpoint("embeddings", validate_embedding, streamable=False)
RESPONSES = Endpoint("responses", validate_responses, streamable=True, responses=True)


async def read_body(request: web.Request, limit: int) -> dict[str, Any]:
    """The JSON body of an OpenAI or admin request: declared as JSON, within the size limit, parsed."""
    check_content_type(request.headers.get("Content-Type"))
    if request.content_length is not None and request.content_length > limit:
        raise BodyTooLargeError(f"Request body is {request.content_length} bytes; the limit is {limit}.")
    return parse_body(await request.read())


async def caller_key(request: web.Request, snapshot: Snapshot) -> KeyEntry:
    """The API key a request runs as. Without an Authorization header, the console's session may stand in for one
    (server.accounts.playground); with one, the snapshot alone answers (no storage on the request path)."""
    if "Authorization" in request.headers:
        return authenticate(request.headers, snapshot)
    return await playground_key(request, snapshot)


async def serve(request: web.Request, endpoint: Endpoint) -> web.StreamResponse:
    plane = request.app[PLANE]
    catalog = plane.catalog()
    key = await caller_key(request, catalog.snapshot)
    directives = parse_directives(request.headers.get(CACHE_HEADER))
    body = await read_body(request, plane.config.max_body_bytes)
    endpoint.validate(body)
    dialect = ResponsesDialect(body) if endpoint.responses else None
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
        responses=dialect,
    )
    lookup = await plane.cache.fetch(
        key.org_id, endpoint.path, body, catalog.snapshot.cache_policy(key.org_id), directives
    )
    exchange.cache = lookup.status
    # A cached answer costs nothing: it still counts as a request, but reserves no tokens and no spend.
    cost = Estimate() if lookup.value is not None else estimate(plane, *exchange.metered, plans)
    try:
        admission = await plane.limiter.acquire(catalog.snapshot.limit_scopes(key), cost)
    except HatchwayError as exc:
        plane.relay.refuse(exchange, exc)
        raise
    request[RATE_LIMIT_HEADERS] = admission.headers
    try:
        if lookup.value is not None:
            return await plane.relay.replay(request, exchange, lookup.value)
        if lookup.stores and exchange.streaming:
            exchange.collect = StreamAssembler(chat=exchange.chat) if dialect is None else dialect.record
        relay = plane.relay.stream(request, exchange) if exchange.streaming else plane.relay.complete(exchange)
        response = await relay
        if lookup.stores and lookup.key and exchange.answer is not None:
            await plane.cache.store(lookup.key, exchange.answer, lookup.ttl_s)
        return response
    finally:
        # A client that left is billed what was generated for it; a node's own count may still be on its way.
        plane.relay.settle_limits(exchange, admission.settle)


def estimate(plane: Plane, endpoint: str, body: dict[str, Any], plans: list[ModelPlan]) -> Estimate:
    """What to reserve against token and spend limits: the tokens the request may use, priced at the dearest
    target it may be served by."""
    prompt, completion = estimate_tokens(endpoint, body, plane.config.completion_estimate_tokens)
    # The schema lets `max_tokens` be any integer and leaves its range to the upstream: a negative one must not
    # make a reservation that hands tokens back.
    completion = max(0, completion)
    usd = 0.0
    for plan in plans:
        for target in plan.targets:
            price_in, price_out = target.price()
            usd = max(usd, (prompt * (price_in or 0.0) + completion * (price_out or 0.0)) / 1e6)
    return Estimate(prompt + completion, usd)


async def chat_completions(request: web.Request) -> web.StreamResponse:
    return await serve(request, CHAT)


async def completions(request: web.Request) -> web.StreamResponse:
    return await serve(request, COMPLETIONS)


async def embeddings(request: web.Request) -> web.StreamResponse:
    return await serve(request, EMBEDDINGS)


async def responses(request: web.Request) -> web.StreamResponse:
    return await serve(request, RESPONSES)


async def stored_response(request: web.Request) -> web.StreamResponse:
    """/v1/responses/{id} and what hangs off it (retrieve, delete, cancel, input items): a plane that stores no
    responses has none to give, and says so rather than "unknown route"."""
    authenticate(request.headers, request.app[PLANE].catalog().snapshot)
    raise NotFoundError(
        f"{request.method} {clip(request.path, 100)} is not served: Hatchway serves POST /v1/responses and stores no "
        "responses, so none can be retrieved, cancelled or deleted; send the whole conversation in 'input'"
    )


def _model_object(model: str, created: int, owner: str) -> dict[str, Any]:
    return {"id": model, "object": "model", "created": created, "owned_by": owner}


async def list_models(request: web.Request) -> web.Response:
    catalog = request.app[PLANE].catalog()
    snapshot = catalog.snapshot
    key = await caller_key(request, snapshot)
    owner = snapshot.org_names.get(key.org_id, "hatchway")
    data = [_model_object(m, snapshot.created, owner) for m in catalog.models_for(key)]
    return web.json_response({"object": "list", "data": data})


async def retrieve_model(request: web.Request) -> web.Response:
    catalog = request.app[PLANE].catalog()
    snapshot = catalog.snapshot
    key = await caller_key(request, snapshot)
    model = request.match_info["model"]
    if model not in catalog.models_for(key):
        raise ModelNotFoundError(f"The model '{model}' does not exist or you do not have access to it.")
    return web.json_response(_model_object(model, snapshot.created, snapshot.org_names.get(key.org_id, "")))
