"""Rate limits and quotas shared by every plane through Redis: exact with requests spread over several planes.

The same limits, refusals and x-ratelimit-* headers as server.policy.limits, but the counters live in Redis and each
decision is one Lua script (server.shared.scripts) run atomically there: admission checks every limit of every
scope and charges them all, or none, in one round trip (EVALSHA); settlement gives back what was reserved and
not used in another, sent after the response in a task this limiter owns. The scripts are loaded once at start
and called by their SHA1; a Redis that forgot them (restarted) is given them again. Calls made in the same
event-loop turn (this limiter's and the cache's, for concurrent requests) share one pipeline round trip
(server.shared.batch).

Quotas start from the usage table: each plane seeds the current day's and month's counters when it starts,
each counter becoming the larger of what Redis holds and what the table says, so N planes starting do not add
their seeds N times. A Redis that lost its data (the epoch key is gone) is seeded again before the next
admission it answers.

When Redis cannot be reached (`redis_failure`):

    open    (default) each plane falls back to its own in-process limiter, its quotas re-read from the usage
            table: traffic goes on, each plane holding the limits by itself (so N planes admit up to N times a
            limit while Redis is away). Logged once when Redis goes and once when it is back.
    closed  every request with a limit is refused with 503 and Retry-After: 1 until Redis answers again; for
            deployments where a quota is a hard spending cap.

Either way Redis is tried again at most once a second (`RETRY_S`) while it is away, so requests do not each
wait for a connect timeout.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import logging
import secrets
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from server.errors import HatchwayError, ServiceUnavailableError
from server.policy.limits import (
    QUOTAS,
    Admission,
    Bucket,
    Estimate,
    Limiter,
    Limits,
    concurrency_refused,
    quota_refused,
    rate_headers,
    requests_refused,
    tokens_exceed_limit,
    tokens_refused,
    window_end,
    windows,
)
from server.shared.batch import batcher_for
from server.shared.scripts import ADMIT, SEED, SETTLE

log = logging.getLogger(__name__)

# A command that takes longer than this is a Redis that cannot be reached: on loopback or a LAN a decision
# takes well under a millisecond.
TIMEOUT_S = 0.5
# Connections to Redis per plane: a decision holds one for a round trip (~0.1-1 ms), so this serves thousands
# of decisions a second; more would only queue inside Redis, which runs scripts one at a time.
MAX_CONNECTIONS = 64
# Settlements on the wire at once: the other connections stay free for admissions, which a client waits on.
SETTLE_CONCURRENCY = 16
# While Redis is away, how often one request tries it again.
RETRY_S = 1.0
# How long a settlement that cannot reach Redis is retried before it is counted as lost (the lease lapses
# anyway, giving back the reservation; the use it would have counted is missing until the next seed).
SETTLE_RETRY_S = 30.0
# How long closing waits for settlements still on their way.
CLOSE_WAIT_S = 5.0
# The epoch key lives a week: its lapse costs one seed from the usage table.
EPOCH_MS = 7 * 86_400_000
# The errors that mean Redis is not there (as against a script that failed: a bug, raised as such).
UNREACHABLE = (RedisConnectionError, RedisTimeoutError, OSError)

UsageSoFar = Callable[[], Awaitable[Mapping[tuple[str, str], tuple[float, float]]]]


class Script:
    """A Lua script registered once (SCRIPT LOAD) and called by its SHA1 (EVALSHA)."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.sha = hashlib.sha1(source.encode()).hexdigest()

    async def load(self, client: aioredis.Redis) -> None:
        await client.script_load(self.source)

    async def __call__(self, client: aioredis.Redis, keys: Sequence[str], args: Sequence[str | int | float]) -> Any:
        # With the other calls of this loop turn, in one round trip; a Redis that forgot the script (restarted,
        # SCRIPT FLUSHed) is given it again, once (server.shared.batch).
        return await batcher_for(client).evalsha(self.sha, self.source, keys, args)


