"""Bearer-key authentication against the snapshot (a hash and a dict lookup; no storage)."""

from __future__ import annotations

import re
from collections.abc import Mapping
from datetime import UTC, datetime

from server.credentials import hash_key
from server.errors import AuthenticationError, ModelNotFoundError, PermissionDeniedError
from server.policy.snapshot import KeyEntry, Snapshot
from server.routing.catalog import Catalog

_PRINTABLE_ASCII = re.compile(r"[\x21-\x7e]+")
# How much of a client's model name an error message quotes.
_MODEL_QUOTE_CHARS = 100


def bearer_token(headers: Mapping[str, str]) -> str:
    header = headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if not header:
        raise AuthenticationError(
            "You didn't provide an API key. Send it as 'Authorization: Bearer YOUR_KEY'.",
            code="missing_api_key",
        )
    if scheme.lower() != "bearer" or not token.strip():
        raise AuthenticationError("The Authorization header must be 'Bearer YOUR_KEY'.")
    token = token.strip()
    # Every key the plane issues is printable ASCII. Anything else (aiohttp hands non-UTF-8 bytes over as
    # surrogates) can match no key, and must not reach hashing or an error message as it is.
    if not _PRINTABLE_ASCII.fullmatch(token):
        raise AuthenticationError("Incorrect API key provided: the key must be printable ASCII.")
    return token


def authenticate(headers: Mapping[str, str], snapshot: Snapshot) -> KeyEntry:
    token = bearer_token(headers)
    key = snapshot.keys.get(hash_key(token))
    if key is None:
        # One message for unknown, revoked and mistyped keys: the difference is nobody else's business.
        raise AuthenticationError(f"Incorrect API key provided: {token[:6]}****.")
    if key.expires_at is not None and key.expires_at <= datetime.now(UTC):
        raise AuthenticationError("This API key has expired.", code="expired_api_key")
    return key


def authenticate_admin(headers: Mapping[str, str], snapshot: Snapshot) -> str:
    """Return the admin key's id."""
    admin_id = snapshot.admin_keys.get(hash_key(bearer_token(headers)))
    if admin_id is None:
        raise AuthenticationError("Incorrect admin key provided.")
    return admin_id


def authorize_model(key: KeyEntry, catalog: Catalog, model: str) -> None:
    """404 for a model the org does not serve, 403 for one it serves but this key may not use."""
    shown = model if len(model) <= _MODEL_QUOTE_CHARS else model[: _MODEL_QUOTE_CHARS - 3] + "..."
    if not catalog.serves(key.org_id, model):
        raise ModelNotFoundError(f"The model '{shown}' does not exist or you do not have access to it.", param="model")
    if key.models is not None and model not in key.models:
        raise PermissionDeniedError(f"This API key is not allowed to use the model '{shown}'.", param="model")
