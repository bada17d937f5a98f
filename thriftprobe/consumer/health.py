"""Failing providers: passive outlier ejection, and an optional active health check.

``OutlierDetector`` counts consecutive connect and transport failures per node. After
``consecutive_failures`` of them the node is ejected (skipped by the balancer) for
``base_ejection`` seconds, doubling with each ejection in a row up to ``max_ejection``. When
the time is up exactly one call probes the node (``claim_probe``); every other call keeps
avoiding it until the probe's result is known: a success clears its record, a failure ejects it
again for longer. Ejection is capped: no more than ``max_ejected_share`` of the nodes that can
take calls (valid, weight > 0) are ever ejected, so a bad network on the client's side cannot
empty the table. If every remaining node is excluded anyway, the client panics and uses all
nodes.

A node that answers ``LOADSHEDDING`` (overloaded: it did not run the handler) is not failing: it
answered at once, in step, so the call path reports a success for it, never a failure. Ejecting
busy nodes would pile their load onto the others; the call moves on instead (see the client).

``HealthChecker`` is the optional active check (like the seed's proxy health thread): a
background thread that opens a TCP connection to each node that can take calls every
``interval`` seconds and reports the outcome to the detector, so even an idle client knows which
nodes are down. A round that fails for any reason is logged and the next one runs as usual.
The check only connects and sends no byte, so it works alike whatever transport and protocol a
node speaks; nodes advertising a wire the consumer does not speak take no calls and are not
checked. The probe call after an ejection is a real call, in the node's wire.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from typing import AbstractSet, Callable, Dict, FrozenSet, Iterable, Optional, Set, Tuple

from .table import Snapshot

__all__ = ["HealthChecker", "OutlierDetector"]

log = logging.getLogger(__name__)

Address = Tuple[str, int]

# 2 ** 62 times any sane base ejection is far beyond any max_ejection, and still a float.
_MAX_DOUBLINGS = 62


class _Record:
    __slots__ = ("after_send", "ejections", "failures", "until")

    def __init__(self) -> None:
        self.failures = 0
        self.ejections = 0
        self.until = 0.0
        self.after_send = False  # failed after a request was sent: a TCP probe proves nothing


class OutlierDetector:
    """Thread-safe. The call path reads ``excluded()``, a frozenset that is empty when all is well,
    and ``claim_probe()``, None unless an ejection just ended."""

    def __init__(
        self,
        consecutive_failures: int = 3,
        base_ejection: float = 1.0,
        max_ejection: float = 30.0,
        max_ejected_share: float = 0.5,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if consecutive_failures < 1 or base_ejection <= 0 or max_ejection < base_ejection:
            raise ValueError("OutlierDetector needs consecutive_failures >= 1 and 0 < base_ejection <= max_ejection")
        if not 0 <= max_ejected_share <= 1:
            raise ValueError("max_ejected_share must be within 0..1")
        self.consecutive_failures = consecutive_failures
        self.base_ejection = base_ejection
        self.max_ejection = max_ejection
        self.max_ejected_share = max_ejected_share
        self._clock = clock
        self._lock = threading.Lock()
        self._records: Dict[Address, _Record] = {}
        # Excluded: ejected now, or waiting for (or in) its probe after the ejection ended.
        self._ejected: FrozenSet[Address] = frozenset()
        self._next_expiry = float("inf")
        self._probe_ready: Set[Address] = set()  # ejection over, no probe sent yet
        self._probing: Set[Address] = set()  # one call is probing it now
        self._on_eject: Tuple[Callable[[Address], None], ...] = ()

    def add_ejection_listener(self, listener: Callable[[Address], None]) -> None:
        """Call ``listener(address)`` on each ejection (under the detector's lock: keep it short,
        never block). A detector shared by several clients tells each of them."""
        with self._lock:
            self._on_eject = (*self._on_eject, listener)

    def remove_ejection_listener(self, listener: Callable[[Address], None]) -> None:
        with self._lock:
            self._on_eject = tuple(fn for fn in self._on_eject if fn != listener)

    def excluded(self) -> FrozenSet[Address]:
        """The addresses calls must avoid now (empty in the common case, at the cost of one
        attribute read): ejected ones, and those whose ejection ended until their probe's result
        is known."""
        if self._ejected and self._clock() >= self._next_expiry:
            self._expire()
        return self._ejected

    def _expire(self) -> None:
        with self._lock:
            now = self._clock()
            for address in self._ejected - self._probe_ready - self._probing:
                if self._records[address].until <= now:
                    self._probe_ready.add(address)
                    log.info("node %s:%d is eligible again after its ejection; the next call probes it", *address)
            self._publish(self._ejected)

    def claim_probe(self, usable: Callable[[Address], bool]) -> Optional[Address]:
        """Return a node whose ejection ended and that no call probes yet, now owned by the
        caller's call (which must report ``success``, ``failure`` or ``probe_abandoned``), or
        None. ``usable(address)`` says whether this call may send to it. Lock-free when no
        ejection has ended."""
        if self._ejected and self._clock() >= self._next_expiry:
            self._expire()
        if not self._probe_ready:
            return None
        with self._lock:
            for address in self._probe_ready:
                if usable(address):
                    self._probe_ready.discard(address)
                    self._probing.add(address)
                    return address
        return None

    def probe_abandoned(self, address: Address) -> None:
        """The claimed probe sent nothing (the caller's own error): another call may probe."""
        with self._lock:
            if address in self._probing:
                self._probing.discard(address)
                self._probe_ready.add(address)

    def _publish(self, ejected: Iterable[Address]) -> None:
        self._ejected = frozenset(ejected)
        waiting = self._probe_ready | self._probing
        self._next_expiry = min(
            (self._records[a].until for a in self._ejected if a not in waiting), default=float("inf")
        )

    def _clear(self, address: Address) -> None:
        """Forget the node's record and end its exclusion (under the lock)."""
        self._records.pop(address, None)
        self._probe_ready.discard(address)
        self._probing.discard(address)
        if address in self._ejected:
            self._publish(self._ejected - {address})

    def success(self, address: Address) -> None:
        if address in self._records:  # unlocked peek: the common case is no record at all
            with self._lock:
                if address in self._probing or address in self._probe_ready:
                    log.info("node %s:%d answered its probe; no longer ejected", *address)
                    self._clear(address)
                elif address in self._records and address not in self._ejected:
                    del self._records[address]

    def recovered(self, address: Address) -> None:
        """An active probe reached the node: end its ejection and clear its record, unless it
        failed after requests were sent (a node that accepts but never answers stays ejected
        until its time is up)."""
        if address in self._records:
            with self._lock:
                record = self._records.get(address)
                if record is None or record.after_send:
                    return
                if address in self._ejected:
                    log.info("node %s:%d answered a health check; no longer ejected", *address)
                self._clear(address)

    def failure(
        self,
        address: Address,
        table_size: int,
        after_send: bool = False,
        eligible: Optional[AbstractSet[Address]] = None,
    ) -> None:
        """Count a failure (``after_send``: of a call, not of a connect); eject the node if it
        reached the threshold and the cap allows.

        ``table_size`` is the number of nodes that can take calls; ``eligible``, if given, their
        addresses, so that ejected nodes switched off since do not count against the cap.
        """
        with self._lock:
            record = self._records.setdefault(address, _Record())
            record.after_send = record.after_send or after_send
            probed = address in self._probing or address in self._probe_ready
            if address in self._ejected and not probed:
                return
            record.failures += 1
            if record.failures < self.consecutive_failures and not probed:
                return
            if not probed:  # a failed probe re-ejects a node that is counted already
                ejected = len(self._ejected if eligible is None else self._ejected & eligible)
                if ejected + 1 > self.max_ejected_share * table_size:
                    log.warning(
                        "node %s:%d failed %d times in a row but is not ejected: "
                        "%d of %d nodes already are (cap %.0f%%)",
                        address[0], address[1], record.failures, ejected, table_size,
                        self.max_ejected_share * 100,
                    )
                    return
            duration = min(self.max_ejection, self.base_ejection * (2.0 ** min(record.ejections, _MAX_DOUBLINGS)))
            record.ejections += 1
            record.failures = 0
            record.until = self._clock() + duration
            self._probe_ready.discard(address)
            self._probing.discard(address)
            self._publish(self._ejected | {address})
            log.warning("ejected node %s:%d for %.1f s after repeated failures", address[0], address[1], duration)
            for listener in self._on_eject:
                listener(address)

    def forget(self, address: Address) -> None:
        """Drop what is known of a node that left the registry."""
        with self._lock:
            self._clear(address)

    def reinit_after_fork(self) -> None:
        self._lock = threading.Lock()


class HealthChecker:
    """Connects to every node every ``interval`` seconds on thread ``thriftprobe-health-<label>``.

    Reports each outcome to the detector. Stopped and joined by ``close()``.
    """

    def __init__(
        self,
        snapshot: Callable[[], Snapshot],
        detector: OutlierDetector,
        label: str,
        interval: float = 5.0,
        timeout: float = 1.0,
    ) -> None:
        if interval <= 0 or timeout <= 0:
            raise ValueError("health check interval and timeout must be > 0")
        self._snapshot = snapshot
        self._detector = detector
        self._interval = interval
        self._timeout = timeout
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="thriftprobe-health-" + label, daemon=True)

    def start(self) -> "HealthChecker":
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            try:
                self.check_once()
            except Exception:  # one bad round must not end the checks for the client's lifetime
                log.exception("%s: health check round failed; the next one runs in %.1f s",
                              self._thread.name, self._interval)

    def check_once(self) -> None:
        """Probe every node that can take calls (valid, weight > 0) once."""
        snap = self._snapshot()
        eligible = frozenset(node.address for node in snap.available)
        for node in snap.available:
            if self._stop.is_set():
                return
            if self._probe(node.address):
                self._detector.recovered(node.address)
            else:
                self._detector.failure(node.address, len(eligible), eligible=eligible)

    def _probe(self, address: Address) -> bool:
        try:
            with socket.create_connection(address, timeout=self._timeout):
                return True
        except OSError:
            return False

    def close(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

