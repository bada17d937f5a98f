"""Failing providers: passive outlier ejection, and an optional active health check.

``OutlierDetector`` counts consecutive connect and transport failures per node. After
``consecutive_failures`` of them the node is ejected (skipped by the balancer) for
``base_ejection`` seconds, doubling with each ejection in a row up to ``max_ejection``. When
the time is up the node is eligible again and its next call is the probe: a success clears its
record, a failure ejects it again for longer. Ejection is capped: no more than
``max_ejected_share`` of the nodes are ever ejected, so a bad network on the client's side
cannot empty the table. If every remaining node is excluded anyway, the client panics and uses
all nodes.

``HealthChecker`` is the optional active check (like the seed's proxy health thread): a
background thread that opens a TCP connection to each node every ``interval`` seconds and
reports the outcome to the detector, so even an idle client knows which nodes are down.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from typing import Callable, Dict, FrozenSet, Iterable, Tuple

from .table import Snapshot

__all__ = ["HealthChecker", "OutlierDetector"]

log = logging.getLogger(__name__)

Address = Tuple[str, int]


class _Record:
    __slots__ = ("after_send", "ejections", "failures", "until")

    def __init__(self) -> None:
        self.failures = 0
        self.ejections = 0
        self.until = 0.0
        self.after_send = False  # failed after a request was sent: a TCP probe proves nothing


class OutlierDetector:
    """Thread-safe. The call path reads ``excluded()``, a frozenset that is empty when all is well."""

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
        self._ejected: FrozenSet[Address] = frozenset()
        self._next_expiry = float("inf")

    def excluded(self) -> FrozenSet[Address]:
        """The addresses ejected now (empty in the common case, at the cost of one attribute read)."""
        if self._ejected and self._clock() >= self._next_expiry:
            self._expire()
        return self._ejected

    def _expire(self) -> None:
        with self._lock:
            now = self._clock()
            still = {a for a in self._ejected if self._records[a].until > now}
            for address in self._ejected - still:
                # The next call is the probe: one more failure ejects the node again, for longer.
                self._records[address].failures = self.consecutive_failures - 1
                log.info("node %s:%d is eligible again after its ejection; the next call probes it", *address)
            self._publish(still)

    def _publish(self, ejected: Iterable[Address]) -> None:
        self._ejected = frozenset(ejected)
        self._next_expiry = min((self._records[a].until for a in self._ejected), default=float("inf"))

    def success(self, address: Address) -> None:
        if address in self._records:  # unlocked peek: the common case is no record at all
            with self._lock:
                record = self._records.get(address)
                if record is not None and address not in self._ejected:
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
                del self._records[address]
                if address in self._ejected:
                    log.info("node %s:%d answered a health check; no longer ejected", *address)
                    self._publish(self._ejected - {address})

    def failure(self, address: Address, table_size: int, after_send: bool = False) -> None:
        """Count a failure (``after_send``: of a call, not of a connect); eject the node if it
        reached the threshold and the cap allows."""
        with self._lock:
            record = self._records.setdefault(address, _Record())
            record.after_send = record.after_send or after_send
            if address in self._ejected:
                return
            record.failures += 1
            if record.failures < self.consecutive_failures:
                return
            if len(self._ejected) + 1 > self.max_ejected_share * table_size:
                log.warning(
                    "node %s:%d failed %d times in a row but is not ejected: %d of %d nodes already are (cap %.0f%%)",
                    address[0], address[1], record.failures, len(self._ejected), table_size,
                    self.max_ejected_share * 100,
                )
                return
            duration = min(self.max_ejection, self.base_ejection * (2 ** record.ejections))
            record.ejections += 1
            record.failures = 0
            record.until = self._clock() + duration
            self._publish(self._ejected | {address})
            log.warning("ejected node %s:%d for %.1f s after repeated failures", address[0], address[1], duration)

    def forget(self, address: Address) -> None:
        """Drop what is known of a node that left the registry."""
        with self._lock:
            if self._records.pop(address, None) is not None and address in self._ejected:
                self._publish(self._ejected - {address})

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
            self.check_once()

    def check_once(self) -> None:
        snap = self._snapshot()
        for node in snap.all_nodes:
            if self._stop.is_set():
                return
            if self._probe(node.address):
                self._detector.recovered(node.address)
            else:
                self._detector.failure(node.address, len(snap.all_nodes))

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

