"""Routing: which targets may serve a model, and in what order.

An org's routing rule for a model (an exact name or a glob, the exact one winning) picks a strategy:

    priority    the listed targets in the listed order, then the others in the order they were added
    cheapest    by price (prompt + completion per 1M tokens); unpriced targets last
    fastest     by EWMA of time to first token (streams) or latency (whole answers); unmeasured first. A node
                pool the plane has not measured yet but whose nodes measured their tokens/s (agent.speed) is
                placed by that: for whole answers as the latency of a NOMINAL_ANSWER_TOKENS answer at that speed,
                for streams (where tokens/s says nothing of the first token) first among the unmeasured, the
                fastest first
    least-busy  by requests in flight
    weighted    a weighted random order (weights from `--targets a=3,b=1`, default 1)

and a fallback chain of other models, tried after every target of the first (e.g. a larger-context model), and
how a slow first token is hedged (`hedge`, server.routing.hedge).
Without a rule, targets are tried in the order they were added.
"""

from __future__ import annotations

import fnmatch
import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from server.routing.health import Health
from server.targets.base import Target

STRATEGIES = ("priority", "cheapest", "fastest", "least-busy", "weighted")

# `fastest`: the answer length a node pool's measured tokens/s turns into an expected latency (a typical chat
# answer), until the plane measured the pool's latency itself.
NOMINAL_ANSWER_TOKENS = 256


@dataclass(frozen=True)
class RouteRule:
    pattern: str
    strategy: str = "priority"
    targets: tuple[str, ...] = ()
    weights: dict[str, float] = field(default_factory=dict)
    fallbacks: tuple[str, ...] = ()
    # Hedging of a slow first token (server.routing.hedge): off, auto or seconds; None takes the plane's `hedge`
    # setting.
    hedge: str | None = None

    def matches(self, model: str) -> bool:
        return fnmatch.fnmatchcase(model, self.pattern)


def parse_targets(raw: Sequence[str]) -> tuple[tuple[str, ...], dict[str, float]]:
    """`["a=3", "b"]` -> names in order and their weights; raises ValueError for a bad weight."""
    names: list[str] = []
    weights: dict[str, float] = {}
    for item in raw:
        name, sep, weight = item.partition("=")
        name = name.strip()
        if not name:
            raise ValueError(f"empty target name in {item!r}")
        names.append(name)
        if sep:
            try:
                weights[name] = float(weight)
            except ValueError:
                raise ValueError(f"weight of {name!r} must be a number, got {weight!r}") from None
            if weights[name] < 0:
                raise ValueError(f"weight of {name!r} must not be negative")
    return tuple(names), weights


def find_rule(rules: Sequence[RouteRule], model: str) -> RouteRule | None:
    for rule in rules:
        if rule.pattern == model:
            return rule
    for rule in rules:
        if rule.matches(model):
            return rule
    return None


@dataclass(frozen=True)
class ModelPlan:
    model: str
    targets: tuple[Target, ...]
    # The model's rule's hedging (server.routing.hedge); None: the plane's default.
    hedge: str | None = None


class Router:
    def __init__(self, health: Health, rng: random.Random | None = None) -> None:
        self.health = health
        self.rng = rng or random.Random()

    def plan(
        self,
        rules: Sequence[RouteRule],
        targets_for: Callable[[str], tuple[Target, ...]],
        model: str,
        *,
        streaming: bool,
    ) -> list[ModelPlan]:
        """The model's targets in rule order, then each fallback model's (in its own rule's order)."""
        rule = find_rule(rules, model)
        chain = [model, *(rule.fallbacks if rule else ())]
        plans: list[ModelPlan] = []
        for name in dict.fromkeys(chain):  # ordered and without repeats
            targets = targets_for(name)
            if targets:
                own = find_rule(rules, name)
                ordered = self.order(targets, own, streaming=streaming)
                plans.append(ModelPlan(name, ordered, own.hedge if own else None))
        return plans

    def order(self, targets: tuple[Target, ...], rule: RouteRule | None, *, streaming: bool) -> tuple[Target, ...]:
        if rule is None or len(targets) < 2:
            return targets
        if rule.strategy == "priority":
            rank = {name: i for i, name in enumerate(rule.targets)}
            return tuple(sorted(targets, key=lambda t: rank.get(t.id, len(rank))))
        if rule.strategy == "cheapest":
            return tuple(sorted(targets, key=_price_key))
        if rule.strategy == "fastest":
            return tuple(sorted(targets, key=lambda t: self._speed(t, streaming)))
        if rule.strategy == "least-busy":
            return tuple(sorted(targets, key=lambda t: self.health.stats(t.key).in_flight))
        if rule.strategy == "weighted":
            return self._weighted(targets, rule.weights)
        raise ValueError(f"unknown strategy {rule.strategy!r}")

    def _speed(self, target: Target, streaming: bool) -> tuple[float, float]:
        """Seconds expected (lower first), then minus the nodes' measured tokens/s (faster first among equals)."""
        stats = self.health.stats(target.key)
        measured = stats.ttft_s if streaming else stats.latency_s
        if measured is not None:
            return measured, 0.0
        # Only a node pool has it (server.targets.node); any other target has not been measured at all.
        tokens_per_s: float | None = getattr(target, "tokens_per_s", None)
        if not tokens_per_s:
            return 0.0, 0.0
        if streaming:
            return 0.0, -tokens_per_s
        return NOMINAL_ANSWER_TOKENS / tokens_per_s, 0.0

    def _weighted(self, targets: tuple[Target, ...], weights: dict[str, float]) -> tuple[Target, ...]:
        # Efraimidis-Spirakis: sorting by U^(1/w) draws a weighted order without replacement in one pass.
        def draw(target: Target) -> float:
            weight = weights.get(target.id, 1.0)
            if weight <= 0:
                return math.inf
            return -math.log(1.0 - self.rng.random()) / weight

        return tuple(sorted(targets, key=draw))


def _price_key(target: Target) -> tuple[bool, float]:
    unpriced = target.price_in is None and target.price_out is None
    return unpriced, (target.price_in or 0.0) + (target.price_out or 0.0)
