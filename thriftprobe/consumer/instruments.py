"""What one client records into a ``thriftprobe.metrics.Recorder`` (``build_client(...,
metrics=)``; the README's "Consumer metrics" lists the series and their labels).

Per call: one observation of ``rpc_client_call_duration_seconds``, the whole call as its caller
sees it (retries and sends to other nodes included), labelled with the node that answered or was
tried last and how the call ended. A retry is not a call of its own: it is counted in
``thriftprobe_client_retries`` (by reason), and the connection or node that failed shows in the
connection, ejection and node-state series. Label children are cached per client, so recording
a call is a tuple, a dict lookup and an ``observe``.

Scraped, not recorded per call: connections per node, idle and in use, and the table's nodes by
state (the gauges read the client's pool and table when the registry is collected; in use is
opened - closed - idle, so lending a connection and taking it back cost nothing). Counted as
they happen: connections opened and failed, retries, retry-budget refusals, ejections, and the
discovery propagation lag (fed by the table).

Nothing here imports prometheus_client: a client built without a recorder has no instruments,
and its call path tests one attribute.
"""

from __future__ import annotations

import threading
import time
from typing import AbstractSet, Callable, Dict, List, Optional, Tuple

from thriftpy2.thrift import TApplicationException, TException
from thriftpy2.transport import TTransportException

from ..errors import InvalidArgument, NoAvailableNode, Overloaded, ThriftProbeError
from ..metrics import Recorder, add_gauge_source

__all__ = ["NODE_STATES", "ClientInstruments", "node_label", "outcome_of"]

Address = Tuple[str, int]

NODE_STATES = ("valid", "disabled", "ejected", "held")
"""The states of ``thriftprobe_client_nodes``; each node of a table is in exactly one, checked in
this order: ``held`` (kept through the empty-list grace period), ``disabled`` (switched off,
weight 0, or advertising a wire this consumer does not speak), ``ejected`` (by outlier
detection, or waiting for the probe after it), ``valid`` (takes calls)."""


def node_label(address: Optional[Address]) -> str:
    """``host:port`` (``[host]:port`` for IPv6), or "" when no node was sent anything."""
    if address is None:
        return ""
    host, port = address
    return ("[%s]:%d" if ":" in host else "%s:%d") % (host, port)


def outcome_of(error: BaseException, seconds: float, timeout_ms: Optional[int]) -> Tuple[str, bool]:
    """How a call that raised ``error`` after ``seconds`` ended (one of ``metrics.OUTCOMES``), and
    whether a node is named for it (False: the ``node`` label is "")."""
    if isinstance(error, TTransportException):
        return ("timeout" if error.type == TTransportException.TIMED_OUT else "transport_error"), True
    if isinstance(error, TApplicationException):  # the provider's, or a missing argument (no node)
        return "application_error", True
    if isinstance(error, Overloaded):  # every node tried shed it: named, the last that did
        return "overloaded", True
    if isinstance(error, NoAvailableNode):
        if timeout_ms is not None and seconds * 1000.0 >= timeout_ms:
            return "timeout", True  # connects ran out of the call's time: the last node tried
        return "no_node", False
    if isinstance(error, InvalidArgument):  # the caller's argument: nothing sent, no node blamed
        return "application_error", False
    if isinstance(error, TException):  # an exception the IDL declares, raised by the handler
        return "declared_exception", True
    if isinstance(error, ThriftProbeError):  # the client is closed
        return "no_node", False
    return "transport_error", True  # interrupted mid-call (KeyboardInterrupt...): it did not complete


DEPARTED_GRACE = 300.0
"""Seconds a node's series stay after it left the table (a few scrapes see its last values)."""


