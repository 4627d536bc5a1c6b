"""One error hierarchy, rendered in one shape: the OpenAI error envelope.

    HatchwayError                       status  type
    ├── InvalidRequestError              400    invalid_request_error
    │   ├── BodyTooLargeError            413    invalid_request_error
    │   └── UnsupportedMediaTypeError    415    invalid_request_error (code unsupported_media_type)
    ├── AuthenticationError              401    authentication_error
    ├── PermissionDeniedError            403    permission_error
    ├── NotFoundError                    404    invalid_request_error
    │   └── ModelNotFoundError           404    invalid_request_error (code model_not_found)
    ├── RequestTimeoutError              408    invalid_request_error (the client sent its request too slowly)
    ├── ConflictError                    409    invalid_request_error
    ├── RateLimitError                   429    rate_limit_error      waiting helps (Retry-After)
    ├── QuotaExceededError               429    insufficient_quota    waiting does not (x-should-retry: false)
    ├── InternalError                    500    api_error
    ├── ServiceUnavailableError          503    api_error
    └── UpstreamError                    502    api_error        a target failed; the attempt loop may fail over
        ├── UpstreamConnectError         502                     reset or cut: the connection broke
        │   └── UpstreamRefusedError     502                     nobody listens there (refused, DNS)
        ├── UpstreamTimeoutError         504                     no headers (or no first byte) in time
        ├── UpstreamProtocolError        502                     the upstream answered something that is not OpenAI
        ├── UpstreamStatusError          (upstream's)            the upstream answered with an error status
        └── UpstreamConfigError          500                     the plane's own settings for it are unusable
                                                                 (bad base URL): no fault of the target's

Every handler raises these; `render` is the only place that turns one into an HTTP response.

An UpstreamError has two texts: `message`, what the tenant is shown (the target's name and what went wrong,
never an internal address or the upstream's own words about our credentials), and `detail`, what the
operator's log gets (`str(exc)`: the upstream's text, with secrets masked by server.redact).
"""

from __future__ import annotations

import http
import re
from collections.abc import Iterable
from typing import Any

import orjson

from server.redact import bounded, mask


