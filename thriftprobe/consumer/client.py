"""build_client and ProbeClient, the TClient that picks a node for every call.

The call path touches no ZooKeeper and takes no lock of its own: it reads the table's current
snapshot, asks the balancer for a node, borrows a pooled connection, sends, reads the reply and
gives the connection back.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import types
import weakref
from typing import Any, Dict, FrozenSet, Optional, Tuple, Union

from thriftpy2.protocol.exc import TProtocolException
from thriftpy2.thrift import TApplicationException, TClient, TDecodeException, TMessageType, args_to_kwargs
from thriftpy2.transport import TTransportException

from .. import config as config_mod
from ..errors import BackendError, InvalidArgument, NoAvailableNode, ThriftProbeError
from ..idl import load_service
from ..node import Node, validate_names
from ..registry import Registry, Watch, open_registry
from .balancer import Balancer, WeightedRandom
from .cache import CacheWriter, TableCache
from .health import HealthChecker, OutlierDetector
from .pool import ConnectionPool, PooledConnection
from .retry import Retry
from .table import NodeTable

try:  # the compiled protocol's own error type, when thriftpy2 was built with Cython
    from thriftpy2.protocol.cybin import ProtocolError as _CyProtocolError  # type: ignore[attr-defined]
except ImportError:  # pragma: no cover
    _CyProtocolError = TProtocolException

__all__ = ["ProbeClient", "build_client"]

log = logging.getLogger(__name__)

Address = Tuple[str, int]

# What a failure of the connection or of the byte stream looks like, once a request was sent.
_TRANSPORT_ERRORS = (OSError, EOFError, TTransportException, TProtocolException, TDecodeException, _CyProtocolError)


class _Method:
    """What a call of one IDL method needs, looked up once instead of on every call."""

    __slots__ = ("args_cls", "args_spec", "msg_type", "name", "oneway", "result_cls")

    def __init__(self, service: types.ModuleType, name: str) -> None:
        self.name = name
        self.args_cls = getattr(service, name + "_args")
        self.args_spec = self.args_cls.thrift_spec
        self.result_cls = getattr(service, name + "_result")
        self.oneway = bool(getattr(self.result_cls, "oneway", False))
        self.msg_type = TMessageType.ONEWAY if self.oneway else TMessageType.CALL


class ProbeClient(TClient):
    """A thriftpy2 TClient whose every call goes to a weighted-random valid node of the service.

    One instance is safe to share between any number of threads: connections are lent per call
    from a pool, never shared mid-call. It survives ``fork()``: a child process's first call
    drops what it inherited without touching it (the parent keeps using its sockets and its
    ZooKeeper session) and builds its own, starting from the inherited table of nodes.
    Close it (or use ``with``) to release its sockets and its share of the ZooKeeper session.

    Errors of a call: ``NoAvailableNode`` when no node is available or none accepted a connection
    (nothing was sent); thriftpy2's ``TTransportException`` when the connection failed or timed
    out after the request was sent and the retry policy did not (or could not) send it again;
    ``TApplicationException`` and the IDL's exceptions as the provider raised them.
    """

    def __init__(
        self,
        service: types.ModuleType,
        *,
        cfg: config_mod.Config,
        appkey: str,
        service_name: str,
        registry: Optional[Registry],
        table: NodeTable,
        watch: Optional[Watch],
        pool: ConnectionPool,
        balancer: Balancer,
        retry: Optional[Retry],
        outliers: OutlierDetector,
        health_check_interval: Optional[float],
        cache_writer: Optional[CacheWriter] = None,
    ) -> None:
        super().__init__(service, None)  # type: ignore[arg-type]  # no fixed protocol: one per call
        self.env = cfg.env
        self.appkey = appkey
        self.service_name = service_name
        self.table = table
        self._cfg = cfg
        self._registry = registry
        self._watch = watch
        self._pool = pool
        self._balancer = balancer
        self._retry = retry
        self._outliers = outliers
        self._health_check_interval = health_check_interval
        self._health: Optional[HealthChecker] = None
        self._cache_writer = cache_writer
        self._methods: Dict[str, _Method] = {name: _Method(service, name) for name in service.thrift_services}
        self._close_lock = threading.Lock()
        self._closed = False
        self._forked = False
        self._fork_lock = threading.Lock()
        # A connection coming back to the pool for an address without an idle list is kept only
        # if its node is still in the (current) table.
        pool.set_keep(lambda address: address in self.table.snapshot.addresses)
        table.on_remove(self._node_left)
        self._attacher: Optional[threading.Thread] = None
        self._attach_stop = threading.Event()
        if cache_writer is not None:
            cache_writer.start(self._cache_confirmed_at, write_now=True)
        if registry is None:  # started from the node cache while ZooKeeper was unreachable
            self._start_attaching(first_wait=1.0)
        self._start_health_check()
        for name in self._methods:
            # A real attribute per IDL method spares every call TClient.__getattr__ and a new
            # functools.partial. Names the class already uses (close...) keep TClient's rules.
            if not hasattr(ProbeClient, name):
                setattr(self, name, self._method_caller(name))
        _live_clients.add(self)

    def _method_caller(self, api: str) -> Any:
        call = self._call

        def method(*args: Any, **kwargs: Any) -> Any:
            return call(api, None, args, kwargs)

        method.__name__ = method.__qualname__ = api
        return method

    # -- the call path -------------------------------------------------------------------------

    def _req(self, _api: str, *args: Any, **kwargs: Any) -> Any:
        return self._call(_api, None, args, kwargs)

    def with_timeout(self, timeout_ms: int) -> "_TimeoutView":
        """A view of this client whose calls use ``timeout_ms`` as their socket timeout.

        ``client.with_timeout(200).ping()``; the view shares everything else with the client.
        """
        if not isinstance(timeout_ms, int) or isinstance(timeout_ms, bool) or timeout_ms <= 0:
            raise InvalidArgument("timeout must be a positive number of milliseconds, got %r" % (timeout_ms,))
        return _TimeoutView(self, timeout_ms)

    def _call(self, api: str, timeout_ms: Optional[int], args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Any:
        if self._forked:
            self._adopt_after_fork()
        method = self._methods[api]
        try:
            kwargs = args_to_kwargs(method.args_spec, *args, **kwargs)
        except ValueError as err:
            raise TApplicationException(
                TApplicationException.UNKNOWN_METHOD,
                "%s is a required argument of %s.%s" % (err.args[0], self.service_name, api),
            ) from None
        retry = self._retry
        if retry is not None:
            retry.budget.deposit()
        attempt = 0
        avoid: FrozenSet[Address] = frozenset()
        while True:
            attempt += 1
            conn = self._lend(avoid)
            try:
                reply = self._exchange(conn, method, kwargs, timeout_ms)
            except _TRANSPORT_ERRORS as err:
                self._pool.discard(conn)
                self._outliers.failure(conn.address, len(self.table.snapshot.all_nodes), after_send=True)
                if retry is not None and retry.may_retry(api, attempt):
                    log.debug("%s.%s failed on %s:%d (%s); retrying", self.service_name, api, *conn.address, err)
                    avoid = avoid | {conn.address}
                    continue
                raise _transport_error(err, "%s.%s on %s:%d" % (self.service_name, api, *conn.address)) from err
            except BaseException:
                self._pool.discard(conn)
                raise
            self._pool.release(conn)
            self._outliers.success(conn.address)
            return _unpack(reply)

    def _lend(self, avoid: FrozenSet[Address]) -> PooledConnection:
        """Borrow a connection to a picked node; on a connect failure try the other nodes.

        Ejected nodes and ``avoid`` (nodes this call already failed on) are skipped while any
        other node is left; when none is, every node is eligible again (panic mode).
        """
        if self._closed:
            raise ThriftProbeError("client for %s/%s is closed" % (self.appkey, self.service_name))
        snapshot = self.table.snapshot
        pick = self._balancer.pick
        soft = self._outliers.excluded()
        if avoid:
            soft = soft | avoid
        tried: FrozenSet[Address] = frozenset()
        error: Optional[Exception] = None
        while True:
            node = pick(snapshot, soft | tried) if soft or tried else pick(snapshot)
            if node is None and soft:
                soft = frozenset()
                continue
            if node is None:
                if not tried:
                    raise NoAvailableNode(
                        "no valid node of service %r in env %s, appkey %s (%d registered, none valid with weight > 0)"
                        % (self.service_name, self.env, self.appkey, len(snapshot.all_nodes))
                    )
                raise NoAvailableNode(
                    "no node of service %r in env %s, appkey %s accepted a connection (tried %s)"
                    % (self.service_name, self.env, self.appkey, ", ".join("%s:%d" % a for a in sorted(tried)))
                ) from error
            try:
                return self._pool.acquire(node.address)
            except TTransportException as err:
                log.debug("cannot connect to %s:%d (%s); trying another node", node.host, node.port, err)
                self._outliers.failure(node.address, len(snapshot.all_nodes))
                tried = tried | {node.address}
                error = err

    @staticmethod
    def _exchange(conn: PooledConnection, method: _Method, kwargs: Dict[str, Any], timeout_ms: Optional[int]) -> Any:
        if timeout_ms is not None:
            conn.set_timeout(timeout_ms)
        proto = conn.protocol
        seqid = conn.seqid = (conn.seqid + 1) & 0x7FFFFFFF
        proto.write_message_begin(method.name, method.msg_type, seqid)
        args = method.args_cls()
        for key, value in kwargs.items():
            setattr(args, key, value)
        args.write(proto)
        proto.write_message_end()
        proto.trans.flush()
        if method.oneway:
            reply = None
        else:
            fname, mtype, rseqid = proto.read_message_begin()
            if rseqid != seqid or fname != method.name:
                # Not the answer to this request: the stream is out of step, so the caller discards it.
                raise TTransportException(
                    TTransportException.UNKNOWN,
                    "reply %s#%d does not match request %s#%d" % (fname, rseqid, method.name, seqid),
                )
            reply = TApplicationException() if mtype == TMessageType.EXCEPTION else method.result_cls()
            reply.read(proto)
            proto.read_message_end()
        if timeout_ms is not None:
            conn.set_timeout(None)
        return reply

    # -- fork ----------------------------------------------------------------------------------

    def _adopt_after_fork(self) -> None:
        """First call in a child process: replace what was inherited from the parent.

        Nothing inherited is closed (that would shut the parent's sockets or end its session):
        it is forgotten. The child starts from the inherited table and attaches to ZooKeeper on
        a background thread, so no call waits for ZooKeeper.
        """
        with self._fork_lock:
            if not self._forked:
                return
            self._pool = self._pool.abandon_after_fork()
            self.table = self.table.copy_for_child()
            self.table.on_remove(self._node_left)
            self._outliers.reinit_after_fork()
            if self._retry is not None:
                self._retry.budget.reinit_after_fork()
            self._close_lock = threading.Lock()
            self._registry = self._watch = None  # the parent's
            self._attach_stop = threading.Event()
            if self._cache_writer is not None:
                self._cache_writer.start(self._cache_confirmed_at)
            self._start_attaching(first_wait=0.0)
            self._start_health_check()
            self._forked = False
            log.info("client for %s/%s adopted after fork in pid %d", self.appkey, self.service_name, os.getpid())

    def _start_attaching(self, first_wait: float) -> None:
        self._attacher = threading.Thread(
            target=self._keep_attaching,
            args=(first_wait,),
            name="thriftprobe-attach-%s-%s" % (self.appkey, self.service_name),
            daemon=True,
        )
        self._attacher.start()

    def _attach(self) -> None:
        """Open (a share of) a ZooKeeper session and watch the service into the table. The
        registry's list is authoritative: nodes it does not have (inherited from a parent, or
        read from the cache file) leave the table. Raises BackendError."""
        registry = open_registry(self._cfg)
        try:
            watch = registry.watch(self.env, self.appkey, self.service_name, self.table)
        except BaseException:
            registry.close()
            raise
        with self._close_lock:
            if self._closed:
                watch.close()
                registry.close()
                return
            self._registry, self._watch = registry, watch
        watch.retain_only_watched(self.table)

    def _keep_attaching(self, first_wait: float = 1.0) -> None:
        wait = first_wait
        while not self._attach_stop.wait(wait):
            wait = 1.0
            try:
                self._attach()
            except BackendError as err:
                log.debug("ZooKeeper still unreachable: %s", err)
                continue
            log.info("ZooKeeper reachable: %s/%s now follows the registry", self.appkey, self.service_name)
            return

    def _cache_confirmed_at(self) -> Optional[float]:
        """When ZooKeeper last confirmed the table (the cache file's age counts from it)."""
        watch = self._watch
        return watch.confirmed_at() if watch is not None else None

    def _node_left(self, node: Node) -> None:
        self._pool.drop(node.address)
        self._outliers.forget(node.address)

    def _start_health_check(self) -> None:
        if self._health_check_interval:
            self._health = HealthChecker(
                lambda: self.table.snapshot,
                self._outliers,
                "%s-%s" % (self.appkey, self.service_name),
                interval=self._health_check_interval,
            ).start()

    # -- life cycle ----------------------------------------------------------------------------

    def close(self) -> None:
        """Release the sockets and this client's share of the ZooKeeper session. Idempotent."""
        with self._close_lock:
            if self._closed:
                return
            self._closed = True
        _live_clients.discard(self)
        self._attach_stop.set()
        if self._attacher is not None and self._attacher is not threading.current_thread():
            self._attacher.join()
        if self._health is not None:
            self._health.close()
        self.table.close()
        if self._forked:  # a child that never called: everything it holds is the parent's
            self._pool.abandon_after_fork()
            return
        self._pool.close()
        if self._registry is not None:
            if self._watch is not None:
                self._watch.close()
            self._registry.close()
        if self._cache_writer is not None:
            self._cache_writer.close()  # last: it writes the table as it is now

    def __enter__(self) -> "ProbeClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return "<ProbeClient %s/%s/%s, %d nodes>" % (
            self.env,
            self.appkey,
            self.service_name,
            len(self.table.snapshot.all_nodes),
        )


