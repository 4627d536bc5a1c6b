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
from server.api.middleware import RATE_LIMIT_HEADERS, REQUEST_ID
from server.api.resources import CACHE, CATALOG, CONFIG, LIMITER, RELAY, ROUTER, SNAPSHOTS
from server.api.schema import clip
from server.api.validation import (
    Validator,
    check_content_type,
    parse_body,
    validate_chat,
    validate_completion,
    validate_embedding,
)
from server.config import Config
from server.errors import BodyTooLargeError, HatchwayError, InvalidRequestError, ModelNotFoundError, NotFoundError
from server.policy.auth import authenticate, authorize_model
from server.policy.cache import Lookup, StreamAssembler, parse_directives
from server.policy.limits import Estimate, estimate_tokens
from server.policy.snapshot import KeyEntry, Snapshot
from server.relay import Capture, Exchange
from server.responses.dialect import ResponsesDialect
from server.responses.request import validate_responses
from server.routing.rules import ModelPlan

# Per-request cache control: `bypass`, `no-store`, `ttl=SECONDS` (server.policy.cache.parse_directives).
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
    config, cache, relay = request.app[CONFIG], request.app[CACHE], request.app[RELAY]
    catalog = request.app[CATALOG]()
    key = await caller_key(request, catalog.snapshot)
    directives = parse_directives(request.headers.get(CACHE_HEADER))
    body = await read_body(request, config.max_body_bytes)
    endpoint.validate(body)
    dialect = ResponsesDialect(body) if endpoint.responses else None
    if body.get("stream") and not endpoint.streamable:
        raise InvalidRequestError(f"/v1/{endpoint.path} cannot be streamed", param="stream")
    authorize_model(key, catalog, body["model"])
    plans = request.app[ROUTER].plan(
        catalog.snapshot.rules.get(key.org_id, ()),
        lambda model: catalog.targets_for(key.org_id, model),
        body["model"],
        streaming=bool(body.get("stream")),
    )
    lookup = await cache.fetch(key.org_id, endpoint.path, body, catalog.snapshot.cache_policy(key.org_id), directives)
    exchange = Exchange(
        request_id=request[REQUEST_ID],
        key=key,
        endpoint=endpoint.path,
        body=body,
        plans=plans,
        deadline_s=config.request_deadline_s,
        cache=lookup.status,
        capture=_capture(lookup, endpoint, body, dialect),
        responses=dialect,
    )
    # A cached answer costs nothing: it still counts as a request, but reserves no tokens and no spend.
    cost = Estimate() if lookup.value is not None else estimate(config, *exchange.metered, plans)
    try:
        admission = await request.app[LIMITER].acquire(catalog.snapshot.limit_scopes(key), cost)
    except HatchwayError as exc:
        relay.refuse(exchange, exc)
        raise
    request[RATE_LIMIT_HEADERS] = admission.headers
    try:
        if lookup.value is not None:
            return await relay.replay(request, exchange, lookup.value)
        response = await (relay.stream(request, exchange) if exchange.streaming else relay.complete(exchange))
        if lookup.key and exchange.capture is not None and exchange.capture.answer is not None:
            await cache.store(lookup.key, exchange.capture.answer, lookup.ttl_s)
        return response
    finally:
        # A client that left is billed what was generated for it; a node's own count may still be on its way.
        relay.settle_limits(exchange, admission.settle)


def _capture(
    lookup: Lookup, endpoint: Endpoint, body: dict[str, Any], dialect: ResponsesDialect | None
) -> Capture | None:
    """What the relay keeps of the answer for the cache: nothing unless a miss will be stored; a stream is
    assembled as it passes (a Responses stream by its dialect's record)."""
    if not lookup.stores or lookup.value is not None:
        return None
    if not body.get("stream"):
        return Capture()
    return Capture(StreamAssembler(chat=endpoint is CHAT) if dialect is None else dialect.record)


def estimate(config: Config, endpoint: str, body: dict[str, Any], plans: list[ModelPlan]) -> Estimate:
    """What to reserve against token and spend limits: the tokens the request may use, priced at the dearest
    target it may be served by."""
    prompt, completion = estimate_tokens(endpoint, body, config.completion_estimate_tokens)
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
    authenticate(request.headers, request.app[SNAPSHOTS].current)
    raise NotFoundError(
        f"{request.method} {clip(request.path, 100)} is not served: Hatchway serves POST /v1/responses and stores no "
        "responses, so none can be retrieved, cancelled or deleted; send the whole conversation in 'input'"
    )


def _model_object(model: str, created: int, owner: str) -> dict[str, Any]:
    return {"id": model, "object": "model", "created": created, "owned_by": owner}


async def list_models(request: web.Request) -> web.Response:
    catalog = request.app[CATALOG]()
    snapshot = catalog.snapshot
    key = await caller_key(request, snapshot)
    owner = snapshot.org_names.get(key.org_id, "hatchway")
    data = [_model_object(m, snapshot.created, owner) for m in catalog.models_for(key)]
    return web.json_response({"object": "list", "data": data})


async def retrieve_model(request: web.Request) -> web.Response:
    catalog = request.app[CATALOG]()
    snapshot = catalog.snapshot
    key = await caller_key(request, snapshot)
    model = request.match_info["model"]
    if model not in catalog.models_for(key):
        raise ModelNotFoundError(f"The model '{model}' does not exist or you do not have access to it.")
    return web.json_response(_model_object(model, snapshot.created, snapshot.org_names.get(key.org_id, "")))
