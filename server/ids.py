"""Unique ids for request ids and usage rows: a random prefix per process and a counter.

uuid4 (or `secrets`) reads the kernel's random source once per id, which profiling showed as a real share of the
plane's time in a sandbox (bench/README.md). 64 random bits per process keep ids from different processes and
restarts apart; the counter keeps those of one process apart. 32 hex characters, like a UUID's.
"""

from __future__ import annotations

import itertools
import secrets
from collections.abc import Callable


def id_sequence() -> Callable[[], str]:
    """A function returning a new unique id on each call."""
    prefix = secrets.token_hex(8)
    counter = itertools.count(1)
    return lambda: f"{prefix}{next(counter):016x}"
