"""The in-memory snapshot the request path reads instead of the database.

Everything a request needs (keys, orgs, the model -> targets table, prices) is built once from the database
and swapped in whole after each admin change commits, so serving a request never touches storage. A change
committed through another plane on the same database is rebuilt here too (server.storage.notify).
"""

from __future__ import annotations

import asyncio
import itertools
import json
from collections import defaultdict
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime

from server.policy.cache import CachePolicy
from server.policy.limits import LIMIT_FIELDS, Limits, key_scope, org_scope
from server.routing.continuation import provider_continuation
from server.routing.failover import FailoverPolicy
from server.routing.health import Health
from server.routing.rules import RouteRule, parse_targets
from server.storage.models import split_list
from server.storage.store import SnapshotRows, Store
from server.targets.base import Target
from server.targets.provider import ProviderTarget, UpstreamPool


@dataclass(frozen=True, slots=True)
class KeyEntry:
    id: str
    org_id: str
    name: str
    # None allows every model of the org.
    models: frozenset[str] | None
    expires_at: datetime | None


@dataclass(frozen=True, slots=True)
class NodeEntry:
    id: str
    org_id: str
    name: str
    drained: bool


@dataclass(frozen=True)
class Snapshot:
    version: int = 0
    keys: dict[str, KeyEntry] = field(default_factory=dict)
    admin_keys: dict[str, str] = field(default_factory=dict)
    org_names: dict[str, str] = field(default_factory=dict)
    # (org id, model name) -> targets in their default order.
    routes: dict[tuple[str, str], tuple[Target, ...]] = field(default_factory=dict)
    models_by_org: dict[str, tuple[str, ...]] = field(default_factory=dict)
    rules: dict[str, tuple[RouteRule, ...]] = field(default_factory=dict)
    # Enrolled, unrevoked nodes by the hash of their credential.
    nodes: dict[str, NodeEntry] = field(default_factory=dict)
    # Limits by scope (`org:ID`, `key:ID`); a scope without limits is absent.
    limits: dict[str, Limits] = field(default_factory=dict)
    cache_policies: dict[str, CachePolicy] = field(default_factory=dict)
    created: int = 0

    def targets_for(self, org_id: str, model: str) -> tuple[Target, ...]:
        return self.routes.get((org_id, model), ())

    def limit_scopes(self, key: KeyEntry) -> tuple[tuple[str, Limits], ...]:
        """The key's own limits, then its org's: a request must fit both."""
        scopes = (key_scope(key.id), org_scope(key.org_id))
        return tuple((scope, self.limits[scope]) for scope in scopes if scope in self.limits)

    def cache_policy(self, org_id: str) -> CachePolicy:
        return self.cache_policies.get(org_id) or CachePolicy()

    def org_id(self, ref: str) -> str | None:
        """An org's id from its id or its name; None when no org is either."""
        if ref in self.org_names:
            return ref
        return next((org_id for org_id, name in self.org_names.items() if name == ref), None)