class _TimeoutView:
    """``client.with_timeout(ms)``: the IDL's methods with a per-call socket timeout."""

    __slots__ = ("_client", "_timeout_ms")

    def __init__(self, client: ProbeClient, timeout_ms: int) -> None:
        self._client = client
        self._timeout_ms = timeout_ms

    def __getattr__(self, api: str) -> Any:
        client = self._client
        if api not in client._methods:
            raise AttributeError("%s has no method %r" % (client.service_name, api))
        return lambda *args, **kwargs: client._call(api, self._timeout_ms, args, kwargs)


_live_clients: "weakref.WeakSet[ProbeClient]" = weakref.WeakSet()


def _mark_clients_forked() -> None:
    # Runs in the child right after fork(), single-threaded: no lock is taken here. Every lock
    # the child may take before it adopts (close() included) is renewed: a parent thread that
    # held one at the fork (a watch callback inside the table, the health or cache thread in
    # an event) does not exist in the child and would never release it.
    for client in list(_live_clients):
        client._forked = True
        client._fork_lock = threading.Lock()
        client._close_lock = threading.Lock()
        client._attach_stop = threading.Event()
        client._health = None  # its thread is the parent's; adopting starts the child's own
        client.table.reinit_after_fork()
        if client._cache_writer is not None:
            client._cache_writer.reinit_after_fork()


