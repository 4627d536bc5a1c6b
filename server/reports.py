"""Usage reports: requests, tokens, cost and latency grouped by model, route, key, node or day.

Read from the usage rows the batch writer stored (never on the request path). A request counts once, by its
final row; attempts that failed over have rows of their own and are reported apart as `failed_attempts`.
A group whose served requests were all unpriced reports `cost_usd: null` ("unpriced"), never 0.
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import Engine
from sqlmodel import Session, col, select

from server.errors import InvalidRequestError
from server.storage.models import ApiKey, Node, Org, UsageRecord
from server.storage.store import find_org

GROUPS = ("model", "route", "key", "node", "org", "day")


def _group_value(row: UsageRecord, group: str, key_names: dict[str, str], org_names: dict[str, str]) -> str:
    if group == "model":
        return row.model
    if group == "route":
        return row.target or "-"
    if group == "key":
        return key_names.get(row.key_id, row.key_id)
    if group == "node":
        return row.node_id or "-"
    if group == "org":
        return org_names.get(row.org_id, row.org_id)
    return row.created_at.date().isoformat()


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    if len(values) == 1:
        return round(values[0], 2)
    return round(statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1], 2)


def usage_report(
    engine: Engine, *, org_ref: str | None, since: datetime | None, by: Sequence[str]
) -> list[dict[str, Any]]:
    unknown = [g for g in by if g not in GROUPS]
    if unknown:
        raise InvalidRequestError(f"cannot group by {', '.join(unknown)}; use {', '.join(GROUPS)}", param="by")
    with Session(engine) as session:
        query = select(UsageRecord)
        if org_ref:
            query = query.where(UsageRecord.org_id == find_org(session, org_ref).id)
        if since is not None:
            query = query.where(col(UsageRecord.created_at) >= since)
        rows = list(session.exec(query))
        key_names = {k.id: k.name or k.prefix for k in session.exec(select(ApiKey))}
        org_names = {o.id: o.name for o in session.exec(select(Org))}
    groups: dict[tuple[str, ...], list[UsageRecord]] = defaultdict(list)
    for row in rows:
        groups[tuple(_group_value(row, g, key_names, org_names) for g in by)].append(row)
    return [_summarise(dict(zip(by, values, strict=True)), group) for values, group in sorted(groups.items())]


def _cost(served: list[UsageRecord]) -> tuple[float | None, int]:
    """USD of the served rows, None when none was priced (unpriced is not free), and how many were unpriced."""
    costs = [r.cost_usd for r in served if r.cost_usd is not None]
    return (round(sum(costs), 8) if costs else None), len(served) - len(costs)


def _summarise(labels: dict[str, str], rows: list[UsageRecord]) -> dict[str, Any]:
    final = [r for r in rows if r.final]
    served = [r for r in final if r.status == 200]
    cost, unpriced = _cost(served)
    latencies = [r.latency_ms for r in served]
    return {
        **labels,
        "requests": len(final),
        "errors": len(final) - len(served),
        "failed_attempts": len(rows) - len(final),
        "prompt_tokens": sum(r.prompt_tokens for r in served),
        "completion_tokens": sum(r.completion_tokens for r in served),
        "cost_usd": cost,
        "unpriced_requests": unpriced,
        "cache_hits": sum(1 for r in served if r.cache == "hit"),
        "latency_p50_ms": _percentile(latencies, 50),
        "latency_p95_ms": _percentile(latencies, 95),
    }


EARNINGS_GROUPS = ("node", "org")


def earnings_report(engine: Engine, *, org_ref: str | None, since: datetime | None, by: str) -> list[dict[str, Any]]:
    """What nodes served and earned at their own prices, per node or per contributing org (the node's owner)."""
    if by not in EARNINGS_GROUPS:
        raise InvalidRequestError(f"earnings group by {', '.join(EARNINGS_GROUPS)}", param="by")
    with Session(engine) as session:
        query = select(UsageRecord, Node).join(Node, col(Node.id) == col(UsageRecord.node_id))
        query = query.where(col(UsageRecord.final), UsageRecord.status == 200)
        if org_ref:
            query = query.where(Node.org_id == find_org(session, org_ref).id)
        if since is not None:
            query = query.where(col(UsageRecord.created_at) >= since)
        pairs = list(session.exec(query))
        org_names = {o.id: o.name for o in session.exec(select(Org))}
    groups: dict[tuple[str, ...], list[UsageRecord]] = defaultdict(list)
    for row, node in pairs:
        owner = org_names.get(node.org_id, node.org_id)
        label: tuple[str, ...] = (node.id, node.name, owner) if by == "node" else (owner,)
        groups[label].append(row)
    columns = ("node_id", "node", "org") if by == "node" else ("org",)
    result = []
    for label, rows in sorted(groups.items()):
        earned, unpriced = _cost(rows)
        result.append(
            {
                **dict(zip(columns, label, strict=True)),
                "requests": len(rows),
                "prompt_tokens": sum(r.prompt_tokens for r in rows),
                "completion_tokens": sum(r.completion_tokens for r in rows),
                "earned_usd": earned,
                "unpriced_requests": unpriced,
            }
        )
    return result
