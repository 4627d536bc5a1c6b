"""What to do after a failed attempt: the failure classes of DESIGN §4 mapped onto one of four moves.

    RETRY       the same target again, after a delay (backoff with jitter, or the upstream's Retry-After)
    NEXT        the next target for the same model
    NEXT_MODEL  skip this model's remaining targets and go to the fallback model (context too long)
    STOP        no other target can do better (the client's own mistake): pass the error through

The numbers that bound all this live in `FailoverPolicy`, one per target (defaults from the config,
overrides per provider).
"""

from __future__ import annotations

import enum
import random
from dataclasses import dataclass, field, fields, replace
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any

from server.errors import (
    UpstreamConnectError,
    UpstreamError,
    UpstreamRefusedError,
    UpstreamStatusError,
    UpstreamTimeoutError,
)


def _limit(default: float, help: str) -> Any:
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class FailoverPolicy:
    """Per-target limits. Every field can be overridden per provider (`provider add/set --FIELD`)."""

    connect_timeout_s: float = _limit(10.0, "Connect timeout towards the target (s).")
    header_timeout_s: float = _limit(120.0, "Time the target has to answer with headers (s).")
    ttft_timeout_s: float = _limit(60.0, "Time to a stream's first content token before failing over (s).")
    idle_timeout_s: float = _limit(60.0, "Longest silence between two chunks of a stream: a stall (s).")
    stall_floor_s: float = _limit(5.0, "Silence a committed stream may always keep before it counts as stalled (s).")
    stall_factor: float = _limit(4.0, "A stall is a silence this many times the stream's longest gap so far.")
    stall_ceiling_s: float = _limit(10.0, "Longest silence of a committed stream, whatever its pace (s).")
    hedge_floor_s: float = _limit(1.0, "Least hedge delay under `--hedge auto` (s).")
    hedge_unmeasured_s: float = _limit(2.0, "Hedge delay under `--hedge auto` before the target's TTFT is known (s).")
    max_retries: int = _limit(1, "Extra tries of the same target after a 5xx or a reset connection.")
    max_rate_limit_retries: int = _limit(2, "Extra tries of the same target after a 429.")
    backoff_base_s: float = _limit(0.2, "First backoff delay; doubles per retry, with jitter (s).")
    backoff_cap_s: float = _limit(2.0, "Longest backoff delay (s).")
    retry_after_cap_s: float = _limit(10.0, "Longest Retry-After waited for; longer fails over (s).")
    breaker_failures: int = _limit(5, "Consecutive failures that open the target's circuit breaker.")
    breaker_cooldown_s: float = _limit(15.0, "Time an open breaker waits before one probe request (s).")

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))

    def with_overrides(self, overrides: dict[str, Any]) -> FailoverPolicy:
        return replace(self, **{k: v for k, v in overrides.items() if k in self.field_names()})


def validate_overrides(raw: Any) -> dict[str, float | int]:
    """Check a provider's policy overrides; raises ValueError naming the bad field."""
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ValueError("policy must be an object")
    known = {f.name: f.type for f in fields(FailoverPolicy)}
    result: dict[str, float | int] = {}
    for name, value in raw.items():
        if name not in known:
            raise ValueError(f"unknown policy field {name!r} (known: {', '.join(known)})")
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
            raise ValueError(f"policy field {name!r} must be a non-negative number")
        result[name] = int(value) if known[name] == "int" else float(value)
    return result


class Move(enum.Enum):
    RETRY = "retry"
    NEXT = "next"
    NEXT_MODEL = "next_model"
    STOP = "stop"


@dataclass(frozen=True)
class Decision:
    move: Move
    delay_s: float = 0.0


def backoff_ceiling_s(policy: FailoverPolicy, tries: int) -> float:
    """The longest backoff after `tries` earlier retries: the base doubled per retry, up to the cap."""
    return min(policy.backoff_cap_s, policy.backoff_base_s * 2.0**tries)


def backoff(policy: FailoverPolicy, tries: int) -> float:
    """Exponential backoff with jitter: a crowd of clients retrying together does not stay together."""
    return backoff_ceiling_s(policy, tries) * random.uniform(0.5, 1.0)


def retry_after_seconds(value: str | None) -> float | None:
    """Retry-After as seconds or an HTTP date; None when absent or unreadable."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - datetime.now(UTC)).total_seconds())


def is_context_length_error(exc: UpstreamStatusError) -> bool:
    text = f"{exc.code or ''} {exc.message}".lower()
    return exc.upstream_status == 400 and (
        "context_length_exceeded" in text or "maximum context length" in text or "context window" in text
    )


def decide(exc: UpstreamError, *, tries: int, policy: FailoverPolicy, time_left_s: float, other_key: bool) -> Decision:
    """`tries`: earlier retries of this target for this request; `other_key`: the target has another usable key."""
    if isinstance(exc, UpstreamStatusError):
        return _decide_status(exc, tries, policy, time_left_s, other_key)
    if isinstance(exc, UpstreamTimeoutError | UpstreamRefusedError):
        # A silent or absent target is not retried: the next one is likelier to answer in time.
        return Decision(Move.NEXT)
    if isinstance(exc, UpstreamConnectError) and tries < policy.max_retries:
        return _delayed(backoff(policy, tries), time_left_s)
    return Decision(Move.NEXT)


def _decide_status(
    exc: UpstreamStatusError, tries: int, policy: FailoverPolicy, time_left_s: float, other_key: bool
) -> Decision:
    status = exc.upstream_status
    if status == 429:
        if other_key:
            return Decision(Move.RETRY)
        if tries >= policy.max_rate_limit_retries:
            return Decision(Move.NEXT)
        wait = retry_after_seconds(exc.headers.get("Retry-After"))
        if wait is None:
            return _delayed(backoff(policy, tries), time_left_s)
        if wait > policy.retry_after_cap_s:
            return Decision(Move.NEXT)
        return _delayed(wait, time_left_s)
    if status in (401, 403):
        # Our provider key was refused: another key of the same provider may work, else another target.
        return Decision(Move.RETRY) if other_key else Decision(Move.NEXT)
    if is_context_length_error(exc):
        return Decision(Move.NEXT_MODEL)
    if status in (404, 408, 409) or status >= 500:
        if status >= 500 and tries < policy.max_retries:
            return _delayed(backoff(policy, tries), time_left_s)
        return Decision(Move.NEXT)
    return Decision(Move.STOP)


def _delayed(delay_s: float, time_left_s: float) -> Decision:
    # Waiting past the request's deadline helps nobody: go elsewhere instead.
    if delay_s >= time_left_s:
        return Decision(Move.NEXT)
    return Decision(Move.RETRY, delay_s)
