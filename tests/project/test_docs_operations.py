"""docs/operations.md's metrics table lists every metric the plane exports, as the metrics module registers them."""

from __future__ import annotations

import re

from server.metrics import Metrics
from server.nodes.registry import NodeRegistry
from server.serving.overload import LoadShedder
from tests.conftest import REPO

DOC = REPO / "docs" / "operations.md"


def exported() -> set[str]:
    """Every metric family a plane's /metrics serves, by the name a scrape shows (counters with `_total`)."""
    metrics = Metrics()
    metrics.watch(LoadShedder(max_in_flight=1, lag_limit_s=0.01))
    metrics.watch_nodes(NodeRegistry(queue_size=1, queue_timeout_s=1.0, cancel_timeout_s=1.0))
    return {
        f"{family.name}_total" if family.type == "counter" else family.name for family in metrics.registry.collect()
    }


def documented() -> set[str]:
    return set(re.findall(r"^\| `(hatchway_\w+)` \|", DOC.read_text(), flags=re.MULTILINE))


def test_every_exported_metric_is_documented() -> None:
    assert sorted(exported() - documented()) == []


def test_every_documented_metric_is_exported() -> None:
    assert sorted(documented() - exported()) == []
