"""What a provider records about the calls it serves: the server hooks behind ``start_service``'s
``metrics=`` (see ``thriftprobe.metrics`` for the instruments and their labels).

Per call: ``rpc_server_call_duration_seconds`` (appkey, service, method, node = the provider's
advertised ``host:port``, outcome), requests shed without running counted with the outcome
``overloaded``. Per node: calls in flight, requests waiting for a worker, rejections by reason
and method, connections held and connection events. Method names come from the wire: a name the
IDL does not declare is recorded as ``_OTHER`` (OpenTelemetry's rule), so that a client sending
made-up names cannot grow the label sets without end.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Collection, Dict, Optional, Tuple

from ..metrics import RPC_SYSTEM, Recorder
from .hooks import OVERLOADED, Peer, ServerHooks

__all__ = ["UNKNOWN_METHOD", "ChainedHooks", "ProviderMonitor", "chain"]

log = logging.getLogger(__name__)

UNKNOWN_METHOD = "_OTHER"
"""The ``rpc_method`` label of a method the IDL does not declare (OpenTelemetry's value)."""

# How a request answered without running counts as a call: every LOADSHEDDING answer (the
# consumer sees "not executed" and may retry elsewhere) is "overloaded"; an oversized request,
# answered PROTOCOL_ERROR, is a "protocol_error".
_REJECTED_OUTCOME = {
    OVERLOADED: OVERLOADED,
    "max_connections": OVERLOADED,
    "stopping": OVERLOADED,
    "qps": OVERLOADED,
    "concurrency": OVERLOADED,
    "too_large": "protocol_error",
}


class ProviderMonitor(ServerHooks):
    """Server hooks recording one provider's calls, queue and connections into a ``Recorder``.

    Label children are looked up once per (method, outcome) and kept: recording a call is a dict
    lookup, a gauge decrement and a histogram observation.
    """

    def __init__(self, recorder: Recorder, appkey: str, service: str, node: str, methods: Collection[str]) -> None:
        self.recorder = recorder
        self.appkey = appkey
        self.service = service
        self.node = node
        self._methods = frozenset(methods)
        labels = (appkey, service, node)
        self._in_flight = recorder.child(recorder.server_in_flight, *labels)
        self._queued = recorder.child(recorder.server_queued, *labels)
        self._connections = recorder.child(recorder.server_connections, *labels)
        self._calls: Dict[Tuple[str, str], Any] = {}
        self._events: Dict[str, Any] = {}
        self._rejections: Dict[Tuple[str, str], Any] = {}
        # Every declared method's "ok" series exists from the start: at 0 until called (so that
        # rate() sees the first calls), and the first call does not pay for making it (~60 us,
        # spent after the reply, while the worker still counts as busy).
        for method in sorted(self._methods):
            self._call(method, "ok")

    def watch_queue(self, queued: Callable[[], float]) -> None:
        """Read the queue's length from ``queued()`` whenever the metrics are collected."""
        self._queued.set_function(queued)

    def close(self) -> None:
        """The provider stopped: the queue gauge lets go of the server, and reads 0."""
        self._queued.set_function(lambda: 0.0)

    def _method(self, method: Optional[str]) -> str:
        return method if method in self._methods else UNKNOWN_METHOD

    def _call(self, method: str, outcome: str) -> Any:
        found = self._calls.get((method, outcome))
        if found is None:  # first of its kind, or a name the IDL does not declare (cached as _OTHER)
            name = self._method(method)
            found = self._calls.get((name, outcome))
            if found is None:
                rec = self.recorder
                found = self._calls[(name, outcome)] = rec.child(
                    rec.server_duration, RPC_SYSTEM, self.appkey, self.service, name, self.node, outcome
                )
        return found

    def _event(self, event: str) -> Any:
        found = self._events.get(event)
        if found is None:
            rec = self.recorder
            found = self._events[event] = rec.child(
                rec.server_connection_events, self.appkey, self.service, self.node, event
            )
        return found

    # -- the hooks -------------------------------------------------------------------------------

    def connection_opened(self, peer: Peer) -> None:
        self._connections.inc()
        self._event("opened").inc()

    def connection_closed(self, peer: Peer, reason: str) -> None:
        self._connections.dec()
        self._event(reason).inc()

    def request_started(self, method: str, peer: Peer) -> None:
        self._in_flight.inc()

    def request_finished(self, method: str, peer: Peer, start: float, outcome: str, duration: float) -> None:
        self._in_flight.dec()
        self._call(method, outcome).observe(duration)

    def request_rejected(self, method: Optional[str], peer: Peer, reason: str) -> None:
        name = self._method(method) if method is not None else ""
        key = (name, reason)  # keyed by the label, not the name sent: made-up names stay one entry
        found = self._rejections.get(key)
        if found is None:
            rec = self.recorder
            found = self._rejections[key] = rec.child(
                rec.server_rejections, self.appkey, self.service, self.node, name, reason
            )
        found.inc()
        if method is not None:  # a request that was read far enough to be named: a call answered unrun
            self._call(method, _REJECTED_OUTCOME.get(reason, OVERLOADED)).observe(0.0)


class ChainedHooks(ServerHooks):
    """Calls each of ``hooks`` in turn; one that raises is logged and the others still run."""

    def __init__(self, *hooks: ServerHooks) -> None:
        self.hooks = hooks

    def _each(self, name: str, *args: Any) -> None:
        for hook in self.hooks:
            try:
                getattr(hook, name)(*args)
            except Exception:  # a hook must never break the server, nor the hooks after it
                log.exception("server hook %s.%s failed", type(hook).__name__, name)

    def connection_opened(self, peer: Peer) -> None:
        self._each("connection_opened", peer)

    def connection_closed(self, peer: Peer, reason: str) -> None:
        self._each("connection_closed", peer, reason)

    def request_started(self, method: str, peer: Peer) -> None:
        self._each("request_started", method, peer)

    def request_finished(self, method: str, peer: Peer, start: float, outcome: str, duration: float) -> None:
        self._each("request_finished", method, peer, start, outcome, duration)

    def request_rejected(self, method: Optional[str], peer: Peer, reason: str) -> None:
        self._each("request_rejected", method, peer, reason)


def chain(*hooks: Optional[ServerHooks]) -> Optional[ServerHooks]:
    """One hooks object calling every given one (None entries skipped); None when there is none."""
    present = [h for h in hooks if h is not None]
    if not present:
        return None
    if len(present) == 1:
        return present[0]
    return ChainedHooks(*present)
