"""Call monitoring: what consumers and providers record, in Prometheus form, named after the
OpenTelemetry RPC semantic conventions (``rpc.client.call.duration`` becomes
``rpc_client_call_duration_seconds``).

``prometheus_client`` is optional (``pip install 'thriftprobe[metrics]'``). Without it
``default_recorder()`` is None and the SDK records nothing: call paths test one attribute and
move on. With it, every client and provider of the process records into one ``Recorder`` on
``prometheus_client.REGISTRY`` (or the application's own registry: ``Recorder(registry)``, passed
as ``metrics=`` to ``build_client`` and ``start_service``); ``serve(port)`` exposes it over HTTP.

Labels: ``rpc_system`` (always ``thrift``), ``appkey``, ``rpc_service`` (the Thrift service),
``rpc_method``, ``node`` (the provider's ``host:port``), ``outcome`` (one of ``OUTCOMES``).
A ``Recorder`` is thread-safe and may be shared by every thread; after ``fork()`` the child keeps
recording into its own copy (prometheus_client's usual rule for pre-fork servers applies).
"""

from __future__ import annotations

import contextlib
import os
import threading
from typing import Any, Dict, Optional, Tuple

try:  # the optional extra
    import prometheus_client
except ImportError:  # pragma: no cover - exercised by the test that runs without the extra
    prometheus_client = None  # type: ignore[assignment]

__all__ = [
    "BUCKETS",
    "LAG_BUCKETS",
    "OUTCOMES",
    "MetricsServer",
    "Recorder",
    "available",
    "default_recorder",
    "serve",
]

RPC_SYSTEM = "thrift"

OUTCOMES = (
    "ok",
    "declared_exception",
    "application_error",
    "transport_error",
    "timeout",
    "overloaded",
    "no_node",
    "protocol_error",
)
"""How a call ended. ``declared_exception``: the IDL's own exception (a normal answer);
``application_error``: a TApplicationException (undeclared exception, unknown method...);
``transport_error``: the connection failed; ``timeout``: the call's deadline passed;
``overloaded``: answered "not executed" (LOADSHEDDING); ``no_node``: no node could take it
(consumer only); ``protocol_error``: the request could not be decoded (provider only)."""

BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
"""Call durations, seconds: sub-millisecond to 10 s."""

LAG_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
"""Discovery propagation lag, seconds."""

_CALL_LABELS = ("rpc_system", "appkey", "rpc_service", "rpc_method", "node", "outcome")
_SERVICE_LABELS = ("appkey", "rpc_service")
_NODE_LABELS = ("appkey", "rpc_service", "node")


_AVAILABLE = prometheus_client is not None


def available() -> bool:
    """True when prometheus_client is installed (the ``metrics`` extra)."""
    return _AVAILABLE


