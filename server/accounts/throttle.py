"""Login throttling: failed sign-ins counted per email and per client address over a sliding window.

In memory, per plane: a guesser spread over several planes gets each plane's allowance, which still caps
guesses at a rate argon2id makes useless. Once either count is full, every attempt for that email or from that
address is refused with 429 and Retry-After, before any password is checked, so a right guess gains nothing.
"""

from __future__ import annotations

import math
import time
from collections import deque

from server.errors import RateLimitError

# Bound on the emails and addresses tracked at once, so that a flood of made-up emails cannot grow memory: past
# it the oldest are forgotten (which only ever lets an attacker through sooner, never locks anyone out).
MAX_TRACKED = 100_000


class _Window:
    def __init__(self, limit: int, window_s: float) -> None:
        self.limit = limit
        self.window_s = window_s
        self.failures: dict[str, deque[float]] = {}

    def _live(self, name: str, now: float) -> deque[float] | None:
        failures = self.failures.get(name)
        if failures is None:
            return None
        while failures and failures[0] <= now - self.window_s:
            failures.popleft()
        if not failures:
            del self.failures[name]
            return None
        return failures

    def wait_s(self, name: str, now: float) -> float:
        """0 when `name` may try now, else how long until its oldest failure leaves the window."""
        failures = self._live(name, now)
        if self.limit <= 0 or failures is None or len(failures) < self.limit:
            return 0.0
        return failures[0] + self.window_s - now

    def fail(self, name: str, now: float) -> None:
        failures = self._live(name, now)
        if failures is None:
            if len(self.failures) >= MAX_TRACKED:
                del self.failures[next(iter(self.failures))]
            failures = self.failures[name] = deque(maxlen=max(self.limit, 1))
        failures.append(now)

    def forget(self, name: str) -> None:
        self.failures.pop(name, None)


class LoginThrottle:
    def __init__(self, per_email: int, per_address: int, window_s: float) -> None:
        self._emails = _Window(per_email, window_s)
        self._addresses = _Window(per_address, window_s)

    def check(self, email: str, address: str) -> None:
        now = time.monotonic()
        wait = max(self._emails.wait_s(email, now), self._addresses.wait_s(address, now))
        if wait > 0:
            raise RateLimitError(
                "Too many failed sign-ins; try again later.",
                code="login_throttled",
                headers={"Retry-After": str(max(1, math.ceil(wait)))},
            )

    def failed(self, email: str, address: str) -> None:
        now = time.monotonic()
        self._emails.fail(email, now)
        self._addresses.fail(address, now)

    def succeeded(self, email: str) -> None:
        # The address keeps its failures: one right password must not reset a guesser's count for others' emails.
        self._emails.forget(email)
