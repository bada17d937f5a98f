"""Plan: which nodes take calls now, and what share each tier gets: priority tiers and warm-up.

Every balancer works from a plan built from the table's snapshot and the set of ejected nodes, so
each strategy honours validity, weight, ejection, priority and warm-up the same way.

**Priority tiers** (Envoy's priority levels). Nodes declare a ``priority``; 0 is the primary tier,
1 the first fallback, and so on. A node is *healthy* when it is valid, has a weight above 0 and
is not ejected. A tier's health is ``min(1, 1.4 * healthy / nodes)`` over the tier's nodes that
the client's selector takes and that have a weight above 0: a weight of 0 drains a node on
purpose (blue/green), so it leaves its tier's count rather than counting as lost capacity, while
a node switched off (valid 0) or ejected does count as lost. (1.4 is Envoy's overprovisioning
factor: a tier with 5 of 7 nodes healthy still takes all the traffic.) Tiers take traffic in
priority order, each as much as its health allows until the whole is given: a primary at 50%
health (70% after the factor) keeps 70% of the calls and the next tier takes 30%. When the
tiers' health adds up to less than 1, the shares are scaled up so that they still add up to 1.
As the primary heals, its share returns.

**Warm-up** (slow start, as Dubbo's). A node that declares ``warmup`` seconds gets, for that long
after its ``start_time``, a weight that ramps linearly from 2% to 100% of its own, in steps of 2%
(so plans are rebuilt at most 50 times per node's warm-up, never on every call). Consumers
compute the ramp from the node's own start time; nothing is written while it ramps. A start
time more than ``MAX_CLOCK_AHEAD`` (5 s) ahead of this host's clock when a balancer first sees
the node says the clocks disagree, not that the node is new: that node (with that start time)
gets no ramp, then or later, rather than being held at 2% until the clocks meet. The ramp
applies only in a tier with at least one warm node: when every node of a tier is new (the whole
fleet started together), there is no warm node to spare them, and ramping would only skew the
shares by start order.

Plans are immutable once built (a strategy may keep its own state in ``Tier.state``, guarding
it itself) and may be shared between threads.
"""

from __future__ import annotations

import bisect
import itertools
import math
import time
from typing import AbstractSet, Any, Dict, List, Optional, Tuple

from ..node import Node
from .table import Snapshot

__all__ = ["OVERPROVISIONING", "WARMUP_STEPS", "Plan", "Tier", "build_plan", "warmup_factor"]

Address = Tuple[str, int]

OVERPROVISIONING = 1.4
WARMUP_STEPS = 50
MAX_CLOCK_AHEAD = 5.0
_NEVER = math.inf


def warmup_factor(node: Node, now: float, skewed: bool = False) -> Tuple[float, float]:
    """(share of its weight the node gets now, ``time.time()`` seconds when that share next
    changes, or inf once it is warm). ``now`` is ``time.time()``; ``skewed``: the node's start
    time was judged a clock skew when first seen (see ``judge_skew``)."""
    warmup = node.warmup
    started = node.start_time
    if warmup <= 0 or started is None or skewed:
        return 1.0, _NEVER
    up = now - started
    if up >= warmup or up < -MAX_CLOCK_AHEAD:
        return 1.0, _NEVER
    step = max(1, math.ceil(up / warmup * WARMUP_STEPS)) if up > 0 else 1
    if step >= WARMUP_STEPS:
        return 1.0, started + warmup
    return step / WARMUP_STEPS, started + warmup * step / WARMUP_STEPS


Judged = Dict[Tuple[Address, float], bool]
"""(address, start time) -> whether the start time was more than 5 s ahead when first seen."""


def judge_skew(node: Node, now: float, judged: Judged) -> bool:
    """Whether ``node``'s start time is a clock skew, as judged when this (address, start time)
    was first seen, remembered in ``judged``."""
    started = node.start_time
    if started is None or node.warmup <= 0:
        return False
    key = (node.address, started)
    found = judged.get(key)
    if found is None:
        found = judged[key] = started - now > MAX_CLOCK_AHEAD
    return found


