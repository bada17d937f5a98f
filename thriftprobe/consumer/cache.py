"""The last known table of a service on local disk, for a consumer that starts while ZooKeeper
is unreachable.

The file is rewritten (atomically: a temporary file, then rename) after the table changes, by a
thread of its own (``CacheWriter``), never on the registry's thread: however many changes come at
once, the file is written with the newest table, not once per change. It records when ZooKeeper
last confirmed the table (``confirmed_at``): while the client's session is up that is now, so a
quiet fleet's file is re-stamped every few seconds (at most every 30 s) even though nothing
changes. It is read only when ZooKeeper cannot be reached at start, and only if it was confirmed
less than ``max_age`` seconds ago: that bounds how stale the nodes a consumer starts with can be.
Once ZooKeeper answers, the live registry replaces the cached nodes within milliseconds.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import threading
import time
from typing import Callable, Dict, Optional, Tuple, Union

from ..errors import ThriftProbeError
from ..node import Node

__all__ = ["CacheWriter", "TableCache"]

log = logging.getLogger(__name__)

_FORMAT = 1

ConfirmedAt = Callable[[], Optional[float]]


class TableCache:
    """One service's cache file. Not thread-safe: one CacheWriter writes it."""

    def __init__(self, path: Union[str, "os.PathLike[str]"], env: str, appkey: str, service: str) -> None:
        self.path = os.fspath(path)
        self._key = {"env": env, "appkey": appkey, "service": service}

    def save(self, nodes: Dict[str, Node], confirmed_at: float) -> None:
        """Write ``nodes``, as ZooKeeper confirmed them at ``confirmed_at`` (``time.time()``)."""
        payload = dict(self._key, format=_FORMAT, written_at=time.time(), confirmed_at=confirmed_at,
                       nodes={name: node.to_dict() for name, node in nodes.items()})
        folder = os.path.dirname(os.path.abspath(self.path))
        try:
            fd, tmp = tempfile.mkstemp(prefix=".thriftprobe-", dir=folder)
            try:
                with os.fdopen(fd, "w", encoding="utf-8") as fh:
                    json.dump(payload, fh)
                os.replace(tmp, self.path)
            except BaseException:
                os.unlink(tmp)
                raise
        except OSError as err:  # a cache that cannot be written must not break the client
            log.warning("cannot write the node cache %s: %s", self.path, err)

    def load(self, max_age: float) -> Tuple[Dict[str, Node], float]:
        """The cached nodes and their age: seconds since ZooKeeper last confirmed them. Raises
        ThriftProbeError when the file is missing, unreadable, for another service, or older
        than ``max_age``."""
        try:
            with open(self.path, encoding="utf-8") as fh:
                payload = json.load(fh)
        except (OSError, ValueError) as err:
            raise ThriftProbeError("node cache %s is not usable: %s" % (self.path, err)) from err
        if not isinstance(payload, dict) or payload.get("format") != _FORMAT or any(
            payload.get(k) != v for k, v in self._key.items()
        ):
            raise ThriftProbeError("node cache %s is not for %s" % (self.path, "/".join(self._key.values())))
        try:
            # Files written before confirmed_at existed: their write time is the best we know.
            stamp = payload["confirmed_at"] if "confirmed_at" in payload else payload["written_at"]
            age = time.time() - float(stamp)
            entries = dict(payload["nodes"])
        except (KeyError, TypeError, ValueError) as err:
            raise ThriftProbeError("node cache %s is malformed: %s" % (self.path, err)) from err
        if age > max_age:
            raise ThriftProbeError(
                "node cache %s is %.0f s old (since ZooKeeper last confirmed it; limit %.0f s)"
                % (self.path, age, max_age)
            )
        nodes = {}
        for name, data in entries.items():
            try:
                nodes[str(name)] = Node.from_dict(data)
            except (ValueError, TypeError) as err:
                log.warning("skipping cached node %s in %s: %s", name, self.path, err)
        return nodes, age