class ClientInstruments:
    """One client's instruments (thread-safe). Also the pool's ``PoolWatcher``."""

    def __init__(self, recorder: Recorder, appkey: str, service: str) -> None:
        self.recorder = recorder
        self._appkey = appkey
        self._service = service
        self._lock = threading.Lock()
        self._calls: Dict[Tuple[str, Optional[Address], str], Callable[[float], None]] = {}
        # The observers of successful calls by (method, node): the call path reads it directly.
        self.ok: Dict[Tuple[str, Optional[Address]], Callable[[float], None]] = {}
        self._live: Dict[Address, List[int]] = {}  # [opened, closed] by this client, by address
        self._connects: Dict[Tuple[Address, str], Callable[[], None]] = {}
        self._retries: Dict[Tuple[str, str], Callable[[], None]] = {}
        # The nodes this client opened connections to and that are in its table, with the remove()
        # of their connection gauges: made at the first connection, not for every node of the
        # table (1,000 nodes would be 2,000 series and megabytes for a client that uses few).
        self._pooled: Dict[Address, List[Callable[[], None]]] = {}
        self._idle_count: Callable[[Address], int] = lambda address: 0
        self._removers: List[Callable[[], None]] = []
        # Nodes that left the table, and when: their series go DEPARTED_GRACE s later (a fleet
        # redeployed on new addresses would otherwise leave every old node's series behind).
        self._departed: Dict[Address, float] = {}
        self._closed = False
        self._refused = recorder.child(recorder.client_budget_refusals, appkey, service).inc
        self.observe_lag: Callable[[float], None] = recorder.child(recorder.discovery_lag, appkey, service).observe

    # -- calls -----------------------------------------------------------------------------------

    def call(self, method: str, address: Optional[Address], outcome: str, seconds: float) -> None:
        observe = self._calls.get((method, address, outcome))
        if observe is None:
            rec = self.recorder
            observe = rec.child(
                rec.client_duration, "thrift", self._appkey, self._service, method, node_label(address), outcome
            ).observe
            self._calls[(method, address, outcome)] = observe
        observe(seconds)

    def ok_observer(self, method: str, address: Optional[Address]) -> Callable[[float], None]:
        """The observer of ``method``'s successful calls answered by ``address`` (now in ``ok``)."""
        observe = self.ok.get((method, address))
        if observe is None:
            rec = self.recorder
            observe = self.ok[(method, address)] = rec.child(
                rec.client_duration, "thrift", self._appkey, self._service, method, node_label(address), "ok"
            ).observe
        return observe

    def call_failed(
        self, method: str, address: Optional[Address], error: BaseException, seconds: float, timeout_ms: Optional[int]
    ) -> None:
        outcome, named = outcome_of(error, seconds, timeout_ms)
        self.call(method, address if named else None, outcome, seconds)

    def retried(self, method: str, reason: str) -> None:
        inc = self._retries.get((method, reason))
        if inc is None:
            rec = self.recorder
            inc = self._retries[(method, reason)] = rec.child(
                rec.client_retries, self._appkey, self._service, method, reason
            ).inc
        inc()

    def budget_refused(self) -> None:
        self._refused()

    def ejected(self, address: Address) -> None:
        rec = self.recorder
        rec.child(rec.client_ejections, self._appkey, self._service, node_label(address)).inc()

    # -- the pool (PoolWatcher) ------------------------------------------------------------------

    def _connect_event(self, address: Address, event: str) -> None:
        inc = self._connects.get((address, event))
        if inc is None:
            rec = self.recorder
            inc = self._connects[(address, event)] = rec.child(
                rec.client_connects, self._appkey, self._service, node_label(address), event
            ).inc
        inc()

    def opened(self, address: Address) -> None:
        with self._lock:
            self._live.setdefault(address, [0, 0])[0] += 1
            if address not in self._pooled and not self._closed:
                self._pooled[address] = self._connection_gauges(address)
        self._connect_event(address, "opened")

    def failed(self, address: Address) -> None:
        self._connect_event(address, "failed")

    def closed(self, address: Address) -> None:
        with self._lock:
            self._live.setdefault(address, [0, 0])[1] += 1

    def _in_use(self, address: Address) -> int:
        opened, closed = self._live.get(address, (0, 0))
        return max(0, opened - closed - self._idle_count(address))

    def _connection_gauges(self, address: Address) -> List[Callable[[], None]]:
        """Under the lock: the idle and in-use gauges of a node; returns their remove()."""
        rec, node = self.recorder, node_label(address)
        return [
            add_gauge_source(rec, rec.client_connections, (self._appkey, self._service, node, "idle"),
                             lambda: self._idle_count(address)),
            add_gauge_source(rec, rec.client_connections, (self._appkey, self._service, node, "in_use"),
                             lambda: self._in_use(address)),
        ]

    # -- scraped gauges ----------------------------------------------------------------------------

    def watch_nodes(self, states: Callable[[], Dict[str, int]]) -> None:
        """Report ``states()`` (counts by ``NODE_STATES``) as the table's nodes by state."""
        rec = self.recorder
        with self._lock:
            if self._closed:
                return
            for state in NODE_STATES:
                self._removers.append(add_gauge_source(
                    rec, rec.client_nodes, (self._appkey, self._service, state),
                    lambda state=state: states().get(state, 0),
                ))

    def watch_pool(self, idle_count: Callable[[Address], int]) -> None:
        """Read a node's idle connections with ``idle_count(address)`` (cheap, never raising)."""
        self._idle_count = idle_count

    def nodes_changed(self, addresses: AbstractSet[Address]) -> None:
        """The table's addresses now: the connection gauges of nodes that left go (a node gets
        them at its first connection). Quick (the table calls it under its lock)."""
        now = time.monotonic()
        with self._lock:
            for address in [a for a in self._pooled if a not in addresses]:
                for remove in self._pooled.pop(address):
                    remove()
            known: "set[Optional[Address]]" = {k[1] for k in self._calls} | {k[1] for k in self.ok}
            known |= set(self._live)
            for seen in known:
                if seen is None:
                    continue
                if seen in addresses:
                    self._departed.pop(seen, None)
                else:
                    self._departed.setdefault(seen, now)
            gone = [a for a, since in self._departed.items() if now - since >= DEPARTED_GRACE]
            for address in gone:
                del self._departed[address]
                self._forget_node(address)

    def _forget_node(self, address: Address) -> None:
        """Under the lock: drop a departed node's series and cached observers."""
        rec, node = self.recorder, node_label(address)
        for call in [k for k in self._calls if k[1] == address]:
            del self._calls[call]
            rec.forget(rec.client_duration, "thrift", self._appkey, self._service, call[0], node, call[2])
        for ok in [k for k in self.ok if k[1] == address]:
            del self.ok[ok]
            rec.forget(rec.client_duration, "thrift", self._appkey, self._service, ok[0], node, "ok")
        for connect in [k for k in self._connects if k[0] == address]:
            del self._connects[connect]
            rec.forget(rec.client_connects, self._appkey, self._service, node, connect[1])
        rec.forget(rec.client_ejections, self._appkey, self._service, node)
        self._live.pop(address, None)

    def close(self) -> None:
        """Withdraw this client's gauges (its counters and histograms stay, as Prometheus wants).
        Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            removers = self._removers + [remove for pair in self._pooled.values() for remove in pair]
            self._removers, self._pooled = [], {}
        for remove in removers:
            remove()
