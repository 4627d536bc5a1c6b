"""The outer layer of every request: request id, metrics, and rendering every error as the OpenAI envelope.

It also tells the request's connection (server.serving.connections) when a request begins and ends, which is what
that connection's read timeouts are measured against.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from server.errors import BodyTooLargeError, HatchwayError, InternalError, InvalidRequestError, NotFoundError
from server.ids import id_sequence
from server.metrics import Metrics
from server.relay import CLIENT_CLOSED
from server.serving.connections import Connection
from server.serving.overload import LoadShedder

log = logging.getLogger(__name__)

REQUEST_ID = web.RequestKey("request_id", str)
# A client's id is echoed when it is safe (below); else one of ours (server.ids).
new_request_id = id_sequence()


# A client's request id is echoed only when it is short and printable, so it cannot inject into logs or headers.
_SAFE_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")


def render(exc: HatchwayError) -> web.Response:
    return web.Response(status=exc.status, body=exc.body(), content_type="application/json", headers=exc.headers)


def _from_http_exception(exc: web.HTTPException) -> HatchwayError:
    if exc.status == 404:
        return NotFoundError("Unknown route. See /v1/models for what this plane serves.")
    if exc.status == 413:
        return BodyTooLargeError("Request body is too large.")
    error = InvalidRequestError(exc.reason or "Bad request")
    error.status = exc.status
    if exc.status == 405:
        error.code = "method_not_allowed"
        error.headers = {"Allow": exc.headers.get("Allow", "")}
    return error


def make_middleware(metrics: Metrics, shedder: LoadShedder) -> Middleware:
    """The one middleware: request id, load shedding of API requests (server.serving.overload), metrics, and the
    envelope for every error. One layer rather than several: each costs a call per request."""

    @web.middleware
    async def envelope(request: web.Request, handler: Handler) -> web.StreamResponse:
        client_id = request.headers.get("X-Request-Id", "")
        request[REQUEST_ID] = client_id if _SAFE_REQUEST_ID.match(client_id) else new_request_id()
        resource = request.match_info.route.resource
        route = resource.canonical if resource is not None else "unmatched"
        started = time.perf_counter()
        # Health checks, metrics and the admin API are never shed: they must stay reachable under overload.
        shed = route.startswith("/v1/")
        connection = request.protocol
        if type(connection) is Connection:
            connection.request_began(request.content)
        metrics.in_flight += 1
        response: web.StreamResponse
        try:
            if shed:
                shedder.admit()
                try:
                    response = await handler(request)
                finally:
                    shedder.release()
            else:
                response = await handler(request)
        except HatchwayError as exc:
            response = render(exc)
        except web.HTTPException as exc:
            response = render(_from_http_exception(exc))
        except web.RequestPayloadError:
            # Its message may quote the body: not logged. The connection cannot be trusted to carry another request.
            response = render(
                InvalidRequestError(
                    "The request body is not validly framed (Content-Length or chunked encoding).", code="bad_framing"
                )
            )
            response.force_close()
        except Exception:
            log.exception("request %s: unhandled error", request[REQUEST_ID])
            response = render(InternalError("The plane failed to handle this request; it has been logged."))
        except asyncio.CancelledError:
            # The client left (aiohttp cancels the handler): no response goes out, but the request was served
            # as far as it got and is counted, as the usage row counts it.
            metrics.served(route, CLIENT_CLOSED, time.perf_counter() - started)
            raise
        finally:
            metrics.in_flight -= 1
            if type(connection) is Connection:
                connection.request_ended()
        metrics.served(route, response.status, time.perf_counter() - started)
        return response

    return envelope


# x-ratelimit-* of the limits a request was admitted under, for whatever response it gets.
RATE_LIMIT_HEADERS = web.RequestKey("rate_limit_headers", dict[str, str])


async def stamp_response(request: web.Request, response: web.StreamResponse) -> None:
    """on_response_prepare: every response, streams and errors included, carries the request id and, once a
    request was admitted under rate limits, their x-ratelimit-* headers."""
    request_id = request.get(REQUEST_ID)
    if request_id:
        response.headers["X-Request-Id"] = request_id
    limits = request.get(RATE_LIMIT_HEADERS)
    if limits:
        for name, value in limits.items():
            response.headers.setdefault(name, value)
