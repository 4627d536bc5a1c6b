"""Console sessions: the cookie, its server-side row, and the CSRF token derived from it.

The cookie holds a random session id; the database holds only its SHA-256 (server.accounts.store), so ending a
session anywhere ends it on every plane. The CSRF token is an HMAC keyed by the session id: a page of the plane
gets it from /auth/login or /admin/v1/me and sends it back as X-CSRF-Token; another site can neither read the
cookie (HttpOnly) nor compute the token, and nothing more is stored.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets

from aiohttp import web

from server.credentials import hash_key
from server.errors import PermissionDeniedError

SESSION_COOKIE = "hatchway_session"
CSRF_HEADER = "X-CSRF-Token"
# Methods that change nothing, so they need no CSRF token.
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


def new_session_id() -> str:
    return secrets.token_urlsafe(32)


def session_hash(session_id: str) -> str:
    return hash_key(session_id)


def csrf_token(session_id: str) -> str:
    return hmac.new(session_id.encode(), b"hatchway csrf v1", hashlib.sha256).hexdigest()


def check_csrf(request: web.Request, session_id: str) -> None:
    """Unsafe methods on a cookie-authenticated request must carry the session's CSRF token."""
    if request.method in SAFE_METHODS:
        return
    sent = request.headers.get(CSRF_HEADER, "")
    if not hmac.compare_digest(sent.encode("utf-8", "surrogatepass"), csrf_token(session_id).encode()):
        raise PermissionDeniedError(
            f"This request needs the session's {CSRF_HEADER} header (from /auth/login or /admin/v1/me).",
            code="csrf_failed",
        )


def is_secure(request: web.Request) -> bool:
    """Whether the browser reached the plane over TLS: directly, or through a proxy that says so."""
    forwarded = request.headers.get("X-Forwarded-Proto", "")
    return request.secure or forwarded.split(",")[0].strip().lower() == "https"


def set_session_cookie(response: web.StreamResponse, request: web.Request, session_id: str, lifetime_s: float) -> None:
    response.set_cookie(
        SESSION_COOKIE,
        session_id,
        max_age=int(lifetime_s),
        path="/",
        httponly=True,
        samesite="Strict",
        secure=is_secure(request),
    )


def clear_session_cookie(response: web.StreamResponse, request: web.Request) -> None:
    response.del_cookie(SESSION_COOKIE, path="/", httponly=True, samesite="Strict", secure=is_secure(request))
