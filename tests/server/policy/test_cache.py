"""The response cache: exact match per org, by policy, with TTL and a byte bound; streams replayed as SSE."""

from __future__ import annotations

import json
import sys
import threading
from typing import Any

import httpx
import pytest

from server.policy.cache import CachePolicy, Directives, ResponseCache, StreamAssembler, replay_chunks
from tests.conftest import MODEL, Gateway, RunningPlane, usage_report
from tests.server.policy.test_limits import FrozenClock, live_usage, plane_of, set_limits
from tests.support.mock_upstream import MockUpstream

DETERMINISTIC = {"model": MODEL, "messages": [{"role": "user", "content": "Capital of France?"}], "temperature": 0}


def ask(
    gateway: Gateway, body: dict[str, Any] | None = None, api_key: str | None = None, **headers: str
) -> httpx.Response:
    response = httpx.post(
        f"{gateway.plane.v1}/chat/completions",
        json=body or DETERMINISTIC,
        headers={"Authorization": f"Bearer {api_key or gateway.api_key}", **headers},
        timeout=30,
    )
    assert response.status_code == 200, response.text
    return response


def generations(upstream: MockUpstream) -> int:
    return sum(1 for r in upstream.requests if r.path.endswith("/completions"))


def sse_payloads(response: httpx.Response) -> list[str]:
    return [line.removeprefix("data: ") for line in response.text.split("\n") if line.startswith("data: ")]


def set_cache(gateway: Gateway, org: str = "acme", **policy: Any) -> dict[str, Any]:
    return gateway.plane.admin.put("/cache", {"org": org, **policy})  # type: ignore[no-any-return]


def local_cache(gateway: Gateway) -> ResponseCache:
    """The plane's in-process cache (these planes have no Redis: tests/server/shared/test_shared_cache.py has the
    shared one)."""
    cache = plane_of(gateway).cache
    assert isinstance(cache, ResponseCache)
    return cache


def test_a_deterministic_request_is_a_miss_then_a_hit(gateway: Gateway) -> None:
    first, second = ask(gateway), ask(gateway)
    assert first.headers["x-hatchway-cache"] == "miss"
    assert second.headers["x-hatchway-cache"] == "hit"
    assert second.json() == first.json()
    assert generations(gateway.upstream) == 1


def test_a_seed_makes_a_request_deterministic_enough_to_cache(gateway: Gateway) -> None:
    body = {**DETERMINISTIC, "temperature": 0.7, "seed": 42}
    assert [ask(gateway, body).headers["x-hatchway-cache"] for _ in range(2)] == ["miss", "hit"]


def test_a_sampled_request_bypasses_the_cache_by_default(gateway: Gateway) -> None:
    body = {**DETERMINISTIC, "temperature": 0.7}
    assert [ask(gateway, body).headers["x-hatchway-cache"] for _ in range(2)] == ["bypass", "bypass"]
    assert generations(gateway.upstream) == 2


def test_policy_all_caches_sampled_requests_too(gateway: Gateway) -> None:
    set_cache(gateway, mode="all")
    body = {**DETERMINISTIC, "temperature": 0.7}
    assert [ask(gateway, body).headers["x-hatchway-cache"] for _ in range(2)] == ["miss", "hit"]


def test_policy_off_never_caches(gateway: Gateway) -> None:
    set_cache(gateway, mode="off")
    assert [ask(gateway).headers["x-hatchway-cache"] for _ in range(2)] == ["bypass", "bypass"]


def test_any_change_to_messages_or_sampling_is_a_different_entry(gateway: Gateway) -> None:
    ask(gateway)
    assert ask(gateway, {**DETERMINISTIC, "max_tokens": 5}).headers["x-hatchway-cache"] == "miss"
    other_question = {**DETERMINISTIC, "messages": [{"role": "user", "content": "Capital of Spain?"}]}
    assert ask(gateway, other_question).headers["x-hatchway-cache"] == "miss"


def test_user_and_stream_do_not_change_the_entry(gateway: Gateway) -> None:
    ask(gateway)
    assert ask(gateway, {**DETERMINISTIC, "user": "someone-else"}).headers["x-hatchway-cache"] == "hit"


