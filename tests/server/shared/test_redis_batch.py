"""Auto-pipelining of Redis script calls (server.shared.batch): the calls of one event-loop turn share one round
trip, and each still gets its own reply or its own error, a forgotten script is loaded again, and a Redis that
cannot be reached fails the whole batch, after which the limiter's `redis_failure` fallback takes over.

Round trips are counted on the wire: the client's connections are a subclass that counts the writes it sends.
Needs this machine's Redis (6379); the restart tests start a private redis-server on a spare port."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError

from server.errors import ServiceUnavailableError
from server.policy.cache import CachePolicy, Directives
from server.policy.limits import Estimate, Limits
from server.shared.batch import batcher_for
from server.shared.redis_cache import RedisCache
from server.shared.redis_limits import Script, SharedLimiter
from tests.conftest import REDIS, PrivateRedis

# Echoes its key and argument; fails for the argument 'fail' (a script's error, as a bug would raise).
ECHO = Script("""
if ARGV[1] == 'fail' then
  return redis.error_reply('asked to fail')
end
return {KEYS[1], ARGV[1]}
""")


class CountingConnection(aioredis.Connection):
    """A connection that counts what it writes to Redis: one write is one round trip."""

    writes = 0

    async def send_packed_command(self, command: Any, check_health: bool = True) -> None:
        CountingConnection.writes += 1
        await super().send_packed_command(command, check_health)


@asynccontextmanager
async def counted_client(url: str = REDIS) -> AsyncIterator[aioredis.Redis]:
    """A client whose round trips are counted from here on (its first connection already made)."""
    pool = aioredis.ConnectionPool.from_url(url, connection_class=CountingConnection)
    client = aioredis.Redis(connection_pool=pool)
    await ECHO.load(client)
    CountingConnection.writes = 0
    try:
        yield client
    finally:
        await client.aclose(close_connection_pool=True)


async def nothing_used() -> dict[tuple[str, str], tuple[float, float]]:
    return {}


def limiter_on(url: str, prefix: str, failure: str) -> SharedLimiter:
    limiter = SharedLimiter(url, prefix=prefix, failure=failure, lease_s=60.0, usage_so_far=nothing_used)
    limiter.seed({})
    return limiter


async def test_concurrent_calls_share_one_round_trip_and_each_gets_its_own_reply(prefix: str) -> None:
    async with counted_client() as client:
        replies = await asyncio.gather(*(ECHO(client, [f"{prefix}k{i}"], [str(i)]) for i in range(50)))
        assert replies == [[f"{prefix}k{i}".encode(), str(i).encode()] for i in range(50)]
        assert CountingConnection.writes == 1
        assert batcher_for(client).round_trips == 1


async def test_a_lone_call_is_sent_alone_without_waiting_for_company(prefix: str) -> None:
    async with counted_client() as client:
        assert await ECHO(client, [f"{prefix}k"], ["1"]) == [f"{prefix}k".encode(), b"1"]
        assert CountingConnection.writes == 1


async def test_a_batch_holds_at_most_max_batch_calls(prefix: str) -> None:
    async with counted_client() as client:
        batcher = batcher_for(client)
        batcher.max_batch = 8
        replies = await asyncio.gather(*(ECHO(client, [f"{prefix}k"], [str(i)]) for i in range(20)))
        assert [reply[1] for reply in replies] == [str(i).encode() for i in range(20)]
        assert batcher.round_trips == 3  # 8 + 8 + 4, on connections of their own (so not counted by writes)


async def test_a_script_error_fails_only_its_own_call(prefix: str) -> None:
    async with counted_client() as client:
        args = ["a", "fail", "b", "fail", "c"]
        replies = await asyncio.gather(*(ECHO(client, [f"{prefix}k"], [a]) for a in args), return_exceptions=True)
        assert [reply[1] for reply in replies if not isinstance(reply, BaseException)] == [b"a", b"b", b"c"]
        errors = [reply for reply in replies if isinstance(reply, BaseException)]
        assert len(errors) == 2
        assert all(isinstance(e, ResponseError) and "asked to fail" in str(e) for e in errors)
        assert isinstance(replies[1], ResponseError) and isinstance(replies[3], ResponseError)
        assert CountingConnection.writes == 1


async def test_a_cancelled_caller_leaves_the_rest_of_its_batch_answered(prefix: str) -> None:
    async with counted_client() as client:
        calls = [asyncio.ensure_future(ECHO(client, [f"{prefix}k"], [str(i)])) for i in range(5)]
        await asyncio.sleep(0)  # queued, the batch not yet answered
        calls[2].cancel()
        replies = await asyncio.gather(*calls, return_exceptions=True)
        assert isinstance(replies[2], asyncio.CancelledError)
        assert [replies[i][1] for i in (0, 1, 3, 4)] == [b"0", b"1", b"3", b"4"]


async def test_a_forgotten_script_is_loaded_again_once_and_its_calls_sent_again(private_redis: PrivateRedis) -> None:
    async with counted_client(private_redis.url) as client:
        await client.script_flush()  # as a restarted Redis: it holds no script
        await client.config_resetstat()
        CountingConnection.writes = 0
        replies = await asyncio.gather(*(ECHO(client, ["k"], [str(i)]) for i in range(10)))
        assert [reply[1] for reply in replies] == [str(i).encode() for i in range(10)]
        assert CountingConnection.writes == 3  # the batch, the load, the batch again
        stats = await client.info("commandstats")
        assert stats["cmdstat_script|load"]["calls"] == 1
        assert stats["cmdstat_evalsha"]["calls"] == 20  # each missed, then answered


async def test_a_lone_call_to_a_forgotten_script_loads_it_again(private_redis: PrivateRedis) -> None:
    async with counted_client(private_redis.url) as client:
        await client.script_flush()
        assert await ECHO(client, ["k"], ["1"]) == [b"k", b"1"]
        assert (await client.info("commandstats"))["cmdstat_script|load"]["calls"] == 2  # counted_client's, this


async def test_a_forgotten_script_is_resent_alongside_calls_that_were_answered(private_redis: PrivateRedis) -> None:
    other = Script("return 'other'")
    async with counted_client(private_redis.url) as client:
        await other.load(client)
        await client.script_flush()
        await other.load(client)  # held again; ECHO is not
        replies = await asyncio.gather(other(client, [], []), ECHO(client, ["k"], ["1"]), other(client, [], []))
        assert replies == [b"other", [b"k", b"1"], b"other"]


async def test_an_unreachable_redis_fails_every_call_of_the_batch(private_redis: PrivateRedis) -> None:
    async with counted_client(private_redis.url) as client:
        private_redis.stop()
        replies = await asyncio.gather(*(ECHO(client, ["k"], [str(i)]) for i in range(5)), return_exceptions=True)
        assert all(isinstance(reply, RedisConnectionError) for reply in replies), replies
        assert batcher_for(client).round_trips == 1


async def test_open_limiter_falls_back_for_every_admission_of_a_failed_batch(private_redis: PrivateRedis) -> None:
    limiter = limiter_on(private_redis.url, "batch:", "open")
    await limiter.start()
    scopes = [("org:o1", Limits(rpm=100))]
    assert (await limiter.acquire(scopes, Estimate(10))).lease is not None  # shared while Redis answers
    private_redis.stop()
    admissions = await asyncio.gather(*(limiter.acquire(scopes, Estimate(10)) for _ in range(5)))
    assert all(admission.lease is None for admission in admissions)  # the plane's own limiter admitted them
    assert limiter.away
    assert limiter.unreachable_decisions == 5
    await limiter.close()


async def test_closed_limiter_refuses_every_admission_of_a_failed_batch(private_redis: PrivateRedis) -> None:
    limiter = limiter_on(private_redis.url, "batch:", "closed")
    await limiter.start()
    private_redis.stop()
    scopes = [("org:o1", Limits(rpm=100))]
    refusals = await asyncio.gather(*(limiter.acquire(scopes, Estimate(10)) for _ in range(5)), return_exceptions=True)
    assert all(isinstance(refusal, ServiceUnavailableError) for refusal in refusals), refusals
    await limiter.close()


async def test_the_limiter_and_the_cache_share_round_trips(prefix: str) -> None:
    limiter = limiter_on(REDIS, prefix, "closed")
    await limiter.start()
    cache = RedisCache(limiter.redis, prefix=prefix, max_bytes=10_000)
    await cache.start()  # as the plane does: the scripts loaded, whatever this Redis held before
    batcher = batcher_for(limiter.redis)
    before = batcher.round_trips
    scopes = [("org:o1", Limits(rpm=100))]
    body, policy = {"model": "m", "prompt": "hello"}, CachePolicy("all", 60)
    admission, lookup = await asyncio.gather(
        limiter.acquire(scopes, Estimate(10)),
        cache.fetch("o1", "completions", body, policy, Directives()),
    )
    assert admission.lease is not None
    assert lookup.value is None and lookup.key is not None  # a miss, with the key to store under
    assert batcher.round_trips == before + 1
    admission.settle(0, 0.0)
    await cache.close()
    await limiter.close()


async def test_a_started_cache_looks_up_in_one_round_trip_on_a_redis_that_held_no_script(
    private_redis: PrivateRedis,
) -> None:
    limiter = limiter_on(private_redis.url, "batch:", "closed")
    await limiter.start()
    cache = RedisCache(limiter.redis, prefix="batch:", max_bytes=10_000)
    await cache.start()
    batcher = batcher_for(limiter.redis)
    before = batcher.round_trips
    lookup = await cache.fetch(
        "o1", "completions", {"model": "m", "prompt": "hi"}, CachePolicy("all", 60), Directives()
    )
    assert lookup.value is None and lookup.key is not None
    # Not a NOSCRIPT miss, a load and the call again: the start loaded the script.
    assert batcher.round_trips == before + 1
    await cache.close()
    await limiter.close()


async def test_a_cache_started_without_redis_starts_and_misses(private_redis: PrivateRedis) -> None:
    limiter = limiter_on(private_redis.url, "batch:", "open")
    private_redis.stop()
    await limiter.start()
    cache = RedisCache(limiter.redis, prefix="batch:", max_bytes=10_000)
    await cache.start()
    assert cache.away
    lookup = await cache.fetch(
        "o1", "completions", {"model": "m", "prompt": "hi"}, CachePolicy("all", 60), Directives()
    )
    assert lookup.value is None and lookup.key is None  # a miss, and nothing will be stored
    await cache.close()
    await limiter.close()
