"""NodeTable: the live set of one service's nodes, as the registry last reported it.

Writers (the registry's watch callbacks) take a lock and publish a new immutable ``Snapshot``;
readers (every call) read ``table.snapshot`` with no lock at all. A snapshot keeps the nodes that
may take calls and their cumulative weights, so a weighted pick is one bisect, and the wire
(transport and protocol) each node speaks. A node that advertises a transport or protocol the
consumer does not speak takes no calls; the table logs one warning for it (again only if it
changes what it advertises), never one per call.

A ``selector`` (the client's version, group and tags: see ``selector.Selector``) decides which
nodes the snapshot offers for calls; the others stay in the table (and in ``explain()``).

Empty-list protection: a removal that would leave the table with no node at all is held for
``empty_grace`` seconds instead of applied. A registry glitch (a session expiry, a restarted
ensemble, providers re-registering) therefore never empties a consumer's table: calls keep going
to the last known nodes, and nodes that re-appear simply stay. A real removal of every provider
is honoured when the grace period ends: the held nodes that did not come back are removed.
Each held node gets the full grace period from the moment it was held, also when an earlier
hold's period is still running. (Until then, calls to them fail fast with NoAvailableNode as
their ports refuse connections.)
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from typing import AbstractSet, Callable, Dict, FrozenSet, Iterable, List, Optional, Tuple

from ..node import Node
from .wire import PROTOCOLS, TRANSPORTS, Wire, advertised, wire_of

__all__ = ["NodeTable", "Snapshot"]

log = logging.getLogger(__name__)


class Snapshot:
    """An immutable view of the table: ``matched``: the nodes the client's selector takes
    (version, group, tags) that speak a known wire; ``available``: those of them that may take
    calls (valid, weight > 0); ``cumulative`` weights aligned with ``available``, and their
    ``total``; ``unmatched``: the nodes the selector leaves out; ``wires``: the wire of every node
    that speaks a known one, by address; ``unspoken``: the nodes that do not; ``held``: the
    addresses of the nodes kept through the empty-list grace period. Built in O(n) on every
    change."""

    __slots__ = (
        "addresses", "all_nodes", "available", "cumulative", "held", "matched", "total", "unmatched", "unspoken",
        "wires",
    )

    def __init__(
        self,
        nodes: Dict[str, Node],
        held: FrozenSet[Tuple[str, int]] = frozenset(),
        selector: Optional[Callable[[Node], bool]] = None,
    ) -> None:
        self.held = held
        self.all_nodes: Tuple[Node, ...] = tuple(nodes.values())
        self.addresses: FrozenSet[Tuple[str, int]] = frozenset(n.address for n in self.all_nodes)
        wires: Dict[Tuple[str, int], Wire] = {}
        unspoken: List[Node] = []
        for node in self.all_nodes:
            wire = wire_of(node)
            if wire is None:
                unspoken.append(node)
            else:
                wires[node.address] = wire
        self.wires = wires
        self.unspoken: Tuple[Node, ...] = tuple(unspoken)
        if selector is None:
            self.unmatched: Tuple[Node, ...] = ()
            self.matched: Tuple[Node, ...] = tuple(n for n in self.all_nodes if n.address in wires)
        else:
            self.unmatched = tuple(n for n in self.all_nodes if not selector(n))
            self.matched = tuple(n for n in self.all_nodes if n.address in wires and selector(n))
        self.available: Tuple[Node, ...] = tuple(n for n in self.matched if n.available)
        self.cumulative: Tuple[int, ...] = tuple(itertools.accumulate(n.weight for n in self.available))
        self.total: int = self.cumulative[-1] if self.cumulative else 0


RemovalListener = Callable[[Node], None]
ChangeListener = Callable[[Dict[str, Node]], None]
LagObserver = Callable[[float], None]


class NodeTable:
    """Thread-safe: any number of readers and writers. After ``fork()`` the owner calls
    ``reinit_after_fork()`` in the child before anything else touches the table."""

    def __init__(
        self, empty_grace: float = 0.0, label: str = "", selector: Optional[Callable[[Node], bool]] = None
    ) -> None:
        self._selector = selector
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._nodes: Dict[str, Node] = {}
        self._held: Dict[str, Node] = {}
        self._held_until: Dict[str, float] = {}  # when each held node's grace ends (monotonic)
        self._listeners: List[RemovalListener] = []
        self._change_listeners: List[ChangeListener] = []
        self._empty_grace = empty_grace
        self._label = label
        self._timer: Optional[threading.Timer] = None
        self._warned: Dict[Tuple[str, int], Tuple[str, str]] = {}  # nodes logged as unspoken, and what they said
        self._lag_observer: Optional[LagObserver] = None
        self.snapshot: Snapshot = Snapshot({})

    def set_lag_observer(self, observer: Optional[LagObserver]) -> None:
        """Call ``observer(seconds)`` after each change ``upsert_at`` applies, with the time from
        the change in the registry to now (the discovery propagation lag)."""
        self._lag_observer = observer

    def on_remove(self, listener: RemovalListener) -> None:
        """Call ``listener(node)`` (under the table's lock: keep it short) when a node leaves."""
        with self._lock:
            self._listeners.append(listener)

    def on_change(self, listener: ChangeListener, *, call_now: bool = False) -> None:
        """Call ``listener(nodes)`` (under the table's lock: it must not block) with every node,
        after each change, and at once if ``call_now``."""
        with self._lock:
            self._change_listeners.append(listener)
            if call_now:
                merged = dict(self._held)
                merged.update(self._nodes)
                listener(merged)

    def retain(self, names: AbstractSet[str]) -> None:
        """Remove every node whose name is not in ``names`` (the registry's own list), by the
        usual rules: a removal that would empty the table is held for the grace period."""
        with self._lock:
            stale = [name for name in self._nodes if name not in names]
        self.remove_many(stale)

    def upsert(self, name: str, node: Node) -> None:
        with self._lock:
            held = self._held.pop(name, None)
            if held is not None:
                del self._held_until[name]
                if not self._held:
                    self._cancel_timer()
            old = self._nodes.get(name) or held
            self._nodes[name] = node
            self._publish()
            if old is not None and old.address != node.address:
                self._removed(old)  # back under its name, at another address: the old one left

    def upsert_at(self, name: str, node: Node, changed_at: float) -> None:
        """``upsert``, for a change the registry recorded at ``changed_at`` (``time.time()``
        seconds, by the registry server's clock; see ``registry.TimedNodeListener``): once it is
        applied, the lag observer gets the seconds since then. A registry clock ahead of this
        host's would make the lag negative; it is clamped at 0."""
        self.upsert(name, node)
        observe = self._lag_observer
        if observe is not None:
            lag = time.time() - changed_at
            observe(lag if lag > 0.0 else 0.0)

    def remove(self, name: str) -> None:
        self.remove_many((name,))

    def remove_many(self, names: Iterable[str]) -> None:
        """Remove nodes in one step. If that leaves no node at all, they are held instead (see
        the module docstring): a registry that suddenly lists none of N nodes keeps all N."""
        with self._lock:
            gone = [(name, node) for name, node in ((n, self._nodes.pop(n, None)) for n in names) if node is not None]
            if not gone:
                return
            if not self._nodes and self._empty_grace > 0:
                until = time.monotonic() + self._empty_grace
                for name, node in gone:
                    self._held[name] = node
                    self._held_until[name] = until
                self._arm_timer()
                log.warning(
                    "%s: the registry shows no node left; keeping the last %d for %.1f s in case it is a glitch",
                    self._label, len(self._held), self._empty_grace,
                )
                self._publish()
                return
            self._publish()
            for _, node in gone:
                self._removed(node)

    def _arm_timer(self) -> None:
        """Under the lock: make the timer fire when the earliest hold ends (later holds end later,
        so a running timer is never too late)."""
        if self._timer is None and self._held_until:
            delay = max(0.0, min(self._held_until.values()) - time.monotonic())
            timer = threading.Timer(delay, lambda: self._grace_over(timer))
            self._timer = timer
            self._timer.name = "thriftprobe-grace-" + self._label
            self._timer.daemon = True
            self._timer.start()

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _grace_over(self, timer: threading.Timer) -> None:
        with self._lock:
            if self._timer is not timer:  # cancelled after it fired: a newer hold owns the held nodes
                return
            self._timer = None
            now = time.monotonic()
            over = [name for name, until in self._held_until.items() if until <= now]
            gone = [self._held.pop(name) for name in over]
            for name in over:
                del self._held_until[name]
            self._arm_timer()  # for the holds that began later
            if not gone:
                return
            log.warning("%s: %d node(s) did not come back within %.1f s; removing them",
                        self._label, len(gone), self._empty_grace)
            self._publish()
            for node in gone:
                self._removed(node)

    def named(self) -> Dict[str, Node]:
        """Every node by znode name (held ones included): a copy."""
        with self._lock:
            merged = dict(self._held)
            merged.update(self._nodes)
            return merged

    def wait_for(self, predicate: Callable[[Snapshot], bool], timeout: float) -> bool:
        """Block until ``predicate(snapshot)`` holds or ``timeout`` seconds pass; return whether it held."""
        with self._changed:
            return self._changed.wait_for(lambda: predicate(self.snapshot), timeout)

    def close(self) -> None:
        """Cancel a pending grace timer."""
        with self._lock:
            timer, self._timer = self._timer, None
        if timer is not None:
            timer.cancel()

    def reinit_after_fork(self) -> None:
        """In a child right after ``fork()`` (single-threaded): a fresh lock, since a thread of
        the parent (a watch callback) may have held it at the fork and does not exist here; the
        grace timer's thread does not exist either."""
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._timer = None

    def copy_for_child(self) -> "NodeTable":
        """A new table with this one's nodes, for a child process after fork (locks are fresh)."""
        table = NodeTable(self._empty_grace, self._label, self._selector)
        table._lag_observer = self._lag_observer
        # Change listeners (the cache file) carry over; removal listeners are the caller's to add.
        table._change_listeners = list(self._change_listeners)
        table._nodes = dict(self._nodes)
        table._held = {}
        table._nodes.update({k: v for k, v in self._held.items() if k not in table._nodes})
        table.snapshot = Snapshot(table._nodes, selector=self._selector)
        return table

    def _publish(self) -> None:
        merged = dict(self._held)
        merged.update(self._nodes)
        held = frozenset(node.address for name, node in self._held.items() if name not in self._nodes)
        snapshot = self.snapshot = Snapshot(merged, held, self._selector)
        if snapshot.unspoken or self._warned:
            self._warn_unspoken(snapshot)
        self._changed.notify_all()
        for listener in self._change_listeners:
            listener(merged)

    def _warn_unspoken(self, snapshot: Snapshot) -> None:
        """Log each node this consumer cannot speak to once (under the lock)."""
        warned: Dict[Tuple[str, int], Tuple[str, str]] = {}
        for node in snapshot.unspoken:
            said = tuple(repr(value) for value in advertised(node))
            warned[node.address] = (said[0], said[1])
            if self._warned.get(node.address) != said:
                log.warning(
                    "%s: node %s:%d advertises transport %s and protocol %s; this consumer speaks "
                    "transports %s and protocols %s, so it sends the node no calls",
                    self._label, node.host, node.port, said[0], said[1], "/".join(TRANSPORTS), "/".join(PROTOCOLS),
                )
        self._warned = warned

    def _removed(self, node: Node) -> None:
        for listener in self._listeners:
            listener(node)
