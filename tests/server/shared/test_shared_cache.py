"""The response cache shared by several planes through Redis (server.shared.redis_cache): an answer cached through
one plane is a hit on another, per org and within each org's byte budget, expiring with its TTL; and a Redis
that goes away costs misses, never a failed request, with /readyz saying so until it is back.

Needs this machine's PostgreSQL (5432) and Redis (6379), each test on its own database and key prefix; the
restart test starts a private redis-server of its own on a spare port. A missing service fails the test."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest
import redis
import redis.asyncio as aioredis

from server.policy.cache import CachePolicy, Directives, entry_size, request_key
from server.shared.redis_cache import RedisCache
from tests.conftest import REDIS, Planes, PrivateRedis, RunningPlane, eventually
from tests.server.policy.test_cache import DETERMINISTIC, generations, sse_payloads
from tests.support.mock_upstream import MockUpstream


def set_up(plane: RunningPlane, upstream: MockUpstream, org: str = "acme") -> str:
    """`org` with provider mock-a; the API key."""
    plane.create_org(org)
    plane.add_provider("mock-a", upstream, org=org)
    return plane.create_key(org)


def ask(plane: RunningPlane, key: str, body: dict[str, Any] | None = None, **headers: str) -> httpx.Response:
    response = httpx.post(
        f"{plane.v1}/chat/completions",
        json=body or DETERMINISTIC,
        headers={"Authorization": f"Bearer {key}", **headers},
        timeout=30,
    )
    assert response.status_code == 200, response.text
    return response


def cache_status(plane: RunningPlane, key: str, body: dict[str, Any] | None = None, **headers: str) -> str:
    return ask(plane, key, body, **headers).headers["x-hatchway-cache"]


def entries(plane: RunningPlane, org: str = "acme") -> int | None:
    return plane.admin.get("/cache", org=org)["data"][0]["entries"]  # type: ignore[no-any-return]


def shared(planes: Planes, prefix: str, count: int = 1, url: str = REDIS) -> list[RunningPlane]:
    return [planes.start(redis_url=url, redis_prefix=prefix) for _ in range(count)]


# -- across planes ------------------------------------------------------------------------------------------


def test_an_answer_cached_through_plane_a_is_a_hit_on_plane_b(
    planes: Planes, prefix: str, upstream: MockUpstream
) -> None:
    a, b = shared(planes, prefix, 2)
    key = set_up(a, upstream)
    first = ask(a, key)
    second = ask(b, key)
    assert (first.headers["x-hatchway-cache"], second.headers["x-hatchway-cache"]) == ("miss", "hit")
    assert second.json() == first.json()
    assert generations(upstream) == 1


def test_a_stream_cached_through_plane_a_is_replayed_as_a_stream_by_plane_b(
    planes: Planes, prefix: str, upstream: MockUpstream
) -> None:
    a, b = shared(planes, prefix, 2)
    key = set_up(a, upstream)
    body = {**DETERMINISTIC, "stream": True}
    assert cache_status(a, key, body) == "miss"
    # A stream is stored once its last chunk went out: by the time the client could ask again, or just after.
    eventually(lambda: entries(b) == 1)
    replayed = ask(b, key, body)
    assert replayed.headers["x-hatchway-cache"] == "hit"
    assert replayed.headers["content-type"].startswith("text/event-stream")
    payloads = sse_payloads(replayed)
    assert payloads[-1] == "[DONE]"
    chunks = [json.loads(p) for p in payloads[:-1]]
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks) == upstream.reply
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    assert generations(upstream) == 1


def test_an_org_never_reads_another_orgs_entries(
    planes: Planes, prefix: str, upstream: MockUpstream, make_upstream: Callable[..., MockUpstream]
) -> None:
    a, b = shared(planes, prefix, 2)
    acme = set_up(a, upstream)
    other = make_upstream("mock-b", reply="Beta's own answer")
    beta = set_up(a, other, org="beta")
    ask(a, acme)
    from_beta = ask(b, beta)
    assert from_beta.headers["x-hatchway-cache"] == "miss"
    assert from_beta.json()["choices"][0]["message"]["content"] == "Beta's own answer"
    assert (generations(upstream), generations(other)) == (1, 1)
    # Each org's entries under its own keys.
    org_ids = {row["org"]: row["org_id"] for row in a.admin.get("/cache")["data"]}
    client = redis.Redis.from_url(REDIS)
    try:
        for org_id in org_ids.values():
            assert len(list(client.scan_iter(match=f"{prefix}c:{{{org_id}}}:v:*"))) == 1
    finally:
        client.close()


def test_an_entry_expires_after_its_ttl(planes: Planes, prefix: str, upstream: MockUpstream) -> None:
    (a,) = shared(planes, prefix)
    key = set_up(a, upstream)
    assert cache_status(a, key, **{"X-Hatchway-Cache": "ttl=2"}) == "miss"
    assert cache_status(a, key) == "hit"
    client = redis.Redis.from_url(REDIS)
    try:
        (entry,) = client.scan_iter(match=f"{prefix}c:*:v:*")
        assert 0 < client.pttl(entry) <= 2000  # Redis expires it: every plane sees it go at once
    finally:
        client.close()
    eventually(lambda: cache_status(a, key, **{"X-Hatchway-Cache": "no-store"}) == "miss")


def test_clearing_through_one_plane_clears_the_cache_of_every_plane(
    planes: Planes, prefix: str, upstream: MockUpstream
) -> None:
    a, b = shared(planes, prefix, 2)
    key = set_up(a, upstream)
    ask(a, key)
    shown = b.admin.get("/cache", org="acme")["data"][0]
    assert shown["entries"] == 1 and shown["bytes"] > 0
    assert b.admin.delete("/cache", org="acme")["removed"] == 1
    assert cache_status(a, key) == "miss"
    ask(b, key, {**DETERMINISTIC, "max_tokens": 7})
    assert a.admin.delete("/cache")["removed"] == 2  # without an org: every org's entries


# -- the budget -----------------------------------------------------------------------------------------------


@asynccontextmanager
async def redis_cache(prefix: str, max_bytes: int) -> AsyncIterator[RedisCache]:
    client = aioredis.Redis.from_url(REDIS)
    cache = RedisCache(client, prefix=prefix, max_bytes=max_bytes)
    try:
        yield cache
    finally:
        await cache.close()
        await client.aclose()


POLICY, ASK = CachePolicy("all", 60), Directives()
QUESTIONS = [{"model": "m", "prompt": f"question {i}"} for i in range(4)]


def keys_of(org: str = "org") -> list[str]:
    return [request_key(org, "completions", body) for body in QUESTIONS]


async def hits(cache: RedisCache, org: str = "org") -> list[bool]:
    return [(await cache.fetch(org, "completions", body, POLICY, ASK)).value is not None for body in QUESTIONS]


def test_the_byte_budget_evicts_the_least_recently_used_entry(prefix: str) -> None:
    answer = b"x" * 1000

    async def scenario() -> None:
        keys = keys_of()
        budget = 3 * entry_size(keys[0], answer) + 100  # room for three
        async with redis_cache(prefix, budget) as cache:
            for key in keys[:3]:
                await cache.store(key, answer, 60)
            assert (await cache.fetch("org", "completions", QUESTIONS[0], POLICY, ASK)).value == answer  # now 0 is
            await cache.store(keys[3], answer, 60)  # the most recently used: 1 is the least
            assert await hits(cache) == [True, False, True, True]
            assert cache.evictions == 1
            assert (await cache.held(["org"]))["org"] == (3, 3 * entry_size(keys[0], answer))

    asyncio.run(scenario())


def test_one_orgs_answers_never_evict_another_orgs(prefix: str) -> None:
    answer = b"x" * 1000

    async def scenario() -> None:
        async with redis_cache(prefix, 2 * entry_size(keys_of("quiet")[0], answer) + 100) as cache:  # room for two
            await cache.store(keys_of("quiet")[0], answer, 60)
            for key in keys_of("busy"):
                await cache.store(key, answer, 60)
            assert await hits(cache, "quiet") == [True, False, False, False]
            assert await hits(cache, "busy") == [False, False, True, True]

    asyncio.run(scenario())


def test_an_entry_larger_than_the_budget_is_not_stored(prefix: str) -> None:
    async def scenario() -> None:
        async with redis_cache(prefix, 500) as cache:
            await cache.store(keys_of()[0], b"x" * 1000, 60)
            assert await hits(cache) == [False] * 4
            assert cache.stores == 0

    asyncio.run(scenario())
    client = redis.Redis.from_url(REDIS)
    try:
        assert list(client.scan_iter(match=f"{prefix}*")) == []
    finally:
        client.close()


# -- Redis away -----------------------------------------------------------------------------------------------


def test_with_redis_stopped_requests_are_answered_as_misses_and_readyz_fails_until_it_is_back(
    planes: Planes, private_redis: PrivateRedis, upstream: MockUpstream, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="server.shared.redis_cache")
    (a,) = shared(planes, "restart:", url=private_redis.url)
    key = set_up(a, upstream)
    assert [cache_status(a, key) for _ in range(2)] == ["miss", "hit"]
    assert httpx.get(f"{a.url}/readyz").status_code == 200

    private_redis.stop()
    assert [cache_status(a, key) for _ in range(3)] == ["miss"] * 3  # answered upstream, nothing stored
    assert generations(upstream) == 4
    eventually(lambda: httpx.get(f"{a.url}/readyz").status_code == 503, timeout_s=5)
    assert httpx.get(f"{a.url}/readyz").json()["error"]["message"].startswith("redis unreachable")
    cache = a.server.plane.cache
    assert isinstance(cache, RedisCache) and cache.unanswered >= 3
    assert sum("Redis failed" in r.getMessage() for r in caplog.records) == 1  # once, not once a request

    private_redis.start()  # empty: it kept nothing
    eventually(lambda: httpx.get(f"{a.url}/readyz").status_code == 200, timeout_s=5)
    eventually(lambda: cache_status(a, key) == "hit", timeout_s=5)
    assert sum("Redis reachable again" in r.getMessage() for r in caplog.records) == 1


def test_readyz_asks_redis_at_most_once_a_second_however_often_it_is_probed(planes: Planes, prefix: str) -> None:
    (a,) = shared(planes, prefix)
    probe = a.server.plane.redis_probe
    assert probe is not None
    before = probe.checks
    start = time.monotonic()
    with httpx.Client() as client:
        for _ in range(50):
            assert client.get(f"{a.url}/readyz").status_code == 200
    assert probe.checks - before <= time.monotonic() - start + 1
