"""What the console's overview charts and playground read, under /admin/v1/console/.

GET /admin/v1/console/stats?period=1h|24h|7d|30d&by=model|route|key|node[&org=]
    Requests, errors, tokens, cost, latency and time-to-first-token percentiles over the period: as a time series
    (fixed buckets), per group, and in total; plus live figures (requests in flight, nodes and their slots).
GET /admin/v1/console/info
    What the console needs to know about the plane (the node service port, for the enrollment commands).
GET /admin/v1/console/requests/{request_id}
    The usage row of one request (its route, attempts, tokens, cost, TTFT as recorded): a streamed answer's cost
    is known only once it ended, so the playground reads it here.

Everything is read from the usage store in a worker thread (never on the request path), scoped to what the
principal may see: its org, and for a developer only the requests of their own keys.

Percentiles come from histograms the database builds (GROUP BY time bucket and latency bin, both CASE
expressions every dialect runs), so a period of millions of requests costs a few thousand rows. The bins grow by
BIN_GROWTH, and a percentile is interpolated inside its bin, geometrically: it is within BIN_GROWTH - 1 (12%) of
the exact value, like Prometheus's histogram_quantile. The CLI's usage report stays exact (server.usage.reports).
"""

from __future__ import annotations

import asyncio
import math
from collections import defaultdict
from dataclasses import dataclass, fields
from datetime import UTC, datetime, timedelta
from typing import Any

from aiohttp import web
from sqlalchemy import Engine, Table, and_, case, func, or_, select
from sqlalchemy.sql.elements import ColumnElement
from sqlmodel import Session

from server.accounts import Principal, admin_principal
from server.api.resources import CONFIG, ENGINE, METRICS, NODE_PORT, REGISTRY, SNAPSHOTS
from server.errors import InvalidRequestError, NotFoundError
from server.metrics import Metrics
from server.nodes.registry import NodeRegistry
from server.policy.cache import CACHE_MODES
from server.policy.limits import LIMIT_FIELDS
from server.routing.failover import FailoverPolicy
from server.routing.rules import STRATEGIES
from server.storage.models import ApiKey, UsageRecord
from server.usage.reports import group_column

# period -> (length, bucket count): about 50 to 60 points per chart.
PERIODS: dict[str, tuple[timedelta, int]] = {
    "1h": (timedelta(hours=1), 60),
    "24h": (timedelta(hours=24), 48),
    "7d": (timedelta(days=7), 56),
    "30d": (timedelta(days=30), 60),
}
GROUPS = ("model", "route", "key", "node")
QUANTILES = (50, 95, 99)
# Histogram bins (milliseconds): 1 ms, then each BIN_GROWTH times the last, up to about 10 minutes.
BIN_GROWTH = 1.12
BIN_EDGES: tuple[float, ...] = tuple(round(BIN_GROWTH**i, 3) for i in range(int(math.log(600_000, BIN_GROWTH)) + 2))
# Groups listed in a chart's table, the busiest first.
GROUPS_SHOWN = 20

_RECORDS: Table = UsageRecord.__table__  # type: ignore[attr-defined]
_KEYS: Table = ApiKey.__table__  # type: ignore[attr-defined]
_record, _key = _RECORDS.c, _KEYS.c
_SERVED = and_(_record.final, _record.status == 200)
# Billed as server.usage.reports counts it: served, or left by the client after tokens were generated.
_BILLED = and_(
    _record.final,
    or_(_record.status == 200, and_(_record.status == 499, _record.prompt_tokens + _record.completion_tokens > 0)),
)


@dataclass(frozen=True)
class Scope:
    """Which usage rows a principal may read: an org's (None: every org), and only one account's keys' rows."""

    org_id: str | None
    owner_account_id: str | None


def _bin(column: Any) -> ColumnElement[Any]:
    """The histogram bin of a latency: the index of the first edge at or above it."""
    return case(*((column <= edge, i) for i, edge in enumerate(BIN_EDGES)), else_=len(BIN_EDGES))


def _bucket(since: datetime, width: timedelta, count: int) -> ColumnElement[Any]:
    """The time bucket of a row, counted from `since`."""
    return case(*((_record.created_at >= since + width * i, i) for i in reversed(range(count))), else_=-1)


def quantile(histogram: dict[int, int], q: float) -> float | None:
    """The q-th percentile of a histogram over BIN_EDGES, interpolated geometrically inside its bin."""
    total = sum(histogram.values())
    if not total:
        return None
    rank = q / 100 * total
    seen = 0
    for index in sorted(histogram):
        count = histogram[index]
        if seen + count >= rank:
            low = BIN_EDGES[index - 1] if 0 < index <= len(BIN_EDGES) else (0.0 if index == 0 else BIN_EDGES[-1])
            high = BIN_EDGES[index] if index < len(BIN_EDGES) else BIN_EDGES[-1] * BIN_GROWTH
            share = (rank - seen) / count
            value = low * (high / low) ** share if low > 0 else high * share
            return round(value, 1)
        seen += count
    return None


