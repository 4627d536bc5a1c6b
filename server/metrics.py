"""Prometheus metrics, one registry per plane so several planes (tests) can live in one process."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

if TYPE_CHECKING:
    from server.overload import LoadShedder

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "hatchway_requests",
            "HTTP requests served, by route and status.",
            ("route", "status"),
            registry=self.registry,
        )
        self.latency = Histogram(
            "hatchway_request_duration_seconds",
            "Time to serve a request (to the last byte).",
            ("route",),
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.in_flight = Gauge("hatchway_requests_in_flight", "Requests being served now.", registry=self.registry)
        self.upstream_errors = Counter(
            "hatchway_upstream_errors",
            "Failed attempts against a target, by target and error code.",
            ("target", "code"),
            registry=self.registry,
        )
        self.malformed_chunks = Counter(
            "hatchway_malformed_chunks",
            "Stream chunks from a target that were not valid JSON.",
            ("target",),
            registry=self.registry,
        )
        self.usage_dropped = Counter(
            "hatchway_usage_rows_dropped",
            "Usage rows dropped because the writer queue was full.",
            registry=self.registry,
        )
        self.requests_shed = Counter(
            "hatchway_requests_shed",
            "API requests refused with 503 at once because the plane was overloaded.",
            registry=self.registry,
        )
        self.usage_written = Counter(
            "hatchway_usage_rows_written", "Usage rows written to the database.", registry=self.registry
        )

    def watch(self, shedder: LoadShedder) -> None:
        """Gauges read when scraped: the load shedder's view, and the loop's task count (a leak shows here)."""
        Gauge("hatchway_event_loop_lag_seconds", "Smoothed event-loop lag.", registry=self.registry).set_function(
            lambda: shedder.lag_s
        )
        Gauge("hatchway_event_loop_tasks", "Tasks alive on the event loop.", registry=self.registry).set_function(
            _task_count
        )


def _task_count() -> int:
    try:
        return len(asyncio.all_tasks())
    except RuntimeError:  # scraped from outside a running loop
        return 0
