"""Choose the node that takes a call. Balancers are strategy objects with one method, ``pick``."""

from __future__ import annotations

import bisect
import random
from typing import AbstractSet, Optional, Protocol, Tuple

from ..node import Node
from .table import Snapshot

__all__ = ["Balancer", "WeightedRandom"]


class Balancer(Protocol):
    def pick(self, snapshot: Snapshot, exclude: AbstractSet[Tuple[str, int]] = frozenset()) -> Optional[Node]:
        """Return an available node whose address is not in ``exclude``, or None if there is none."""
        ...


class WeightedRandom:
    """Pick an available node with probability proportional to its weight.

    Thread-safe: it keeps no state between calls. ``rng`` may be given for reproducible tests
    (a ``random.Random`` is not safe to share between threads unless you accept its locking).
    """

    def __init__(self, rng: Optional[random.Random] = None) -> None:
        self._random = (rng or random._inst).random

    def pick(self, snapshot: Snapshot, exclude: AbstractSet[Tuple[str, int]] = frozenset()) -> Optional[Node]:
        if not exclude:
            if not snapshot.total:
                return None
            # bisect_right over cumulative weights: node i owns [cum[i-1], cum[i]).
            i = bisect.bisect_right(snapshot.cumulative, self._random() * snapshot.total)
            available = snapshot.available
            return available[i] if i < len(available) else available[-1]  # float rounding at the top
        left = [n for n in snapshot.available if n.address not in exclude]
        if not left:
            return None
        point = self._random() * sum(n.weight for n in left)
        for node in left:
            point -= node.weight
            if point < 0:
                return node
        return left[-1]  # float rounding at the top edge