def test_org_b_never_gets_org_a_cached_answer(gateway: Gateway, make_upstream: Any) -> None:
    plane: RunningPlane = gateway.plane
    plane.create_org("beta")
    other = make_upstream("mock-b", reply="Beta's own answer")
    plane.add_provider("mock-b", other, org="beta")
    beta_key = plane.create_key("beta")
    ask(gateway)
    from_beta = ask(gateway, api_key=beta_key)
    assert from_beta.headers["x-hatchway-cache"] == "miss"
    assert from_beta.json()["choices"][0]["message"]["content"] == "Beta's own answer"
    assert generations(other) == 1


def test_header_bypass_neither_reads_nor_stores(gateway: Gateway) -> None:
    ask(gateway)
    assert ask(gateway, **{"X-Hatchway-Cache": "bypass"}).headers["x-hatchway-cache"] == "bypass"
    assert generations(gateway.upstream) == 2


def test_header_no_store_reads_but_does_not_store(gateway: Gateway) -> None:
    assert ask(gateway, **{"X-Hatchway-Cache": "no-store"}).headers["x-hatchway-cache"] == "miss"
    assert ask(gateway).headers["x-hatchway-cache"] == "miss"
    assert ask(gateway, **{"X-Hatchway-Cache": "no-store"}).headers["x-hatchway-cache"] == "hit"


def test_an_entry_expires_after_its_ttl(gateway: Gateway) -> None:
    clock = FrozenClock()
    local_cache(gateway).clock = clock
    set_cache(gateway, ttl_s=60)
    ask(gateway)
    clock.advance(59)
    assert ask(gateway).headers["x-hatchway-cache"] == "hit"
    clock.advance(2)
    assert ask(gateway).headers["x-hatchway-cache"] == "miss"


def test_a_ttl_header_overrides_the_org_ttl(gateway: Gateway) -> None:
    clock = FrozenClock()
    local_cache(gateway).clock = clock
    ask(gateway, **{"X-Hatchway-Cache": "ttl=5"})
    clock.advance(6)
    assert ask(gateway).headers["x-hatchway-cache"] == "miss"


@pytest.mark.parametrize("header", ["sometimes", "ttl=soon", "ttl=-3"])
def test_an_unknown_cache_directive_is_a_400(gateway: Gateway, header: str) -> None:
    response = httpx.post(
        f"{gateway.plane.v1}/chat/completions",
        json=DETERMINISTIC,
        headers={**gateway.auth(), "X-Hatchway-Cache": header},
    )
    assert response.status_code == 400
    assert response.json()["error"]["type"] == "invalid_request_error"


# -- streams -------------------------------------------------------------------------------------------


def test_a_stream_is_replayed_from_the_cache_as_a_proper_sse_stream(gateway: Gateway) -> None:
    client = gateway.client()
    body = {**DETERMINISTIC, "stream": True, "stream_options": {"include_usage": True}}
    texts = []
    for expected in ("miss", "hit"):
        with client.chat.completions.with_streaming_response.create(**body) as response:
            assert response.headers["x-hatchway-cache"] == expected
            chunks = list(response.parse())
        texts.append("".join(c.choices[0].delta.content or "" for c in chunks if c.choices))
        assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0
        assert chunks[-2].choices[0].finish_reason == "stop"
    assert texts[0] == texts[1] == gateway.upstream.reply
    assert generations(gateway.upstream) == 1


