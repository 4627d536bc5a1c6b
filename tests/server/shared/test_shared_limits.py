"""Limits shared by several planes through Redis (server.shared): exact with requests spread over planes that
share one PostgreSQL database and one Redis key prefix, the same 429s and headers as one plane, quotas seeded
once from the usage table, and the two answers to a Redis that cannot be reached (open, closed), a Redis
stopped and started again included.

Needs this machine's PostgreSQL (5432) and Redis (6379); the restart test starts a private redis-server of its
own on a spare port. A missing service fails the test and says which."""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import pytest

from server.config import Config
from server.errors import RateLimitError
from server.policy.limits import Estimate, Limits, estimate_tokens
from server.shared.redis_limits import SharedLimiter
from tests.conftest import MODEL, REDIS, Planes, PrivateRedis, RunningPlane, eventually, free_port, usage_report
from tests.support.mock_upstream import MockUpstream
from tests.support.plane_process import PlaneProcess

MESSAGES = [{"role": "user", "content": "Say hello"}]


def set_up(plane: RunningPlane, upstream: MockUpstream, **limits: Any) -> str:
    """Org acme, provider mock-a, `limits` on the org; the API key."""
    plane.create_org("acme")
    plane.add_provider("mock-a", upstream, price_in=1.0, price_out=2.0)
    if limits:
        plane.admin.put("/limits", {"org": "acme", **limits})
    return plane.create_key("acme")


async def spread(planes: list[RunningPlane], key: str, count: int, **request: Any) -> list[httpx.Response]:
    """`count` chat requests at once, request i to plane i mod len(planes)."""
    body = {"model": MODEL, "messages": MESSAGES, **request}
    headers = {"Authorization": f"Bearer {key}"}
    limits = httpx.Limits(max_connections=count)
    async with httpx.AsyncClient(timeout=30, limits=limits) as client:
        return await asyncio.gather(
            *(
                client.post(f"{planes[i % len(planes)].v1}/chat/completions", json=body, headers=headers)
                for i in range(count)
            )
        )


def codes(responses: list[httpx.Response]) -> Counter[int]:
    return Counter(r.status_code for r in responses)


def chat(plane: RunningPlane, key: str, **request: Any) -> httpx.Response:
    body = {"model": MODEL, "messages": MESSAGES, **request}
    return httpx.post(f"{plane.v1}/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"})


def limiter_of(plane: RunningPlane) -> SharedLimiter:
    limiter = plane.server.plane.limiter
    assert isinstance(limiter, SharedLimiter)
    return limiter


def live_usage(plane: RunningPlane) -> dict[str, Any]:
    return plane.admin.get("/limits", org="acme")["data"][0]["usage"]  # type: ignore[no-any-return]


def tokens_billed(plane: RunningPlane, requests: int) -> int:
    rows = usage_report(plane, requests)
    return sum(int(r["prompt_tokens"]) + int(r["completion_tokens"]) for r in rows)


# -- exact across planes --------------------------------------------------------------------------------


def test_ten_rpm_admits_exactly_ten_of_forty_concurrent_requests_spread_over_three_planes(
    planes: Planes, prefix: str, upstream: MockUpstream
) -> None:
    a = planes.start(redis_url=REDIS, redis_prefix=prefix)
    key = set_up(a, upstream, rpm=10)
    # B and C start after the limits exist: their first snapshot has them.
    b, c = planes.start(redis_url=REDIS, redis_prefix=prefix), planes.start(redis_url=REDIS, redis_prefix=prefix)
    responses = asyncio.run(spread([a, b, c], key, 40))
    assert codes(responses) == {200: 10, 429: 30}
    served_by = Counter(str(r.url).split("/v1")[0] for r in responses if r.status_code == 200)
    refused_by = Counter(str(r.url).split("/v1")[0] for r in responses if r.status_code == 429)
    # A plane refused while it had admitted fewer than ten itself: it counted the other planes' admissions.
    assert any(served_by[p.url] < 10 and refused_by[p.url] > 0 for p in (a, b, c))
    refused = next(r for r in responses if r.status_code == 429)
    assert refused.json()["error"]["type"] == "rate_limit_error"
    assert refused.headers["x-ratelimit-limit-requests"] == "10"
    assert refused.headers["x-ratelimit-remaining-requests"] == "0"
    assert int(refused.headers["Retry-After"]) >= 1
    remaining = sorted(int(r.headers["x-ratelimit-remaining-requests"]) for r in responses if r.status_code == 200)
    assert remaining == list(range(10))  # each admission saw every other plane's


def test_without_redis_three_planes_admit_ten_rpm_each(planes: Planes, upstream: MockUpstream) -> None:
    """The control: what shared limits are for."""
    a = planes.start()
    key = set_up(a, upstream, rpm=10)
    b, c = planes.start(), planes.start()
    assert codes(asyncio.run(spread([a, b, c], key, 40))) == {200: 30, 429: 10}


