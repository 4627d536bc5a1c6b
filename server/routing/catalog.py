"""What an org can call right now: the snapshot's providers plus the nodes connected at this moment."""

from __future__ import annotations

from server.nodes.registry import NodeRegistry
from server.policy.snapshot import KeyEntry, Snapshot
from server.routing.failover import FailoverPolicy
from server.targets.base import Target
from server.targets.node import NodePoolTarget


class Catalog:
    def __init__(self, snapshot: Snapshot, registry: NodeRegistry, node_policy: FailoverPolicy) -> None:
        self.snapshot = snapshot
        self.registry = registry
        self.node_policy = node_policy

    def targets_for(self, org_id: str, model: str) -> tuple[Target, ...]:
        targets = self.snapshot.targets_for(org_id, model)
        if self.registry.serves(org_id, model):
            targets = (*targets, NodePoolTarget(self.registry, org_id, model, self.node_policy))
        return targets

    def serves(self, org_id: str, model: str) -> bool:
        return (org_id, model) in self.snapshot.routes or self.registry.serves(org_id, model)

    def models(self, org_id: str) -> tuple[str, ...]:
        return tuple(sorted({*self.snapshot.models_by_org.get(org_id, ()), *self.registry.models_for(org_id)}))

    def models_for(self, key: KeyEntry) -> tuple[str, ...]:
        models = self.models(key.org_id)
        return models if key.models is None else tuple(m for m in models if m in key.models)