os.register_at_fork(after_in_child=_mark_clients_forked)


def _transport_error(err: BaseException, where: str) -> TTransportException:
    if isinstance(err, TTransportException):
        return err
    if isinstance(err, socket.timeout):
        return TTransportException(TTransportException.TIMED_OUT, "%s timed out" % where)
    return TTransportException(TTransportException.UNKNOWN, "%s failed: %s: %s" % (where, type(err).__name__, err))


def _unpack(reply: Any) -> Any:
    """Turn a decoded reply into the call's return value or exception (thriftpy2's rules)."""
    if reply is None:  # oneway
        return None
    if isinstance(reply, TApplicationException):
        raise reply
    success = getattr(reply, "success", None)
    if success is not None:
        return success
    if not reply.thrift_spec:  # void method without throws
        return None
    for key, value in reply.__dict__.items():
        if key != "success" and value:
            raise value
    if hasattr(reply, "success"):
        raise TApplicationException(TApplicationException.MISSING_RESULT)
    return None


def build_client(
    thrift_path: Union[str, "os.PathLike[str]"],
    appkey: str,
    service_name: str,
    socket_timeout: int = 3000,
    *,
    connect_timeout: Optional[int] = None,
    config: Union[config_mod.Config, str, "os.PathLike[str]", None] = None,
    env: Optional[str] = None,
    balancer: Optional[Balancer] = None,
    retry: Optional[Retry] = None,
    outlier_detection: Optional[OutlierDetector] = None,
    health_check_interval: Optional[float] = None,
    empty_grace: float = 10.0,
    cache_file: Union[str, "os.PathLike[str]", None] = None,
    cache_max_age: float = 3600.0,
    max_idle_per_node: int = 32,
) -> ProbeClient:
    """Return a client for ``service_name`` of ``appkey``, as defined in the IDL ``thrift_path``.

    The client watches ``/services/<env>/<appkey>`` in ZooKeeper, so the table of nodes is filled
    before this returns and kept current afterwards. ``socket_timeout`` (ms) bounds each read and
    write of a call; ``connect_timeout`` (ms, default: the socket timeout) bounds opening a
    connection. ``config`` is a loaded Config or a path (see ``thriftprobe.config``).

    Resilience (see the README's "Failure behaviour"): ``retry`` says which methods are idempotent
    and may be sent again after a failure that followed sending (default: none are);
    ``outlier_detection`` ejects nodes that keep failing (default: ``OutlierDetector()``);
    ``health_check_interval`` (s) starts an active TCP health check (default: off);
    ``empty_grace`` (s) is how long the last nodes are kept when the registry suddenly shows none.
    ``cache_file``: keep the last known nodes in this file, and start from it (if younger than
    ``cache_max_age`` s) when ZooKeeper is unreachable; the client then attaches to ZooKeeper
    in the background as soon as it answers.

    Raises InvalidArgument, ConfigError, IdlError, or BackendError when ZooKeeper is unreachable.
    """
    validate_names(appkey, service_name)
    for label, value in (("socket_timeout", socket_timeout), ("connect_timeout", connect_timeout)):
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value <= 0):
            raise InvalidArgument("%s must be a positive number of milliseconds, got %r" % (label, value))
    if not isinstance(max_idle_per_node, int) or max_idle_per_node < 0:
        raise InvalidArgument("max_idle_per_node must be an integer >= 0, got %r" % (max_idle_per_node,))
    if empty_grace < 0 or cache_max_age < 0 or (health_check_interval is not None and health_check_interval <= 0):
        raise InvalidArgument("empty_grace and cache_max_age must be >= 0, health_check_interval > 0")
    cfg = config_mod.resolve(config, env)
    service = load_service(thrift_path, service_name)
    outliers = outlier_detection or OutlierDetector()
    pool = ConnectionPool(
        connect_timeout_ms=connect_timeout or socket_timeout,
        socket_timeout_ms=socket_timeout,
        max_idle=max_idle_per_node,
    )
    table = NodeTable(empty_grace, "%s/%s/%s" % (cfg.env, appkey, service_name))
    cache = TableCache(cache_file, cfg.env, appkey, service_name) if cache_file is not None else None
    confirmed_at: Optional[float] = None
    registry: Optional[Registry] = None
    watch: Optional[Watch] = None
    try:
        registry = open_registry(cfg)
    except BackendError as err:
        if cache is None:
            raise
        try:
            cached, age = cache.load(cache_max_age)
        except ThriftProbeError as cache_err:
            raise BackendError("%s; and %s" % (err, cache_err)) from err
        confirmed_at = time.time() - age
        for name, node in cached.items():
            table.upsert(name, node)
        log.warning("%s; starting %s/%s from %d cached node(s), %.0f s old", err, appkey, service_name,
                    len(cached), age)
    if registry is not None:
        try:
            watch = registry.watch(cfg.env, appkey, service_name, table)
        except BaseException:
            registry.close()
            raise
    writer: Optional[CacheWriter] = None
    if cache is not None:
        writer = CacheWriter(cache, label="%s-%s" % (appkey, service_name), refresh=min(30.0, cache_max_age / 4),
                             confirmed_at=confirmed_at)
        table.on_change(writer.changed, call_now=True)
    log.info(
        "client for %s/%s/%s ready with %d nodes", cfg.env, appkey, service_name, len(table.snapshot.all_nodes)
    )
    return ProbeClient(
        service,
        cfg=cfg,
        appkey=appkey,
        service_name=service_name,
        registry=registry,
        table=table,
        watch=watch,
        pool=pool,
        balancer=balancer or WeightedRandom(),
        retry=retry,
        outliers=outliers,
        health_check_interval=health_check_interval,
        cache_writer=writer,
    )
