"""Rate limits and quotas, per key and per org, held in memory and exact under concurrency.

Each limited scope (an org, or one key) has:

    requests    a bucket of `rpm` requests refilled continuously (rpm/60 a second), so a burst of 50 against
                rpm 10 lets exactly 10 through, and one more every 6 s after
    tokens      the same for `tpm`, charged with an estimate at admission (prompt estimate + max_tokens) and
                settled with the real usage when the answer is complete: the difference goes back
    concurrency requests in flight, released when the answer is complete or the client left
    quotas      tokens and spend (USD) per UTC day and per UTC month: used + reserved + this request's estimate
                must fit, so concurrent requests cannot overshoot together

`admit` checks every dimension of every scope first and only then charges them, with no await in between:
on one event loop that is atomic. Refusals are 429s: `rate_limit_error` with Retry-After when waiting helps,
`insufficient_quota` with `x-should-retry: false` when only a new window (or an admin) can.

Counters live in this process; they survive snapshot rebuilds (limits are read from the snapshot at each
admission) and are seeded from the usage table at start-up so a restart does not reset a day's quota.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from datetime import UTC, datetime
from typing import Any

import orjson

from server.errors import QuotaExceededError, RateLimitError


@dataclass(frozen=True, slots=True)
class Limits:
    """One scope's limits; None is unlimited."""

    rpm: int | None = None
    tpm: int | None = None
    concurrency: int | None = None
    tokens_per_day: int | None = None
    tokens_per_month: int | None = None
    usd_per_day: float | None = None
    usd_per_month: float | None = None

    # Derived once, for the request path: the quotas set, as (name, unit, window, limit), and whether any
    # limit is set at all.
    quotas: tuple[tuple[str, str, str, float], ...] = field(default=(), init=False, repr=False, compare=False)
    any: bool = field(default=False, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        quotas = tuple((name, unit, window, getattr(self, name)) for name, unit, window in QUOTAS)
        object.__setattr__(self, "quotas", tuple(q for q in quotas if q[3] is not None))
        object.__setattr__(self, "any", any(getattr(self, name) is not None for name in LIMIT_FIELDS))


LIMIT_FIELDS = tuple(f.name for f in fields(Limits) if f.init)
INTEGER_LIMITS = frozenset({"rpm", "tpm", "concurrency", "tokens_per_day", "tokens_per_month"})


def org_scope(org_id: str) -> str:
    return f"org:{org_id}"


def key_scope(key_id: str) -> str:
    return f"key:{key_id}"


@dataclass(frozen=True, slots=True)
class Estimate:
    """What a request may consume, reserved at admission."""

    tokens: int = 0
    usd: float = 0.0


def estimate_tokens(endpoint: str, body: dict[str, Any], default_completion: int) -> tuple[int, int]:
    """(prompt, completion) tokens a request may use, for reservations: a little over, rather than under."""
    # About four characters a token for English under the common BPE tokenizers; the JSON punctuation counted
    # along with the text keeps the estimate on the high side.
    text = body.get("messages") or body.get("prompt") or body.get("input") or ""
    prompt = (len(orjson.dumps(text)) + len(orjson.dumps(body.get("tools") or []))) // 4 + 1
    if endpoint == "embeddings":
        return prompt, 0
    n = body.get("n") if isinstance(body.get("n"), int) else 1
    most = body.get("max_completion_tokens") or body.get("max_tokens") or default_completion
    return prompt, int(most) * max(1, n or 1)


# -- counters ------------------------------------------------------------------------------------------


@dataclass
class Bucket:
    """`capacity` units per minute, refilled continuously. The level may go below zero when a request used
    more than it reserved: the debt is paid back by the refill before anything else gets through."""

    level: float | None = None
    stamp: float = 0.0

    def refill(self, capacity: int, now: float) -> float:
        if self.level is None:
            self.level = float(capacity)
        else:
            elapsed = max(0.0, now - self.stamp)
            self.level = min(float(capacity), self.level + elapsed * capacity / 60.0)
        self.stamp = now
        return self.level

    def seconds_until(self, amount: float, capacity: int) -> float:
        """How long until the level reaches `amount` (after a refill at `stamp`)."""
        missing = amount - (self.level or 0.0)
        return max(0.0, missing * 60.0 / capacity)


@dataclass
class Quota:
    """Use within one calendar window (a UTC day or month), settled and reserved."""

    window: str = ""
    used: float = 0.0
    reserved: float = 0.0

    def roll(self, window: str) -> None:
        if window != self.window:
            # Reservations of requests still in flight stay: they settle into the new window.
            self.window, self.used = window, 0.0


@dataclass
class ScopeState:
    requests: Bucket = field(default_factory=Bucket)
    tokens: Bucket = field(default_factory=Bucket)
    in_flight: int = 0
    # tokens_per_day, tokens_per_month, usd_per_day, usd_per_month -> counter
    quotas: dict[str, Quota] = field(default_factory=dict)

    def quota(self, name: str, window: str) -> Quota:
        quota = self.quotas.get(name)
        if quota is None:
            quota = self.quotas[name] = Quota(window)
        elif quota.window != window:
            quota.roll(window)
        return quota


# The quotas, each with the unit it counts and the calendar window it resets on.
QUOTAS: tuple[tuple[str, str, str], ...] = (
    ("tokens_per_day", "tokens", "day"),
    ("tokens_per_month", "tokens", "month"),
    ("usd_per_day", "usd", "day"),
    ("usd_per_month", "usd", "month"),
)


def windows(now: float) -> dict[str, str]:
    """The UTC day and month `now` falls in, by name."""
    global _windows
    start, end, names = _windows
    if not start <= now < end:
        # Recomputed once a day: formatting dates on every admission was a visible share of the hot path.
        moment = datetime.fromtimestamp(now, UTC)
        day = moment.replace(hour=0, minute=0, second=0, microsecond=0).timestamp()
        names = {"day": moment.strftime("%Y-%m-%d"), "month": moment.strftime("%Y-%m")}
        _windows = (day, day + 86400, names)
    return names


# (start, end, names) of the UTC day the last call fell in.
_windows: tuple[float, float, dict[str, str]] = (0.0, 0.0, {})


def _window_end(kind: str, now: float) -> datetime:
    moment = datetime.fromtimestamp(now, UTC)
    if kind == "day":
        start = moment.replace(hour=0, minute=0, second=0, microsecond=0)
        return datetime.fromtimestamp(start.timestamp() + 86400, UTC)
    year, month = (moment.year + 1, 1) if moment.month == 12 else (moment.year, moment.month + 1)
    return datetime(year, month, 1, tzinfo=UTC)


def format_reset(seconds: float) -> str:
    """A duration the way OpenAI's x-ratelimit-reset-* headers write it: 20ms, 1s, 6m0s."""
    if seconds < 1:
        return f"{math.ceil(seconds * 1000)}ms"
    if seconds < 60:
        return f"{seconds:.3g}s"
    minutes, rest = divmod(round(seconds), 60)
    return f"{minutes}m{rest}s"


# -- admission -----------------------------------------------------------------------------------------


@dataclass
class Admission:
    """A request let through: what it holds in each scope, released once by `settle`."""

    limiter: Limiter
    scopes: tuple[tuple[str, Limits], ...]
    estimate: Estimate
    # x-ratelimit-* headers describing the tightest scope after this admission.
    headers: dict[str, str]
    settled: bool = False

    def settle(self, tokens: int, usd: float) -> None:
        if self.settled:
            return
        self.settled = True
        self.limiter.settle(self, tokens, usd)


class Limiter:
    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        # Wall-clock seconds: quotas follow the calendar. Tests replace it to cross windows without sleeping.
        self.clock = clock
        self.states: dict[str, ScopeState] = {}

    def state(self, scope: str) -> ScopeState:
        state = self.states.get(scope)
        if state is None:
            state = self.states[scope] = ScopeState()
        return state

    def admit(self, scopes: Iterable[tuple[str, Limits]], estimate: Estimate) -> Admission:
        """Charge the request to every scope, or raise without charging any."""
        limited = tuple((scope, limits) for scope, limits in scopes if limits.any)
        now = self.clock()
        current = windows(now)
        try:
            for scope, limits in limited:
                self._check(scope, limits, estimate, now, current)
        except (RateLimitError, QuotaExceededError) as exc:
            exc.headers = {**self.headers(limited, now), **exc.headers}
            raise
        for scope, limits in limited:
            state = self.state(scope)
            state.in_flight += 1
            if limits.rpm is not None:
                assert state.requests.level is not None  # refilled by _check
                state.requests.level -= 1
            if limits.tpm is not None:
                assert state.tokens.level is not None
                state.tokens.level -= estimate.tokens
            for name, unit, window, _ in limits.quotas:
                state.quota(name, current[window]).reserved += _amount(estimate, unit)
        return Admission(self, limited, estimate, self.headers(limited, now))

    def _check(self, scope: str, limits: Limits, estimate: Estimate, now: float, current: dict[str, str]) -> None:
        state = self.state(scope)
        subject = "key" if scope.startswith("key:") else "org"
        if limits.concurrency is not None and state.in_flight >= limits.concurrency:
            raise RateLimitError(
                f"Too many concurrent requests for this {subject}: the limit is {limits.concurrency}. "
                "Retry when one of them has finished.",
                headers={"Retry-After": "1"},
            )
        if limits.rpm is not None and state.requests.refill(limits.rpm, now) < 1:
            wait = state.requests.seconds_until(1, limits.rpm)
            raise RateLimitError(
                f"Rate limit reached for this {subject}: {limits.rpm} requests per minute. Retry in {wait:.1f}s.",
                headers=_retry_after(wait),
            )
        if limits.tpm is not None:
            level = state.tokens.refill(limits.tpm, now)
            if estimate.tokens > limits.tpm:
                raise RateLimitError(
                    f"This request may use up to {estimate.tokens} tokens (prompt estimate + max_tokens), more than "
                    f"this {subject}'s limit of {limits.tpm} tokens per minute. Lower max_tokens.",
                    code="tokens_exceed_limit",
                    headers={"x-should-retry": "false"},
                )
            if level < estimate.tokens:
                wait = state.tokens.seconds_until(estimate.tokens, limits.tpm)
                raise RateLimitError(
                    f"Rate limit reached for this {subject}: {limits.tpm} tokens per minute, and this request "
                    f"may use up to {estimate.tokens}. Retry in {wait:.1f}s.",
                    headers=_retry_after(wait),
                )
        for name, unit, window, limit in limits.quotas:
            quota = state.quota(name, current[window])
            wanted = _amount(estimate, unit)
            if quota.used + quota.reserved + wanted > limit:
                what = f"{limit:g} USD" if unit == "usd" else f"{limit} tokens"
                raise QuotaExceededError(
                    f"This {subject} has used its quota of {what} per {window} (used {quota.used:g}, "
                    f"reserved {quota.reserved:g}, this request may need {wanted:g}). It resets at "
                    f"{_window_end(window, now).isoformat()}."
                )

    def settle(self, admission: Admission, tokens: int, usd: float) -> None:
        now = self.clock()
        current = windows(now)
        for scope, limits in admission.scopes:
            state = self.state(scope)
            state.in_flight -= 1
            if limits.tpm is not None:
                state.tokens.refill(limits.tpm, now)
                assert state.tokens.level is not None
                state.tokens.level = min(float(limits.tpm), state.tokens.level + admission.estimate.tokens - tokens)
            for name, unit, window, _ in limits.quotas:
                quota = state.quota(name, current[window])
                quota.reserved = max(0.0, quota.reserved - _amount(admission.estimate, unit))
                quota.used += tokens if unit == "tokens" else usd

    def headers(self, scopes: Sequence[tuple[str, Limits]], now: float) -> dict[str, str]:
        """x-ratelimit-* for the tightest scope of each kind (fewest remaining)."""
        headers: dict[str, str] = {}
        # The kind names both the header and the ScopeState bucket.
        for kind, attr in (("requests", "rpm"), ("tokens", "tpm")):
            tightest: tuple[float, int, Bucket] | None = None
            for scope, limits in scopes:
                capacity = getattr(limits, attr)
                if capacity is None:
                    continue
                bucket: Bucket = getattr(self.state(scope), kind)
                level = bucket.refill(capacity, now)
                if tightest is None or level < tightest[0]:
                    tightest = (level, capacity, bucket)
            if tightest is not None:
                level, capacity, bucket = tightest
                headers[f"x-ratelimit-limit-{kind}"] = str(capacity)
                headers[f"x-ratelimit-remaining-{kind}"] = str(max(0, math.floor(level)))
                headers[f"x-ratelimit-reset-{kind}"] = format_reset(bucket.seconds_until(capacity, capacity))
        return headers

    def seed(self, used: Mapping[tuple[str, str], tuple[float, float]]) -> None:
        """Start-up: what each scope already used this window, {(scope, "day"|"month"): (tokens, usd)}."""
        current = windows(self.clock())
        for (scope, window), (tokens, usd) in used.items():
            state = self.state(scope)
            for name, unit, quota_window in QUOTAS:
                if quota_window == window:
                    state.quota(name, current[window]).used = tokens if unit == "tokens" else usd

    def usage(self, scope: str, limits: Limits) -> dict[str, Any]:
        """The live state of a scope, for `limits show`."""
        now = self.clock()
        current = windows(now)
        state = self.state(scope)
        live: dict[str, Any] = {"in_flight": state.in_flight}
        if limits.rpm is not None:
            live["requests_remaining"] = max(0, math.floor(state.requests.refill(limits.rpm, now)))
        if limits.tpm is not None:
            live["tokens_remaining"] = max(0, math.floor(state.tokens.refill(limits.tpm, now)))
        for name, unit, window, _ in limits.quotas:
            quota = state.quota(name, current[window])
            live[f"{name}_used"] = round(quota.used, 6) if unit == "usd" else int(quota.used)
        return live


def _retry_after(wait_s: float) -> dict[str, str]:
    return {"Retry-After": str(max(1, math.ceil(wait_s)))}


def _amount(estimate: Estimate, unit: str) -> float:
    return float(estimate.tokens) if unit == "tokens" else estimate.usd