class Recorder:
    """The instruments of one Prometheus registry, and cheap ways to record into them.

    Label children are cached per label set, so recording a call is a dict lookup and an
    ``observe``. Raises RuntimeError when prometheus_client is not installed.
    """

    def __init__(self, registry: Any = None) -> None:
        if prometheus_client is None:
            raise RuntimeError("thriftprobe metrics need prometheus_client: pip install 'thriftprobe[metrics]'")
        pc = prometheus_client
        reg = pc.REGISTRY if registry is None else registry
        self.registry = reg
        self._children: Dict[Tuple[Any, ...], Any] = {}
        self._lock = threading.Lock()
        self.client_duration = pc.Histogram(
            "rpc_client_call_duration", "Duration of calls made by thriftprobe consumers (rpc.client.call.duration)",
            _CALL_LABELS, unit="seconds", buckets=BUCKETS, registry=reg,
        )
        self.server_duration = pc.Histogram(
            "rpc_server_call_duration", "Duration of calls served by thriftprobe providers (rpc.server.call.duration)",
            _CALL_LABELS, unit="seconds", buckets=BUCKETS, registry=reg,
        )
        self.client_connects = pc.Counter(
            "thriftprobe_client_connects", "Connections a consumer opened (event=opened) or failed to open (failed)",
            (*_NODE_LABELS, "event"), registry=reg,
        )
        self.client_connections = pc.Gauge(
            "thriftprobe_client_connections", "A consumer's connections now, by state (idle in the pool, in_use)",
            (*_NODE_LABELS, "state"), registry=reg, multiprocess_mode="livesum",
        )
        self.client_nodes = pc.Gauge(
            "thriftprobe_client_nodes", "Nodes in a consumer's table, by state (valid, disabled, ejected, held)",
            (*_SERVICE_LABELS, "state"), registry=reg, multiprocess_mode="livesum",
        )
        self.client_retries = pc.Counter(
            "thriftprobe_client_retries", "Calls sent again to another node, by reason (transport_error, overloaded)",
            (*_SERVICE_LABELS, "rpc_method", "reason"), registry=reg,
        )
        self.client_budget_refusals = pc.Counter(
            "thriftprobe_client_retry_budget_refusals", "Retries the retry budget refused",
            _SERVICE_LABELS, registry=reg,
        )
        self.client_ejections = pc.Counter(
            "thriftprobe_client_ejections", "Nodes a consumer's outlier detection ejected", _NODE_LABELS, registry=reg,
        )
        self.discovery_lag = pc.Histogram(
            "thriftprobe_discovery_lag", "Time from a node's change in the registry (znode mtime) to a consumer's "
            "table applying it", _SERVICE_LABELS, unit="seconds", buckets=LAG_BUCKETS, registry=reg,
        )
        self.server_in_flight = pc.Gauge(
            "thriftprobe_server_calls_in_flight", "Calls a provider is running now", _NODE_LABELS, registry=reg,
            multiprocess_mode="livesum",
        )
        self.server_queued = pc.Gauge(
            "thriftprobe_server_queued_requests", "Requests waiting for a provider's worker", _NODE_LABELS,
            registry=reg, multiprocess_mode="livesum",
        )
        self.server_rejections = pc.Counter(
            "thriftprobe_server_rejections", "Requests a provider answered without running them, by reason",
            (*_NODE_LABELS, "rpc_method", "reason"), registry=reg,
        )
        self.server_connections = pc.Gauge(
            "thriftprobe_server_connections", "Connections a provider holds now", _NODE_LABELS, registry=reg,
            multiprocess_mode="livesum",
        )
        self.server_connection_events = pc.Counter(
            "thriftprobe_server_connection_events", "Connections a provider accepted (event=opened) or closed "
            "(event=<close reason>)", (*_NODE_LABELS, "event"), registry=reg,
        )

    def child(self, metric: Any, *labels: str) -> Any:
        """The labelled child of ``metric`` (cached)."""
        key = (id(metric), *labels)
        found = self._children.get(key)
        if found is None:
            with self._lock:
                found = self._children.get(key)
                if found is None:
                    found = self._children[key] = metric.labels(*labels)
        return found

    def forget(self, metric: Any, *labels: str) -> None:
        """Remove ``metric``'s child for ``labels`` (a node that left for good), if it exists."""
        with self._lock:
            self._children.pop((id(metric), *labels), None)
            with contextlib.suppress(KeyError):
                metric.remove(*labels)

    def client_call(self, appkey: str, service: str, method: str, node: str, outcome: str, seconds: float) -> None:
        self.child(self.client_duration, RPC_SYSTEM, appkey, service, method, node, outcome).observe(seconds)

    def server_call(self, appkey: str, service: str, method: str, node: str, outcome: str, seconds: float) -> None:
        self.child(self.server_duration, RPC_SYSTEM, appkey, service, method, node, outcome).observe(seconds)


_default: Dict[str, Recorder] = {}
_default_lock = threading.Lock()


def default_recorder() -> Optional[Recorder]:
    """The process's recorder on ``prometheus_client.REGISTRY``; None without prometheus_client."""
    if not available():
        return None
    found = _default.get("")
    if found is None:
        with _default_lock:
            found = _default.get("")
            if found is None:
                found = _default[""] = Recorder()
    return found


def resolve(metrics: Any) -> Optional[Recorder]:
    """What ``metrics=`` means: None -> the default recorder (if the extra is installed); False ->
    no recording; a Recorder -> itself."""
    if metrics is None:
        return default_recorder()
    if metrics is False:
        return None
    if isinstance(metrics, Recorder):
        return metrics
    raise TypeError("metrics must be a thriftprobe.metrics.Recorder, None or False, got %s" % type(metrics).__name__)


class MetricsServer:
    """An HTTP server exposing a registry at ``/metrics`` on its own daemon thread; ``close()``
    stops it and frees the port."""

    def __init__(self, port: int, host: str = "0.0.0.0", registry: Any = None) -> None:
        if prometheus_client is None:
            raise RuntimeError("thriftprobe metrics need prometheus_client: pip install 'thriftprobe[metrics]'")
        reg = prometheus_client.REGISTRY if registry is None else registry
        self._server, self._thread = prometheus_client.start_http_server(port, addr=host, registry=reg)
        self.host = host
        self.port: int = self._server.server_address[1]

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)


