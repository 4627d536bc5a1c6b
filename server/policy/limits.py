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
admission) and are seeded from the usage table at start-up so a restart does not reset a day's quota. A quota
set later (a scope that had none) is seeded the same way before the snapshot that carries it goes live
(`new_quotas`, `reseed`): it starts from the window's usage so far, not from 0. Requests already in flight when
it is set were admitted without it and are not counted against it.

With a Redis configured, server.shared.redis_limits.SharedLimiter (a subclass) takes the same decisions in
Redis, for every plane at once, with the refusals and headers built here; the request path calls `acquire`,
which is `admit` here and one round trip there.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Mapping
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

    # Derived once, for the request path: the quotas set, as (index in QUOTAS, name, counts tokens (else USD),
    # window, limit), and whether any limit is set at all.
    quotas: tuple[tuple[int, str, bool, str, float], ...] = field(default=(), init=False, repr=False, compare=False)
    any: bool = field(default=False, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        quotas = tuple(
            (i, name, unit == "tokens", window, getattr(self, name)) for i, (name, unit, window) in enumerate(QUOTAS)
        )
        object.__setattr__(self, "quotas", tuple(q for q in quotas if q[4] is not None))
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


@dataclass(slots=True)
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


@dataclass(slots=True)
class Quota:
    """Use within the current calendar window (a UTC day or month), settled and reserved."""

    used: float = 0.0
    reserved: float = 0.0


@dataclass(slots=True)
class ScopeState:
    scope: str
    requests: Bucket = field(default_factory=Bucket)
    tokens: Bucket = field(default_factory=Bucket)
    in_flight: int = 0
    # One counter per entry of QUOTAS, in that order, counting in `windows`.
    quotas: list[Quota] = field(default_factory=lambda: [Quota() for _ in QUOTAS])
    windows: dict[str, str] = field(default_factory=dict)

    @property
    def subject(self) -> str:
        return "key" if self.scope.startswith("key:") else "org"

    def roll(self, current: dict[str, str]) -> None:
        """Move the quotas into the current windows: a day's or month's use starts again at 0 when it ends.
        Reservations of requests still in flight stay: they settle into the new window."""
        if current is self.windows:
            return  # `windows()` hands out the same dict until the UTC day ends: the common case
        for quota, (_, _, window) in zip(self.quotas, QUOTAS, strict=True):
            if self.windows.get(window) != current[window]:
                quota.used = 0.0
        self.windows = current


# The quotas, each with the unit it counts and the calendar window it resets on.
QUOTAS: tuple[tuple[str, str, str], ...] = (
    ("tokens_per_day", "tokens", "day"),
    ("tokens_per_month", "tokens", "month"),
    ("usd_per_day", "usd", "day"),
    ("usd_per_month", "usd", "month"),
)


def windows(now: float) -> dict[str, str]:
    """The UTC day and month `now` falls in, by name; the same dict for every call within one day."""
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

# The scopes a request is charged to: each one's counters and the limits it was admitted under.
Held = tuple[tuple[ScopeState, Limits], ...]


@dataclass(slots=True)
class Admission:
    """A request let through: what it holds in each scope, released once by `settle`."""

    limiter: Limiter
    scopes: Held
    estimate: Estimate
    # x-ratelimit-* headers describing the tightest scope after this admission.
    headers: dict[str, str]
    settled: bool = False
    # Admitted by the shared limiter (server.shared): the lease it holds there, and the scopes it was charged to.
    lease: str | None = None
    shared: tuple[tuple[str, Limits], ...] = ()

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

    def state(self, scope: str, current: dict[str, str]) -> ScopeState:
        """A scope's counters, rolled into the `current` windows."""
        state = self.states.get(scope)
        if state is None:
            state = self.states[scope] = ScopeState(scope)
        state.roll(current)
        return state

    async def start(self) -> None:
        """Nothing to connect to: the counters are this process's (server.shared's limiter has a store)."""

    async def close(self) -> None:
        """Nothing to hand back: settlement here is synchronous."""

    async def acquire(self, scopes: Iterable[tuple[str, Limits]], estimate: Estimate) -> Admission:
        """The request path's admission: `admit`, with no await in between. The shared limiter (server.shared)
        takes one round trip to its store here instead."""
        return self.admit(scopes, estimate)

    def admit(self, scopes: Iterable[tuple[str, Limits]], estimate: Estimate) -> Admission:
        """Charge the request to every scope, or raise without charging any."""
        now = self.clock()
        current = windows(now)
        held: Held = tuple((self.state(scope, current), limits) for scope, limits in scopes if limits.any)
        try:
            for state, limits in held:
                _check(state, limits, estimate, now)
        except (RateLimitError, QuotaExceededError) as exc:
            exc.headers = {**_headers(held, now), **exc.headers}
            raise
        for state, limits in held:
            state.in_flight += 1
            if limits.rpm is not None:
                assert state.requests.level is not None  # refilled by _check
                state.requests.level -= 1
            if limits.tpm is not None:
                assert state.tokens.level is not None
                state.tokens.level -= estimate.tokens
            for index, _, by_tokens, _, _ in limits.quotas:
                state.quotas[index].reserved += estimate.tokens if by_tokens else estimate.usd
        # The buckets were refilled to `now` by _check: the headers show them as charged.
        return Admission(self, held, estimate, _headers(held, now, refill=False))

    def settle(self, admission: Admission, tokens: int, usd: float) -> None:
        now = self.clock()
        current = windows(now)
        reserved = admission.estimate
        for state, limits in admission.scopes:
            state.roll(current)
            state.in_flight -= 1
            if limits.tpm is not None:
                level = state.tokens.refill(limits.tpm, now)
                state.tokens.level = min(float(limits.tpm), level + reserved.tokens - tokens)
            for index, _, by_tokens, _, _ in limits.quotas:
                quota = state.quotas[index]
                left = quota.reserved - (reserved.tokens if by_tokens else reserved.usd)
                quota.reserved = left if left > 0.0 else 0.0
                quota.used += tokens if by_tokens else usd

    def seed(self, used: Mapping[tuple[str, str], tuple[float, float]]) -> None:
        """Start-up: what each scope already used this window, {(scope, "day"|"month"): (tokens, usd)}."""
        current = windows(self.clock())
        for (scope, window), (tokens, usd) in used.items():
            state = self.state(scope, current)
            for quota, (_, unit, quota_window) in zip(state.quotas, QUOTAS, strict=True):
                if quota_window == window:
                    quota.used = tokens if unit == "tokens" else usd

    async def reseed(
        self, used: Mapping[tuple[str, str], tuple[float, float]], quotas: Mapping[str, Iterable[int]]
    ) -> None:
        self.reseed_here(used, quotas)

    def reseed_here(
        self, used: Mapping[tuple[str, str], tuple[float, float]], quotas: Mapping[str, Iterable[int]]
    ) -> None:
        """A quota just set: its counter starts from the window's usage so far, {(scope, window): (tokens, usd)},
        as `seed` does at start-up. `quotas` names the new quotas (indices in QUOTAS) of each scope; the scope's
        other counters are live and stay as they are."""
        current = windows(self.clock())
        for scope, indices in quotas.items():
            state = self.state(scope, current)
            for index in indices:
                _, unit, window = QUOTAS[index]
                tokens, usd = used.get((scope, window), (0.0, 0.0))
                state.quotas[index].used = tokens if unit == "tokens" else usd

    async def live_usage(self, scope: str, limits: Limits) -> dict[str, Any]:
        """The live state of a scope, for `limits show`, wherever the counters are."""
        return self.usage(scope, limits)

    def usage(self, scope: str, limits: Limits) -> dict[str, Any]:
        """The live state of a scope in this process's counters."""
        now = self.clock()
        state = self.state(scope, windows(now))
        live: dict[str, Any] = {"in_flight": state.in_flight}
        if limits.rpm is not None:
            live["requests_remaining"] = max(0, math.floor(state.requests.refill(limits.rpm, now)))
        if limits.tpm is not None:
            live["tokens_remaining"] = max(0, math.floor(state.tokens.refill(limits.tpm, now)))
        for index, name, by_tokens, _, _ in limits.quotas:
            quota = state.quotas[index]
            live[f"{name}_used"] = int(quota.used) if by_tokens else round(quota.used, 6)
        return live


def new_quotas(old: Mapping[str, Limits], new: Mapping[str, Limits]) -> dict[str, list[int]]:
    """The quotas (indices in QUOTAS) each scope has in `new` and did not have in `old`."""
    added: dict[str, list[int]] = {}
    for scope, limits in new.items():
        before = old.get(scope)
        had = {q[0] for q in before.quotas} if before is not None else set()
        indices = [q[0] for q in limits.quotas if q[0] not in had]
        if indices:
            added[scope] = indices
    return added


def _check(state: ScopeState, limits: Limits, estimate: Estimate, now: float) -> None:
    """Raise when the request does not fit one of the scope's limits; refills its buckets to `now`."""
    if limits.concurrency is not None and state.in_flight >= limits.concurrency:
        raise concurrency_refused(state.subject, limits.concurrency)
    if limits.rpm is not None and state.requests.refill(limits.rpm, now) < 1:
        raise requests_refused(state.subject, limits.rpm, state.requests.seconds_until(1, limits.rpm))
    if limits.tpm is not None:
        level = state.tokens.refill(limits.tpm, now)
        if estimate.tokens > limits.tpm:
            raise tokens_exceed_limit(state.subject, limits.tpm, estimate.tokens)
        if level < estimate.tokens:
            wait = state.tokens.seconds_until(estimate.tokens, limits.tpm)
            raise tokens_refused(state.subject, limits.tpm, estimate.tokens, wait)
    for index, _, by_tokens, _, limit in limits.quotas:
        quota = state.quotas[index]
        wanted = estimate.tokens if by_tokens else estimate.usd
        if quota.used + quota.reserved + wanted > limit:
            raise quota_refused(state.subject, index, limit, quota.used, quota.reserved, wanted, now)


# The refusals, one per limit, worded the same whichever limiter (this one or server.shared's) decided.


def concurrency_refused(subject: str, limit: int) -> RateLimitError:
    return RateLimitError(
        f"Too many concurrent requests for this {subject}: the limit is {limit}. Retry when one of them has finished.",
        headers={"Retry-After": "1"},
    )


def requests_refused(subject: str, rpm: int, wait: float) -> RateLimitError:
    return RateLimitError(
        f"Rate limit reached for this {subject}: {rpm} requests per minute. Retry in {wait:.1f}s.",
        headers=_retry_after(wait),
    )


def tokens_exceed_limit(subject: str, tpm: int, tokens: int) -> RateLimitError:
    return RateLimitError(
        f"This request may use up to {tokens} tokens (prompt estimate + max_tokens), more than "
        f"this {subject}'s limit of {tpm} tokens per minute. Lower max_tokens.",
        code="tokens_exceed_limit",
        headers={"x-should-retry": "false"},
    )


def tokens_refused(subject: str, tpm: int, tokens: int, wait: float) -> RateLimitError:
    return RateLimitError(
        f"Rate limit reached for this {subject}: {tpm} tokens per minute, and this request "
        f"may use up to {tokens}. Retry in {wait:.1f}s.",
        headers=_retry_after(wait),
    )


def quota_refused(
    subject: str, index: int, limit: float, used: float, reserved: float, wanted: float, now: float
) -> QuotaExceededError:
    _, unit, window = QUOTAS[index]
    what = f"{limit} tokens" if unit == "tokens" else f"{limit:g} USD"
    return QuotaExceededError(
        f"This {subject} has used its quota of {what} per {window} (used {used:g}, "
        f"reserved {reserved:g}, this request may need {wanted:g}). It resets at "
        f"{_window_end(window, now).isoformat()}."
    )


def window_end(kind: str, now: float) -> float:
    """When the UTC day or month `now` falls in ends, in epoch seconds."""
    return _window_end(kind, now).timestamp()


def _headers(held: Held, now: float, *, refill: bool = True) -> dict[str, str]:
    """x-ratelimit-* for the tightest scope of each kind (fewest remaining), refilled to `now` unless told."""
    requests: list[tuple[float, int]] = []
    tokens: list[tuple[float, int]] = []
    for state, limits in held:
        if limits.rpm is not None:
            level = state.requests.refill(limits.rpm, now) if refill else state.requests.level or 0.0
            requests.append((level, limits.rpm))
        if limits.tpm is not None:
            level = state.tokens.refill(limits.tpm, now) if refill else state.tokens.level or 0.0
            tokens.append((level, limits.tpm))
    return rate_headers(requests, tokens)


def rate_headers(requests: Iterable[tuple[float, int]], tokens: Iterable[tuple[float, int]]) -> dict[str, str]:
    """x-ratelimit-* for the tightest bucket of each kind (the lowest level), given as (level, capacity)."""
    headers: dict[str, str] = {}
    for names, buckets in ((_REQUEST_HEADERS, requests), (_TOKEN_HEADERS, tokens)):
        tightest = min(buckets, default=None, key=lambda bucket: bucket[0])
        if tightest is not None:
            level, capacity = tightest
            limit, remaining, reset = names
            headers[limit] = str(capacity)
            headers[remaining] = str(max(0, math.floor(level)))
            # Until the bucket is full again: what OpenAI's reset headers mean.
            headers[reset] = format_reset(max(0.0, (capacity - level) * 60.0 / capacity))
    return headers


_REQUEST_HEADERS = ("x-ratelimit-limit-requests", "x-ratelimit-remaining-requests", "x-ratelimit-reset-requests")
_TOKEN_HEADERS = ("x-ratelimit-limit-tokens", "x-ratelimit-remaining-tokens", "x-ratelimit-reset-tokens")


def _retry_after(wait_s: float) -> dict[str, str]:
    return {"Retry-After": str(max(1, math.ceil(wait_s)))}
