"""Usage reports: requests, tokens, cost and latency grouped by model, route, key, node or day.

Read from the usage rows the batch writer stored (never on the request path). A request counts once, by its
final row; attempts that failed over have rows of their own and are reported apart as `failed_attempts`.
A group whose served requests were all unpriced reports `cost_usd: null` ("unpriced"), never 0; cache hits are
free, neither priced nor unpriced, so a group of unpriced requests and cache hits is unpriced too.

The database does the grouping (GROUP BY with SUM and COUNT), so a report's memory is one row per group however
many requests there were. Latency percentiles are exact: a window query ranks each group's latencies in the
database and returns only the two rows around each percentile, which are interpolated here as
`statistics.quantiles(method="inclusive")` does (SQLite has no percentile function; this works on both).
Tokens, cost and earnings count every billed request: served, or left by its client after tokens were generated.
Node earnings are the plane's own figures: the cost it recorded for each request a node served, from the
tokens it billed (held to its bounds, server.usage.metering) at the node's price (held to
server.nodes.bounds.MAX_PRICE).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import date, datetime
from typing import Any

from sqlalchemy import Engine, Table, and_, case, func, or_, select
from sqlalchemy.sql.elements import ColumnElement
from sqlmodel import Session

from server.errors import InvalidRequestError
from server.storage.models import ApiKey, Node, Org, UsageRecord
from server.storage.store import find_org

GROUPS = ("model", "route", "key", "node", "org", "day")
PERCENTILES = (50, 95)

_RECORDS: Table = UsageRecord.__table__  # type: ignore[attr-defined]
_KEYS: Table = ApiKey.__table__  # type: ignore[attr-defined]
_ORGS: Table = Org.__table__  # type: ignore[attr-defined]
_NODES: Table = Node.__table__  # type: ignore[attr-defined]
_record, _key, _org, _node = _RECORDS.c, _KEYS.c, _ORGS.c, _NODES.c
# Requests billed: served, or left by their client (499) after tokens were generated for them (server.relay).
_BILLED = and_(
    _record.final,
    or_(_record.status == 200, and_(_record.status == 499, _record.prompt_tokens + _record.completion_tokens > 0)),
)


def group_column(group: str) -> ColumnElement[Any]:
    """The SQL for one grouping, labelled as it is shown: names for keys and orgs, "-" for no route or node."""
    if group == "model":
        model: ColumnElement[Any] = _record.model
        return model
    if group == "route":
        return func.coalesce(func.nullif(_record.target, ""), "-")
    if group == "key":
        # A key's name, else its prefix; the key's id when the key is gone.
        return func.coalesce(func.nullif(_key.name, ""), _key.prefix, _record.key_id)
    if group == "node":
        return func.coalesce(func.nullif(_record.node_id, ""), "-")
    if group == "org":
        return func.coalesce(_org.name, _record.org_id)
    return func.date(_record.created_at)


def _shown(value: Any) -> str:
    # PostgreSQL's date() is a date; SQLite's a string.
    return value.isoformat() if isinstance(value, date) else str(value)


def usage_report(
    engine: Engine,
    *,
    org_ref: str | None,
    since: datetime | None,
    by: Sequence[str],
    key_ids: Sequence[str] | None = None,
) -> list[dict[str, Any]]:
    """Usage grouped `by`; with `key_ids`, of those keys only (a developer's own)."""
    unknown = [g for g in by if g not in GROUPS]
    if unknown:
        raise InvalidRequestError(f"cannot group by {', '.join(unknown)}; use {', '.join(GROUPS)}", param="by")
    groups = [group_column(g).label(f"g{i}") for i, g in enumerate(by)]
    served = and_(_record.final, _record.status == 200)
    with Session(engine) as session:
        where = _filters(session, org_ref, since, key_ids)
        source = _record_source(by)
        totals = select(
            *groups,
            func.count().label("rows"),
            _count(_record.final).label("requests"),
            _count(served).label("served"),
            func.sum(case((_BILLED, _record.prompt_tokens), else_=0)).label("prompt_tokens"),
            func.sum(case((_BILLED, _record.completion_tokens), else_=0)).label("completion_tokens"),
            func.sum(case((_BILLED, _record.cost_usd))).label("cost"),
            # A cache hit is recorded at 0.0: free, which says nothing about the price of what it replays.
            _count(and_(served, _record.cost_usd.is_not(None), _record.cache != "hit")).label("priced"),
            _count(and_(served, _record.cost_usd.is_(None))).label("unpriced"),
            _count(and_(served, _record.cache == "hit")).label("cache_hits"),
        ).select_from(source)
        if where is not None:
            totals = totals.where(where)
        if groups:
            totals = totals.group_by(*groups)
        summaries = {
            tuple(_shown(v) for v in row[: len(by)]): _summary(row) for row in session.execute(totals) if row.rows
        }
        served_here = and_(served, where) if where is not None else served
        for labels, latency in _percentiles(session, source, groups, served_here):
            # Rows written between the two queries (each reads the table as it is then) are left out.
            if labels in summaries:
                summaries[labels].update(latency)
    return [{**dict(zip(by, labels, strict=True)), **summaries[labels]} for labels in sorted(summaries)]


def _count(condition: ColumnElement[Any]) -> ColumnElement[Any]:
    return func.sum(case((condition, 1), else_=0))


def _filters(
    session: Session, org_ref: str | None, since: datetime | None, key_ids: Sequence[str] | None = None
) -> ColumnElement[bool] | None:
    conditions: list[ColumnElement[bool]] = []
    if key_ids is not None:
        conditions.append(_record.key_id.in_(key_ids))
    if org_ref:
        conditions.append(_record.org_id == find_org(session, org_ref).id)
    if since is not None:
        conditions.append(_record.created_at >= since)
    return and_(*conditions) if conditions else None


def _record_source(by: Sequence[str]) -> Any:
    source: Any = _RECORDS
    if "key" in by:
        source = source.outerjoin(_KEYS, _key.id == _record.key_id)
    if "org" in by:
        source = source.outerjoin(_ORGS, _org.id == _record.org_id)
    return source


def _summary(row: Any) -> dict[str, Any]:
    served, priced, unpriced = int(row.served), int(row.priced), int(row.unpriced)
    # No cost when nothing was served, or when what was served is unpriced and the rest free: its sum of 0.0 would
    # read as "cost nothing". Free cache hits alone do cost nothing.
    known = row.cost is not None and not (unpriced and not priced)
    return {
        "requests": int(row.requests),
        "errors": int(row.requests) - served,
        "failed_attempts": int(row.rows) - int(row.requests),
        "prompt_tokens": int(row.prompt_tokens or 0),
        "completion_tokens": int(row.completion_tokens or 0),
        "cost_usd": round(float(row.cost), 8) if known else None,
        "unpriced_requests": unpriced,
        "cache_hits": int(row.cache_hits),
        **{f"latency_p{q}_ms": None for q in PERCENTILES},
    }


def _percentiles(
    session: Session, source: Any, groups: list[Any], served: ColumnElement[Any]
) -> list[tuple[tuple[str, ...], dict[str, float]]]:
    """Each group's latency percentiles over its served requests, from the two ranked rows around each."""
    partition = [g.element for g in groups]
    ranked = (
        select(
            *groups,
            _record.latency_ms.label("latency"),
            (func.row_number().over(partition_by=partition or None, order_by=_record.latency_ms) - 1).label("pos"),
            func.count().over(partition_by=partition or None).label("n"),
        )
        .select_from(source)
        .where(served)
        .subquery()
    )
    # The rows at j and j+1 for j = q * (n - 1) // 100, in integer arithmetic that every dialect agrees on.
    around = or_(
        *(
            and_(ranked.c.pos * 100 + 100 > q * (ranked.c.n - 1), ranked.c.pos * 100 - 100 <= q * (ranked.c.n - 1))
            for q in PERCENTILES
        )
    )
    picked = select(*(ranked.c[f"g{i}"] for i in range(len(groups))), ranked.c.pos, ranked.c.n, ranked.c.latency)
    found: dict[tuple[str, ...], tuple[int, dict[int, float]]] = {}
    for row in session.execute(picked.where(around)):
        labels = tuple(_shown(v) for v in row[: len(groups)])
        found.setdefault(labels, (int(row.n), {}))[1][int(row.pos)] = float(row.latency)
    return [(labels, _interpolated(n, at)) for labels, (n, at) in found.items()]


def _interpolated(n: int, at: dict[int, float]) -> dict[str, float]:
    """`statistics.quantiles(data, n=100, method="inclusive")[q - 1]`, from the ranked values it reads."""
    result = {}
    for q in PERCENTILES:
        if n == 1:
            value = at[0]
        else:
            j, delta = divmod(q * (n - 1), 100)
            value = (at[j] * (100 - delta) + at[j + 1] * delta) / 100
        result[f"latency_p{q}_ms"] = round(value, 2)
    return result


EARNINGS_GROUPS = ("node", "org")
# Rows served by a node, with the node and the org that owns it (if it still exists).
_NODE_ROWS = _RECORDS.join(_NODES, _node.id == _record.node_id).outerjoin(_ORGS, _org.id == _node.org_id)


def earnings_report(
    engine: Engine, *, org_ref: str | None, since: datetime | None, by: str, node_ids: Sequence[str] | None = None
) -> list[dict[str, Any]]:
    """What nodes served and earned at their own prices, per node or per contributing org (the node's owner);
    with `node_ids`, of those nodes only (a provider's own)."""
    if by not in EARNINGS_GROUPS:
        raise InvalidRequestError(f"earnings group by {', '.join(EARNINGS_GROUPS)}", param="by")
    owner = func.coalesce(_org.name, _node.org_id)
    labels: list[Any] = [_node.id, _node.name, owner] if by == "node" else [owner]
    columns = ("node_id", "node", "org") if by == "node" else ("org",)
    with Session(engine) as session:
        query = (
            select(
                *labels,
                func.count().label("requests"),
                func.sum(_record.prompt_tokens).label("prompt_tokens"),
                func.sum(_record.completion_tokens).label("completion_tokens"),
                func.sum(_record.cost_usd).label("earned"),
                func.count(_record.cost_usd).label("priced"),
            )
            .select_from(_NODE_ROWS)
            .where(_BILLED)
            .group_by(*labels)
        )
        if org_ref:
            query = query.where(_node.org_id == find_org(session, org_ref).id)
        if since is not None:
            query = query.where(_record.created_at >= since)
        if node_ids is not None:
            query = query.where(_node.id.in_(node_ids))
        rows = list(session.execute(query))
    result = []
    for row in sorted(rows, key=lambda r: tuple(r[: len(columns)])):
        requests, priced = int(row.requests), int(row.priced)
        result.append(
            {
                **dict(zip(columns, row[: len(columns)], strict=True)),
                "requests": requests,
                "prompt_tokens": int(row.prompt_tokens or 0),
                "completion_tokens": int(row.completion_tokens or 0),
                "earned_usd": round(float(row.earned), 8) if priced else None,
                "unpriced_requests": requests - priced,
            }
        )
    return result
