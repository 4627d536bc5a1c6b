"""Prometheus metrics, one registry per plane so several planes (tests) can live in one process."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from server.nodes.registry import NodeRegistry
    from server.serving.overload import LoadShedder

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
        # A plain int read when scraped: a Gauge's inc/dec take a lock twice per request.
        self.in_flight = 0
        Gauge("hatchway_requests_in_flight", "Requests being served now.", registry=self.registry).set_function(
            lambda: self.in_flight
        )
        # The labelled children of `requests` and `latency` by (route, status), looked up once each:
        # `labels()` builds and locks on every call.
        self._served: dict[tuple[str, int], tuple[Counter, Histogram]] = {}
        self.upstream_errors = Counter(
            "hatchway_upstream_errors",
            "Failed attempts against a target, by target and error code.",
            ("target", "code"),
            registry=self.registry,
        )
        self.retry_waits = Counter(
            "hatchway_retry_wait_seconds",
            "Seconds requests waited before retrying a target: its Retry-After, or backoff.",
            ("target",),
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
            "Usage rows dropped: the writer queue was full, or the database refused the row.",
            registry=self.registry,
        )
        self.usage_claims_clamped = Counter(
            "hatchway_usage_claims_clamped",
            "Usage reported by a target beyond what the request allowed or received, billed only up to the bound.",
            ("target_kind",),
            registry=self.registry,
        )
        self.requests_shed = Counter(
            "hatchway_requests_shed",
            "API requests refused with 503 at once because the plane was overloaded.",
            registry=self.registry,
        )
        self.protocol_errors = Counter(
            "hatchway_http_protocol_errors",
            "Malformed HTTP requests (bad request line, header or URL too long, invalid framing), by status.",
            ("status",),
            registry=self.registry,
        )
        self.connections_timed_out = Counter(
            "hatchway_connections_timed_out",
            "Client connections closed for sending a request too slowly, by phase (header, body).",
            ("phase",),
            registry=self.registry,
        )
        self.connections_capped = Counter(
            "hatchway_connections_capped",
            "Connections closed at accept: their client address held max_connections_per_ip already.",
            registry=self.registry,
        )
        self.usage_written = Counter(
            "hatchway_usage_rows_written", "Usage rows written to the database.", registry=self.registry
        )

    def served(self, route: str, status: int, seconds: float) -> None:
        """Count one answered request and its duration."""
        children = self._served.get((route, status))
        if children is None:
            children = self._served[(route, status)] = (
                self.requests.labels(route, str(status)),
                self.latency.labels(route),
            )
        children[0].inc()
        children[1].observe(seconds)

    def watch(self, shedder: LoadShedder) -> None:
        """Gauges read when scraped: the load shedder's view, and the loop's task count (a leak shows here)."""
        Gauge("hatchway_event_loop_lag_seconds", "Smoothed event-loop lag.", registry=self.registry).set_function(
            lambda: shedder.lag_s
        )
        Gauge("hatchway_event_loop_tasks", "Tasks alive on the event loop.", registry=self.registry).set_function(
            _task_count
        )

    def watch_nodes(self, nodes: NodeRegistry) -> None:
        """Each node of the gateway, this plane's and those of other planes, with the plane it is connected to."""
        self.registry.register(NodeCollector(nodes))


class NodeCollector(Collector):
    def __init__(self, nodes: NodeRegistry) -> None:
        self.nodes = nodes

    def collect(self) -> Iterator[Metric]:
        info = GaugeMetricFamily(
            "hatchway_node_connected",
            "1 for each node connected to a plane of the gateway, labelled with that plane and the node's state.",
            labels=("node", "org", "plane", "state"),
        )
        slots = GaugeMetricFamily(
            "hatchway_node_slots",
            "A node's slots for one model: total, and busy as the node's plane counts them.",
            labels=("node", "model", "plane", "kind"),
        )
        speed = GaugeMetricFamily(
            "hatchway_node_tokens_per_second",
            "A node's generation speed for one model, measured on its own jobs (absent until measured).",
            labels=("node", "model", "plane"),
        )
        for session in self.nodes.every_session():
            info.add_metric((session.node_id, session.org_id, session.plane, session.state), 1)
            for model in session.models.values():
                slots.add_metric((session.node_id, model.name, session.plane, "total"), model.slots_total)
                slots.add_metric((session.node_id, model.name, session.plane, "busy"), model.busy)
                if model.tokens_per_s:
                    speed.add_metric((session.node_id, model.name, session.plane), model.tokens_per_s)
        yield info
        yield slots
        yield speed


def _task_count() -> int:
    try:
        return len(asyncio.all_tasks())
    except RuntimeError:  # scraped from outside a running loop
        return 0
