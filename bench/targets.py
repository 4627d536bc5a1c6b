"""The issue's targets (figures, not tests), checked against one run's results.

Each check gives the measured figure, the target, and met / NOT met / n/a (the benchmark did not run, or the
figure cannot be measured yet). Nothing here fails the run: the table is for people.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

MIB_PER_MB = 1e6 / 2**20


def _gateway_row(results: dict[str, Any], target: str, mode: str, concurrency: int) -> dict[str, Any] | None:
    for row in results.get("gateway", {}).get("rows", []):
        if (row["target"], row["mode"], row["concurrency"]) == (target, mode, concurrency):
            return dict(row)
    return None


def _check(
    name: str, measured: float | None, target: str, ok: Callable[[float], bool], unit: str, digits: int = 2
) -> dict[str, Any]:
    return {
        "target": name,
        "measured": None if measured is None else round(measured, digits),
        "unit": unit,
        "goal": target,
        "met": None if measured is None else bool(ok(measured)),
    }


def evaluate(results: dict[str, Any]) -> list[dict[str, Any]]:
    checks: list[dict[str, Any]] = []
    for mode in ("non-stream", "stream"):
        hatchway, relay = _gateway_row(results, "hatchway", mode, 32), _gateway_row(results, "relay", mode, 32)
        ratio = 100 * hatchway["rps"] / relay["rps"] if hatchway and relay and relay["rps"] else None
        checks.append(_check(f"req/s at c=32, {mode}, % of bare relay", ratio, ">= 70%", lambda v: v >= 70, "%", 1))
    for mode in ("non-stream", "stream"):
        row = _gateway_row(results, "hatchway", mode, 1)
        added50 = row["added_p50_ms"] if row else None
        added99 = row["added_p99_ms"] if row else None
        checks.append(_check(f"added p50 at c=1, {mode}", added50, "<= 0.8 ms", lambda v: v <= 0.8, "ms"))
        checks.append(_check(f"added p99 at c=1, {mode}", added99, "<= 2 ms", lambda v: v <= 2.0, "ms"))
    for mode in ("non-stream", "stream"):
        row = _gateway_row(results, "hatchway", mode, 128)
        checks.append(
            _check(f"p99 at c=128, {mode}", row["p99_ms"] if row else None, "<= 200 ms", lambda v: v <= 200, "ms", 1)
        )
    overload = results.get("overload", {})
    refused = overload.get("refused", {})
    refused_p99 = refused.get("p99_ms") if refused.get("count") else None
    checks.append(
        _check(
            "overload at 2x: 429/503 p99 latency",
            refused_p99,
            "<= 10 ms, with Retry-After",
            lambda v: v <= 10 and refused.get("with_retry_after") == refused.get("count"),
            "ms",
        )
        | ({"note": "no request was refused"} if overload and refused_p99 is None else {})
    )
    if overload:
        checks.append(
            _check(
                "overload at 2x: p99 of served",
                overload["served"]["p99_ms"],
                "bounded (<= 200 ms)",
                lambda v: v <= 200,
                "ms",
                1,
            )
        )
    peaks = [r["peak_rss_mib"] for r in results.get("gateway", {}).get("rows", []) if r["target"] == "hatchway"]
    checks.append(
        _check("plane RSS under load (peak)", max(peaks) if peaks else None, "<= 100 MiB", lambda v: v <= 100, "MiB", 1)
    )
    ready = results.get("gateway", {}).get("contenders", {}).get("hatchway", {}).get("ready_s")
    checks.append(_check("ready to serve after start", ready, "<= 1 s", lambda v: v <= 1.0, "s"))
    llama = results.get("node", {}).get("llama")
    checks.append(
        _check(
            "node path: added TTFT (p50)",
            llama["added_ttft_ms"]["p50"] if llama else None,
            "<= 5 ms",
            lambda v: v <= 5,
            "ms",
        )
    )
    checks.append(
        _check(
            "node path: tokens/s vs direct (p50)",
            100 * llama["tokens_per_s_ratio"]["p50"] if llama else None,
            ">= 97%",
            lambda v: v >= 97,
            "%",
            1,
        )
    )
    stages = {s["agents"]: s for s in results.get("fleet", {}).get("stages", [])}
    fleet = stages.get(1000)
    checks.append(
        _check(
            "1,000 agents: plane memory they cost",
            fleet["plane_rss_growth_mib"] / MIB_PER_MB if fleet else None,
            "<= 300 MB",
            lambda v: v <= 300,
            "MB",
            1,
        )
    )
    soak = results.get("soak", {})
    checks.append(
        _check("soak: RSS growth after warm-up", soak.get("rss_growth_percent"), "< 5%", lambda v: v < 5, "%")
    )
    checks.append(_check("soak: fd growth after warm-up", soak.get("fds_growth"), "0", lambda v: v <= 0, "fds", 0))
    checks.append(
        _check("soak: task growth after warm-up", soak.get("tasks_growth"), "0", lambda v: v <= 0, "tasks", 0)
        | ({"note": soak["tasks_note"]} if soak.get("tasks_note") else {})
    )
    # A soak whose requests were refused measured an idle plane: its growth figures say nothing then.
    unexpected = sum(soak["unexpected"].values()) if "unexpected" in soak else None
    checks.append(_check("soak: unexpected answers", unexpected, "0", lambda v: v <= 0, "answers", 0))
    return checks


BENCH_OF = (
    ("req/s at", "gateway"),
    ("added p", "gateway"),
    ("p99 at c=128", "gateway"),
    ("plane RSS", "gateway"),
    ("ready", "gateway"),
    ("overload", "overload"),
    ("node path", "node"),
    ("1,000 agents", "fleet"),
    ("soak", "soak"),
)


def bench_of(check: dict[str, Any]) -> str:
    return next(bench for prefix, bench in BENCH_OF if check["target"].startswith(prefix))


def format_table(checks: list[dict[str, Any]], selected: list[str] | None = None) -> str:
    if selected is not None:
        checks = [c for c in checks if bench_of(c) in selected]
    if not checks:
        return "(no target is measured by the benchmarks that ran)"
    width = max(len(c["target"]) for c in checks)
    header = f"{'target':{width}} {'measured':>12} {'goal':>26} {'':8}"
    lines = [header, "-" * len(header)]
    for check in checks:
        measured = "n/a" if check["measured"] is None else f"{check['measured']} {check['unit']}"
        verdict = {True: "met", False: "NOT met", None: "n/a"}[check["met"]]
        lines.append(f"{check['target']:{width}} {measured:>12} {check['goal']:>26} {verdict:8}")
        if check.get("note"):
            lines.append(f"{'':{width}}   ({check['note']})")
    return "\n".join(lines)
