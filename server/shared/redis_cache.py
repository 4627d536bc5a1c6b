"""The response cache shared by every plane through Redis: an answer stored by one plane is a hit on all of them.

The same policy, keys, headers and stream replay as server.policy.cache (which decides what is cached and under which
key); only where the entries live differs. Each org has its own entries and its own byte budget
(`cache_max_bytes`, the in-process cache's bound, here per org), so one org's traffic never evicts another's.
Keys (P is `redis_prefix`; {ORG} is a Redis Cluster hash tag, so one org's keys share a slot):

    P c:{ORG}:v:DIGEST      string: the answer, expiring with its TTL (PX)
    P c:{ORG}:lru           sorted set: DIGEST by last use (µs, Redis's clock), oldest evicted first
    P c:{ORG}:exp           sorted set: DIGEST by expiry, so the bytes of expired entries are given back
    P c:{ORG}:sz            hash: DIGEST -> the bytes it counts (server.policy.cache.entry_size)
    P c:{ORG}:bytes         the org's bytes in use: the sum of sz
    (the four bookkeeping keys expire with the longest-lived entry, so an org that stops caching leaves nothing)

A lookup is one script (GET and touch), a store another (give back the expired, store, evict the least recently
used until the org is within its budget), each one round trip, atomic, and sharing the limiter's connection
pool (server.shared.redis_limits) and its batches: the calls of concurrent requests made in one event-loop turn
go in one pipeline (server.shared.batch). An entry larger than the budget is not stored.

When Redis cannot be reached, a lookup is a miss and nothing is stored: no request fails for the cache. The
first failure marks Redis away; while it is away requests do not try it at all, and a task pings it every
second (`RETRY_S`) until it answers. Lookups and stores without Redis are counted (`unanswered`) and logged at
most once a minute.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from server.errors import ServiceUnavailableError
from server.policy.cache import BYPASSED, HIT, MISS, CachePolicy, Directives, Lookup, entry_for, entry_size
from server.shared.redis_limits import RETRY_S, UNREACHABLE, Script

log = logging.getLogger(__name__)

# How often the failure of a lookup or store is logged while it goes on.
LOG_EVERY_S = 60.0
# Entries an admin's clear drops per script: a big org is cleared in several, so Redis never stalls on one.
CLEAR_BATCH = 1000
# Expired entries a store (or a listing) gives back per script, at most: the cost of a store stays bounded.
PURGE_BATCH = 64
# Whatever Redis answers that is not an answer: unreachable (connection, timeout) or refusing (out of memory).
FAILURES = (RedisError, OSError)

_COMMON = """
-- Redis before 7 replicates a script that read TIME only by its effects when asked (7 always does).
if redis.replicate_commands then
  redis.replicate_commands()
end

local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

-- KEYS[1..4] of every script but LOOKUP: lru, exp, sz, bytes; the entry keys are `base` .. digest.
local function forget(base, digest)
  local size = tonumber(redis.call('HGET', KEYS[3], digest))
  redis.call('HDEL', KEYS[3], digest)
  redis.call('ZREM', KEYS[1], digest)
  redis.call('ZREM', KEYS[2], digest)
  if size then
    redis.call('DECRBY', KEYS[4], size)
  end
  return redis.call('DEL', base .. digest)
end

local function purge(base, now, limit)
  for _, digest in ipairs(redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now, 'LIMIT', 0, limit)) do
    forget(base, digest)
  end
end
"""

# KEYS: the entry, lru. ARGV: digest. Returns the answer or nil; a hit becomes the most recently used.
LOOKUP = """
-- Redis before 7 replicates a script that read TIME only by its effects when asked (7 always does).
if redis.replicate_commands then
  redis.replicate_commands()
end
local value = redis.call('GET', KEYS[1])
if value then
  local t = redis.call('TIME')
  -- Last use in microseconds: in milliseconds, entries used in the same one tied and were evicted in digest order.
  redis.call('ZADD', KEYS[2], 'XX', tonumber(t[1]) * 1000000 + tonumber(t[2]), ARGV[1])
end
return value
"""

# KEYS: lru, exp, sz, bytes, the entry. ARGV: entry base, digest, answer, ttl ms, size, budget, purge limit.
# Returns how many entries were evicted to make room, or -1 when the entry alone is over the budget.
STORE = (
    _COMMON
    + """
local base, digest, ttl, size, budget = ARGV[1], ARGV[2], tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
local t = redis.call('TIME')
local now, used = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000), tonumber(t[1]) * 1000000 + tonumber(t[2])
purge(base, now, tonumber(ARGV[7]))
if size > budget then
  return -1
