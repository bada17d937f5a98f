"""Choose the node that takes a call: balancers are strategy objects, passed as ``balancer=``.

Four strategies share one base, ``Balancer``, which works from a ``tiers.Plan`` (healthy nodes by
priority tier, their warm-up weights, each tier's share of the calls), so every strategy honours
validity, weight, ejection, priority and warm-up the same way; the strategy only chooses a node
within the tier a call falls to:

- ``WeightedRandom()`` (the default): at random, in proportion to weight. O(log n).
- ``RoundRobin()``: smooth weighted round robin. Every run of W calls (W the weights' sum) gives
  each node its weight's share, interleaved rather than in bursts, as nginx's smooth weighted
  round robin does; scheduled earliest-deadline-first on a heap (Envoy's and gRPC's form of it),
  so a pick is O(log n) instead of nginx's O(n). Each client starts at its own random point of
  the schedule, so that many clients do not call the same node in step.
- ``LeastLoaded()``: power of two choices: two nodes of the tier drawn at random, and the one
  with the lower cost takes the call, cost = (calls in flight + 1) x latency / weight, the
  latency a peak-sensitive moving average (Finagle's Peak EWMA) that decays towards the mean of
  all nodes while a node gets no calls, so that a node that was slow is tried again in time.
- ``ConsistentHash(key=...)``: a ketama-style ring of 160 points per node of average weight
  (more or fewer by weight). ``key(method, args)`` gives the call's key from the method name
  and its arguments by name; calls with equal keys go to the same node while it stays, and when
  one of N nodes leaves only its ~1/N of the keys move. A key of None: a random node.

Thread-safe: a balancer may serve any number of threads. Give each client its own balancer:
one shared by two clients works, but rebuilds its plan whenever the calls switch clients.

A balancer of your own: subclass ``Balancer`` and implement ``_choose`` (and ``_prepare`` if it
keeps state per tier), or implement ``pick`` with the signature below from scratch.
"""

from __future__ import annotations

import bisect
import hashlib
import heapq
import itertools
import math
import random
import threading
import time
from typing import AbstractSet, Any, Callable, Dict, List, Mapping, Optional, Protocol, Tuple

from ..errors import InvalidArgument
from ..node import Node
from .table import Snapshot
from .tiers import Plan, Tier, build_plan

__all__ = [
    "Balancer",
    "Call",
    "ConsistentHash",
    "LeastLoaded",
    "Picker",
    "RoundRobin",
    "WeightedRandom",
]

Address = Tuple[str, int]
Call = Tuple[str, Mapping[str, Any]]
"""(method name, arguments by name) of the call a node is picked for."""

_NO_SKIP: AbstractSet[Address] = frozenset()


class Picker(Protocol):
    """What the client needs of a balancer."""

    def pick(
        self,
        snapshot: Snapshot,
        exclude: AbstractSet[Address] = frozenset(),
        skip: AbstractSet[Address] = frozenset(),
        call: Optional[Call] = None,
    ) -> Optional[Node]:
        """A node of ``snapshot.available`` for ``call``, or None if there is none. ``exclude``:
        the ejected nodes (unhealthy: they count against their tier's health); ``skip``: nodes
        this call must not go to (it failed there, or they shed it), which leave the tiers'
        shares as they are."""
        ...