def build_snapshot(
    rows: SnapshotRows, store: Store, pool: UpstreamPool, health: Health, policy: FailoverPolicy, version: int
) -> Snapshot:
    org_names = {o.id: o.name for o in rows.orgs}
    keys = {
        k.key_hash: KeyEntry(
            id=k.id,
            org_id=k.org_id,
            name=k.name,
            models=frozenset(split_list(k.models)) if k.models else None,
            expires_at=k.expires_at,
        )
        for k in rows.api_keys
    }
    secrets_by_provider: dict[str, list[tuple[str, str]]] = defaultdict(list)
    for pk in rows.provider_keys:
        secrets_by_provider[pk.provider_id].append((pk.id, store.vault.decrypt(pk.ciphertext)))
    models_by_provider = defaultdict(list)
    for pm in rows.provider_models:
        models_by_provider[pm.provider_id].append(pm)

    # Once per provider: its proxy credentials are decrypted here, like its keys.
    egress_by_provider = {provider.id: store.provider_egress(provider) for provider in rows.providers}
    routes: dict[tuple[str, str], list[Target]] = defaultdict(list)
    for provider in rows.providers:  # already in the order they were added
        provider_policy = policy.with_overrides(json.loads(provider.policy)) if provider.policy else policy
        for pm in models_by_provider[provider.id]:
            routes[(provider.org_id, pm.alias)].append(
                ProviderTarget(
                    pool=pool,
                    health=health,
                    provider_id=provider.id,
                    name=provider.name,
                    base_url=provider.base_url,
                    api_keys=tuple(secrets_by_provider[provider.id]),
                    upstream_model=pm.upstream_model,
                    price_in=pm.price_in,
                    price_out=pm.price_out,
                    policy=provider_policy,
                    continuation=provider_continuation(provider.continuation),
                    egress=egress_by_provider[provider.id],
                    responses=provider.responses,
                )
            )
    models_by_org: dict[str, set[str]] = defaultdict(set)
    for org_id, alias in routes:
        models_by_org[org_id].add(alias)
    rules: dict[str, list[RouteRule]] = defaultdict(list)
    for rule in rows.routes:
        names, weights = parse_targets(split_list(rule.targets))
        fallbacks = tuple(split_list(rule.fallbacks))
        rules[rule.org_id].append(RouteRule(rule.pattern, rule.strategy, names, weights, fallbacks, rule.hedge))
    return Snapshot(
        version=version,
        keys=keys,
        admin_keys={k.key_hash: k.id for k in rows.admin_keys},
        org_names=org_names,
        routes={route: tuple(targets) for route, targets in routes.items()},
        models_by_org={org: tuple(sorted(models)) for org, models in models_by_org.items()},
        rules={org: tuple(org_rules) for org, org_rules in rules.items()},
        nodes={n.credential_hash: NodeEntry(n.id, n.org_id, n.name, n.drained) for n in rows.nodes},
        limits={
            key_scope(row.key_id) if row.key_id else org_scope(row.org_id): limits
            for row in rows.limits
            if (limits := Limits(**{name: getattr(row, name) for name in LIMIT_FIELDS})).any
        },
        cache_policies={o.id: CachePolicy(o.cache_mode, o.cache_ttl_s) for o in rows.orgs},
        created=int(datetime.now().timestamp()),
    )


class SnapshotHolder:
    """Owns the current snapshot; `reload` rebuilds it off the event loop and swaps it in atomically.

    `node_pools` names the health keys of the node pools connected now: they live outside the snapshot (they
    come and go with their nodes' streams), and what was learnt about them must outlive a reload."""

    def __init__(
        self,
        store: Store,
        pool: UpstreamPool,
        health: Health,
        policy: FailoverPolicy,
        node_pools: Callable[[], Iterable[str]] = lambda: (),
    ) -> None:
        self.store = store
        self.pool = pool
        self.health = health
        self.policy = policy
        self.node_pools = node_pools
        self.current = Snapshot()
        self.loaded = False
        # Awaited with (current, next) before `next` goes live: the plane seeds a quota set since (server.plane).
        self.prepare: Callable[[Snapshot, Snapshot], Awaitable[None]] | None = None
        # Called with each snapshot once it is live: the plane brings its live node sessions in line with it.
        self.applied: Callable[[Snapshot], None] | None = None
        self._versions = itertools.count(1)
        self._lock = asyncio.Lock()

    async def reload(self) -> Snapshot:
        async with self._lock:
            version = next(self._versions)
            snapshot = await asyncio.to_thread(self._build, version)
            if self.prepare is not None:
                await self.prepare(self.current, snapshot)
            self.current = snapshot
            self.loaded = True
            # On the loop, not in the builder's thread: the loop is what mutates the health records.
            live = {t.key for targets in self.current.routes.values() for t in targets}
            self.health.forget(live.union(self.node_pools()))
            if self.applied is not None:
                self.applied(snapshot)
            return self.current

    def _build(self, version: int) -> Snapshot:
        return build_snapshot(self.store.load_all(), self.store, self.pool, self.health, self.policy, version)