def _empty() -> dict[str, Any]:
    return {"requests": 0, "errors": 0, "prompt_tokens": 0, "completion_tokens": 0, "cost_usd": None}


def _add(into: dict[str, Any], row: Any) -> None:
    into["requests"] += int(row.requests or 0)
    into["errors"] += int(row.requests or 0) - int(row.served or 0)
    into["prompt_tokens"] += int(row.prompt_tokens or 0)
    into["completion_tokens"] += int(row.completion_tokens or 0)
    if row.cost is not None:
        into["cost_usd"] = round((into["cost_usd"] or 0.0) + float(row.cost), 8)


def _percentiles(prefix: str, histogram: dict[int, int]) -> dict[str, float | None]:
    return {f"{prefix}_p{q}_ms": quantile(histogram, q) for q in QUANTILES}


def _binned(rows: list[Any]) -> dict[Any, dict[int, int]]:
    """(key, bin, count) rows as one histogram per key."""
    found: dict[Any, dict[int, int]] = defaultdict(dict)
    for key, index, n in rows:
        found[key][int(index)] = found[key].get(int(index), 0) + int(n)
    return found


@dataclass
class _Read:
    """What the database answered: sums per time bucket and per group, and latency/TTFT histograms of each."""

    by_bucket: list[Any]
    by_group: list[Any]
    histograms: dict[str, list[Any]]


def _read(engine: Engine, scope: Scope, since: datetime, width: timedelta, count: int, by: str) -> _Read:
    conditions: list[ColumnElement[bool]] = [_record.created_at >= since]
    if scope.org_id is not None:
        conditions.append(_record.org_id == scope.org_id)
    source: Any = _RECORDS.outerjoin(_KEYS, _key.id == _record.key_id)
    if scope.owner_account_id is not None:
        # A developer's own requests: those of the keys their account owns (server.accounts).
        conditions.append(_key.owner_account_id == scope.owner_account_id)
    where = and_(*conditions)
    bucket = _bucket(since, width, count).label("bucket")
    group = group_column(by).label("grp")
    sums = (
        func.sum(case((_record.final, 1), else_=0)).label("requests"),
        func.sum(case((_SERVED, 1), else_=0)).label("served"),
        func.sum(case((_BILLED, _record.prompt_tokens), else_=0)).label("prompt_tokens"),
        func.sum(case((_BILLED, _record.completion_tokens), else_=0)).label("completion_tokens"),
        func.sum(case((_BILLED, _record.cost_usd))).label("cost"),
    )
    latency_bin = _bin(_record.latency_ms).label("bin")
    ttft_bin = _bin(_record.ttft_ms).label("bin")
    streamed = and_(_SERVED, _record.ttft_ms.is_not(None))
    with Session(engine) as session:
        by_bucket = list(session.execute(select(bucket, *sums).select_from(source).where(where).group_by(bucket)))
        by_group = list(session.execute(select(group, *sums).select_from(source).where(where).group_by(group)))
        histograms: dict[str, list[Any]] = {}
        for name, keys, bin_column, served in (
            ("latency_bucket", bucket, latency_bin, _SERVED),
            ("ttft_bucket", bucket, ttft_bin, streamed),
            ("latency_group", group, latency_bin, _SERVED),
            ("ttft_group", group, ttft_bin, streamed),
        ):
            query = (
                select(keys, bin_column, func.count().label("n"))
                .select_from(source)
                .where(and_(where, served))
                .group_by(keys, bin_column)
            )
            histograms[name] = list(session.execute(query))
    return _Read(by_bucket, by_group, histograms)


def usage_stats(engine: Engine, scope: Scope, period: str, by: str, now: datetime) -> dict[str, Any]:
    length, count = PERIODS[period]
    width = length / count
    since = now - length
    read = _read(engine, scope, since, width, count, by)

    no_percentiles = {f"{kind}_p{q}_ms": None for kind in ("latency", "ttft") for q in QUANTILES}
    series = [{"t": (since + width * i).isoformat(), **_empty(), **no_percentiles} for i in range(count)]
    total = _empty()
    for row in read.by_bucket:
        if 0 <= row.bucket < count:
            _add(series[row.bucket], row)
            _add(total, row)
    groups: dict[str, dict[str, Any]] = {}
    for row in read.by_group:
        _add(groups.setdefault(str(row.grp), {**_empty(), **no_percentiles}), row)

    for kind in ("latency", "ttft"):
        merged: dict[int, int] = defaultdict(int)
        for index, histogram in _binned(read.histograms[f"{kind}_bucket"]).items():
            if 0 <= index < count:
                series[index].update(_percentiles(kind, histogram))
                for b, n in histogram.items():
                    merged[b] += n
        total.update(_percentiles(kind, merged))
        for name, histogram in _binned(read.histograms[f"{kind}_group"]).items():
            if str(name) in groups:
                groups[str(name)].update(_percentiles(kind, histogram))
    busiest = sorted(groups.items(), key=lambda item: (-item[1]["requests"], item[0]))[:GROUPS_SHOWN]
    return {
        "object": "console.stats",
        "period": period,
        "by": by,
        "since": since.isoformat(),
        "until": now.isoformat(),
        "bucket_s": int(width.total_seconds()),
        "totals": total,
        "series": series,
        "groups": [{"name": name, **figures} for name, figures in busiest],
    }