class Balancer:
    """The base of the strategies: plan caching, tiers, and the skip path (see the module)."""

    tracks_load = False
    """True when the client must report each call's start and end (``begin``/``end``)."""

    def __init__(self, rng: Optional[random.Random] = None) -> None:
        # random.Random is not thread-safe to share unless you accept its locking; the module's
        # instance is what random.random() itself uses.
        self._random = (rng or random._inst).random
        # The plans in use: for the ejected set calls pass (slot 0) and for no ejected node
        # (slot 1: also the panic mode's, when every healthy node is ejected), so that a client
        # alternating between the two does not rebuild on every call.
        self._plans: List[Optional[Plan]] = [None, None]
        self._build_lock = threading.Lock()

    # -- what strategies implement -------------------------------------------------------------

    def _prepare(self, tier: Tier) -> None:
        """Build the strategy's state for a new tier (under the plan's build lock)."""

    def _choose(self, tier: Tier, point: Any) -> Node:
        """A node of ``tier`` (which has at least one). ``point`` is what ``_point`` gave."""
        raise NotImplementedError

    def _choose_skipping(self, tier: Tier, skip: AbstractSet[Address], point: Any) -> Optional[Node]:
        """A node of ``tier`` not in ``skip``, or None: by default at random by weight among
        them (the path of retries, O(n))."""
        return _weighted_among(tier, skip, self._random())

    def _point(self, call: Optional[Call]) -> Any:
        """The strategy's draw for one pick; ``_tier_point`` maps it into [0, 1) to choose the tier."""
        return None

    def _tier_point(self, point: Any) -> float:
        return self._random()

    # -- the shared part ----------------------------------------------------------------------

    def plan(self, snapshot: Snapshot, exclude: AbstractSet[Address] = frozenset()) -> Plan:
        """The plan picks use now for ``snapshot`` with ``exclude`` ejected (built if needed;
        one without tiers when no node is healthy)."""
        plan = self._plans[0 if exclude else 1]
        if (
            plan is None
            or plan.snapshot is not snapshot
            or (plan.ejected is not exclude and plan.ejected != exclude)
            or plan.expires <= time.monotonic()
        ):
            plan = self._replan(snapshot, exclude, plan)
        return plan

    def _replan(self, snapshot: Snapshot, exclude: AbstractSet[Address], stale: Optional[Plan]) -> Plan:
        """Build the plan, on this thread. While one thread builds, the others go on with the
        previous plan (if there is one) rather than wait: a ring of 1,000 nodes takes a while."""
        lock = self._build_lock
        if not lock.acquire(blocking=stale is None):
            return stale  # type: ignore[return-value] # (blocking when there is none)
        try:
            slot = 0 if exclude else 1
            plan = self._plans[slot]
            if (
                plan is not None
                and plan.snapshot is snapshot
                and (plan.ejected is exclude or plan.ejected == exclude)
                and plan.expires > time.monotonic()
            ):
                return plan  # another thread built it meanwhile
            plan = build_plan(snapshot, exclude)
            for tier in plan.tiers:
                self._prepare(tier)
            self._plans[slot] = plan
            self._adopt([p for p in self._plans if p is not None])
            return plan
        finally:
            lock.release()

    def _adopt(self, plans: List[Plan]) -> None:
        """The plans in use changed (under the build lock): drop state kept for anything else."""

    def pick(
        self,
        snapshot: Snapshot,
        exclude: AbstractSet[Address] = frozenset(),
        skip: AbstractSet[Address] = frozenset(),
        call: Optional[Call] = None,
    ) -> Optional[Node]:
        plan = self.plan(snapshot, exclude)
        tiers = plan.tiers
        if not tiers:
            return None
        point = self._point(call)
        tier = tiers[0] if len(tiers) == 1 else plan.tier_at(self._tier_point(point))
        if not skip:
            return self._choose(tier, point)
        node = self._choose_skipping(tier, skip, point)
        if node is not None:
            return node
        for other in tiers:  # every node of that tier is skipped: the next tiers, in order
            if other is not tier:
                node = self._choose_skipping(other, skip, point)
                if node is not None:
                    return node
        return None

    def shares(self, snapshot: Snapshot, exclude: AbstractSet[Address] = frozenset()) -> Dict[Address, float]:
        """Each node's share of the calls by weight now (see ``Plan.shares``); {} with none."""
        return self.plan(snapshot, exclude).shares()

    def reinit_after_fork(self) -> None:
        """In a child process right after ``fork()``: fresh locks (a thread of the parent may
        have held one) and no plan; strategies drop what described the parent's calls."""
        self._plans = [None, None]
        self._build_lock = threading.Lock()

    # Load reports, for strategies with ``tracks_load``.
    def begin(self, address: Address) -> None:
        """A call was sent to ``address``."""

    def end(self, address: Address, seconds: float, ok: bool) -> None:
        """The call sent to ``address`` ended after ``seconds``: answered (``ok``) or failed."""

    def __repr__(self) -> str:
        return "%s()" % type(self).__name__


