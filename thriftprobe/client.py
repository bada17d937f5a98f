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
import types
from typing import Any, Dict, Optional, Set, Tuple, Union

from thriftpy2.thrift import TApplicationException, TClient, TMessageType, args_to_kwargs
from thriftpy2.transport import TTransportException

from . import config as config_mod
from .balancer import Balancer, WeightedRandom
from .errors import InvalidArgument, NoAvailableNode, ThriftProbeError
from .idl import load_service
from .node import validate_names
from .pool import ConnectionPool, PooledConnection
from .registry import ServiceWatch, ZooKeeperRegistry
from .table import NodeTable

__all__ = ["build_client", "ProbeClient"]

log = logging.getLogger(__name__)


class _Method:
    """What a call of one IDL method needs, looked up once instead of on every call."""

    __slots__ = ("name", "args_cls", "args_spec", "result_cls", "oneway", "msg_type")

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
    from a pool, never shared mid-call. It is not fork-safe: build a new client in a child process.
    Close it (or use ``with``) to release its sockets and its share of the ZooKeeper session.

    Errors of a call: ``NoAvailableNode`` when no node is available or none accepted a connection
    (nothing was sent); thriftpy2's ``TTransportException`` when the connection failed or timed
    out after the request was sent (not retried: the call may have run); ``TApplicationException``
    and the IDL's exceptions as the provider raised them.
    """

    def __init__(
        self,
        service: types.ModuleType,
        *,
        env: str,
        appkey: str,
        service_name: str,
        registry: ZooKeeperRegistry,
        table: NodeTable,
        watch: ServiceWatch,
        pool: ConnectionPool,
        balancer: Balancer,
    ) -> None:
        super().__init__(service, None)  # type: ignore[arg-type]  # no fixed protocol: one per call
        self.env = env
        self.appkey = appkey
        self.service_name = service_name
        self.table = table
        self._registry = registry
        self._watch = watch
        self._pool = pool
        self._balancer = balancer
        self._methods: Dict[str, _Method] = {name: _Method(service, name) for name in service.thrift_services}
        self._close_lock = threading.Lock()
        self._closed = False

    # -- the call path -------------------------------------------------------------------------

    def _req(self, _api: str, *args: Any, **kwargs: Any) -> Any:
        method = self._methods[_api]
        try:
            kwargs = args_to_kwargs(method.args_spec, *args, **kwargs)
        except ValueError as err:
            raise TApplicationException(
                TApplicationException.UNKNOWN_METHOD,
                "%s is a required argument of %s.%s" % (err.args[0], self.service_name, _api),
            ) from None
        conn = self._lend()
        try:
            reply = self._exchange(conn, method, kwargs)
        except socket.timeout as err:
            self._pool.discard(conn)
            raise TTransportException(
                TTransportException.TIMED_OUT,
                "%s.%s on %s:%d timed out" % (self.service_name, _api, conn.address[0], conn.address[1]),
            ) from err
        except OSError as err:
            self._pool.discard(conn)
            raise TTransportException(
                TTransportException.UNKNOWN,
                "%s.%s on %s:%d failed: %s" % (self.service_name, _api, conn.address[0], conn.address[1], err),
            ) from err
        except BaseException:
            self._pool.discard(conn)
            raise
        self._pool.release(conn)
        return _unpack(reply)

    def _lend(self) -> PooledConnection:
        """Borrow a connection to a picked node; on a connect failure try the other nodes."""
        if self._closed:
            raise ThriftProbeError("client for %s/%s is closed" % (self.appkey, self.service_name))
        snapshot = self.table.snapshot
        node = self._balancer.pick(snapshot)
        if node is None:
            raise NoAvailableNode(
                "no valid node of service %r in env %s, appkey %s (%d registered, none valid with weight > 0)"
                % (self.service_name, self.env, self.appkey, len(snapshot.all_nodes))
            )
        try:
            return self._pool.acquire(node.address)
        except TTransportException as err:
            first_error = err
        tried: Set[Tuple[str, int]] = {node.address}
        log.debug("cannot connect to %s:%d (%s); trying another node", node.host, node.port, first_error)
        while True:
            node = self._balancer.pick(snapshot, tried)
            if node is None:
                raise NoAvailableNode(
                    "no node of service %r in env %s, appkey %s accepted a connection (tried %s)"
                    % (self.service_name, self.env, self.appkey, ", ".join("%s:%d" % a for a in sorted(tried)))
                ) from first_error
            try:
                return self._pool.acquire(node.address)
            except TTransportException as err:
                log.debug("cannot connect to %s:%d (%s); trying another node", node.host, node.port, err)
                tried.add(node.address)

    @staticmethod
    def _exchange(conn: PooledConnection, method: _Method, kwargs: Dict[str, Any]) -> Any:
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
            return None
        fname, mtype, rseqid = proto.read_message_begin()
        if rseqid != seqid or fname != method.name:
            # Not the answer to this request: the stream is out of step, so the caller discards it.
            raise TTransportException(
                TTransportException.UNKNOWN,
                "reply %s#%d does not match request %s#%d" % (fname, rseqid, method.name, seqid),
            )
        if mtype == TMessageType.EXCEPTION:
            exc = TApplicationException()
            exc.read(proto)
            proto.read_message_end()
            return exc
        result = method.result_cls()
        result.read(proto)
        proto.read_message_end()
        return result

    # -- life cycle ----------------------------------------------------------------------------

    def close(self) -> None:
        """Release the sockets and this client's share of the ZooKeeper session. Idempotent."""
        with self._close_lock:
            if self._closed:
                return
            self._closed = True
        self._watch.close()
        self._pool.close()
        self._registry.close()

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
    max_idle_per_node: int = 32,
) -> ProbeClient:
    """Return a client for ``service_name`` of ``appkey``, as defined in the IDL ``thrift_path``.

    The client watches ``/services/<env>/<appkey>`` in ZooKeeper, so the table of nodes is filled
    before this returns and kept current afterwards. ``socket_timeout`` (ms) bounds each read and
    write of a call; ``connect_timeout`` (ms, default: the socket timeout) bounds opening a
    connection. ``config`` is a loaded Config or a path (see ``thriftprobe.config``).

    Raises InvalidArgument, ConfigError, IdlError, or BackendError when ZooKeeper is unreachable.
    """
    validate_names(appkey, service_name)
    for label, value in (("socket_timeout", socket_timeout), ("connect_timeout", connect_timeout)):
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value <= 0):
            raise InvalidArgument("%s must be a positive number of milliseconds, got %r" % (label, value))
    if not isinstance(max_idle_per_node, int) or max_idle_per_node < 0:
        raise InvalidArgument("max_idle_per_node must be an integer >= 0, got %r" % (max_idle_per_node,))
    cfg = config_mod.resolve(config, env)
    service = load_service(thrift_path, service_name)
    pool = ConnectionPool(
        connect_timeout_ms=connect_timeout or socket_timeout,
        socket_timeout_ms=socket_timeout,
        max_idle=max_idle_per_node,
    )
    table = NodeTable()
    table.on_remove(lambda node: pool.drop(node.address))
    registry = ZooKeeperRegistry(cfg.zookeeper)
    try:
        watch = registry.watch(cfg.env, appkey, service_name, table)
    except BaseException:
        registry.close()
        raise
    log.info("client for %s/%s/%s ready with %d nodes", cfg.env, appkey, service_name, len(table.snapshot.all_nodes))
    return ProbeClient(
        service,
        env=cfg.env,
        appkey=appkey,
        service_name=service_name,
        registry=registry,
        table=table,
        watch=watch,
        pool=pool,
        balancer=balancer or WeightedRandom(),
    )