def live_figures(metrics: Metrics, registry: NodeRegistry, org_id: str | None) -> dict[str, Any]:
    """What the plane's counters say now (server.metrics), for the whole plane, and its nodes in scope."""
    served = errors = 0
    for metric in metrics.requests.collect():
        for sample in metric.samples:
            if sample.name.endswith("_total") and sample.labels.get("route", "").startswith("/v1/"):
                served += int(sample.value)
                if sample.labels.get("status", "200") >= "400":
                    errors += int(sample.value)
    states: dict[str, int] = defaultdict(int)
    slots_busy = slots_total = 0
    for session in registry.every_session():
        if org_id is not None and session.org_id != org_id:
            continue
        states[session.state] += 1
        for model in session.models.values():
            slots_busy += model.busy
            slots_total += model.slots_total
    live: dict[str, Any] = {"nodes": dict(states), "slots_busy": slots_busy, "slots_total": slots_total}
    if org_id is None:
        # The plane's own counters are the whole plane's traffic: a plane admin's business only.
        live |= {"in_flight": metrics.in_flight, "api_requests": served, "api_errors": errors}
    return live


def _org_id(request: web.Request, principal: Principal, ref: str | None) -> str | None:
    """The org the caller asked about (id or name), or its own when it has one."""
    if ref:
        org_id = request.app[SNAPSHOTS].current.org_id(ref)
        if org_id is None:
            raise InvalidRequestError(f"no org {ref!r}", param="org")
        return org_id
    return principal.org_scope


def _scope(principal: Principal, request: web.Request) -> Scope:
    org_id = _org_id(request, principal, request.query.get("org"))
    principal.require("usage.read", org_id=org_id)
    # A developer's usage is the usage of their own keys (server.accounts.roles).
    return Scope(org_id, principal.owner_scope)


async def overview(request: web.Request) -> web.Response:
    principal = await admin_principal(request)
    scope = _scope(principal, request)
    period = request.query.get("period", "24h")
    if period not in PERIODS:
        raise InvalidRequestError(f"period must be one of {', '.join(PERIODS)}", param="period")
    by = request.query.get("by", "model")
    if by not in GROUPS:
        raise InvalidRequestError(f"by must be one of {', '.join(GROUPS)}", param="by")
    now = datetime.now(UTC)
    stats = await asyncio.to_thread(usage_stats, request.app[ENGINE], scope, period, by, now)
    stats["live"] = live_figures(request.app[METRICS], request.app[REGISTRY], scope.org_id)
    return web.json_response(stats)


async def info(request: web.Request) -> web.Response:
    await admin_principal(request)
    config = request.app[CONFIG]
    return web.json_response(
        {
            "object": "console.info",
            "grpc_port": request.app[NODE_PORT](),
            "grpc_insecure": config.grpc_insecure,
            # What the forms offer, from the plane's own tables rather than a copy in the page.
            "failover_fields": [
                {"name": f.name, "default": f.default, "help": f.metadata.get("help", "")}
                for f in fields(FailoverPolicy)
            ],
            "strategies": list(STRATEGIES),
            "cache_modes": list(CACHE_MODES),
            "limit_fields": list(LIMIT_FIELDS),
        }
    )


def find_request(engine: Engine, request_id: str, scope: Scope) -> dict[str, Any] | None:
    source: Any = _RECORDS.outerjoin(_KEYS, _key.id == _record.key_id)
    conditions: list[ColumnElement[bool]] = [_record.request_id == request_id, _record.final]
    if scope.org_id is not None:
        conditions.append(_record.org_id == scope.org_id)
    if scope.owner_account_id is not None:
        conditions.append(_key.owner_account_id == scope.owner_account_id)
    columns = (
        _record.request_id,
        _record.created_at,
        _record.model,
        _record.target,
        _record.node_id,
        _record.status,
        _record.attempts,
        _record.stream,
        _record.prompt_tokens,
        _record.completion_tokens,
        _record.cost_usd,
        _record.latency_ms,
        _record.ttft_ms,
        _record.cache,
    )
    with Session(engine) as session:
        row = session.execute(select(*columns).select_from(source).where(and_(*conditions)).limit(1)).first()
    if row is None:
        return None
    found = dict(row._mapping)
    found["created_at"] = found["created_at"].isoformat()
    return {"object": "console.request", **found}


async def request_row(request: web.Request) -> web.Response:
    """A request's usage row; 404 until the batch writer stored it (a fraction of a second), or when out of scope."""
    principal = await admin_principal(request)
    scope = _scope(principal, request)
    found = await asyncio.to_thread(find_request, request.app[ENGINE], request.match_info["request_id"], scope)
    if found is None:
        raise NotFoundError("no stored request with this id (yet)")
    return web.json_response(found)
