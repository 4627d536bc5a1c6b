"""What the plane learns about its targets while serving, kept across snapshot rebuilds.

Per target (provider + upstream model): a circuit breaker, EWMAs of latency and time to first token, the recent
times to first token (their p95 is `--hedge auto`'s delay, server.routing.hedge), and the requests in flight. Per
provider key: a cool-down after a 429 or a 401, so the next request uses another key.
Nothing here says how a target continues a broken stream: that is declared, never learnt (server.routing.continuation).
"""

from __future__ import annotations

import enum
import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from server.errors import UpstreamConfigError, UpstreamError, UpstreamStatusError

Clock = Callable[[], float]


class BreakerState(enum.Enum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


@dataclass
class Breaker:
    """closed -> open after `threshold` consecutive failures -> half-open after `cooldown_s`, where a single
    probe request may pass -> closed when the target answers, open again when it fails.

    Every attempt ends in one of three calls, the probe's included:
        failed      a target fault (`is_target_fault`: 5xx, 408, 429, timeout, refused or reset connection,
                    a broken or garbled stream)
        succeeded   any other answer, a 4xx about the request included: the target is up
        released    no verdict (the client left, the request's budget ran out, the plane's own settings for the
                    target are unusable: UpstreamConfigError): the next request probes
    A probe that never reports back holds the half-open state for one cooldown at most, then another request
    probes: a lost verdict must not retire a target until the plane restarts.
    """

    state: BreakerState = BreakerState.CLOSED
    failures: int = 0
    opened_at: float = 0.0
    probing: bool = False
    probe_started: float = 0.0

    def admits(self, now: float, cooldown_s: float) -> bool:
        if self.state is BreakerState.CLOSED:
            return True
        if self.state is BreakerState.OPEN and now - self.opened_at >= cooldown_s:
            self.state = BreakerState.HALF_OPEN
        if self.state is BreakerState.HALF_OPEN and (not self.probing or now - self.probe_started >= cooldown_s):
            self.probing, self.probe_started = True, now
            return True
        return False

    def retry_in(self, now: float, cooldown_s: float) -> float:
        return max(0.0, self.opened_at + cooldown_s - now) if self.state is BreakerState.OPEN else 0.0

    def succeeded(self) -> None:
        self.state, self.failures, self.probing = BreakerState.CLOSED, 0, False

    def failed(self, now: float, threshold: int) -> None:
        self.failures += 1
        self.probing = False
        if self.state is BreakerState.HALF_OPEN or self.failures >= threshold:
            self.state, self.opened_at = BreakerState.OPEN, now

    def released(self) -> None:
        """The probe ended without a verdict (the client left): let the next request probe instead."""
        self.probing = False


# The recent times to first token kept per target for its p95 (`--hedge auto`), and how many make a p95 at all.
TTFT_SAMPLES = 100
TTFT_SAMPLES_NEEDED = 5


@dataclass
class TargetStats:
    breaker: Breaker = field(default_factory=Breaker)
    in_flight: int = 0
    # EWMAs in seconds; None until measured, which the `fastest` strategy treats as worth trying.
    latency_s: float | None = None
    ttft_s: float | None = None
    # The last TTFT_SAMPLES times to first token (s). Only answers that won count: a hedged attempt cancelled
    # while waiting says only that it was slower than its rival, and counting that wait would raise the delay
    # by the rival's time to first token on every hedge.
    ttft_samples: deque[float] = field(default_factory=lambda: deque(maxlen=TTFT_SAMPLES))

    def observe(self, latency_s: float | None = None, ttft_s: float | None = None, alpha: float = 0.2) -> None:
        if latency_s is not None:
            self.latency_s = latency_s if self.latency_s is None else (1 - alpha) * self.latency_s + alpha * latency_s
        if ttft_s is not None:
            self.ttft_s = ttft_s if self.ttft_s is None else (1 - alpha) * self.ttft_s + alpha * ttft_s
            self.ttft_samples.append(ttft_s)

    def ttft_p95(self) -> float | None:
        """The 95th percentile of the recent times to first token; None until enough were seen."""
        if len(self.ttft_samples) < TTFT_SAMPLES_NEEDED:
            return None
        ordered = sorted(self.ttft_samples)
        return ordered[min(len(ordered) - 1, math.ceil(0.95 * len(ordered)) - 1)]


def is_target_fault(exc: UpstreamError) -> bool:
    """Failures that say something about the target's health (not about the client's request)."""
    if isinstance(exc, UpstreamStatusError):
        return exc.upstream_status >= 500 or exc.upstream_status in (408, 429)
    return not isinstance(exc, UpstreamConfigError)  # the plane's own settings failed it: nothing was learnt


class Health:
    def __init__(self, clock: Clock = time.monotonic) -> None:
        self.clock = clock
        self._targets: dict[str, TargetStats] = {}
        # provider key id -> monotonic time until which it rests.
        self._key_rest: dict[str, float] = {}

    def stats(self, target_key: str) -> TargetStats:
        stats = self._targets.get(target_key)
        if stats is None:
            stats = self._targets[target_key] = TargetStats()
        return stats

    def key_usable(self, key_id: str) -> bool:
        return self._key_rest.get(key_id, 0.0) <= self.clock()

    def rest_key(self, key_id: str, seconds: float) -> None:
        self._key_rest[key_id] = self.clock() + seconds

    def forget(self, live_keys: set[str]) -> None:
        """Drop what belongs to targets that no longer exist, so removed providers do not leak memory.
        `live_keys` names every target that can serve now: the snapshot's and the connected node pools'."""
        for key in set(self._targets) - live_keys:
            if self._targets[key].in_flight == 0:
                del self._targets[key]
