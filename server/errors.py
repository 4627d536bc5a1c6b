"""One error hierarchy, rendered in one shape: the OpenAI error envelope.

    HatchwayError                       status  type
    ├── InvalidRequestError              400    invalid_request_error
    │   └── BodyTooLargeError            413    invalid_request_error
    ├── AuthenticationError              401    authentication_error
    ├── PermissionDeniedError            403    permission_error
    ├── NotFoundError                    404    invalid_request_error
    │   └── ModelNotFoundError           404    invalid_request_error (code model_not_found)
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
        └── UpstreamStatusError          (upstream's)            the upstream answered with an error status

Every handler raises these; `render` is the only place that turns one into an HTTP response.
"""

from __future__ import annotations

from typing import Any

import orjson


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


class InternalError(HatchwayError):
    status = 500
    type = "api_error"
    code = "internal_error"


class ServiceUnavailableError(HatchwayError):
    status = 503
    type = "api_error"
    code = "service_unavailable"


class UpstreamError(HatchwayError):
    """A target failed to serve; `server.failover.decide` tells what the attempt loop does next."""

    status = 502
    type = "api_error"
    code = "upstream_error"


class UpstreamConnectError(UpstreamError):
    code = "upstream_connect_error"


class UpstreamRefusedError(UpstreamConnectError):
    code = "upstream_unreachable"


class UpstreamTimeoutError(UpstreamError):
    status = 504
    code = "upstream_timeout"


class UpstreamProtocolError(UpstreamError):
    code = "upstream_protocol_error"


class UpstreamStatusError(UpstreamError):
    """The upstream answered with an error status; its own envelope is passed through when it has one."""

    # Statuses that describe the client's request and so reach the client as they are; anything else
    # (an upstream 401 means *our* provider key is wrong, a 5xx is the upstream's fault) becomes a 502.
    PASSED_THROUGH = frozenset({400, 404, 413, 422, 429})

    def __init__(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
        self.upstream_status = status
        self.status = status if status in self.PASSED_THROUGH else 502
        parsed = _parse_envelope(body)
        message = str(parsed.get("message") or f"HTTP {status}")
        if self.status == status:
            super().__init__(message, param=parsed.get("param"), code=parsed.get("code"), headers=headers)
            self.type = parsed["type"] if isinstance(parsed.get("type"), str) else "invalid_request_error"
        else:
            super().__init__(f"upstream answered HTTP {status}: {message}", headers=headers)


def _parse_envelope(body: bytes) -> dict[str, Any]:
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        return {}
    error = doc.get("error") if isinstance(doc, dict) else None
    return error if isinstance(error, dict) else {}
