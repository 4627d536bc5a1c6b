"""Every way an upstream can fail, as the client sees it: status, body, the bytes of the stream, and what was
recorded. Waits are read from what the plane counts (the seconds it waited before retries), and no test bounds the
wall clock from above: a timer is shown to fire by what only it explains (a fault that lasts past the request's
deadline)."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from server.config import Config
from server.routing.failover import FailoverPolicy, backoff_ceiling_s
from tests.conftest import ADMIN_KEY, MODEL, RunningPlane, abandon_request, eventually
from tests.support.mock_upstream import Fault, MockUpstream

REPLY = "The quick brown fox jumps over the lazy dog"
# /metrics takes the admin key.
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}


@pytest.fixture
def plane_config(plane_config: Config) -> Config:
    # Short limits so every timeout-driven case finishes in about a second.
    return plane_config.replace(
        upstream_header_timeout_s=1.0,
        ttft_timeout_s=1.0,
        stream_idle_timeout_s=1.0,
        retry_after_cap_s=2.0,
        breaker_cooldown_s=1.0,
        request_deadline_s=20.0,
        # Far above this module's answers; test_a_whole_answer_past_the_body_cap_fails_over goes past it.
        max_upstream_body_bytes=256 * 1024,
    )


@dataclass
class Pair:
    """Providers `primary` then `backup` serving MODEL with the same answer, and a key for them."""

    plane: RunningPlane
    primary: MockUpstream
    backup: MockUpstream
    key: str

    def post(self, body: dict[str, Any], timeout: float = 30) -> httpx.Response:
        return httpx.post(
            f"{self.plane.v1}/chat/completions",
            json=body,
            headers={"Authorization": f"Bearer {self.key}"},
            timeout=timeout,
        )

    def chat(self, *, stream: bool = False, timeout: float = 30, **fields: Any) -> httpx.Response:
        body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "stream": stream, **fields}
        return self.post(body, timeout=timeout)

    def waited_s(self, target: str) -> float:
        """Seconds the plane waited before retrying `target` (Retry-After, backoff), from its metrics."""
        return self.plane.metric("hatchway_retry_wait_seconds_total", target=target)

    def usage_rows(self, expected: int) -> list[dict[str, Any]]:
        """The usage rows once `expected` of them were written (the writer flushes every 50 ms here)."""
        deadline = time.monotonic() + 5
        while True:
            rows = self.plane.sql("SELECT * FROM usage_record ORDER BY id")
            if len(rows) >= expected or time.monotonic() > deadline:
                return rows
            time.sleep(0.05)


@pytest.fixture
def pair(plane: RunningPlane, make_upstream: Callable[..., MockUpstream]) -> Pair:
    plane.create_org()
    primary, backup = make_upstream("primary", reply=REPLY), make_upstream("backup", reply=REPLY)
    plane.add_provider("primary", primary, price_in=1.0, price_out=1.0)
    plane.add_provider("backup", backup, price_in=2.0, price_out=2.0)
    return Pair(plane, primary, backup, plane.create_key())


@dataclass
class Stream:
    text: str
    chunks: list[dict[str, Any]]
    done: bool
    error: dict[str, Any] | None


def read_stream(response: httpx.Response) -> Stream:
    assert response.status_code == 200, response.text
    frames = [f for f in response.text.split("\n\n") if f]
    assert all(f.startswith("data: ") for f in frames), frames
    payloads = [f.removeprefix("data: ") for f in frames]
    done = payloads[-1] == "[DONE]"
    docs = [json.loads(p) for p in payloads if p != "[DONE]"]
    error = docs[-1]["error"] if docs and "error" in docs[-1] else None
    chunks = [d for d in docs if "error" not in d]
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    return Stream(text, chunks, done, error)


def backoffs_ceiling_s(retries: int) -> float:
    """The most that `retries` backoffs may wait in all, with the default policy (each draws half to all of it)."""
    return sum(backoff_ceiling_s(FailoverPolicy(), tries) for tries in range(retries))


# 1 ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_429_with_retry_after_waits_and_retries_the_same_target(pair: Pair, stream: bool) -> None:
    pair.primary.faults.append(Fault("status", status=429, retry_after="1"))
    started = time.monotonic()
    response = pair.chat(stream=stream)
    assert response.status_code == 200
    assert response.headers["x-hatchway-route"] == "primary"
    assert response.headers["x-hatchway-attempts"] == "2"
    assert pair.waited_s("primary") == 1.0 <= time.monotonic() - started
    assert len(pair.backup.requests) == 0


def test_429_with_retry_after_beyond_the_cap_fails_over_at_once(pair: Pair) -> None:
    pair.primary.faults.append(Fault("status", status=429, retry_after="30"))
    response = pair.chat()
    assert response.headers["x-hatchway-route"] == "backup"
    assert len(pair.primary.requests) == 1 and pair.waited_s("primary") == 0


# 2 ------------------------------------------------------------------------------------------------


def test_persistent_429_without_retry_after_backs_off_a_bounded_number_of_times_then_fails_over(
    pair: Pair,
) -> None:
    pair.primary.always = Fault("status", status=429)
    response = pair.chat()
    assert response.status_code == 200
    assert response.headers["x-hatchway-route"] == "backup"
    assert len(pair.primary.requests) == 3  # the first try and max_rate_limit_retries (2)
    assert backoffs_ceiling_s(2) / 2 <= pair.waited_s("primary") <= backoffs_ceiling_s(2)


def test_429_on_one_provider_key_retries_at_once_with_the_next_key(
    plane: RunningPlane, make_upstream: Callable[..., MockUpstream]
) -> None:
    plane.create_org()
    upstream = make_upstream("keys")
    provider = plane.add_provider("keys", upstream, api_keys=["sk-one", "sk-two"])
    upstream.faults.append(Fault("status", status=429, retry_after="30"))
    key = plane.create_key()
    response = httpx.post(
        f"{plane.v1}/chat/completions",
        json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}]},
        headers={"Authorization": f"Bearer {key}"},
    )
    assert response.status_code == 200
    assert plane.metric("hatchway_retry_wait_seconds_total", target="keys") == 0
    assert [r.headers["Authorization"] for r in upstream.requests] == ["Bearer sk-one", "Bearer sk-two"]
    assert response.headers["x-hatchway-provider-key"] == provider["api_keys"][1]["id"]
    # The rate-limited key rests: the next request goes straight to the other one.
    httpx.post(
        f"{plane.v1}/chat/completions",
        json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}]},
        headers={"Authorization": f"Bearer {key}"},
    )
    assert upstream.requests[-1].headers["Authorization"] == "Bearer sk-two"


# 3, 4 ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_one_500_then_healthy_is_retried_on_the_same_target(pair: Pair, stream: bool) -> None:
    pair.primary.faults.append(Fault("status", status=500))
    response = pair.chat(stream=stream)
    assert response.status_code == 200
    assert response.headers["x-hatchway-route"] == "primary"
    assert response.headers["x-hatchway-attempts"] == "2"


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_persistent_503_fails_over_within_the_retry_budget(pair: Pair, stream: bool) -> None:
    pair.primary.always = Fault("status", status=503)
    response = pair.chat(stream=stream)
    assert response.status_code == 200
    assert response.headers["x-hatchway-route"] == "backup"
    assert len(pair.primary.requests) == 2  # the first try and max_retries (1)
    assert backoffs_ceiling_s(1) / 2 <= pair.waited_s("primary") <= backoffs_ceiling_s(1)


# 5 ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_reset_connection_is_retried(pair: Pair, stream: bool) -> None:
    pair.primary.faults.append(Fault("reset"))
    response = pair.chat(stream=stream)
    assert response.status_code == 200
    assert response.headers["x-hatchway-route"] == "primary"
    assert response.headers["x-hatchway-attempts"] == "2"


def test_refused_connection_fails_over_at_once(pair: Pair, loop_thread) -> None:
    loop_thread.run(pair.primary.stop())
    response = pair.chat()
    assert response.status_code == 200
    assert response.headers["x-hatchway-route"] == "backup"
    assert response.headers["x-hatchway-attempts"] == "2"
    assert pair.waited_s("primary") == 0


# 6 ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_silent_target_times_out_and_is_not_retried(pair: Pair, stream: bool) -> None:
    # Silent past the request's deadline (20 s): only the header timeout (1 s) leaves time for the backup.
    pair.primary.always = Fault("silent", delay_s=60)
    response = pair.chat(stream=stream)
    assert response.status_code == 200
    assert response.headers["x-hatchway-route"] == "backup"
    assert len(pair.primary.requests) == 1
    assert pair.usage_rows(2)[0]["error_code"] == "upstream_timeout"


# 7 ------------------------------------------------------------------------------------------------


def test_slow_first_token_fails_over_before_anything_reaches_the_client(pair: Pair) -> None:
    pair.primary.reply = "PRIMARY SHOULD NEVER BE SEEN"
    # No first token before the request's deadline (20 s): only the plane's own timers (a hedge, the first-token
    # limit) let the backup serve.
    pair.primary.always = Fault("slow_first_token", delay_s=60)
    stream = read_stream(pair.chat(stream=True))
    assert stream.text == REPLY and stream.done
    assert all(c["id"].startswith("chatcmpl-mock") for c in stream.chunks)
    assert len(pair.backup.requests) == 1


# 8, 9, 14 -----------------------------------------------------------------------------------------


def test_stream_cut_mid_way_is_rescued_by_regeneration_past_the_delivered_text(pair: Pair) -> None:
    pair.primary.faults.append(Fault("cut", after_chunks=3))
    response = pair.chat(stream=True)
    stream = read_stream(response)
    assert stream.text == REPLY
    assert stream.done and stream.error is None
    rescue = pair.backup.requests[-1].json
    assert rescue is not None and rescue["messages"][-1]["role"] == "user", "a plain provider is asked anew"
    assert len({c["id"] for c in stream.chunks}) == 1, "the client sees one completion id throughout"


def test_stream_stall_mid_way_is_detected_and_rescued(pair: Pair) -> None:
    # Quiet past the request's deadline (20 s): only the plane's own timers (the stream's pace, the idle limit)
    # leave time for a rescue.
    pair.primary.faults.append(Fault("stall", after_chunks=4, delay_s=60))
    stream = read_stream(pair.chat(stream=True))
    assert stream.text == REPLY and stream.done


def test_regeneration_that_differs_ends_in_an_error_event_not_altered_text(pair: Pair) -> None:
    pair.backup.accepts_prefill = False
    pair.backup.reply = "A completely different answer"
    pair.primary.faults.append(Fault("cut", after_chunks=3))
    pair.primary.always = Fault("status", status=503)  # so the primary cannot rescue its own stream
    stream = read_stream(pair.chat(stream=True))
    assert not stream.done
    assert stream.error is not None
    assert stream.text == "The quick brown"


def test_stream_without_any_rescuer_ends_with_an_error_event_and_no_done(pair: Pair) -> None:
    pair.backup.always = Fault("status", status=503)
    pair.primary.faults.append(Fault("cut", after_chunks=3))
    pair.primary.always = Fault("status", status=503)
    stream = read_stream(pair.chat(stream=True))
    assert not stream.done
    assert stream.error is not None and stream.error["type"] == "api_error"
    assert REPLY.startswith(stream.text) and stream.text != REPLY


def test_streams_with_several_choices_are_not_stitched(pair: Pair) -> None:
    pair.primary.faults.append(Fault("cut", after_chunks=3))
    stream = read_stream(pair.chat(stream=True, n=2))
    assert not stream.done and stream.error is not None
    assert len(pair.backup.requests) == 0


def test_whole_answer_cut_mid_body_is_retried(pair: Pair) -> None:
    pair.primary.faults.append(Fault("cut"))
    response = pair.chat()
    assert response.status_code == 200
    assert response.json()["choices"][0]["message"]["content"] == REPLY


# 10 -----------------------------------------------------------------------------------------------


def test_malformed_chunk_is_skipped_counted_and_the_stream_goes_on(pair: Pair) -> None:
    pair.primary.faults.append(Fault("garbage", after_chunks=2))
    stream = read_stream(pair.chat(stream=True))
    assert stream.text == REPLY and stream.done
    metrics = httpx.get(f"{pair.plane.url}/metrics", headers=ADMIN).text
    assert 'hatchway_malformed_chunks_total{target="primary"} 1.0' in metrics


def test_whole_answer_that_is_not_json_fails_over(pair: Pair) -> None:
    pair.primary.faults.append(Fault("garbage"))
    response = pair.chat()
    assert response.status_code == 200
    assert response.headers["x-hatchway-route"] == "backup"


def test_a_whole_answer_past_the_body_cap_fails_over(pair: Pair) -> None:
    pair.primary.reply = "word " * 200_000  # a 1 MB answer, four times max_upstream_body_bytes
    response = pair.chat()
    assert response.status_code == 200
    assert response.headers["x-hatchway-route"] == "backup"
    failed = pair.usage_rows(2)[0]
    assert failed["status"] == 502 and failed["error_code"] == "upstream_protocol_error"


# 11 -----------------------------------------------------------------------------------------------


def test_stream_ending_after_its_finish_but_without_done_is_finalised_with_its_usage(pair: Pair) -> None:
    pair.primary.faults.append(Fault("no_done"))
    stream = read_stream(pair.chat(stream=True, stream_options={"include_usage": True}))
    assert stream.text == REPLY and stream.done
    assert stream.chunks[-1]["choices"] == [] and stream.chunks[-1]["usage"]["completion_tokens"] == 9
    assert not pair.backup.requests, "a finished answer is not rescued"


def test_stream_ending_without_finish_or_done_is_treated_as_cut(pair: Pair) -> None:
    pair.primary.faults.append(Fault("no_done_no_finish", after_chunks=3))
    stream = read_stream(pair.chat(stream=True))
    assert stream.text == REPLY and stream.done
    assert len(pair.backup.requests) == 1


# 12, 13 -------------------------------------------------------------------------------------------


def test_context_length_goes_to_the_larger_fallback_model_not_the_same_model(
    pair: Pair, make_upstream: Callable[..., MockUpstream]
) -> None:
    large = make_upstream("large", reply="from the large model")
    pair.plane.add_provider("large-host", large, models=["large"])
    pair.plane.admin.put("/routes", {"org": "acme", "model": MODEL, "fallbacks": ["large"]})
    pair.primary.faults.append(Fault("context_length"))
    response = pair.chat()
    assert response.status_code == 200
    assert response.headers["x-hatchway-route"] == "large-host"
    assert len(pair.backup.requests) == 0, "the same model's other target would fail the same way"


def test_context_length_without_a_fallback_returns_the_error(pair: Pair) -> None:
    pair.primary.faults.append(Fault("context_length"))
    response = pair.chat()
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "context_length_exceeded"
    assert len(pair.primary.requests) == 1


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_content_policy_rejection_is_passed_through_without_retry(pair: Pair, stream: bool) -> None:
    pair.primary.faults.append(Fault("content_policy"))
    response = pair.chat(stream=stream)
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["code"] == "content_policy_violation" and "safety system" in error["message"]
    assert len(pair.primary.requests) == 1 and len(pair.backup.requests) == 0


# 15 -----------------------------------------------------------------------------------------------


def test_flapping_primary_opens_its_breaker_and_a_probe_brings_it_back(pair: Pair) -> None:
    pair.plane.admin.patch("/providers/primary", {"policy": {"breaker_failures": 2, "max_retries": 0}})
    pair.primary.always = Fault("status", status=503)
    for _ in range(2):
        assert pair.chat().headers["x-hatchway-route"] == "backup"
    tried = len(pair.primary.requests)
    for _ in range(3):  # open: the primary is not even tried
        response = pair.chat()
        assert response.headers["x-hatchway-route"] == "backup"
        assert response.headers["x-hatchway-attempts"] == "1"
    assert len(pair.primary.requests) == tried
    pair.primary.always = None
    time.sleep(1.1)  # the cool-down
    assert pair.chat().headers["x-hatchway-route"] == "primary"  # the probe
    assert pair.chat().headers["x-hatchway-route"] == "primary"


def test_every_breaker_open_gets_a_fast_503_with_retry_after(pair: Pair) -> None:
    for name in ("primary", "backup"):
        pair.plane.admin.patch(f"/providers/{name}", {"policy": {"breaker_failures": 1, "max_retries": 0}})
    pair.primary.always = pair.backup.always = Fault("status", status=503)
    assert pair.chat().status_code == 502
    response = pair.chat()
    assert response.status_code == 503
    assert response.headers["retry-after"] == "1"
    assert len(pair.primary.requests) == len(pair.backup.requests) == 1, "no open target was tried again"


# 16 -----------------------------------------------------------------------------------------------


def test_after_failover_the_answer_and_the_usage_rows_name_what_served(
    plane: RunningPlane, make_upstream: Callable[..., MockUpstream]
) -> None:
    plane.create_org()
    primary, backup = make_upstream("primary"), make_upstream("backup")
    plane.add_provider("primary", primary)
    plane.add_provider("backup", backup, models=[f"{MODEL}=backup-model"], price_in=2.0, price_out=2.0)
    primary.always = Fault("status", status=503)
    pair = Pair(plane, primary, backup, plane.create_key())
    response = pair.chat()
    assert response.json()["model"] == "backup-model"
    assert response.json()["usage"]["completion_tokens"] == 3
    rows = pair.usage_rows(3)
    failed, final = [r for r in rows if not r["final"]], [r for r in rows if r["final"]]
    assert [(r["target"], r["status"], r["completion_tokens"], r["cost_usd"]) for r in failed] == [
        ("primary", 503, 0, None),
        ("primary", 503, 0, None),
    ]
    assert len(final) == 1
    assert (final[0]["target"], final[0]["status"], final[0]["attempts"]) == ("backup", 200, 3)
    assert final[0]["completion_tokens"] == 3 and final[0]["cost_usd"] > 0


# Client disconnects -------------------------------------------------------------------------------


def test_client_leaving_a_stream_cancels_the_upstream_at_once(pair: Pair) -> None:
    pair.primary.chunk_delay_s = 0.3
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "stream": True}
    with httpx.stream(
        "POST", f"{pair.plane.v1}/chat/completions", json=body, headers={"Authorization": f"Bearer {pair.key}"}
    ) as response:
        next(response.iter_raw())
    eventually(lambda: pair.primary.disconnects == 1, what="the upstream to see the disconnect")
    assert pair.primary.completed == 0
    final = [r for r in pair.usage_rows(1) if r["final"]]
    assert final and final[0]["status"] == 499


def test_client_leaving_a_whole_answer_cancels_the_upstream_at_once(pair: Pair) -> None:
    # A header timeout far beyond the wait below: only the client's leaving can end the upstream request.
    pair.plane.admin.patch("/providers/primary", {"policy": {"header_timeout_s": 30}})
    pair.primary.delay_s = 10
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}
    abandon_request(f"{pair.plane.v1}/chat/completions", body, pair.key, after_s=0.5)
    eventually(lambda: pair.primary.disconnects == 1, what="the upstream to see the disconnect")
    assert pair.primary.completed == 0