def serve(port: int = 0, host: str = "0.0.0.0", registry: Any = None) -> MetricsServer:
    """Expose this process's metrics at ``http://host:port/metrics`` (``port=0``: the OS picks;
    read ``.port``). Raises RuntimeError without prometheus_client, OSError if the port is taken."""
    return MetricsServer(port, host, registry)


# -- consumer side (issue 12: consumer metrics) ----------------------------------------------------
# Gauges whose value is read when the registry is scraped (nothing is done per call), summed over
# every source that registered for one label set: two clients of one service in a process both
# count their connections and table nodes under that service's labels.

_SOURCES_ATTR = "_thriftprobe_gauge_sources"


def add_gauge_source(recorder: Recorder, metric: Any, labels: Tuple[str, ...], source: Any) -> Any:
    """Make ``metric``'s child for ``labels`` (a Gauge) report the sum of ``source()`` and of the
    other sources registered for the same labels, evaluated at each scrape. ``source`` must be
    cheap, never block and never raise. Returns ``remove()``, which unregisters it (idempotent);
    when the last source of a label set goes, so does its series."""
    with recorder._lock:
        table: Dict[Tuple[Any, ...], Dict[object, Any]] = recorder.__dict__.setdefault(_SOURCES_ATTR, {})
        key = (id(metric), *labels)
        sources = table.get(key)
        if sources is None:
            sources = table[key] = {}
            bound = sources

            def total() -> float:
                return float(sum(fn() for fn in list(bound.values())))

            metric.labels(*labels).set_function(total)
        token = object()
        sources[token] = source

    def remove() -> None:
        with recorder._lock:
            if sources.pop(token, None) is None or sources or table.get(key) is not sources:
                return
            del table[key]
            with contextlib.suppress(KeyError):  # removed by its owner meanwhile
                metric.remove(*labels)

    return remove

# -- provider endpoints (issue 12, provider part) ------------------------------------------------
# Providers with ``metrics_port`` share one HTTP endpoint per process, host and registry: the
# endpoint exposes the whole registry (every provider and consumer of the process), so two
# endpoints of one process would expose the same series twice and a Prometheus scraping both
# would count every call twice. ``port=0`` joins the process's endpoint if there is one; a given
# port joins the endpoint on that port, or binds it. The endpoint closes with its last user.


class SharedEndpoint:
    """One user's hold on a shared ``MetricsServer``: ``.host``, ``.port``; ``release()`` once."""

    def __init__(self, key: Tuple[str, int], server: MetricsServer) -> None:
        self._key = key
        self._server = server
        self.host = server.host
        self.port = server.port
        self._released = False

    def release(self) -> None:
        """Let go of the endpoint; the last user closes it (idempotent)."""
        with _shared_lock:
            if self._released:
                return
            self._released = True
            servers = _shared.get(self._key, [])
            for entry in servers:
                if entry[0] is self._server:
                    entry[1] -= 1
                    if entry[1] > 0:
                        return
                    servers.remove(entry)
                    break
            if not servers:
                _shared.pop(self._key, None)
        self._server.close()


__all__ += ["SharedEndpoint", "acquire_endpoint"]

_shared: Dict[Tuple[str, int], "list[list[Any]]"] = {}  # (host, id(registry)) -> [[server, users, pid]]
_shared_lock = threading.Lock()


def acquire_endpoint(port: int = 0, host: str = "0.0.0.0", registry: Any = None) -> SharedEndpoint:
    """A hold on this process's ``/metrics`` endpoint for ``registry`` on ``host``: the one on
    ``port`` (or any one, for ``port=0``) if it is served already, else a new one. Raises
    RuntimeError without prometheus_client, OSError if the port cannot be bound."""
    if prometheus_client is None:
        raise RuntimeError("thriftprobe metrics need prometheus_client: pip install 'thriftprobe[metrics]'")
    reg = prometheus_client.REGISTRY if registry is None else registry
    key = (host, id(reg))
    with _shared_lock:
        servers = _shared.setdefault(key, [])
        # A forked child inherits the parent's table, not its HTTP threads: serve its own.
        servers[:] = [entry for entry in servers if entry[2] == os.getpid()]
        for entry in servers:
            if port in (0, entry[0].port):
                entry[1] += 1
                return SharedEndpoint(key, entry[0])
        try:
            server = MetricsServer(port, host, reg)
        except BaseException:
            if not servers:
                _shared.pop(key, None)
            raise
        servers.append([server, 1, os.getpid()])
        return SharedEndpoint(key, server)