class CacheWriter:
    """Keeps a TableCache written, on thread ``thriftprobe-cache-<label>``.

    ``changed(nodes)`` is the table's change listener: it runs under the table's lock on the
    registry's thread, so it only hands the newest nodes over. The thread writes the newest
    table once for any number of changes that came meanwhile, at most every half second (a
    burst of 1,000 re-registrations is a handful of writes, the last one with the final table).
    While the table is quiet, it re-stamps the file every ``refresh`` seconds when
    ``confirmed_at()`` (the registry's word) moved on. The stamp is never newer than ZooKeeper's
    last confirmation; it may be older by up to ``refresh`` seconds, which only makes the cache
    look older than it is.

    Thread-safe. ``close()`` writes what is pending and joins the thread. After ``fork()`` the
    child calls ``reinit_after_fork()`` (the thread does not exist there) and ``start()`` again.
    """

    def __init__(self, cache: TableCache, *, label: str, refresh: float, confirmed_at: Optional[float] = None) -> None:
        self._cache = cache
        self._label = label
        self._refresh = max(0.1, refresh)
        self._source: ConfirmedAt = lambda: None
        self._stamp = confirmed_at  # the newest confirmation known (given: the loaded file's)
        self._latest: Dict[str, Node] = {}
        self._version = 0  # of _latest; only the table's listener (serial, under its lock) bumps it
        self._written: Tuple[int, Optional[float]] = (-1, None)  # version and stamp in the file
        self._gap = min(0.5, self._refresh)  # between two writes, so that a burst is written once
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._closed = False
        self._thread: Optional[threading.Thread] = None

    def changed(self, nodes: Dict[str, Node]) -> None:
        """The table changed (O(1): it never blocks the registry's thread)."""
        self._latest = nodes
        self._version += 1
        self._wake.set()

    def start(self, confirmed_at: ConfirmedAt, *, write_now: bool = False) -> None:
        """Start the thread; ``confirmed_at()`` says when the registry last confirmed the table
        (None: not yet, or no registry). ``write_now``: write the file first, on this thread."""
        self._source = confirmed_at
        self._closed = False
        self._stop.clear()
        if write_now:
            self.write_if_due()
        self._thread = threading.Thread(target=self._run, name="thriftprobe-cache-" + self._label, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            self._wake.wait(self._refresh)
            self._wake.clear()
            closing = self._closed
            try:
                wrote = self.write_if_due()
            except Exception:  # the thread must outlive any surprise, or the file stops being kept
                log.exception("writing the node cache %s failed", self._cache.path)
                wrote = True
            if closing:
                return
            if wrote:
                self._stop.wait(self._gap)  # changes meanwhile gather into the next write

    def write_if_due(self) -> bool:
        """Write the file if the table changed, or ZooKeeper confirmed it ``refresh`` s later
        than the file says; return whether it did. Called on the writer's thread (or by its
        owner before it runs)."""
        version = self._version  # before the nodes: a change meanwhile is written next time
        nodes = self._latest
        confirmed = self._source()
        if confirmed is not None and (self._stamp is None or confirmed > self._stamp):
            self._stamp = confirmed
        stamp = self._stamp
        if stamp is None:  # never confirmed by ZooKeeper: nothing worth keeping
            return False
        written_version, written_stamp = self._written
        if version == written_version and written_stamp is not None and stamp - written_stamp < self._refresh:
            return False
        self._cache.save(nodes, stamp)
        self._written = (version, stamp)
        return True

    def close(self) -> None:
        """Write what is pending, stop the thread and join it. Idempotent."""
        self._closed = True
        self._stop.set()
        self._wake.set()
        thread, self._thread = self._thread, None
        if thread is not None and thread is not threading.current_thread():
            thread.join()

    def reinit_after_fork(self) -> None:
        """In a child right after ``fork()``: the parent's thread does not exist here, and its
        event's lock may have been held at the fork."""
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = None