class SharedLimiter(Limiter):
    """server.policy.limits.Limiter with its counters in Redis. The in-process counters it inherits are the fallback
    of `redis_failure=open`, and only that."""

    def __init__(
        self,
        url: str,
        *,
        prefix: str,
        failure: str,
        lease_s: float,
        usage_so_far: UsageSoFar,
        clock: Callable[[], float] = time.time,
    ) -> None:
        super().__init__(clock)
        # A bounded pool that makes callers wait for a connection (an asyncio client runs one command at a time
        # on each): a burst of settlements must queue, not open a connection each.
        pool = aioredis.BlockingConnectionPool.from_url(
            url,
            max_connections=MAX_CONNECTIONS,
            timeout=TIMEOUT_S,
            socket_timeout=TIMEOUT_S,
            socket_connect_timeout=TIMEOUT_S,
            # One retry on a fresh connection: a pooled one may point at a Redis since restarted.
            retry=Retry(NoBackoff(), 1),
        )
        self.redis = aioredis.Redis(connection_pool=pool)
        self.url = url
        self.prefix = prefix
        self.failure = failure
        self.lease_ms = int(lease_s * 1000)
        self.usage_so_far = usage_so_far
        self.settle_retry_s = SETTLE_RETRY_S
        self.admit_script = Script(ADMIT)
        self.settle_script = Script(SETTLE)
        self.seed_script = Script(SEED)
        # Lease names: unique across planes without asking Redis for a counter.
        self._plane = secrets.token_hex(6)
        self._leases = itertools.count()
        self._settling: set[asyncio.Task[None]] = set()
        self._settle_slots = asyncio.Semaphore(SETTLE_CONCURRENCY)
        self._seeding: asyncio.Task[None] | None = None
        self._start_seed: Mapping[tuple[str, str], tuple[float, float]] = {}
        # Redis is away until this time (monotonic): requests do not try it before.
        self.away_until = 0.0
        self.away = False
        # Counted for operators (and tests): decisions taken without Redis, settlements that never reached it.
        self.unreachable_decisions = 0
        self.settle_failures = 0

    def __repr__(self) -> str:
        return (
            f"SharedLimiter(prefix={self.prefix!r}, failure={self.failure}, away={self.away}, "
            f"unreachable_decisions={self.unreachable_decisions}, settle_failures={self.settle_failures})"
        )

    # -- keys -------------------------------------------------------------------------------------------

    @property
    def epoch_key(self) -> str:
        return f"{self.prefix}epoch"

    def quota_key(self, scope: str, window_name: str) -> str:
        return f"{self.prefix}q:{scope}:{window_name}"

    def scope_keys(self, scope: str, current: Mapping[str, str]) -> list[str]:
        p = self.prefix
        return [
            f"{p}s:{scope}",
            f"{p}l:{scope}",
            f"{p}h:{scope}",
            self.quota_key(scope, current["day"]),
            self.quota_key(scope, current["month"]),
        ]

    def _window_expiry(self, now: float) -> tuple[int, int]:
        """When the current day's and month's counters expire (ms): a day after each window ends."""
        return int((window_end("day", now) + 86400) * 1000), int((window_end("month", now) + 86400) * 1000)

    # -- start, seed, close -----------------------------------------------------------------------------

    def seed(self, used: Mapping[tuple[str, str], tuple[float, float]]) -> None:
        """Start-up (in a thread): the fallback's counters now, Redis's in `start`."""
        super().seed(used)
        self._start_seed = used

    async def start(self) -> None:
        try:
            for script in (self.admit_script, self.settle_script, self.seed_script):
                await script.load(self.redis)
            await self._push_seed(self._start_seed, mark_epoch=True)
        except UNREACHABLE as exc:
            # The plane starts anyway: requests follow `redis_failure` until Redis answers, and the first
            # admission that finds its counters unseeded seeds them.
            self._went_away(exc)
        else:
            log.info("shared limits in Redis (prefix %r, failure mode %s)", self.prefix, self.failure)

    async def _push_seed(self, used: Mapping[tuple[str, str], tuple[float, float]], *, mark_epoch: bool) -> None:
        now = self.clock()
        current = windows(now)
        day_at, month_at = self._window_expiry(now)
        keys = [self.epoch_key]
        args: list[str | int] = [EPOCH_MS if mark_epoch else 0]
        for (scope, window), (tokens, usd) in used.items():
            keys.append(self.quota_key(scope, current[window]))
            args += [repr(float(tokens)), repr(float(usd)), day_at if window == "day" else month_at]
        await self.seed_script(self.redis, keys, args)

    async def reseed(
        self, used: Mapping[tuple[str, str], tuple[float, float]], quotas: Mapping[str, Iterable[int]]
    ) -> None:
        """A quota just set starts from the window's usage so far, in Redis as here."""
        self.reseed_here(used, quotas)
        windows_of = {(scope, QUOTAS[index][2]) for scope, indices in quotas.items() for index in indices}
        wanted = {scope_window: used.get(scope_window, (0.0, 0.0)) for scope_window in windows_of}
        try:
            await self._push_seed(wanted, mark_epoch=False)
        except UNREACHABLE as exc:
            log.warning("could not seed the new quotas in Redis (%s): they count from Redis's own figures", exc)

    async def _seed_again(self) -> None:
        """Redis lost the counters: seed them from the usage table, once however many requests noticed."""
        if self._seeding is None or self._seeding.done():
            self._seeding = asyncio.get_running_loop().create_task(self._seed_from_table())
        await asyncio.shield(self._seeding)

    async def _seed_from_table(self) -> None:
        used = await self.usage_so_far()
        await self._push_seed(used, mark_epoch=True)
        log.warning("Redis held no shared limit state (restarted or flushed): quotas seeded from the usage table")

    async def close(self) -> None:
        if self._settling:
            _, late = await asyncio.wait(set(self._settling), timeout=CLOSE_WAIT_S)
            for task in late:
                task.cancel()
            self.settle_failures += len(late)
            if late:
                log.warning("%d settlements of shared limits never reached Redis", len(late))
        await self.redis.aclose(close_connection_pool=True)  # the pool is ours (see __init__)
        log.info("shared limits closed: %r", self)

    # -- admission --------------------------------------------------------------------------------------

    async def acquire(self, scopes: Iterable[tuple[str, Limits]], estimate: Estimate) -> Admission:
        held = tuple((scope, limits) for scope, limits in scopes if limits.any)
        if not held:
            return Admission(self, (), estimate, {})  # nothing limited: no round trip
        if self.away and time.monotonic() < self.away_until:
            return self._without_redis(held, estimate)
        lease = f"{self._plane}:{next(self._leases)}"
        now = self.clock()
        current = windows(now)
        keys, args = self._admit_call(held, estimate, lease, now, current)
        try:
            reply = await self.admit_script(self.redis, keys, args)
            if reply[0] == b"unseeded":
                await self._seed_again()
                reply = await self.admit_script(self.redis, keys, args)
        except UNREACHABLE as exc:
            self._went_away(exc)
            return self._without_redis(held, estimate)
        if self.away:
            self._came_back()
        # '' where the scope has no such bucket: never read, the limit being None.
        levels = [float(v) if v else 0.0 for v in reply[-2 * len(held) :]]
        headers = rate_headers(
            ((levels[2 * i], limits.rpm) for i, (_, limits) in enumerate(held) if limits.rpm is not None),
            ((levels[2 * i + 1], limits.tpm) for i, (_, limits) in enumerate(held) if limits.tpm is not None),
        )
        if reply[0] != 1:
            refusal = self._refusal(held, estimate, reply, now)
            refusal.headers = {**headers, **refusal.headers}
            raise refusal
        return Admission(self, (), estimate, headers, lease=lease, shared=held)

    def _admit_call(
        self, held: tuple[tuple[str, Limits], ...], estimate: Estimate, lease: str, now: float, current: dict[str, str]
    ) -> tuple[list[str], list[str | int | float]]:
        day_at, month_at = self._window_expiry(now)
        keys = [self.epoch_key]
        args: list[str | int | float] = [
            lease,
            self.lease_ms,
            estimate.tokens,
            repr(float(estimate.usd)),
            day_at,
            month_at,
            len(held),
        ]
        for scope, limits in held:
            keys += self.scope_keys(scope, current)
            args += [_arg(limits.rpm), _arg(limits.tpm), _arg(limits.concurrency)]
            args += [_arg(getattr(limits, name)) for name, _, _ in QUOTAS]
        return keys, args

    def _refusal(
        self, held: tuple[tuple[str, Limits], ...], estimate: Estimate, reply: list[Any], now: float
    ) -> HatchwayError:
        scope, limits = held[int(reply[1]) - 1]
        subject = "key" if scope.startswith("key:") else "org"
        reason = reply[2].decode()
        if reason == "concurrency":
            assert limits.concurrency is not None
            return concurrency_refused(subject, limits.concurrency)
        if reason == "requests":
            assert limits.rpm is not None
            return requests_refused(subject, limits.rpm, float(reply[3]))
        if reason == "tokens_exceed_limit":
            assert limits.tpm is not None
            return tokens_exceed_limit(subject, limits.tpm, estimate.tokens)
        if reason == "tokens":
            assert limits.tpm is not None
            return tokens_refused(subject, limits.tpm, estimate.tokens, float(reply[3]))
        index = int(reply[3])
        name, unit, _ = QUOTAS[index]
        wanted = estimate.tokens if unit == "tokens" else estimate.usd
        return quota_refused(subject, index, getattr(limits, name), float(reply[4]), float(reply[5]), wanted, now)

    # -- settlement -------------------------------------------------------------------------------------

    def settle(self, admission: Admission, tokens: int, usd: float) -> None:
        if admission.lease is None:
            super().settle(admission, tokens, usd)  # admitted by the fallback, or nothing limited
            return
        task = asyncio.get_running_loop().create_task(self._settle(admission, tokens, usd))
        self._settling.add(task)
        task.add_done_callback(self._settling.discard)

    async def _settle(self, admission: Admission, tokens: int, usd: float) -> None:
        assert admission.lease is not None
        deadline = time.monotonic() + self.settle_retry_s
        pause = 0.05
        while True:
            now = self.clock()
            current = windows(now)
            day_at, month_at = self._window_expiry(now)
            keys: list[str] = []
            args: list[str | int | float] = [
                admission.lease,
                admission.estimate.tokens,
                tokens,
                repr(float(usd)),
                day_at,
                month_at,
                len(admission.shared),
            ]
            for scope, limits in admission.shared:
                keys += self.scope_keys(scope, current)
                args.append(_arg(limits.tpm))
            try:
                async with self._settle_slots:
                    await self.settle_script(self.redis, keys, args)
                return
            except UNREACHABLE as exc:
                if time.monotonic() + pause > deadline:
                    self.settle_failures += 1
                    log.warning(
                        "a settlement of shared limits never reached Redis (%s); %d lost so far: its lease lapses "
                        "in at most %.0f s, its use is counted again from the usage table at the next seed",
                        exc,
                        self.settle_failures,
                        self.lease_ms / 1000,
                    )
                    return
            await asyncio.sleep(pause)
            pause = min(1.0, pause * 2)

    # -- without Redis ----------------------------------------------------------------------------------

    def _went_away(self, exc: BaseException) -> None:
        self.away_until = time.monotonic() + RETRY_S
        if self.away:
            return
        self.away = True
        if self.failure == "open":
            log.warning("Redis unreachable (%s): limits are held by each plane alone until it is back", exc)
            # The fallback's quotas were seeded at start: bring them up to what the usage table says now.
            task = asyncio.get_running_loop().create_task(self._reseed_fallback())
            self._settling.add(task)
            task.add_done_callback(self._settling.discard)
        else:
            log.warning("Redis unreachable (%s): requests with limits are refused with 503 until it is back", exc)

    def _came_back(self) -> None:
        self.away = False
        log.warning(
            "Redis reachable again: limits are shared again (%d decisions taken without it)", self.unreachable_decisions
        )

    async def _reseed_fallback(self) -> None:
        try:
            self.seed_here(await self.usage_so_far())
        except Exception:  # the fallback keeps its start-up figures: better than failing the switch
            log.exception("could not re-read the usage table for the in-process limits")

    def seed_here(self, used: Mapping[tuple[str, str], tuple[float, float]]) -> None:
        super().seed(used)

    def _without_redis(self, held: tuple[tuple[str, Limits], ...], estimate: Estimate) -> Admission:
        self.unreachable_decisions += 1
        if self.failure == "open":
            return self.admit(held, estimate)
        raise ServiceUnavailableError(
            "Rate limits cannot be checked right now (the shared limit store is unreachable). Retry shortly.",
            headers={"Retry-After": str(max(1, round(self.away_until - time.monotonic())))},
        )

    # -- live state -------------------------------------------------------------------------------------

    async def live_usage(self, scope: str, limits: Limits) -> dict[str, Any]:
        """What Redis holds for a scope, for `limits show` (the plane's own counters while Redis is away)."""
        now = self.clock()
        state, leases, _, day, month = self.scope_keys(scope, windows(now))
        try:
            async with self.redis.pipeline(transaction=False) as pipe:
                pipe.hmget(state, ["rl", "rs", "tl", "ts"])
                pipe.zcount(leases, now, "+inf")
                pipe.hmget(day, ["tokens", "usd"])
                pipe.hmget(month, ["tokens", "usd"])
                pipe.time()
                levels, in_flight, day_used, month_used, server_time = await pipe.execute()
        except UNREACHABLE:
            return self.usage(scope, limits)
        redis_now = server_time[0] + server_time[1] / 1e6
        live: dict[str, Any] = {"in_flight": int(in_flight)}
        if limits.rpm is not None:
            live["requests_remaining"] = max(0, int(_refill(levels[0], levels[1], limits.rpm, redis_now)))
        if limits.tpm is not None:
            live["tokens_remaining"] = max(0, int(_refill(levels[2], levels[3], limits.tpm, redis_now)))
        for _, name, by_tokens, window, _ in limits.quotas:
            figures = day_used if window == "day" else month_used
            used = float(figures[0 if by_tokens else 1] or 0)
            live[f"{name}_used"] = int(used) if by_tokens else round(used, 6)
        return live


def _arg(value: float | None) -> str:
    return "" if value is None else repr(value)


def _refill(level: bytes | None, stamp: bytes | None, capacity: int, now: float) -> float:
    """A bucket's level as Redis holds it (absent: full), refilled to `now` by the in-process bucket's rule."""
    if level is None or stamp is None:
        return Bucket().refill(capacity, now)
    return Bucket(float(level), float(stamp)).refill(capacity, now)