def _weighted_among(tier: Tier, skip: AbstractSet[Address], draw: float) -> Optional[Node]:
    """At random by weight among the nodes of ``tier`` not in ``skip`` (O(k log k + log n) for
    k skipped nodes of the tier: the draw is made over the remaining weight and shifted past the
    skipped nodes' intervals)."""
    nodes, weights, cumulative = tier.nodes, tier.weights, tier.cumulative
    positions = tier.positions
    skipped = sorted(i for i in map(positions.get, skip) if i is not None)
    if not skipped:
        i = bisect.bisect_right(cumulative, draw * tier.total)
        return nodes[i] if i < len(nodes) else nodes[-1]
    left = tier.total - sum(weights[i] for i in skipped)
    if len(skipped) >= len(nodes) or left <= 0:
        return None
    point = draw * left
    for i in skipped:  # ascending: shift the point past each skipped interval it reaches
        if point >= cumulative[i] - weights[i]:
            point += weights[i]
        else:
            break
    i = bisect.bisect_right(cumulative, point)
    excluded = set(skipped)
    if i >= len(nodes) or i in excluded:  # float rounding at an edge: the nearest one not skipped
        below = range(min(i, len(nodes) - 1), -1, -1)
        i = next(j for j in itertools.chain(below, range(i, len(nodes))) if j not in excluded)
    return nodes[i]


class WeightedRandom(Balancer):
    """At random, with probability proportional to (warm-up) weight: one bisect over the tier's
    cumulative weights. ``rng`` may be given for reproducible tests."""

    def _choose(self, tier: Tier, point: Any) -> Node:
        i = bisect.bisect_right(tier.cumulative, self._random() * tier.total)
        nodes = tier.nodes
        return nodes[i] if i < len(nodes) else nodes[-1]  # float rounding at the top


class _Schedule:
    """A tier's round-robin schedule: a heap of (deadline, rank, index) under a lock."""

    __slots__ = ("heap", "lock", "steps")

    def __init__(self, heap: List[Tuple[float, int, int]], steps: Tuple[float, ...]) -> None:
        self.heap = heap
        self.steps = steps
        self.lock = threading.Lock()


class RoundRobin(Balancer):
    """Smooth weighted round robin (see the module): node i's k-th turn (k = 0, 1, ...) is due
    at ``(k + 1/2) / weight_i``; the earliest due node takes the call, ties by a random rank per
    plan. Over any run of calls from the start of a schedule, no node's count strays by 1.5 or
    more from its weight's share (nginx's sequence has the same property). The schedule starts
    again when the plan changes (a node joins, leaves, is ejected, changes weight, or a warm-up
    step)."""

    def _prepare(self, tier: Tier) -> None:
        ranks = list(range(len(tier.nodes)))
        self._shuffle(ranks)
        steps = tuple(1.0 / w for w in tier.weights)
        heap = [(0.5 * step, rank, i) for i, (step, rank) in enumerate(zip(steps, ranks))]
        heapq.heapify(heap)
        tier.state = _Schedule(heap, steps)

    def _shuffle(self, items: List[int]) -> None:
        draw = self._random
        for i in range(len(items) - 1, 0, -1):
            j = int(draw() * (i + 1))
            items[i], items[j] = items[j], items[i]

    def _choose(self, tier: Tier, point: Any) -> Node:
        schedule: _Schedule = tier.state
        heap = schedule.heap
        with schedule.lock:
            due, rank, i = heap[0]
            heapq.heapreplace(heap, (due + schedule.steps[i], rank, i))
        return tier.nodes[i]

    def _choose_skipping(self, tier: Tier, skip: AbstractSet[Address], point: Any) -> Optional[Node]:
        """The earliest due node not in ``skip`` takes its turn; the skipped keep theirs."""
        schedule: _Schedule = tier.state
        heap = schedule.heap
        nodes = tier.nodes
        with schedule.lock:
            held = []
            found = None
            while heap:
                due, rank, i = heapq.heappop(heap)
                if nodes[i].address in skip:
                    held.append((due, rank, i))
                    continue
                found = i
                heapq.heappush(heap, (due + schedule.steps[i], rank, i))
                break
            for entry in held:
                heapq.heappush(heap, entry)
        return None if found is None else nodes[found]


