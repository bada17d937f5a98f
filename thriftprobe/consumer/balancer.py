"""Choose the node that takes a call. Balancers are strategy objects with one method, ``pick``."""

from __future__ import annotations

import bisect
import itertools
import random
from typing import AbstractSet, Dict, Optional, Protocol, Tuple

from ..node import Node
from .table import Snapshot

__all__ = ["Balancer", "WeightedRandom"]


class Balancer(Protocol):
    def pick(self, snapshot: Snapshot, exclude: AbstractSet[Tuple[str, int]] = frozenset()) -> Optional[Node]:
        """Return an available node whose address is not in ``exclude``, or None if there is none."""
        ...


class WeightedRandom:
    """Pick an available node with probability proportional to its weight.

    A pick is one bisect over the snapshot's cumulative weights. With ``exclude`` (ejected nodes,
    nodes a call already failed on) it stays O(k log k + log n) for k excluded nodes: the draw is
    made over the remaining weight and shifted past the excluded nodes' intervals.

    Thread-safe: the only state kept between calls is an index of the last snapshot's addresses,
    replaced whole. ``rng`` may be given for reproducible tests (a ``random.Random`` is not safe
    to share between threads unless you accept its locking).
    """

    def __init__(self, rng: Optional[random.Random] = None) -> None:
        self._random = (rng or random._inst).random
        self._index: Tuple[Optional[Snapshot], Dict[Tuple[str, int], int]] = (None, {})

    def _positions(self, snapshot: Snapshot) -> Dict[Tuple[str, int], int]:
        """Address -> position in ``snapshot.available``; built once per snapshot (O(n))."""
        cached, positions = self._index
        if cached is not snapshot:
            positions = {node.address: i for i, node in enumerate(snapshot.available)}
            self._index = (snapshot, positions)
        return positions

    def pick(self, snapshot: Snapshot, exclude: AbstractSet[Tuple[str, int]] = frozenset()) -> Optional[Node]:
        available = snapshot.available
        cumulative = snapshot.cumulative
        total = snapshot.total
        if not total:
            return None
        if not exclude:
            # bisect_right over cumulative weights: node i owns [cum[i-1], cum[i]).
            i = bisect.bisect_right(cumulative, self._random() * total)
            return available[i] if i < len(available) else available[-1]  # float rounding at the top
        positions = self._positions(snapshot)
        skipped = sorted(i for i in map(positions.get, exclude) if i is not None)
        left = total - sum(available[i].weight for i in skipped)
        if left <= 0:
            return None
        point = self._random() * left
        for i in skipped:  # ascending: shift the point past each excluded interval it reaches
            if point >= cumulative[i] - available[i].weight:
                point += available[i].weight
            else:
                break
        i = bisect.bisect_right(cumulative, point)
        if i >= len(available) or i in skipped:  # float rounding at an edge: take the last one not excluded
            excluded = set(skipped)
            below = range(min(i, len(available) - 1), -1, -1)
            i = next(j for j in itertools.chain(below, range(i, len(available))) if j not in excluded)
        return available[i]
