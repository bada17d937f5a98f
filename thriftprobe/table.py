"""NodeTable: the live set of one service's nodes, as the registry last reported it.

Writers (the registry's watch callbacks) take a lock and publish a new immutable ``Snapshot``;
readers (every call) read ``table.snapshot`` with no lock at all. A snapshot keeps the nodes that
may take calls and their cumulative weights, so a weighted pick is one bisect.
"""

from __future__ import annotations

import itertools
import threading
from typing import Callable, Dict, List, Tuple

from .node import Node

__all__ = ["NodeTable", "Snapshot"]


class Snapshot:
    """An immutable view of the table: ``available`` nodes (valid, weight > 0) in a stable order,
    ``cumulative`` weights aligned with them, and their ``total``."""

    __slots__ = ("available", "cumulative", "total", "all_nodes")

    def __init__(self, nodes: Dict[str, Node]) -> None:
        self.all_nodes: Tuple[Node, ...] = tuple(nodes[name] for name in sorted(nodes))
        self.available: Tuple[Node, ...] = tuple(n for n in self.all_nodes if n.available)
        self.cumulative: Tuple[int, ...] = tuple(itertools.accumulate(n.weight for n in self.available))
        self.total: int = self.cumulative[-1] if self.cumulative else 0


RemovalListener = Callable[[Node], None]


class NodeTable:
    """Thread-safe: any number of readers and writers."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._nodes: Dict[str, Node] = {}
        self._listeners: List[RemovalListener] = []
        self._changed = threading.Condition(self._lock)
        self.snapshot: Snapshot = Snapshot({})

    def on_remove(self, listener: RemovalListener) -> None:
        """Call ``listener(node)`` (under the table's lock: keep it short) when a node leaves."""
        with self._lock:
            self._listeners.append(listener)

    def upsert(self, name: str, node: Node) -> None:
        with self._lock:
            old = self._nodes.get(name)
            self._nodes[name] = node
            self._publish()
            if old is not None and old.address != node.address:
                self._removed(old)

    def remove(self, name: str) -> None:
        with self._lock:
            old = self._nodes.pop(name, None)
            if old is None:
                return
            self._publish()
            self._removed(old)

    def nodes(self) -> List[Node]:
        """Every registered node, available or not."""
        return list(self.snapshot.all_nodes)

    def wait_for(self, predicate: Callable[[Snapshot], bool], timeout: float) -> bool:
        """Block until ``predicate(snapshot)`` holds or ``timeout`` seconds pass; return whether it held."""
        with self._changed:
            return self._changed.wait_for(lambda: predicate(self.snapshot), timeout)

    def _publish(self) -> None:
        self.snapshot = Snapshot(self._nodes)
        self._changed.notify_all()

    def _removed(self, node: Node) -> None:
        for listener in self._listeners:
            listener(node)