class _Load:
    """One node's load as a LeastLoaded balancer sees it (guarded by the balancer's lock)."""

    __slots__ = ("in_flight", "latency", "stamp")

    def __init__(self) -> None:
        self.in_flight = 0
        self.latency = -1.0  # no answer yet
        self.stamp = 0.0


class LeastLoaded(Balancer):
    """Power of two choices on (in flight + 1) x latency / weight (see the module).

    ``decay``: seconds over which a node's latency average forgets (Finagle's default, 10 s): a
    node's average moves towards each new answer's latency with weight ``1 - exp(-dt/decay)``
    (``dt`` the time since its previous answer), at once to a latency above it (a peak), and
    towards the mean of all nodes while it gets no answers. A failed call never lowers a node's
    latency. A node that has not answered yet counts at the mean.
    """

    tracks_load = True

    def __init__(self, decay: float = 10.0, rng: Optional[random.Random] = None) -> None:
        if not isinstance(decay, (int, float)) or isinstance(decay, bool) or not 0 < decay < math.inf:
            raise InvalidArgument("decay must be a positive number of seconds, got %r" % (decay,))
        super().__init__(rng)
        self._decay = float(decay)
        self._loads: Dict[Address, _Load] = {}
        self._lock = threading.Lock()
        self._mean = 0.0  # a moving average of every answer's latency (seconds)

    def _cost(self, address: Address, now: float) -> float:
        load = self._loads.get(address)
        mean = self._mean
        if load is None:
            return mean
        latency = load.latency
        if latency < 0:
            latency = mean
        else:
            idle = now - load.stamp
            if idle > 0:
                latency = mean + (latency - mean) * math.exp(-idle / self._decay)
        return latency * (load.in_flight + 1)

    def _choose(self, tier: Tier, point: Any) -> Node:
        nodes = tier.nodes
        n = len(nodes)
        if n == 1:
            return nodes[0]
        draw = self._random
        a = int(draw() * n)
        b = int(draw() * (n - 1))
        if b >= a:
            b += 1
        if a >= n or b >= n:  # float rounding at the top
            a, b = min(a, n - 1), min(b, n - 1)
        now = time.monotonic()
        weights = tier.weights
        cost_a = self._cost(nodes[a].address, now) / weights[a]
        cost_b = self._cost(nodes[b].address, now) / weights[b]
        if cost_a == cost_b:
            return nodes[a] if weights[a] >= weights[b] else nodes[b]
        return nodes[a] if cost_a < cost_b else nodes[b]

    def _choose_skipping(self, tier: Tier, skip: AbstractSet[Address], point: Any) -> Optional[Node]:
        left = [i for i, node in enumerate(tier.nodes) if node.address not in skip]
        if not left:
            return None
        if len(left) == 1:
            return tier.nodes[left[0]]
        draw = self._random
        a = left[int(draw() * len(left)) % len(left)]
        b = left[int(draw() * len(left)) % len(left)]
        now = time.monotonic()
        cost_a = self._cost(tier.nodes[a].address, now) / tier.weights[a]
        cost_b = self._cost(tier.nodes[b].address, now) / tier.weights[b]
        return tier.nodes[a] if cost_a <= cost_b else tier.nodes[b]

    def reinit_after_fork(self) -> None:
        super().reinit_after_fork()
        self._lock = threading.Lock()
        self._loads = {}  # the parent's calls in flight are not the child's

    def begin(self, address: Address) -> None:
        with self._lock:
            load = self._loads.get(address)
            if load is None:
                load = self._loads[address] = _Load()
            load.in_flight += 1

    def end(self, address: Address, seconds: float, ok: bool) -> None:
        now = time.monotonic()
        with self._lock:
            load = self._loads.get(address)
            if load is None:  # forgotten while in flight (the node left)
                return
            if load.in_flight > 0:
                load.in_flight -= 1
            latency = load.latency
            if not ok:
                seconds = max(seconds, latency)
            if latency < 0 or seconds >= latency:
                load.latency = seconds  # the first answer, or a peak: at once
            else:
                keep = math.exp(-max(0.0, now - load.stamp) / self._decay)
                load.latency = latency * keep + seconds * (1.0 - keep)
            load.stamp = now
            if ok:
                self._mean = seconds if self._mean == 0.0 else self._mean * 0.9 + seconds * 0.1

    def _adopt(self, plans: List[Plan]) -> None:
        addresses = frozenset().union(*(plan.snapshot.addresses for plan in plans))
        with self._lock:
            for address in [a for a, load in self._loads.items() if a not in addresses and not load.in_flight]:
                del self._loads[address]

    def __repr__(self) -> str:
        return "LeastLoaded(decay=%r)" % self._decay


