"""Passwords: argon2id (argon2-cffi, RFC 9106's low-memory profile), hashed in a worker thread.

A hash takes tens of milliseconds and 64 MiB by design; on the event loop it would stall every request the
plane is serving, so callers await these functions, which run it in a thread.
"""

from __future__ import annotations

import asyncio
import functools

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

from server.errors import InvalidRequestError

# Long enough that a guess is expensive; the upper bound only keeps one request from hashing megabytes.
MIN_LENGTH = 10
MAX_LENGTH = 1024

_hasher = PasswordHasher()


@functools.cache
def _dummy_hash() -> str:
    """What a login for an unknown email is checked against, so that it costs as long as a wrong password."""
    return _hasher.hash("hatchway: no such account")


def check_password(password: object) -> str:
    if not isinstance(password, str) or not MIN_LENGTH <= len(password) <= MAX_LENGTH:
        raise InvalidRequestError(
            f"'password' must be a string of {MIN_LENGTH} to {MAX_LENGTH} characters", param="password"
        )
    return password


async def hash_password(password: str) -> str:
    return await asyncio.to_thread(_hasher.hash, password)


def _verify(stored: str | None, password: str) -> bool:
    try:
        return _hasher.verify(stored or _dummy_hash(), password) and stored is not None
    except (VerificationError, InvalidHashError):
        return False


async def verify_password(stored: str | None, password: str) -> bool:
    """Whether `password` matches `stored`; with `stored` None (no such account) a dummy hash is checked and the
    answer is False, in about the time a real check takes."""
    return await asyncio.to_thread(_verify, stored, password)
