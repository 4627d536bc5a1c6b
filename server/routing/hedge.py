"""Hedging a slow first token: when a stream's first content token is late, the next target starts in parallel.

"The Tail at Scale" (Dean and Barroso): a request slower than most is likely to be slow for a reason of its own
(a queue, a cold cache, a struggling replica), and a second copy sent elsewhere after a short delay answers it
sooner at the cost of a few extra requests. Per routing rule, `--hedge`:

    off       never: the target has its whole `ttft_timeout_s`, as before
    auto      after the target's own recent p95 time to first token, at least `hedge_floor_s`; before it has
              TTFT_SAMPLES_NEEDED answers on record, after `hedge_unmeasured_s` (the plane's default setting)
    SECONDS   after that many seconds

The first of the two to produce a content token wins and is relayed; the other is cancelled (its upstream
request closed, its node job cancelled) and recorded as a failed attempt (`hedge_lost`), never billed as a
completion. Only streams are hedged: a whole answer's headers come when the whole generation is done, so a second
copy would double the cost of every long answer; those are bounded by `upstream_header_timeout_s` instead.
"""

from __future__ import annotations

from server.routing.failover import FailoverPolicy
from server.routing.health import TargetStats

OFF = "off"
AUTO = "auto"


def parse_hedge(raw: str) -> str:
    """`off`, `auto` or a positive number of seconds, normalised; raises ValueError for anything else."""
    value = raw.strip().lower()
    if value in (OFF, AUTO):
        return value
    try:
        seconds = float(value)
    except ValueError:
        raise ValueError(f"hedge must be off, auto or a number of seconds, got {raw!r}") from None
    if not seconds > 0 or seconds == float("inf"):
        raise ValueError(f"hedge seconds must be a positive number, got {raw!r}")
    return f"{seconds:g}"


def hedge_delay(setting: str, policy: FailoverPolicy, stats: TargetStats) -> float | None:
    """How long a target's first content token may take before the next target is started; None: never."""
    if setting == OFF:
        return None
    if setting == AUTO:
        p95 = stats.ttft_p95()
        return policy.hedge_unmeasured_s if p95 is None else max(policy.hedge_floor_s, p95)
    return float(setting)
