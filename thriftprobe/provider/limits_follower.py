"""Keeps a running provider's request limits current: what operators set, pushed or recorded.

Two sources, the newest revision wins and a provider never goes back to an older one:

- the push: the registry's watch of the service's limits (``Registry.watch_limits``) hands over
  every change within milliseconds;
- the record: the limits in Redis (``LimitsStore``), read at start (before serving), after every
  call of the watch (which includes every reconnection, a new ZooKeeper session's too: a change
  made while the provider was cut off from ZooKeeper, or whose push failed, is found there) and
  every ``interval`` seconds.

The watch's callback runs on kazoo's thread: it only hands the value over and wakes the
follower's own thread (``thriftprobe-limits-<service>-<port>``), which applies it and reads
Redis. While Redis is unreachable the limits in force stay (they are never dropped for none).
"""

from __future__ import annotations

import logging
import threading
from typing import Callable, Optional

from ..errors import ThriftProbeError
from ..limits import ServiceLimits
from ..registry import LimitsWatch, Registry
from ..stores.limits import LimitsStore

__all__ = ["LimitsFollower"]

log = logging.getLogger(__name__)


class LimitsFollower:
    """Applies a service's newest limits through ``apply(limits)`` (called on the follower's
    thread, with increasing revisions only). Thread-safe; ``close()`` stops the watch and joins
    the thread."""

    def __init__(
        self,
        store: LimitsStore,
        registry: Registry,
        env: str,
        appkey: str,
        service: str,
        current: ServiceLimits,
        apply: Callable[[ServiceLimits], None],
        *,
        interval: float = 30.0,
        label: str = "",
    ) -> None:
        self._store = store
        self._registry = registry
        self._env = env
        self._appkey = appkey
        self._service = service
        self._current = current
        self._apply = apply
        self._interval = interval
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._pushed: Optional[ServiceLimits] = None
        self._stopping = False
        self._watch: Optional[LimitsWatch] = None
        self._thread = threading.Thread(
            target=self._run, name="thriftprobe-limits-%s" % (label or service), daemon=True
        )

    @property
    def current(self) -> ServiceLimits:
        """The limits applied last."""
        return self._current

    def start(self) -> None:
        """Start the thread, then the watch (whose first call comes at once). Raises
        BackendError when the watch cannot be set up; nothing is left running then."""
        self._thread.start()
        try:
            self._watch = self._registry.watch_limits(self._env, self._appkey, self._service, self._on_pushed)
        except BaseException:
            self.close()
            raise

    def _on_pushed(self, limits: Optional[ServiceLimits]) -> None:
        # kazoo's thread: hand over and wake, nothing else.
        with self._lock:
            if limits is not None and (self._pushed is None or limits.rev > self._pushed.rev):
                self._pushed = limits
        self._wake.set()

    def _offer(self, limits: ServiceLimits, source: str) -> None:
        with self._lock:
            if self._stopping or limits.rev <= self._current.rev:
                return
            self._current = limits
        log.info(
            "limits of %s/%s/%s now rev %d (from %s): %s",
            self._env, self._appkey, self._service, limits.rev, source, limits.to_dict()["methods"],
        )
        try:
            self._apply(limits)
        except Exception:  # the follower must outlive a surprise, or no later change is applied
            log.exception("applying limits rev %d of %s failed", limits.rev, self._service)

    def _run(self) -> None:
        while True:
            self._wake.wait(self._interval)
            self._wake.clear()
            if self._stopping:
                return
            with self._lock:
                pushed, self._pushed = self._pushed, None
            if pushed is not None:
                self._offer(pushed, "the registry")
            try:
                self._offer(self._store.load(self._appkey, self._service), "Redis")
            except ThriftProbeError as err:
                log.warning("cannot read the limits of %s/%s (%s); keeping rev %d",
                            self._appkey, self._service, err, self._current.rev)

    def close(self, timeout: float = 5.0) -> None:
        """Stop the watch and the thread; waits at most ``timeout`` seconds for the thread (a
        Redis read in progress). Idempotent."""
        with self._lock:
            self._stopping = True
        watch, self._watch = self._watch, None
        if watch is not None:
            watch.close()
        self._wake.set()
        if self._thread.ident is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)