def test_a_replayed_stream_ends_with_done(gateway: Gateway) -> None:
    body = {**DETERMINISTIC, "stream": True}
    ask(gateway, body)
    replayed = ask(gateway, body)
    assert replayed.headers["content-type"].startswith("text/event-stream")
    payloads = sse_payloads(replayed)
    assert payloads[-1] == "[DONE]"
    chunks = [json.loads(p) for p in payloads[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert "usage" not in chunks[-1] or chunks[-1]["usage"] is None  # not asked for


def test_an_answer_cached_whole_is_replayed_to_a_streaming_client_and_back(gateway: Gateway) -> None:
    whole = ask(gateway).json()
    streamed = ask(gateway, {**DETERMINISTIC, "stream": True})
    assert streamed.headers["x-hatchway-cache"] == "hit"
    text = "".join(json.loads(p)["choices"][0]["delta"].get("content") or "" for p in sse_payloads(streamed)[:-1])
    assert text == whole["choices"][0]["message"]["content"]


def test_a_broken_stream_is_not_cached(gateway: Gateway) -> None:
    from tests.support.mock_upstream import Fault

    gateway.upstream.faults.append(Fault("cut", after_chunks=2))
    body = {**DETERMINISTIC, "stream": True}
    ask(gateway, body)  # committed, then cut: an error event, not an answer
    assert ask(gateway, body).headers["x-hatchway-cache"] == "miss"


def test_completions_and_embeddings_are_cached_too(gateway: Gateway) -> None:
    client = gateway.client()
    for _ in range(2):
        completion = client.completions.with_raw_response.create(model=MODEL, prompt="Once upon", temperature=0)
        embedding = client.embeddings.with_raw_response.create(model=MODEL, input="hello")
    assert completion.headers["x-hatchway-cache"] == "hit"
    assert embedding.headers["x-hatchway-cache"] == "hit"


# -- cost --------------------------------------------------------------------------------------------------


def test_a_hit_costs_nothing_and_is_recorded_as_a_hit(gateway: Gateway) -> None:
    plane_of(gateway).limiter.clock = FrozenClock()
    set_limits(gateway, usd_per_month=10)
    ask(gateway)
    spent = live_usage(gateway)["usd_per_month_used"]
    hit = ask(gateway)
    assert hit.headers["x-hatchway-cost-usd"] == "0.00000000"
    assert live_usage(gateway)["usd_per_month_used"] == spent
    (report,) = usage_report(gateway.plane, 2, org="acme")
    assert report["cache_hits"] == 1


def test_a_hit_is_served_even_when_the_spend_quota_is_used_up(gateway: Gateway) -> None:
    plane_of(gateway).limiter.clock = FrozenClock()
    ask(gateway)
    set_limits(gateway, usd_per_month=0)
    assert ask(gateway).headers["x-hatchway-cache"] == "hit"


# -- admin and the bound -------------------------------------------------------------------------------


def test_cache_policy_is_shown_and_cleared_from_the_admin_api(gateway: Gateway) -> None:
    ask(gateway)
    shown = gateway.plane.admin.get("/cache", org="acme")["data"][0]
    assert (shown["mode"], shown["ttl_s"], shown["entries"]) == ("deterministic", 300, 1)
    assert gateway.plane.admin.delete("/cache", org="acme")["removed"] == 1
    assert ask(gateway).headers["x-hatchway-cache"] == "miss"


def test_an_unknown_cache_mode_is_refused(gateway: Gateway) -> None:
    from server.cli.client import AdminAPIError

    with pytest.raises(AdminAPIError) as refused:
        set_cache(gateway, mode="sometimes")
    assert refused.value.status == 400


def test_the_cache_evicts_the_least_recently_used_entries_beyond_its_byte_bound() -> None:
    cache = ResponseCache(max_bytes=3 * (1000 + 300))
    policy, directives = CachePolicy("all", 60), Directives()
    bodies = [{"model": "m", "prompt": str(i)} for i in range(4)]
    keys = [cache.lookup("org", "completions", b, policy, directives).key for b in bodies]
    for key in keys[:3]:
        assert key is not None
        cache.put(key, b"x" * 1000, 60)
    assert cache.get(keys[0] or "") is not None  # 0 is now the most recently used
    cache.put(keys[3] or "", b"x" * 1000, 60)
    assert [cache.get(k or "") is not None for k in keys] == [True, False, True, True]
    assert cache.size <= cache.max_bytes and cache.evictions == 1


def test_an_answer_larger_than_the_whole_cache_is_not_stored() -> None:
    cache = ResponseCache(max_bytes=500)
    cache.put("org:k", b"x" * 1000, 60)
    assert cache.get("org:k") is None and cache.size == 0


def test_the_assembler_rebuilds_a_stream_into_the_whole_answer() -> None:
    assembler = StreamAssembler(chat=True)
    base = {"id": "c1", "created": 1, "model": "m", "object": "chat.completion.chunk"}
    for delta, finish in (({"role": "assistant"}, None), ({"content": "Par"}, None), ({"content": "is"}, "stop")):
        assembler.observe({**base, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})
    body = assembler.body()
    assert body is not None
    doc = json.loads(body)
    assert doc["choices"][0]["message"] == {"role": "assistant", "content": "Paris"}
    replayed = [json.loads(p) for p in replay_chunks(body, chat=True, include_usage=False)]
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in replayed) == "Paris"


def test_a_stream_with_tool_calls_is_not_assembled_for_the_cache() -> None:
    assembler = StreamAssembler(chat=True)
    call = {"index": 0, "id": "t1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    assembler.observe({"choices": [{"index": 0, "delta": {"tool_calls": [call]}, "finish_reason": "tool_calls"}]})
    assert assembler.body() is None


def test_a_stream_with_logprobs_is_not_assembled_for_the_cache() -> None:
    assembler = StreamAssembler(chat=True)
    logprobs = {"content": [{"token": "Hi", "logprob": -0.1, "bytes": [72, 105], "top_logprobs": []}]}
    assembler.observe({"choices": [{"index": 0, "delta": {"content": "Hi"}, "logprobs": logprobs}]})
    assembler.observe({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
    assert assembler.body() is None


def test_a_whole_answer_replayed_as_a_stream_keeps_its_logprobs() -> None:
    logprobs = {"content": [{"token": "Hi", "logprob": -0.1, "bytes": [72, 105], "top_logprobs": []}]}
    message = {"role": "assistant", "content": "Hi"}
    body = json.dumps({"id": "c1", "choices": [{"index": 0, "message": message, "logprobs": logprobs}]}).encode()
    first = json.loads(replay_chunks(body, chat=True, include_usage=False)[0])
    assert first["choices"][0]["logprobs"] == logprobs


def test_cache_cli_sets_shows_and_clears(gateway: Gateway) -> None:
    from click.testing import CliRunner

    from server.cli import cli
    from tests.conftest import ADMIN_KEY

    def admin(*args: str) -> str:
        result = CliRunner().invoke(cli, ["admin", "--url", gateway.plane.url, "--admin-key", ADMIN_KEY, *args])
        assert result.exit_code == 0, result.output
        return result.output

    admin("cache", "set", "--org", "acme", "--mode", "all", "--ttl", "60")
    ask(gateway, {**DETERMINISTIC, "temperature": 0.9})
    shown = admin("cache", "show", "--org", "acme").splitlines()
    assert shown[0].split() == ["ORG", "MODE", "TTL_S", "ENTRIES", "BYTES"]
    assert shown[1].split()[:4] == ["acme", "all", "60", "1"]
    assert admin("cache", "clear", "--org", "acme").splitlines()[1].split()[1] == "1"


def test_clearing_the_cache_while_answers_are_being_stored_never_fails(gateway: Gateway) -> None:
    cache = local_cache(gateway)
    org_id = gateway.plane.admin.get("/cache", org="acme")["data"][0]["org_id"]

    async def fill() -> None:
        # Enough entries that one pass over them outlasts many thread switches.
        for i in range(100_000):
            cache.put(f"{org_id}:filler-{i}", b"{}", 300)

    statuses: list[int] = []

    def store_answers(worker: int) -> None:
        with httpx.Client(headers={"Authorization": f"Bearer {gateway.api_key}"}, timeout=30) as client:
            for i in range(40):
                body = {**DETERMINISTIC, "messages": [{"role": "user", "content": f"question {worker}-{i}"}]}
                statuses.append(client.post(f"{gateway.plane.v1}/chat/completions", json=body).status_code)

    switch = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)  # threads take turns as often as they can: a race shows at once
    workers = [threading.Thread(target=store_answers, args=(w,)) for w in range(4)]
    for worker in workers:
        worker.start()
    cleared = []
    try:
        for _ in range(3):
            gateway.plane.loop_thread.run(fill())
            cleared.append(gateway.plane.admin.delete("/cache", org="acme")["removed"])
    finally:
        for worker in workers:
            worker.join()
        sys.setswitchinterval(switch)
    assert statuses and set(statuses) == {200}
    assert all(removed >= 100_000 for removed in cleared)
    assert cache.size == sum(e.size for e in cache.entries.values())
