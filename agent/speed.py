"""Generation speed measured on the node's own jobs, which the agent reports in Status (ModelLoad.tokens_per_s).

The plane routes by what a node measured, not only by what it claims: a GPU the agent cannot use, a busy owner or
a slow disk all show here. A job's speed is its tokens after the first over the time after the first, so that the
prompt's evaluation (which depends on the prompt, not on the machine's decode speed) is left out. Only jobs with
at least `MIN_TOKENS` generated tokens count (a short answer's rate is mostly noise), and cancelled ones do not
(a cancel's latency is no part of generating). Recent jobs weigh most: an exponentially weighted average, which
follows a change (another model loaded, the owner's game started) within a few jobs.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass

# Jobs with fewer generated tokens than this are not measured.
MIN_TOKENS = 8
# The weight of the newest job in the average; the first measured job sets it alone.
ALPHA = 0.3


@dataclass(frozen=True)
class Speed:
    tokens_per_s: float
    jobs: int


class SpeedMeter:
    """Per model: the average tokens/s over its measured jobs, and how many were measured. Thread-safe."""

    def __init__(self, *, min_tokens: int = MIN_TOKENS, alpha: float = ALPHA) -> None:
        self.min_tokens = min_tokens
        self.alpha = alpha
        self._speeds: dict[str, Speed] = {}
        self._lock = threading.Lock()

    def record(self, model: str, tokens: int, seconds_after_first: float) -> bool:
        """One finished job: `tokens` generated, the last `tokens - 1` of them in `seconds_after_first`. True when
        it was measured (long enough, and a sane duration)."""
        if tokens < self.min_tokens or not (math.isfinite(seconds_after_first) and seconds_after_first > 0):
            return False
        rate = (tokens - 1) / seconds_after_first
        with self._lock:
            previous = self._speeds.get(model)
            if previous is None:
                self._speeds[model] = Speed(rate, 1)
            else:
                average = self.alpha * rate + (1 - self.alpha) * previous.tokens_per_s
                self._speeds[model] = Speed(average, previous.jobs + 1)
        return True

    def get(self, model: str) -> Speed | None:
        with self._lock:
            return self._speeds.get(model)
