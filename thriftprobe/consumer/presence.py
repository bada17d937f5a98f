"""What a consumer tells about itself: to operators, who it is; to its owner, what it sees now.

``Presence``: each client (one per ``build_client``) registers itself under
``/consumers/<env>/<appkey>/<service>/<caller>_<host>_<pid>`` (``_2``, ``_3``... appended when
several clients of one process share that name), with its caller appkey, host, pid, SDK version
and start time, so operators see who calls whom. Best effort: the registry's keeper thread does
the work, re-registers after a lost session and withdraws the entry on ``close()``; an
unreachable ZooKeeper is logged, and never delays or fails a call. A forked child registers its
own entry when it attaches its own watch (on its first call); the parent's stays the parent's.

``explain()``: the client's table as the call path sees it now, node by node: weight, switch,
state (valid, disabled, ejected, held), the ejection's remaining time, calls in flight, pooled
connections, and why the node would or would not be picked. ``InFlight`` counts the calls in
flight per node without a lock (see there).
"""

from __future__ import annotations

import itertools
import logging
import os
import re
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Optional, Set, Tuple

from .._version import __version__
from ..errors import InvalidArgument
from ..node import Node, validate_appkey
from ..registry import ConsumerRegistration, Registry
from .balancer import Balancer, Picker, WeightedRandom
from .health import OutlierDetector
from .pool import ConnectionPool
from .selector import Selector
from .table import NodeTable
from .tiers import warmup_factor
from .wire import advertised, wire_of

__all__ = ["DEFAULT_CALLER", "Explanation", "InFlight", "NodeReport", "Presence", "check_caller", "explain"]

log = logging.getLogger(__name__)

Address = Tuple[str, int]

DEFAULT_CALLER = "unknown"
"""The caller appkey of a client built without ``caller=`` and without ``client.<env>.caller``."""

REGISTER_WAIT = 1.0
"""Seconds ``build_client`` waits, at most, for its consumer entry to be published."""

CLOSE_WAIT = 2.0
"""Seconds ``close()`` waits, at most, for the entry to be withdrawn (it goes with the session
anyway)."""

_UNSAFE_IN_NAME = re.compile(r"[^A-Za-z0-9.\-]")


def check_caller(caller: object) -> str:
    """Return ``caller`` if it can name a calling appkey; raise InvalidArgument (the rules of an appkey)."""
    try:
        return validate_appkey(caller)
    except InvalidArgument as err:
        raise InvalidArgument("caller %s" % str(err).replace("appkey ", "", 1)) from None


# The names this process's clients use now, so that two clients with the same caller of the
# same service get distinct entries. Renewed in a forked child (its pid makes its names its own).
_names_lock = threading.Lock()
_names: Set[Tuple[str, str, str, str]] = set()


def _renew_names_after_fork() -> None:
    global _names_lock  # noqa: PLW0603 - a lock a parent's thread held at the fork is never released
    _names_lock = threading.Lock()
    _names.clear()


os.register_at_fork(after_in_child=_renew_names_after_fork)


