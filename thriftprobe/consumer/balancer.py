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

Thread-safe: a balancer may serve any number of threads, but only one client: its plans are of
that client's table. ``build_client`` refuses a balancer that another open client uses.

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
import weakref
from typing import AbstractSet, Any, Callable, Dict, List, Mapping, Optional, Protocol, Tuple

from ..errors import InvalidArgument
from ..node import Node
from .table import Snapshot
from .tiers import Judged, Plan, Tier, build_plan

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
_REFUSAL_WEIGHT = 4.0
_REFUSAL_DECAY = 1.0  # seconds
_MAX_REFUSED = 8.0  # a burst of refusals counts as 8 at most: the node is back within ~5 s of the last


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
        self._judged: Judged = {}  # clock skews of nodes' start times, as first seen (under the build lock)
        self._claim: Optional["weakref.ReferenceType[Any]"] = None
        self._claim_lock = threading.Lock()  # never held for long: close() takes it

    def claim(self, owner: Any) -> None:
        """Bind the balancer to ``owner`` (a client's claim object, kept as long as the client
        is open). Raises InvalidArgument while another owner holds it."""
        with self._claim_lock:
            held = self._claim() if self._claim is not None else None
            if held is not None and held is not owner:
                raise InvalidArgument(
                    "this %r already serves another client (%s); give each client its own balancer"
                    % (self, getattr(held, "label", "?"))
                )
            self._claim = weakref.ref(owner)

    def release(self, owner: Any) -> None:
        """Unbind the balancer from ``owner`` (the client closed)."""
        with self._claim_lock:
            if self._claim is not None and self._claim() is owner:
                self._claim = None

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
            plan = build_plan(snapshot, exclude, judged=self._judged)
            for tier in plan.tiers:
                self._prepare(tier)
            self._plans[slot] = plan
            in_use = [p for p in self._plans if p is not None]
            addresses = frozenset().union(*(p.snapshot.addresses for p in in_use))
            for key in [k for k in self._judged if k[0] not in addresses]:
                del self._judged[key]
            self._adopt(in_use)
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
        self._claim_lock = threading.Lock()

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
    """A tier's round-robin schedule: a heap of (deadline, rank, index) under a lock; ``now``
    is the deadline of the last turn taken."""

    __slots__ = ("heap", "lock", "now", "steps", "tier")

    def __init__(self, tier: Tier, heap: List[Tuple[float, int, int]], steps: Tuple[float, ...]) -> None:
        self.tier = tier
        self.heap = heap
        self.steps = steps
        self.now = 0.0
        self.lock = threading.Lock()

    def standing(self) -> Dict[Address, Tuple[float, int, float]]:
        """Each node's place: (time until its turn, rank, weight), for the next schedule."""
        with self.lock:
            now = self.now
            nodes, weights = self.tier.nodes, self.tier.weights
            return {nodes[i].address: (due - now, rank, weights[i]) for due, rank, i in self.heap}


class RoundRobin(Balancer):
    """Smooth weighted round robin (see the module): node i's k-th turn (k = 0, 1, ...) is due
    at ``(k + 1/2) / weight_i``; the earliest due node takes the call, ties by a random rank per
    plan. Over any run of calls from the start of a schedule, no node's count strays by 1.5 or
    more from its weight's share (nginx's sequence has the same property).

    When the plan changes (a node joins, leaves, is ejected, changes weight, or a warm-up step)
    the schedule goes on: each node keeps its place, the time to its turn scaled by its old
    weight over its new one, and a node that joins takes its first turn after half its step.
    (Starting the schedule again would give the heaviest nodes the first turns after every
    change, and starve light and warming nodes while plans change often.)"""

    def __init__(self, rng: Optional[random.Random] = None) -> None:
        super().__init__(rng)
        self._schedules: Dict[int, _Schedule] = {}  # the newest schedule of each priority

    def _prepare(self, tier: Tier) -> None:
        previous = self._schedules.get(tier.priority)
        standing = previous.standing() if previous is not None else {}
        draw = self._random
        steps = tuple(1.0 / w for w in tier.weights)
        heap = []
        for i, (node, step) in enumerate(zip(tier.nodes, steps)):
            found = standing.get(node.address)
            if found is None:
                heap.append((0.5 * step, int(draw() * (1 << 30)), i))
            else:
                left, rank, weight = found
                heap.append((max(0.0, left) * weight * step, rank, i))  # left x old weight / new weight
        heapq.heapify(heap)
        schedule = tier.state = _Schedule(tier, heap, steps)
        self._schedules[tier.priority] = schedule

    def _adopt(self, plans: List[Plan]) -> None:
        priorities = {tier.priority for plan in plans for tier in plan.tiers}
        for priority in [p for p in self._schedules if p not in priorities]:
            del self._schedules[priority]

    def reinit_after_fork(self) -> None:
        super().reinit_after_fork()
        self._schedules = {}

    def _choose(self, tier: Tier, point: Any) -> Node:
        schedule: _Schedule = tier.state
        heap = schedule.heap
        with schedule.lock:
            due, rank, i = heap[0]
            schedule.now = due
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
                schedule.now = max(schedule.now, due)
                heapq.heappush(heap, (due + schedule.steps[i], rank, i))
                break
            for entry in held:
                heapq.heappush(heap, entry)
        return None if found is None else nodes[found]