class Tier:
    """The healthy nodes of one priority, with their effective weights (after warm-up).
    ``state`` is the strategy's own structure for the tier (a ring, a schedule), built with
    the plan."""

    __slots__ = ("cumulative", "full_weights", "nodes", "positions", "priority", "state", "total", "weights")

    def __init__(self, priority: int, nodes: Tuple[Node, ...], weights: Tuple[float, ...]) -> None:
        self.priority = priority
        self.nodes = nodes
        self.weights = weights
        self.full_weights = tuple(float(node.weight) for node in nodes)
        self.cumulative = tuple(itertools.accumulate(weights))
        self.total = self.cumulative[-1] if self.cumulative else 0.0
        self.positions: Dict[Address, int] = {node.address: i for i, node in enumerate(nodes)}
        self.state: Any = None


class Plan:
    """The tiers that have healthy nodes, in priority order, and each one's share of the calls
    (``loads``; ``bounds`` are their running sums, for a bisect). ``expires`` is when
    (``time.monotonic()``) a warm-up step changes the weights and the plan must be rebuilt."""

    __slots__ = ("bounds", "ejected", "expires", "health", "loads", "snapshot", "tiers")

    def __init__(
        self,
        snapshot: Snapshot,
        ejected: AbstractSet[Address],
        tiers: Tuple[Tier, ...],
        health: Tuple[float, ...],
        loads: Tuple[float, ...],
        expires: float,
    ) -> None:
        self.snapshot = snapshot
        self.ejected = ejected
        self.tiers = tiers
        self.health = health
        self.loads = loads
        self.bounds = tuple(itertools.accumulate(loads))
        self.expires = expires

    def tier_at(self, point: float) -> Tier:
        """The tier whose share of [0, 1) holds ``point``."""
        tiers = self.tiers
        if len(tiers) == 1:
            return tiers[0]
        i = bisect.bisect_right(self.bounds, point)
        return tiers[i] if i < len(tiers) else tiers[-1]  # float rounding at the top

    def shares(self) -> Dict[Address, float]:
        """The probability of each node by weight (tier share x weight share in its tier): what a
        weighted random pick gives; other strategies give these shares over time."""
        found: Dict[Address, float] = {}
        for tier, load in zip(self.tiers, self.loads):
            if load <= 0 or tier.total <= 0:
                continue
            for node, weight in zip(tier.nodes, tier.weights):
                found[node.address] = load * weight / tier.total
        return found


def build_plan(
    snapshot: Snapshot, ejected: AbstractSet[Address], now: Optional[float] = None, judged: Optional[Judged] = None
) -> Plan:
    """The plan for ``snapshot`` with ``ejected`` nodes unhealthy; without tiers when no node is
    healthy. O(n). ``now`` (``time.time()``) is for tests; ``judged`` remembers clock skews
    across plans (see ``judge_skew``; a fresh one when not given)."""
    if judged is None:
        judged = {}
    wall = time.time() if now is None else now
    by_priority: Dict[int, List[Node]] = {}
    for node in snapshot.matched:
        if node.weight > 0:  # a weight of 0 drains a node: out of its tier's count
            by_priority.setdefault(node.priority, []).append(node)
    tiers: List[Tier] = []
    health: List[float] = []
    next_change = _NEVER
    for priority in sorted(by_priority):
        members = by_priority[priority]
        healthy = tuple(n for n in members if n.available and n.address not in ejected)
        if not healthy:
            continue
        factors = []
        for node in healthy:
            factor, changes = warmup_factor(node, wall, judge_skew(node, wall, judged))
            factors.append(factor)
            next_change = min(next_change, changes)
        if max(factors) < 1.0:  # nobody warm to spare the new ones: no ramp in this tier
            factors = [1.0] * len(healthy)
        weights = tuple(node.weight * f for node, f in zip(healthy, factors))
        tiers.append(Tier(priority, healthy, weights))
        health.append(min(1.0, OVERPROVISIONING * len(healthy) / len(members)))
    if not tiers:
        return Plan(snapshot, ejected, (), (), (), _NEVER)
    scale = min(1.0, sum(health))
    left = 1.0
    loads = []
    for h in health:
        load = min(left, h / scale)
        loads.append(load)
        left -= load
    expires = _NEVER if next_change == _NEVER else time.monotonic() + max(0.01, next_change - wall)
    return Plan(snapshot, ejected, tuple(tiers), tuple(health), tuple(loads), expires)