def test_concurrency_limit_holds_across_two_planes_and_frees_its_slots(
    planes: Planes, prefix: str, upstream: MockUpstream
) -> None:
    a = planes.start(redis_url=REDIS, redis_prefix=prefix)
    key = set_up(a, upstream, concurrency=4)
    b = planes.start(redis_url=REDIS, redis_prefix=prefix)
    upstream.delay_s = 1.0  # every admitted request is still in flight when the last one arrives
    assert codes(asyncio.run(spread([a, b], key, 20))) == {200: 4, 429: 16}
    upstream.delay_s = 0.0
    eventually(lambda: live_usage(a)["in_flight"] == 0)
    assert codes(asyncio.run(spread([a, b], key, 4))) == {200: 4}


def test_tokens_per_day_quota_is_not_overshot_by_concurrent_requests_on_two_planes(
    planes: Planes, prefix: str, upstream: MockUpstream
) -> None:
    a = planes.start(redis_url=REDIS, redis_prefix=prefix)
    prompt, completion = estimate_tokens("chat/completions", {"messages": MESSAGES, "max_tokens": 50}, 1024)
    reservation = prompt + completion
    quota = 5 * reservation + reservation // 2  # room for five reservations, not six
    key = set_up(a, upstream, tokens_per_day=quota)
    b = planes.start(redis_url=REDIS, redis_prefix=prefix)
    upstream.delay_s = 1.0  # none settles before every request was decided
    responses = asyncio.run(spread([a, b], key, 30, max_tokens=50))
    assert codes(responses) == {200: 5, 429: 25}
    refused = next(r for r in responses if r.status_code == 429)
    assert refused.json()["error"]["code"] == "insufficient_quota"
    assert refused.headers["x-should-retry"] == "false"
    billed = tokens_billed(a, 30)  # refused requests have rows too, with no tokens
    assert billed <= quota
    # Settled with the real use, on both planes: the quota's counter is what was billed.
    eventually(lambda: live_usage(b)["tokens_per_day_used"] == billed)


def test_planes_starting_together_seed_a_quota_once_from_the_usage_table(
    planes: Planes, prefix: str, upstream: MockUpstream
) -> None:
    a = planes.start()  # no Redis: the use so far is only in the usage table
    key = set_up(a, upstream, tokens_per_day=1_000_000)
    for _ in range(3):
        assert chat(a, key).status_code == 200
    billed = tokens_billed(a, 3)
    assert billed > 0
    b, c = planes.start(redis_url=REDIS, redis_prefix=prefix), planes.start(redis_url=REDIS, redis_prefix=prefix)
    assert live_usage(b)["tokens_per_day_used"] == billed
    assert live_usage(c)["tokens_per_day_used"] == billed


# -- Redis unreachable ----------------------------------------------------------------------------------


def test_closed_refuses_limited_requests_with_503_while_redis_is_unreachable(
    planes: Planes, upstream: MockUpstream
) -> None:
    nowhere = f"redis://127.0.0.1:{free_port()}/0"
    a = planes.start(redis_url=nowhere, redis_failure="closed")  # starts anyway
    key = set_up(a, upstream, rpm=100)
    response = chat(a, key)
    assert response.status_code == 503
    assert response.json()["error"]["code"] == "service_unavailable"
    assert int(response.headers["Retry-After"]) >= 1
    assert upstream.requests == []


def test_closed_still_serves_keys_without_limits_while_redis_is_unreachable(
    planes: Planes, upstream: MockUpstream
) -> None:
    nowhere = f"redis://127.0.0.1:{free_port()}/0"
    a = planes.start(redis_url=nowhere, redis_failure="closed")
    key = set_up(a, upstream)
    assert chat(a, key).status_code == 200


def test_open_holds_the_limits_in_the_plane_while_redis_is_unreachable_and_says_so_once(
    planes: Planes, upstream: MockUpstream, caplog: pytest.LogCaptureFixture
) -> None:
    nowhere = f"redis://127.0.0.1:{free_port()}/0"
    caplog.set_level(logging.WARNING, logger="server.shared.redis_limits")
    a = planes.start(redis_url=nowhere, redis_failure="open")
    key = set_up(a, upstream, rpm=3)
    responses = [chat(a, key) for _ in range(6)]
    assert [r.status_code for r in responses] == [200, 200, 200, 429, 429, 429]
    assert responses[0].headers["x-ratelimit-remaining-requests"] == "2"
    assert sum("Redis unreachable" in r.getMessage() for r in caplog.records) == 1
    assert limiter_of(a).unreachable_decisions == 6


