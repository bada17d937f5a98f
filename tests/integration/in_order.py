"""InOrder: a deterministic balancer for tests that must know which node a call goes to."""

from __future__ import annotations

from typing import AbstractSet, Any, Optional, Tuple

from thriftprobe.consumer.table import Snapshot
from thriftprobe.node import Node

Address = Tuple[str, int]


class InOrder:
    """Picks the first node of ``ports`` that is neither excluded (ejected) nor skipped."""

    def __init__(self, *ports: int) -> None:
        self.ports = ports

    def pick(
        self,
        snapshot: Snapshot,
        exclude: AbstractSet[Address] = frozenset(),
        skip: AbstractSet[Address] = frozenset(),
        call: Any = None,
    ) -> Optional[Node]:
        by_port = {node.port: node for node in snapshot.available if node.address not in exclude and
                   node.address not in skip}
        return next((by_port[p] for p in self.ports if p in by_port), None)