end
forget(base, digest)  -- a store of an answer already held (two planes missed at once) replaces it
redis.call('SET', KEYS[5], ARGV[3], 'PX', ttl)
redis.call('ZADD', KEYS[1], used, digest)
redis.call('ZADD', KEYS[2], now + ttl, digest)
redis.call('HSET', KEYS[3], digest, size)
local total = redis.call('INCRBY', KEYS[4], size)
local evicted = 0
while total > budget do
  local two = redis.call('ZRANGE', KEYS[1], 0, 1)
  local oldest = two[1]
  if oldest == digest then
    oldest = two[2]
  end
  if not oldest then
    -- Only the new entry is left and the count says more: it drifted (keys deleted by hand). Start again.
    redis.call('SET', KEYS[4], size)
    break
  end
  forget(base, oldest)
  evicted = evicted + 1
  total = tonumber(redis.call('GET', KEYS[4]))
end
for i = 1, 4 do
  if redis.call('PTTL', KEYS[i]) < ttl then
    redis.call('PEXPIRE', KEYS[i], ttl)
  end
end
return evicted
"""
)

# KEYS: lru, exp, sz, bytes. ARGV: entry base, purge limit. Returns {entries, bytes}, the expired given back first.
HELD = (
    _COMMON
    + """
purge(ARGV[1], now_ms(), tonumber(ARGV[2]))
return {redis.call('ZCARD', KEYS[1]), tonumber(redis.call('GET', KEYS[4])) or 0}
"""
)

# KEYS: lru, exp, sz, bytes. ARGV: entry base, batch. Returns {answers deleted, entries forgotten}: fewer
# forgotten than the batch means the org holds nothing more.
CLEAR = (
    _COMMON
    + """
local removed, members = 0, redis.call('ZRANGE', KEYS[1], 0, tonumber(ARGV[2]) - 1)
for _, digest in ipairs(members) do
  removed = removed + forget(ARGV[1], digest)
end
if redis.call('ZCARD', KEYS[1]) == 0 then
  redis.call('DEL', KEYS[4])