class _Load:
    """One node's load as a LeastLoaded balancer sees it (guarded by the balancer's lock)."""

    __slots__ = ("in_flight", "latency", "refused", "refused_at", "stamp")

    def __init__(self) -> None:
        self.in_flight = 0
        self.latency = -1.0  # no answer yet
        self.stamp = 0.0
        self.refused = 0.0  # calls that got no answer, decaying over _REFUSAL_DECAY seconds
        self.refused_at = 0.0


class LeastLoaded(Balancer):
    """Power of two choices by load (see the module).

    Two distinct nodes of the tier are drawn at random in proportion to their weights (the
    second among the others); the one with the lower cost takes the call, the first drawn on a
    tie, where

        cost = latency x (calls in flight / weight + 1 / the tier's mean weight)

    so that calls in flight count against a node in proportion to its capacity (its weight),
    and idle nodes of equal latency cost the same: at low concurrency the shares follow the
    weights (a canary of weight 1 beside two of 30 gets 1/61 of the calls), under load the
    node with the fewest calls in flight for its weight and the fastest answers wins.

    ``decay``: seconds over which a node's latency average forgets (Finagle's default, 10 s): a
    node's average moves towards each new answer's latency with weight ``1 - exp(-dt/decay)``
    (``dt`` the time since its previous answer), at once to a latency above it (a peak), and
    towards the mean of all nodes while it gets no answers, so that a node that was slow is
    tried again in time. A node that has not answered yet counts at the mean. A call that got
    no answer (a failure, or "not executed": the node shed it) is no latency sample (a fast
    refusal must never make a node look fast) but a refusal: the node's cost is multiplied by
    ``1 + 4 x refusals``, its refusals decaying over 1 s and counting 8 at most, so a node that
    keeps shedding is tried about once every second or two, and one that stops is back within
    about 5 s.
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

    def _latency(self, load: Optional[_Load], now: float) -> float:
        """The node's latency figure now, times its refusals' penalty."""
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
        if load.refused:
            refused = load.refused * math.exp(-(now - load.refused_at) / _REFUSAL_DECAY)
            if refused > 0.05:  # below: forgiven (idle nodes of equal cost then tie again)
                latency *= 1.0 + _REFUSAL_WEIGHT * refused
        return latency

    def _pair(self, tier: Tier, among: Optional[List[int]]) -> Tuple[int, int]:
        """Two distinct indexes of the tier (of ``among``, if given), drawn by weight."""
        draw = self._random
        weights = tier.weights
        if among is None:
            cumulative, total, n = tier.cumulative, tier.total, len(tier.nodes)
            a = min(bisect.bisect_right(cumulative, draw() * total), n - 1)
            # The second by weight among the others: the draw over the rest, shifted past a.
            point = draw() * (total - weights[a])
            if point >= cumulative[a] - weights[a]:
                point += weights[a]
            b = min(bisect.bisect_right(cumulative, point), n - 1)
            if b == a:  # float rounding at an edge
                b = a - 1 if a else 1
            return a, b
        running = list(itertools.accumulate(weights[i] for i in among))
        k = min(bisect.bisect_right(running, draw() * running[-1]), len(among) - 1)
        others = among[:k] + among[k + 1:]
        rest = list(itertools.accumulate(weights[i] for i in others))
        b = others[min(bisect.bisect_right(rest, draw() * rest[-1]), len(others) - 1)]
        return among[k], b

    def _better(self, tier: Tier, a: int, b: int) -> Node:
        nodes, weights = tier.nodes, tier.weights
        base = len(nodes) / tier.total  # 1 / the tier's mean weight
        loads = self._loads
        now = time.monotonic()
        load_a = loads.get(nodes[a].address)
        load_b = loads.get(nodes[b].address)
        cost_a = self._latency(load_a, now) * ((load_a.in_flight if load_a else 0) / weights[a] + base)
        cost_b = self._latency(load_b, now) * ((load_b.in_flight if load_b else 0) / weights[b] + base)
        return nodes[b] if cost_b < cost_a else nodes[a]

    def _choose(self, tier: Tier, point: Any) -> Node:
        if len(tier.nodes) == 1:
            return tier.nodes[0]
        a, b = self._pair(tier, None)
        return self._better(tier, a, b)

    def _choose_skipping(self, tier: Tier, skip: AbstractSet[Address], point: Any) -> Optional[Node]:
        left = [i for i, node in enumerate(tier.nodes) if node.address not in skip]
        if not left:
            return None
        if len(left) == 1:
            return tier.nodes[left[0]]
        a, b = self._pair(tier, left)
        return self._better(tier, a, b)

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
            if not ok:  # no answer: a refusal, and a latency only if it was a peak (a timeout)
                decayed = load.refused * math.exp(-(now - load.refused_at) / _REFUSAL_DECAY)
                load.refused = min(_MAX_REFUSED, decayed + 1.0)
                load.refused_at = now
                if self._mean <= 0.0 or seconds <= max(latency, self._mean):
                    return  # a fast refusal is no latency sample: only a slow failure (a timeout) is
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
    """A tier's hash ring: sorted 32-bit points, the index (in the tier) of each one's node, and
    each node's salt (for its warm-up draw)."""

    __slots__ = ("owners", "points", "salts")

    def __init__(self, points: List[int], owners: List[int], salts: Tuple[int, ...]) -> None:
        self.points = points
        self.owners = owners
        self.salts = salts