class Presence:
    """One client's entry in the registry's consumer tree. Thread-safe; never raises."""

    def __init__(self, env: str, appkey: str, service: str, caller: str) -> None:
        self.env = env
        self.appkey = appkey
        self.service = service
        self.caller = caller
        self._lock = threading.Lock()
        self._registration: Optional[ConsumerRegistration] = None
        self._name: Optional[str] = None
        self._closed = False

    def attach(self, registry: Registry) -> None:
        """Register through ``registry`` (waiting at most ``REGISTER_WAIT`` s for it; the keeper
        goes on trying in the background). Once only: later calls do nothing."""
        with self._lock:
            if self._closed or self._registration is not None:
                return
            host = socket.gethostname()
            pid = os.getpid()
            name = self._claim_name(host, pid)
            info: Dict[str, Any] = {
                "caller": self.caller,
                "host": host,
                "pid": pid,
                "sdk": "thriftprobe/" + __version__,
                "start_time": int(time.time()),
            }
            try:
                self._registration = registry.register_consumer(
                    self.env, self.appkey, self.service, name, info, wait=REGISTER_WAIT
                )
            except Exception as err:  # noqa: BLE001 - best effort: the client works without its entry
                log.warning("cannot register consumer %s of %s/%s/%s (%s); calls are not affected",
                            name, self.env, self.appkey, self.service, err)
                self._release_name()
                return
            if not self._registration.registered():
                log.info("consumer entry %s is not published yet; it is as soon as ZooKeeper answers",
                         self._registration.path)

    def _claim_name(self, host: str, pid: int) -> str:
        base = "%s_%s_%d" % (self.caller, _UNSAFE_IN_NAME.sub("-", host) or "host", pid)
        with _names_lock:
            for n in itertools.count(1):
                name = base if n == 1 else "%s_%d" % (base, n)
                key = (self.env, self.appkey, self.service, name)
                if key not in _names:
                    _names.add(key)
                    self._name = name
                    return name
        raise AssertionError("unreachable")  # pragma: no cover

    def _release_name(self) -> None:
        if self._name is not None:
            with _names_lock:
                _names.discard((self.env, self.appkey, self.service, self._name))
            self._name = None

    @property
    def path(self) -> Optional[str]:
        """Where the entry is (or will be) published; None before ``attach``."""
        registration = self._registration
        return registration.path if registration is not None else None

    def registered(self) -> bool:
        registration = self._registration
        return registration is not None and registration.registered()

    def close(self, timeout: float = CLOSE_WAIT) -> None:
        """Withdraw the entry (waiting at most ``timeout`` s). Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            registration, self._registration = self._registration, None
            self._release_name()
        if registration is not None:
            registration.close(timeout)

    def forget_after_fork(self) -> None:
        """In a forked child: the entry is the parent's (never withdrawn from here); the child
        registers its own on ``attach``."""
        self._lock = threading.Lock()
        self._registration = None
        self._name = None


class InFlight:
    """Calls in flight per node, counted without a lock on the call path.

    Each node has two ``itertools.count`` objects, started and finished calls: ``next()`` on one
    is atomic, so no update is lost between threads. A reader takes ``next()`` of finished, then
    of started: both move on by one, so their difference (started minus finished) is unchanged by
    reading, and it is never negative (every finished call counted had started before). Readers
    take a lock among themselves.
    """

    __slots__ = ("_counts", "_read_lock")

    def __init__(self) -> None:
        self._counts: Dict[Address, Tuple[Iterator[int], Iterator[int]]] = {}
        # Readers (explain) take turns: two interleaved reads would each move the other's
        # counters and report one call too many and one too few. The call path takes no lock.
        self._read_lock = threading.Lock()

    def start(self, address: Address) -> Iterator[int]:
        """Count a call to ``address`` as started; ``next()`` the returned counter when it ends."""
        pair = self._counts.get(address)
        if pair is None:
            pair = self._counts.setdefault(address, (itertools.count(), itertools.count()))
        next(pair[0])
        return pair[1]

    def count(self, address: Address) -> int:
        pair = self._counts.get(address)
        if pair is None:
            return 0
        with self._read_lock:
            finished = next(pair[1])
            return max(0, next(pair[0]) - finished)

    def forget(self, address: Address) -> None:
        """The node left: calls still in flight end on the counter they hold."""
        self._counts.pop(address, None)


@dataclass(frozen=True)
class NodeReport:
    """One node as the call path sees it now (see ``Explanation``)."""

    name: str
    host: str
    port: int
    weight: int
    valid: bool
    state: str
    """``valid`` (takes calls), ``unmatched`` (not of the client's version, group or tags),
    ``disabled`` (switched off, weight 0, or a wire this consumer does not speak), ``ejected``
    (failing: skipped while others are left), ``held`` (the registry lists no node; kept through
    the empty-list grace period, still takes calls)."""
    ejected_for: Optional[float]
    """Seconds the ejection still lasts; 0 once over and awaiting (or in) its probe; None if not ejected."""
    held_for: Optional[float]
    """Seconds the empty-list grace period still keeps the node; None if not held."""
    in_flight: int
    pooled: int
    """Idle connections in the pool, ready for the next call."""
    share: float
    """The probability that the next call is sent to it (0..1), as the balancer stands now."""
    why: str

    @property
    def address(self) -> str:
        return "%s:%d" % (self.host, self.port)

    def to_dict(self) -> Dict[str, Any]:
        return {
            "name": self.name, "host": self.host, "port": self.port, "weight": self.weight,
            "valid": int(self.valid), "state": self.state,
            "ejected_for": None if self.ejected_for is None else round(self.ejected_for, 3),
            "held_for": None if self.held_for is None else round(self.held_for, 3),
            "in_flight": self.in_flight, "pooled": self.pooled, "share": round(self.share, 4), "why": self.why,
        }


@dataclass(frozen=True)
class Explanation:
    """``client.explain()``: the client's table now. ``str()`` gives the printable form;
    ``to_dict()`` the JSON one."""

    env: str
    appkey: str
    service: str
    caller: str
    registered_as: Optional[str]
    """The client's consumer entry (a znode path), None while it is not published."""
    attached: bool
    """Whether the table follows the registry now (False: started from the cache file, or a forked
    child that has not attached yet)."""
    panic: bool
    """Every node that can take calls is excluded (ejected): calls go to all of them again."""
    nodes: List[NodeReport] = field(default_factory=list)

    def to_dict(self) -> Dict[str, Any]:
        return {
            "env": self.env, "appkey": self.appkey, "service": self.service, "caller": self.caller,
            "registered_as": self.registered_as, "attached": self.attached, "panic": self.panic,
            "nodes": [n.to_dict() for n in self.nodes],
        }

    def __str__(self) -> str:
        takes = sum(n.share > 0 for n in self.nodes)
        lines = [
            "client of %s/%s/%s, caller %s; %d node(s), %d take calls now%s%s" % (
                self.env, self.appkey, self.service, self.caller, len(self.nodes), takes,
                "" if self.attached else "; NOT following the registry now (cached or inherited table)",
                "; PANIC: every node is excluded, all take calls" if self.panic else "",
            ),
            "registered as %s" % (self.registered_as or "- (not published now)"),
            "%-21s %6s %5s %-8s %8s %9s %6s %6s  %s" % (
                "node", "weight", "valid", "state", "ejected", "in-flight", "pooled", "pick", "why"),
        ]
        lines.extend("%-21s %6d %5s %-8s %8s %9d %6d %5.1f%%  %s" % (
            n.address, n.weight, "on" if n.valid else "off", n.state,
            "-" if n.ejected_for is None else "%.1fs" % n.ejected_for,
            n.in_flight, n.pooled, n.share * 100, n.why,
        ) for n in self.nodes)
        if not self.nodes:
            lines.append("(no nodes)")
        return "\n".join(lines)


def _held(table: NodeTable) -> Dict[str, float]:
    """Seconds each held node (empty-list protection) is still kept, by name."""
    now = time.monotonic()
    with table._lock:  # the table's own state: read as its grace timer does
        return {name: max(0.0, until - now) for name, until in table._held_until.items()}


def _ejections(outliers: OutlierDetector) -> Dict[Address, Tuple[str, float, int]]:
    """Excluded addresses: (phase ``ejected`` | ``probe`` | ``probing``, seconds left, ejections in a row)."""
    outliers.excluded()  # ends the ejections whose time is up
    with outliers._lock:
        now = outliers._clock()
        found = {}
        for address in outliers._ejected:
            record = outliers._records.get(address)
            if record is None:
                continue
            phase = "probing" if address in outliers._probing else "probe" if address in outliers._probe_ready \
                else "ejected"
            found[address] = (phase, max(0.0, record.until - now), record.ejections)
        return found


def explain(
    *,
    env: str,
    appkey: str,
    service: str,
    caller: str,
    presence: Optional[Presence],
    attached: bool,
    table: NodeTable,
    outliers: OutlierDetector,
    pool: ConnectionPool,
    flights: InFlight,
    balancer: Picker,
) -> Explanation:
    """Build the explanation of one client's table (see ``Explanation``)."""
    snapshot = table.snapshot
    held = _held(table)
    ejections = _ejections(outliers)
    available = {node.address for node in snapshot.available}
    excluded = {address for address in ejections if address in available}
    eligible = available - excluded
    panic = bool(available) and not eligible
    pool_of = eligible if eligible else available
    total = sum(node.weight for node in snapshot.available if node.address in pool_of)
    shares: Optional[Dict[Address, float]] = None
    if isinstance(balancer, Balancer):  # tiers and warm-up: the plan's shares
        shares = balancer.shares(snapshot, frozenset() if panic else outliers.excluded())
    custom = "" if isinstance(balancer, WeightedRandom) else " by weight (the client's balancer, %s, may differ)" \
        % type(balancer).__name__
    selector = table._selector if isinstance(table._selector, Selector) else None
    now = time.time()
    names = {node.address: name for name, node in table.named().items()}
    reports = []
    for node in sorted(snapshot.all_nodes, key=lambda n: n.address):
        address = node.address
        name = names.get(address, node.znode_name(service))
        ejection = ejections.get(address)
        held_for = held.get(name)
        if shares is not None:
            share = shares.get(address, 0.0)
        else:
            share = node.weight / total if total and address in pool_of else 0.0
        if selector is not None and not selector(node):
            state, why = "unmatched", "not selected by this client: %s" % selector.why_not(node)
        else:
            state, why = _why(node, address in available, ejection, held_for, share, total, panic, custom)
            if state in ("valid", "held") and shares is not None:
                why += _tier_note(node, now)
        reports.append(NodeReport(
            name=name, host=node.host, port=node.port, weight=node.weight, valid=node.valid, state=state,
            ejected_for=None if ejection is None else ejection[1], held_for=held_for,
            in_flight=flights.count(address), pooled=pool.idle_count(address), share=share, why=why,
        ))
    return Explanation(
        env=env, appkey=appkey, service=service, caller=caller,
        registered_as=presence.path if presence is not None and presence.registered() else None,
        attached=attached, panic=panic, nodes=reports,
    )


def _tier_note(node: Node, now: float) -> str:
    """What priority and warm-up add to a node's line in ``explain()``."""
    note = "; priority %d" % node.priority if node.priority else ""
    factor, _ = warmup_factor(node, now)
    if factor < 1.0:
        note += "; warming up: %d%% of its weight (if a warm node of its tier is left)" % round(factor * 100)
    return note


def _why(
    node: Node,
    available: bool,
    ejection: Optional[Tuple[str, float, int]],
    held_for: Optional[float],
    share: float,
    total: int,
    panic: bool,
    custom: str,
) -> Tuple[str, str]:
    """(state, why) of one node."""
    if not available:
        if not node.valid:
            return "disabled", "switched off (valid 0): takes no calls"
        if node.weight <= 0:
            return "disabled", "weight 0: takes no calls"
        if wire_of(node) is None:
            transport, protocol = advertised(node)
            return "disabled", "advertises transport %r and protocol %r, which this consumer does not speak: " \
                "takes no calls" % (transport, protocol)
        return "disabled", "takes no calls"  # pragma: no cover - every reason is named above
    picked = "picked with probability %.1f%% (weight %d of %d)%s" % (share * 100, node.weight, total, custom)
    if ejection is not None:
        phase, left, count = ejection
        if phase == "probing":
            why = "ejection over; a call is probing it now, others avoid it until its result is known"
        elif phase == "probe":
            why = "ejection over: the next call probes it, others avoid it until then"
        else:
            why = "ejected (%d time(s) in a row) after consecutive failures: avoided for %.1f s more" % (count, left)
        return "ejected", why + ("; every node is excluded, so calls go to all (panic): " + picked if panic else "")
    if held_for is not None:
        return "held", "the registry lists no node; kept %.1f s more in case it is a glitch, and %s" % (
            held_for, picked)
    return "valid", picked