end
return {removed, #members}
"""
)


class RedisCache:
    """server.policy.cache.AnswerCache with its entries in Redis. Parameters: `redis` (a client whose pool this cache
    shares and does not close: the limiter's), `prefix` (`redis_prefix`), `max_bytes` (each org's budget; 0
    turns the cache off, as it does the in-process one)."""

    def __init__(self, redis: aioredis.Redis, *, prefix: str, max_bytes: int) -> None:
        self.redis = redis
        self.prefix = prefix
        self.max_bytes = max_bytes
        self.lookup_script = Script(LOOKUP)
        self.store_script = Script(STORE)
        self.held_script = Script(HELD)
        self.clear_script = Script(CLEAR)
        self.hits = 0
        self.misses = 0
        self.stores = 0
        self.evictions = 0
        # Lookups and stores that went without Redis (away, or it failed to answer).
        self.unanswered = 0
        self.away = False
        self._recovery: asyncio.Task[None] | None = None
        self._logged_at = float("-inf")

    def __repr__(self) -> str:
        return (
            f"RedisCache(prefix={self.prefix!r}, away={self.away}, hits={self.hits}, misses={self.misses}, "
            f"stores={self.stores}, evictions={self.evictions}, unanswered={self.unanswered})"
        )

    # -- keys -------------------------------------------------------------------------------------------

    def org_keys(self, org_id: str) -> tuple[list[str], str]:
        """An org's bookkeeping keys (lru, exp, sz, bytes) and the prefix of its entries' keys."""
        base = f"{self.prefix}c:{{{org_id}}}:"
        return [f"{base}lru", f"{base}exp", f"{base}sz", f"{base}bytes"], f"{base}v:"

    # -- the request path -------------------------------------------------------------------------------

    async def fetch(
        self, org_id: str, endpoint: str, body: dict[str, Any], policy: CachePolicy, directives: Directives
    ) -> Lookup:
        entry = entry_for(org_id, endpoint, body, policy, directives) if self.max_bytes > 0 else None
        if entry is None:
            return BYPASSED
        key, ttl = entry
        if self.away:
            return self._miss_without_redis(None)
        keys, base = self.org_keys(org_id)
        digest = key.rpartition(":")[2]
        try:
            value = await self.lookup_script(self.redis, [base + digest, keys[0]], [digest])
        except FAILURES as exc:
            return self._miss_without_redis(exc)
        if value is not None:
            self.hits += 1
            return Lookup(HIT, key, value, ttl)
        self.misses += 1
        return Lookup(MISS, key, None, ttl)

    async def store(self, key: str, value: bytes, ttl_s: int) -> None:
        size = entry_size(key, value)
        if ttl_s <= 0 or size > self.max_bytes:
            return  # no round trip for what would not be kept
        if self.away:
            self._without_redis(None)
            return
        org_id, _, digest = key.rpartition(":")
        keys, base = self.org_keys(org_id)
        # Any: the answer goes as bytes, which Script's arguments (typed for the limiter's) do not name.
        args: list[Any] = [base, digest, value, ttl_s * 1000, size, self.max_bytes, PURGE_BATCH]
        try:
            evicted = int(await self.store_script(self.redis, [*keys, base + digest], args))
        except FAILURES as exc:
            self._without_redis(exc)
            return
        if evicted >= 0:
            self.stores += 1
            self.evictions += evicted

    # -- admin ------------------------------------------------------------------------------------------

    async def remove(self, org_id: str | None = None) -> int:
        try:
            if org_id is not None:
                return await self._clear(org_id)
            removed = 0
            for org in await self._orgs():
                removed += await self._clear(org)
            return removed
        except FAILURES as exc:
            raise ServiceUnavailableError(
                f"The shared response cache (Redis) cannot be cleared right now: {type(exc).__name__}. Retry shortly."
            ) from exc

    async def _clear(self, org_id: str) -> int:
        keys, base = self.org_keys(org_id)
        removed = 0
        while True:
            deleted, forgotten = await self.clear_script(self.redis, keys, [base, CLEAR_BATCH])
            removed += int(deleted)
            if int(forgotten) < CLEAR_BATCH:
                return removed

    async def _orgs(self) -> list[str]:
        """Every org holding entries under this prefix (an admin's clear of all of them: SCAN, never KEYS)."""
        head = f"{self.prefix}c:{{"
        pattern = f"{_glob_escape(head)}*}}:lru"
        orgs = []
        async for name in self.redis.scan_iter(match=pattern, count=1000):
            text = name.decode() if isinstance(name, bytes) else str(name)
            orgs.append(text[len(head) : -len("}:lru")])
        return orgs

    async def held(self, org_ids: Iterable[str]) -> dict[str, tuple[int, int] | None]:
        wanted = list(dict.fromkeys(org_ids))
        if not wanted:
            return {}
        try:
            await self.held_script.load(self.redis)  # a pipeline cannot reload a script Redis forgot
            async with self.redis.pipeline(transaction=False) as pipe:
                for org_id in wanted:
                    keys, base = self.org_keys(org_id)
                    pipe.evalsha(self.held_script.sha, len(keys), *keys, base, PURGE_BATCH * 16)
                replies = await pipe.execute()
        except FAILURES:
            return dict.fromkeys(wanted)
        return {org_id: (int(entries), int(size)) for org_id, (entries, size) in zip(wanted, replies, strict=True)}

    async def start(self) -> None:
        """Load the scripts, as the limiter does at start: the first lookup is then one round trip, not a miss
        (NOSCRIPT), a load and the call again. A Redis that does not answer now fails no start: lookups are
        misses until a ping answers, as after any failure."""
        try:
            for script in (self.lookup_script, self.store_script, self.held_script, self.clear_script):
                await script.load(self.redis)
        except FAILURES as exc:
            self._without_redis(exc)

    async def close(self) -> None:
        if self._recovery is not None:
            self._recovery.cancel()
            await asyncio.gather(self._recovery, return_exceptions=True)
        log.info("shared response cache closed: %r", self)

    # -- without Redis ----------------------------------------------------------------------------------

    def _miss_without_redis(self, exc: BaseException | None) -> Lookup:
        """A miss with no key: the answer will not be stored either."""
        self.misses += 1
        self._without_redis(exc)
        return Lookup(MISS)

    def _without_redis(self, exc: BaseException | None) -> None:
        self.unanswered += 1
        if isinstance(exc, UNREACHABLE) and not self.away:
            # Away until a ping answers: no request waits on a Redis that is not there.
            self.away = True
            self._recovery = asyncio.get_running_loop().create_task(self._recover())
        now = time.monotonic()
        if now - self._logged_at >= LOG_EVERY_S:
            self._logged_at = now
            why = f"{type(exc).__name__}: {exc}" if exc is not None else "unreachable"
            log.warning(
                "shared response cache: Redis failed (%s): lookups are misses and nothing is stored until it "
                "answers; %d lookups and stores without it so far",
                why,
                self.unanswered,
            )

    async def _recover(self) -> None:
        while True:
            await asyncio.sleep(RETRY_S)
            try:
                await self.redis.ping()
            except FAILURES:
                continue
            self.away = False
            self._logged_at = float("-inf")  # a failure after this is news again
            log.warning(
                "shared response cache: Redis reachable again (%d lookups and stores went without it)",
                self.unanswered,
            )
            return


def _glob_escape(text: str) -> str:
    """`text` matched literally in a SCAN pattern."""
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)