def test_closed_plane_serves_again_after_redis_restarts_with_quotas_seeded_again(
    planes: Planes, private_redis: PrivateRedis, upstream: MockUpstream
) -> None:
    a = planes.start(redis_url=private_redis.url, redis_prefix="restart:", redis_failure="closed")
    key = set_up(a, upstream, rpm=1000, tokens_per_day=1_000_000)
    for _ in range(3):
        assert chat(a, key).status_code == 200
    billed = tokens_billed(a, 3)
    eventually(lambda: live_usage(a)["tokens_per_day_used"] == billed)

    private_redis.stop()  # and with it every counter: no persistence
    assert chat(a, key).status_code == 503

    private_redis.start()
    deadline = time.monotonic() + 10
    while (response := chat(a, key)).status_code != 200:
        assert response.status_code == 503
        assert time.monotonic() < deadline, "Redis came back but the plane never served again"
        time.sleep(0.1)
    # The day's use came back from the usage table, plus the request just served.
    eventually(lambda: live_usage(a)["tokens_per_day_used"] == tokens_billed(a, 4))
    assert limiter_of(a).settle_failures == 0


def test_open_plane_goes_back_to_shared_limits_after_redis_restarts(
    planes: Planes, private_redis: PrivateRedis, upstream: MockUpstream, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="server.shared.redis_limits")
    a = planes.start(redis_url=private_redis.url, redis_prefix="restart:", redis_failure="open")
    # 10 a minute: one more every 6 s, so the two readings below differ by the one request between them.
    key = set_up(a, upstream, rpm=10)
    b = planes.start(redis_url=private_redis.url, redis_prefix="restart:", redis_failure="open")
    assert chat(a, key).status_code == 200
    private_redis.stop()
    assert chat(a, key).status_code == 200  # held by the plane alone
    private_redis.start()

    def shared_again() -> bool:
        return chat(a, key).status_code == 200 and not limiter_of(a).away

    eventually(shared_again)
    # One bucket again, whichever plane is asked.
    remaining_a = int(chat(a, key).headers["x-ratelimit-remaining-requests"])
    remaining_b = int(chat(b, key).headers["x-ratelimit-remaining-requests"])
    assert remaining_b == remaining_a - 1
    messages = [r.getMessage() for r in caplog.records]
    assert sum("Redis unreachable" in m for m in messages) == 1
    assert sum("Redis reachable again" in m for m in messages) == 1


def test_redis_failure_must_be_open_or_closed() -> None:
    from server.config import ConfigError

    with pytest.raises(ConfigError, match="redis_failure"):
        Config(redis_failure="maybe")


# -- leases and settlements -----------------------------------------------------------------------------


async def nothing_used() -> dict[tuple[str, str], tuple[float, float]]:
    return {}


def shared_limiter(url: str, prefix: str, lease_s: float = 60.0) -> SharedLimiter:
    limiter = SharedLimiter(url, prefix=prefix, failure="closed", lease_s=lease_s, usage_so_far=nothing_used)
    limiter.seed({})
    return limiter


def test_a_plane_that_never_settles_gives_its_concurrency_back_when_the_lease_lapses(prefix: str) -> None:
    async def scenario() -> None:
        killed, survivor = shared_limiter(REDIS, prefix, lease_s=0.5), shared_limiter(REDIS, prefix)
        await killed.start()
        await survivor.start()
        scopes = [("org:o1", Limits(concurrency=1, tokens_per_day=1000))]
        await killed.acquire(scopes, Estimate(600))  # never settled: its plane is gone
        with pytest.raises(RateLimitError):
            await survivor.acquire(scopes, Estimate(100))
        await asyncio.sleep(0.6)
        (await survivor.acquire(scopes, Estimate(600))).settle(0, 0.0)  # the slot and the 600 tokens are back
        await killed.close()
        await survivor.close()

    asyncio.run(scenario())


def test_a_settlement_that_cannot_reach_redis_is_retried_then_counted(private_redis: PrivateRedis) -> None:
    async def scenario() -> None:
        limiter = shared_limiter(private_redis.url, "settle:")
        limiter.settle_retry_s = 0.5
        await limiter.start()
        admission = await limiter.acquire([("org:o1", Limits(tpm=1000))], Estimate(100))
        private_redis.stop()
        admission.settle(50, 0.0)
        await asyncio.sleep(1.5)
        assert limiter.settle_failures == 1
        await limiter.close()

    asyncio.run(scenario())


def test_serve_takes_the_redis_url_as_a_flag(tmp_path: Path, prefix: str) -> None:
    process = PlaneProcess(tmp_path / "plane", "--redis-url", REDIS, env={"HATCHWAY_REDIS_PREFIX": prefix})
    try:
        process.wait_for(re.compile(r"shared limits in Redis \(prefix '" + re.escape(prefix)))
    finally:
        assert process.terminate() == 0
