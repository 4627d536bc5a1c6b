"""The decisions behind failover, one failure class at a time, and the circuit breaker's states."""

from __future__ import annotations

import pytest

from server.errors import (
    UpstreamConnectError,
    UpstreamProtocolError,
    UpstreamRefusedError,
    UpstreamStatusError,
    UpstreamTimeoutError,
)
from server.routing.continuation import Continuation, ContinuationMismatch
from server.routing.failover import FailoverPolicy, Move, decide, retry_after_seconds, validate_overrides
from server.routing.health import Breaker, BreakerState

POLICY = FailoverPolicy()


def status(code: int, body: bytes = b"", retry_after: str | None = None) -> UpstreamStatusError:
    return UpstreamStatusError(code, body, headers={"Retry-After": retry_after} if retry_after else None)


def move(exc: Exception, tries: int = 0, time_left_s: float = 60, other_key: bool = False) -> tuple[Move, float]:
    decision = decide(exc, tries=tries, policy=POLICY, time_left_s=time_left_s, other_key=other_key)
    return decision.move, decision.delay_s


def test_429_with_retry_after_within_the_cap_waits_that_long() -> None:
    assert move(status(429, retry_after="2")) == (Move.RETRY, 2.0)


def test_429_with_retry_after_beyond_the_cap_fails_over() -> None:
    assert move(status(429, retry_after="3600"))[0] is Move.NEXT


def test_429_with_retry_after_beyond_the_deadline_fails_over() -> None:
    assert move(status(429, retry_after="5"), time_left_s=3)[0] is Move.NEXT


def test_429_without_retry_after_backs_off_then_fails_over() -> None:
    first, delay = move(status(429))
    assert first is Move.RETRY and 0.1 <= delay <= 0.2
    second, longer = move(status(429), tries=1)
    assert second is Move.RETRY and 0.2 <= longer <= 0.4
    assert move(status(429), tries=POLICY.max_rate_limit_retries)[0] is Move.NEXT


def test_429_with_another_provider_key_retries_at_once_with_it() -> None:
    assert move(status(429, retry_after="5"), other_key=True) == (Move.RETRY, 0.0)


def test_retry_after_as_an_http_date() -> None:
    assert retry_after_seconds("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0
    assert retry_after_seconds("soon") is None


def test_one_5xx_is_retried_once_then_fails_over() -> None:
    assert move(status(500))[0] is Move.RETRY
    assert move(status(503), tries=1)[0] is Move.NEXT


def test_refused_connection_and_silence_fail_over_without_retrying() -> None:
    assert move(UpstreamRefusedError("refused"))[0] is Move.NEXT
    assert move(UpstreamTimeoutError("silent"))[0] is Move.NEXT


def test_reset_connection_is_retried_once() -> None:
    assert move(UpstreamConnectError("reset"))[0] is Move.RETRY
    assert move(UpstreamConnectError("reset"), tries=1)[0] is Move.NEXT


def test_context_length_goes_to_the_fallback_model() -> None:
    body = b'{"error": {"message": "too long", "code": "context_length_exceeded", "type": "invalid_request_error"}}'
    assert move(status(400, body))[0] is Move.NEXT_MODEL


def test_content_policy_and_other_4xx_stop() -> None:
    body = b'{"error": {"message": "rejected by the safety system", "code": "content_policy_violation"}}'
    assert move(status(400, body))[0] is Move.STOP
    assert move(status(422))[0] is Move.STOP


def test_refused_provider_key_tries_another_key_else_fails_over() -> None:
    assert move(status(401), other_key=True)[0] is Move.RETRY
    assert move(status(401))[0] is Move.NEXT


def test_protocol_errors_fail_over() -> None:
    assert move(UpstreamProtocolError("garbage"))[0] is Move.NEXT


def test_policy_overrides_are_checked() -> None:
    assert validate_overrides({"ttft_timeout_s": 5, "max_retries": 0}) == {"ttft_timeout_s": 5.0, "max_retries": 0}
    with pytest.raises(ValueError, match="unknown policy field"):
        validate_overrides({"tftt": 1})
    with pytest.raises(ValueError, match="non-negative"):
        validate_overrides({"max_retries": -1})


def test_breaker_opens_after_the_threshold_and_lets_one_probe_through_after_the_cooldown() -> None:
    breaker = Breaker()
    for _ in range(3):
        assert breaker.admits(0.0, cooldown_s=10)
        breaker.failed(0.0, threshold=3)
    assert breaker.state is BreakerState.OPEN
    assert not breaker.admits(5.0, cooldown_s=10)
    assert breaker.admits(10.0, cooldown_s=10)  # the probe
    assert not breaker.admits(10.0, cooldown_s=10)  # only one at a time
    breaker.succeeded()
    assert breaker.state is BreakerState.CLOSED and breaker.admits(10.0, cooldown_s=10)


def test_a_failed_probe_opens_the_breaker_again() -> None:
    breaker = Breaker()
    breaker.failed(0.0, threshold=1)
    assert breaker.admits(10.0, cooldown_s=10)
    breaker.failed(10.0, threshold=1)
    assert breaker.state is BreakerState.OPEN and not breaker.admits(15.0, cooldown_s=10)


def test_a_probe_whose_client_left_lets_the_next_request_probe() -> None:
    breaker = Breaker()
    breaker.failed(0.0, threshold=1)
    assert breaker.admits(10.0, cooldown_s=10)
    breaker.released()
    assert breaker.admits(10.0, cooldown_s=10)


def test_regenerated_text_is_forwarded_only_past_the_delivered_text() -> None:
    continuation = Continuation("Hello wor", "regenerate")
    assert continuation.feed("Hello") == ""
    assert continuation.feed(" world") == "ld"
    assert continuation.feed("!") == "!"


def test_regenerated_text_that_differs_is_refused() -> None:
    continuation = Continuation("Hello world", "regenerate")
    with pytest.raises(ContinuationMismatch):
        continuation.feed("Goodbye")


def test_prefill_continuation_passes_everything_through() -> None:
    assert Continuation("Hello", "verify").feed(" world") == " world"