class HatchwayError(Exception):
    status: int = 500
    type: str = "api_error"
    code: str | None = None

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code
        self.headers = headers or {}

    def envelope(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def body(self) -> bytes:
        return orjson.dumps(self.envelope())


class InvalidRequestError(HatchwayError):
    status = 400
    type = "invalid_request_error"


class BodyTooLargeError(InvalidRequestError):
    status = 413
    code = "request_too_large"


class UnsupportedMediaTypeError(InvalidRequestError):
    status = 415
    code = "unsupported_media_type"


class AuthenticationError(HatchwayError):
    status = 401
    type = "authentication_error"
    code = "invalid_api_key"


class PermissionDeniedError(HatchwayError):
    status = 403
    type = "permission_error"
    code = "model_not_allowed"


class NotFoundError(HatchwayError):
    status = 404
    type = "invalid_request_error"
    code = "not_found"


class ModelNotFoundError(NotFoundError):
    code = "model_not_found"


class ConflictError(HatchwayError):
    status = 409
    type = "invalid_request_error"
    code = "conflict"


class RateLimitError(HatchwayError):
    status = 429
    type = "rate_limit_error"
    code = "rate_limit_exceeded"


class QuotaExceededError(HatchwayError):
    """A token or spend quota is used up: only a new window or an admin can help, so clients must not retry."""

    status = 429
    type = "insufficient_quota"
    code = "insufficient_quota"

    def __init__(self, message: str) -> None:
        super().__init__(message, headers={"x-should-retry": "false"})


class RequestTimeoutError(HatchwayError):
    """The client did not send its request (headers or body) within the plane's read timeouts."""

    status = 408
    type = "invalid_request_error"
    code = "request_timeout"


class InternalError(HatchwayError):
    status = 500
    type = "api_error"
    code = "internal_error"


class ServiceUnavailableError(HatchwayError):
    status = 503
    type = "api_error"
    code = "service_unavailable"


class UpstreamError(HatchwayError):
    """A target failed to serve; `server.routing.failover.decide` tells what the attempt loop does next.

    `message` is for the tenant; `detail` (the message when not given) for the operator's log, where `str(exc)`
    puts it. Both are masked (server.redact) and bounded, whoever built them.
    """

    status = 502
    type = "api_error"
    code = "upstream_error"

    def __init__(
        self,
        message: str,
        *,
        detail: str | None = None,
        secrets: Iterable[str] = (),
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        secrets = tuple(secrets)
        super().__init__(bounded(mask(message, secrets), _MESSAGE_CHARS), param=param, code=code, headers=headers)
        self.detail = self.message if detail is None else bounded(mask(detail, secrets), _DETAIL_CHARS)

    def __str__(self) -> str:
        return self.detail


class UpstreamConnectError(UpstreamError):
    code = "upstream_connect_error"


class UpstreamRefusedError(UpstreamConnectError):
    code = "upstream_unreachable"


class UpstreamTimeoutError(UpstreamError):
    status = 504
    code = "upstream_timeout"


class UpstreamProtocolError(UpstreamError):
    code = "upstream_protocol_error"


class UpstreamConfigError(UpstreamError):
    """The plane cannot even send the request as its settings for the target say (a base URL the client cannot
    use, an API key that cannot be a header): the operator's mistake, found before anything reached the target,
    so it says nothing about the target's health (server.routing.health.is_target_fault) and the next target is
    tried."""

    status = 500
    code = "upstream_misconfigured"


class UpstreamStatusError(UpstreamError):
    """The upstream answered with an error status.

    Statuses that describe the client's request (PASSED_THROUGH) reach the client with the upstream's own
    envelope, secrets masked: OpenAI's words are what a developer needs to fix the request. Anything else is
    the operator's problem (an upstream 401/403 means *our* provider key is refused, a 5xx is the upstream's
    fault): the tenant gets a 502 naming the target and the status, the upstream's text goes to the log only.
    """

    PASSED_THROUGH = frozenset({400, 404, 413, 422, 429})

    def __init__(
        self,
        status: int,
        body: bytes,
        headers: dict[str, str] | None = None,
        *,
        target: str = "the upstream",
        secrets: Iterable[str] = (),
    ) -> None:
        self.upstream_status = status
        self.status = status if status in self.PASSED_THROUGH else 502
        parsed = _parse_envelope(body)
        text = parsed.get("message")
        if not isinstance(text, str) or not text:
            text = None
        raw = text or body[:_DETAIL_CHARS].decode("utf-8", "replace") or "(no body)"
        detail = f"{target} answered HTTP {status}: {raw}"
        if self.status == status:
            param = parsed.get("param")
            super().__init__(
                text or f"{target} answered HTTP {status}",
                detail=detail,
                secrets=secrets,
                param=param if isinstance(param, str) else None,
                code=_token(parsed.get("code")),
                headers=headers,
            )
            self.type = _token(parsed.get("type")) or "invalid_request_error"
        else:
            super().__init__(
                f"{target} answered HTTP {status} ({_failure(status)}); the plane's log has the details",
                detail=detail,
                secrets=secrets,
                headers=headers,
            )


# How much of an upstream's text a tenant's message and an operator's log line carry.
_MESSAGE_CHARS = 4000
_DETAIL_CHARS = 1000
# An upstream's `code` and `type` become metric labels and usage rows: only short identifiers are kept.
_TOKEN = re.compile(r"[A-Za-z0-9_.\-]{1,64}")
_FAILURES = {401: "authentication failed upstream", 403: "permission denied upstream"}


def _token(value: Any) -> str | None:
    return value if isinstance(value, str) and _TOKEN.fullmatch(value) else None


def _failure(status: int) -> str:
    if status in _FAILURES:
        return _FAILURES[status]
    try:
        return http.HTTPStatus(status).phrase.lower()
    except ValueError:
        return "an error status"


def _parse_envelope(body: bytes) -> dict[str, Any]:
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        return {}
    error = doc.get("error") if isinstance(doc, dict) else None
    return error if isinstance(error, dict) else {}