class _Ring:
    """A tier's hash ring: sorted 32-bit points and the index (in the tier) of each one's node."""

    __slots__ = ("owners", "points")

    def __init__(self, points: List[int], owners: List[int]) -> None:
        self.points = points
        self.owners = owners


_MASK32 = (1 << 32) - 1
_TWO32 = float(1 << 32)
_TWO64 = float(1 << 64)


def _digest(data: bytes) -> int:
    return int.from_bytes(hashlib.md5(data, usedforsecurity=False).digest(), "big")


class ConsistentHash(Balancer):
    """A ketama-style hash ring (see the module). ``key(method, args)`` returns the call's key
    (str, bytes or int; None for no affinity); ``replicas`` points per node of the tier's
    average weight (a node of twice that weight gets twice as many).

    A key's MD5 gives its place on the ring (the first node clockwise takes it), which tier it
    falls to, and a number in [0, 1) that decides whether a warming node takes it: a node at
    30% of its weight takes the keys whose number is below 0.3, and the next node clockwise the
    others. As it warms, keys only move onto it, and each key still has one node at a time.

    A tier's ring is built when the tier's nodes or weights change (a node joins, leaves, is
    ejected, changes weight), not for warm-up steps: about 0.1 s for 1,000 nodes, on the calling
    thread; calls on other threads meanwhile use the previous plan.
    """

    def __init__(
        self,
        key: Callable[[str, Mapping[str, Any]], Any],
        replicas: int = 160,
        rng: Optional[random.Random] = None,
    ) -> None:
        if not callable(key):
            raise InvalidArgument("key must be a function of (method, args), got %r" % (key,))
        if not isinstance(replicas, int) or isinstance(replicas, bool) or not 1 <= replicas <= 10_000:
            raise InvalidArgument("replicas must be an integer 1..10000, got %r" % (replicas,))
        super().__init__(rng)
        self._key = key
        self._replicas = replicas
        self._node_points: Dict[Address, List[int]] = {}
        self._rings: Dict[Tuple[Any, ...], _Ring] = {}  # the current plan's rings, by tier make-up

    def _points_of(self, address: Address, count: int) -> List[int]:
        """The first ``count`` ring points of a node (32-bit, four per MD5 of "host:port-k")."""
        points = self._node_points.get(address)
        if points is None:
            points = self._node_points[address] = []
        k = len(points) // 4
        name = ("%s:%d-" % address).encode("utf-8")
        while len(points) < count:
            value = _digest(name + str(k).encode("ascii"))
            points.extend(((value >> 96) & _MASK32, (value >> 64) & _MASK32, (value >> 32) & _MASK32, value & _MASK32))
            k += 1
        return points[:count]

    def _prepare(self, tier: Tier) -> None:
        makeup = (tuple(node.address for node in tier.nodes), tier.full_weights)
        ring = self._rings.get(makeup)
        if ring is None:
            mean = sum(tier.full_weights) / len(tier.full_weights)
            shift = max(1, (len(tier.nodes) - 1).bit_length())
            merged: List[int] = []
            for i, (node, weight) in enumerate(zip(tier.nodes, tier.full_weights)):
                count = max(1, round(self._replicas * weight / mean))
                merged.extend((p << shift) | i for p in self._points_of(node.address, count))
            merged.sort()
            mask = (1 << shift) - 1
            ring = _Ring([m >> shift for m in merged], [m & mask for m in merged])
        tier.state = (makeup, ring)

    def _adopt(self, plans: List[Plan]) -> None:
        """Keep the rings and the points of the plans in use, and only those."""
        self._rings = {tier.state[0]: tier.state[1] for plan in plans for tier in plan.tiers}
        addresses = frozenset().union(*(plan.snapshot.addresses for plan in plans))
        for address in [a for a in self._node_points if a not in addresses]:
            del self._node_points[address]

    def _point(self, call: Optional[Call]) -> Any:
        if call is None:
            return None
        method, args = call
        try:
            key = self._key(method, args)
        except Exception as err:
            raise InvalidArgument("the ConsistentHash key function failed for %s(%r): %s" % (method, args, err)) \
                from err
        if key is None:
            return None
        if isinstance(key, str):
            data = key.encode("utf-8")
        elif isinstance(key, (bytes, bytearray)):
            data = bytes(key)
        elif isinstance(key, int) and not isinstance(key, bool):
            data = str(key).encode("ascii")
        else:
            raise InvalidArgument(
                "the ConsistentHash key function must return str, bytes, int or None; for %s it returned %r"
                % (method, key)
            )
        return _digest(data)

    def _tier_point(self, point: Any) -> float:
        if point is None:
            return self._random()
        return float(point & ((1 << 64) - 1)) / _TWO64  # the digest's low 64 bits

    def _choose(self, tier: Tier, point: Any) -> Node:
        found = self._walk(tier, point, _NO_SKIP)
        assert found is not None  # a tier has a node, and nothing is skipped
        return found

    def _choose_skipping(self, tier: Tier, skip: AbstractSet[Address], point: Any) -> Optional[Node]:
        return self._walk(tier, point, skip)

    def _walk(self, tier: Tier, point: Any, skip: AbstractSet[Address]) -> Optional[Node]:
        """The first node clockwise from the key's place that is not skipped and takes the key
        (see the class: a warming node takes a key whose number is below its warm-up share)."""
        ring: _Ring = tier.state[1]
        points, owners, nodes = ring.points, ring.owners, tier.nodes
        if point is None:
            place, share = int(self._random() * _TWO32), self._random()
        else:
            place, share = point >> 96, float((point >> 64) & _MASK32) / _TWO32
        size = len(points)
        j = bisect.bisect_left(points, place)
        if j == size:
            j = 0
        weights, full = tier.weights, tier.full_weights
        owner = owners[j]
        node = nodes[owner]
        if not skip and weights[owner] == full[owner]:
            return node  # the common case: a warm node, nothing skipped
        fallback: Optional[Node] = None
        for step in range(size):
            owner = owners[(j + step) % size]
            node = nodes[owner]
            if node.address in skip:
                continue
            if weights[owner] >= full[owner] or share < weights[owner] / full[owner]:
                return node
            if fallback is None:
                fallback = node
        return fallback  # every node left is warming and none takes the key: the first of them

    def __repr__(self) -> str:
        return "ConsistentHash(key=%r, replicas=%d)" % (self._key, self._replicas)