_MASK32 = (1 << 32) - 1
_MASK64 = (1 << 64) - 1
_TWO32 = float(1 << 32)
_TWO64 = float(1 << 64)
_MAX_WALK = 256  # ring points a warming key looks at before it settles for the first candidate
_MAX_POINTS = 2_000_000  # points of one ring at most (about 100 MB while it is built)


def _digest(data: bytes) -> int:
    return int.from_bytes(hashlib.md5(data, usedforsecurity=False).digest(), "big")


_MIX = 0xBF58476D1CE4E5B9
"""A key's number for a node: ``z = ((key bits ^ node salt) * _MIX) mod 2**64``, then
``z ^ (z >> 29)``, compared with the node's share x 2**64: one multiply and an xor-shift, enough
to make two nodes' numbers for one key independent (a plain xor of the salts would not be)."""


class ConsistentHash(Balancer):
    """A ketama-style hash ring (see the module). ``key(method, args)`` returns the call's key
    (str, bytes or int; None for no affinity).

    Points per node: ``replicas x weight / R`` (at least 1). R is set by the tier's first ring
    (its median weight rounded to a power of two) and kept while the median stays within 4x
    of it, so a node that joins, leaves or changes weight moves only its own points, and only
    the keys it gains or loses move. Only a change of the whole fleet's weights (the median
    moving 4x), or a ring that would exceed 2 million points, sets a new R and moves keys
    between nodes that did not change.

    A key's MD5 gives its place on the ring (the first node clockwise takes it) and which tier it
    falls to. A warming node at a share f of its weight takes a key only if a number drawn from
    the key and the node together is below f; otherwise the key goes on clockwise. Each node
    draws its own number for a key, so a warming node's refused keys spread over the nodes after
    it as its share would have it, and as f grows keys only move onto it. A key that meets only
    warming nodes for 256 points settles for the first node it met.

    A tier's ring is built when its nodes or their weights change (a node joins, leaves, is
    ejected, changes weight), not for warm-up steps; about 0.1 s for 1,000 nodes of equal weight,
    on the calling thread, while calls on other threads go on with the previous plan.
    """

    def __init__(
        self,
        key: Callable[[str, Mapping[str, Any]], Any],
        replicas: int = 160,
        rng: Optional[random.Random] = None,
    ) -> None:
        if not callable(key):
            raise InvalidArgument("key must be a function of (method, args), got %r" % (key,))
        if not isinstance(replicas, int) or isinstance(replicas, bool) or not 1 <= replicas <= 1000:
            raise InvalidArgument("replicas must be an integer 1..1000, got %r" % (replicas,))
        super().__init__(rng)
        self._key = key
        self._replicas = replicas
        self._node_points: Dict[Address, List[int]] = {}
        self._rings: Dict[Tuple[Any, ...], _Ring] = {}  # the rings of the plans in use, by tier make-up
        self._references: Dict[int, float] = {}  # per priority: see _reference

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
            reference = self._reference(tier)
            shift = max(1, (len(tier.nodes) - 1).bit_length())
            merged: List[int] = []
            for i, (node, weight) in enumerate(zip(tier.nodes, tier.full_weights)):
                count = max(1, round(self._replicas * weight / reference))
                merged.extend(sorted((p << shift) | i for p in self._points_of(node.address, count)))
            merged.sort()  # sorted runs, one per node: timsort merges them
            mask = (1 << shift) - 1
            salts = tuple(_digest(("%s:%d" % node.address).encode("utf-8")) & _MASK64 for node in tier.nodes)
            ring = _Ring([m >> shift for m in merged], [m & mask for m in merged], salts)
        # Per node: the threshold a key's number must stay below for the node to take it (its
        # warm-up share x 2**64), or None for a warm node.
        thresholds = tuple(
            None if weight >= full else int(weight / full * _TWO64)
            for weight, full in zip(tier.weights, tier.full_weights)
        )
        tier.state = (makeup, ring, thresholds)

    def _reference(self, tier: Tier) -> float:
        """The weight that gets ``replicas`` points in this tier: the one used before, while the
        tier's median weight stays within 4x of it (so that one node's change never rescales
        every node's points), else the median rounded to a power of two; doubled while the ring
        would hold more than ``_MAX_POINTS`` points."""
        ordered = sorted(tier.full_weights)
        median = ordered[len(ordered) // 2]
        reference = self._references.get(tier.priority)
        if reference is None or not median / 4 <= reference <= median * 4:
            reference = 2.0 ** round(math.log2(median))
        while sum(tier.full_weights) * self._replicas / reference > _MAX_POINTS:
            reference *= 2
        self._references[tier.priority] = reference
        return reference

    def _adopt(self, plans: List[Plan]) -> None:
        """Keep the rings and the points of the plans in use, and only those."""
        self._rings = {tier.state[0]: tier.state[1] for plan in plans for tier in plan.tiers}
        addresses = frozenset().union(*(plan.snapshot.addresses for plan in plans))
        for address in [a for a in self._node_points if a not in addresses]:
            del self._node_points[address]

    def reinit_after_fork(self) -> None:
        super().reinit_after_fork()
        self._rings = {}
        self._references = {}

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
        return float(point & _MASK64) / _TWO64  # the digest's low 64 bits

    def _choose(self, tier: Tier, point: Any) -> Node:
        found = self._walk(tier, point, _NO_SKIP)
        assert found is not None  # a tier has a node, and nothing is skipped
        return found

    def _choose_skipping(self, tier: Tier, skip: AbstractSet[Address], point: Any) -> Optional[Node]:
        return self._walk(tier, point, skip)

    def _walk(self, tier: Tier, point: Any, skip: AbstractSet[Address]) -> Optional[Node]:
        """The first node clockwise from the key's place that is not skipped and takes the key
        (see the class: a warming node takes a key by its own draw)."""
        ring: _Ring = tier.state[1]
        thresholds: Tuple[Optional[int], ...] = tier.state[2]
        points, owners = ring.points, ring.owners
        nodes: Tuple[Node, ...] = tier.nodes
        if point is None:
            point = int(self._random() * _TWO64) << 64 | int(self._random() * _TWO64)
        size = len(points)
        j = bisect.bisect_left(points, point >> 96)
        if j == size:
            j = 0
        owner = owners[j]
        if not skip and thresholds[owner] is None:
            return nodes[owner]  # the common case: a warm node, nothing skipped
        key_bits = (point >> 32) & _MASK64
        salts = ring.salts
        fallback: Optional[Node] = None
        refused = -1
        for step in range(size):
            owner = owners[j]
            j += 1
            if j == size:
                j = 0
            if owner == refused:
                continue
            node = nodes[owner]
            if skip and node.address in skip:
                continue
            threshold = thresholds[owner]
            if threshold is None:
                return node
            z = ((key_bits ^ salts[owner]) * _MIX) & _MASK64
            if z ^ (z >> 29) < threshold:
                return node
            refused = owner
            if fallback is None:
                fallback = node
            elif step >= _MAX_WALK:
                break
        return fallback  # only warming nodes that refuse the key, or all skipped: None

    def __repr__(self) -> str:
        return "ConsistentHash(key=%r, replicas=%d)" % (self._key, self._replicas)
