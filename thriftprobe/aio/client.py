"""build_client and AioProbeClient: the asyncio twin of ``consumer.client``.

Discovery is the threaded client's own: ``build_client`` builds a threaded client in a thread of
the loop's default executor (that is where it waits for ZooKeeper) and takes over its table,
balancer, outlier detector, retry policy and budget, node cache, health check, presence and
metrics. The registry watch keeps filling the table on kazoo's thread; a call reads the table's
current snapshot (no lock, no wait) and asks the same balancer for a node, so nothing on the
event loop ever waits on ZooKeeper. Node departures reach the loop by ``call_soon_threadsafe``
(their idle connections are closed there).

The call path is the threaded one's, awaited: pick a node, borrow a connection from the
client's asyncio pool (``aio.pool``), send, read the reply, give it back; retries of idempotent
methods after a failure that followed sending, shed calls (``LOADSHEDDING``) on to another node
through the retry budget, ``Overloaded`` and ``NoAvailableNode`` as the threaded client raises
them. A call that is cancelled or times out discards its connection: its late reply is never
read as another call's answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from typing import Any, Callable, Dict, FrozenSet, List, Mapping, Optional, Tuple, Union, cast

from thriftpy2.protocol.exc import TProtocolException
from thriftpy2.thrift import TApplicationException, TDecodeException, TMessageType, args_to_kwargs
from thriftpy2.transport import TTransportException

from .. import config as config_mod
from .. import metrics as metrics_mod
from ..consumer import client as threaded
from ..consumer.balancer import Picker
from ..consumer.health import OutlierDetector
from ..consumer.presence import DEFAULT_CALLER, Explanation, explain
from ..consumer.retry import Retry
from ..consumer.selector import GroupSpec
from ..consumer.wire import Wire
from ..errors import LOADSHEDDING, InvalidArgument, NoAvailableNode, ThriftProbeError
from ..idl import IdlSource
from ..node import Node
from .pool import AioConnection, AioConnectionPool, NodeLeft, run_until

__all__ = ["AioProbeClient", "build_client"]

log = logging.getLogger(__name__)

Address = Tuple[str, int]

_TRANSPORT_ERRORS = (OSError, EOFError, TTransportException, TProtocolException, TDecodeException)
_ENCODE_ERRORS = (TDecodeException, TypeError, ValueError, OverflowError)
_OWN_METHODS = frozenset({"close", "with_timeout"})
_clock = time.perf_counter
_MIN_SEND_TIME = 0.001
"""A call with less time than this left sends nothing more (its answer could not arrive in time)."""


class _AioCore:
    """The state and call path of one AioProbeClient (see there): belongs to one event loop."""

    def __init__(
        self, sync: Any, loop: asyncio.AbstractEventLoop, socket_timeout_ms: int, pool_args: Dict[str, Any]
    ) -> None:
        self._sync = sync  # the threaded client: discovery, table, policies (its own pool stays empty)
        core = sync.__dict__[threaded._CORE]
        self._core = core
        self._loop = loop
        self.service_name: str = core.service_name
        self.appkey: str = core.appkey
        self.env: str = core.env
        self.table = core.table
        self._methods: Dict[str, Any] = core._methods
        self._balancer = core._balancer
        self._tracks_load = bool(core._tracks_load)
        self._outliers: OutlierDetector = core._outliers
        self._retry: Optional[Retry] = core._retry
        self._budget = core._budget
        self._instruments = core._instruments
        self._socket_timeout = socket_timeout_ms / 1000.0
        self._flights = core._flights  # calls in flight per node, for explain()
        self._pool = AioConnectionPool(keep=self._keeps, watcher=self._instruments, **pool_args)
        if self._instruments is not None:
            # The connection gauges read this pool (the threaded one stays empty); the metrics
            # thread reads a length, which needs no lock.
            self._instruments.watch_pool(self._pool.idle_count)
        self._closed = False
        self.table.on_remove(self._node_left)  # on kazoo's thread

    # -- table changes, from kazoo's thread -----------------------------------------------------

    def _keeps(self, address: Address, wire: Wire) -> bool:
        return self.table.snapshot.wires.get(address) is wire

    def _node_left(self, node: Node) -> None:
        if self._closed:
            return
        with contextlib.suppress(RuntimeError):  # a closed loop: nothing left to drop
            self._loop.call_soon_threadsafe(self._pool.drop, node.address)

    @property
    def closed(self) -> bool:
        """Whether ``close()`` has begun (read again after every wait: it may come meanwhile)."""
        return self._closed

    # -- the call path --------------------------------------------------------------------------

    async def call(self, api: str, timeout_ms: Optional[int], args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Any:
        if asyncio.get_running_loop() is not self._loop:
            raise ThriftProbeError(
                "this client of %s/%s belongs to the event loop it was built on; build one per loop"
                % (self.appkey, self.service_name)
            )
        instruments = self._instruments
        if instruments is None:
            return await self._send(api, timeout_ms, args, kwargs, None)
        began = _clock()
        trace: List[Optional[Address]] = [None]
        try:
            result = await self._send(api, timeout_ms, args, kwargs, trace)
        except BaseException as err:
            instruments.call_failed(api, trace[0], err, _clock() - began, timeout_ms)
            raise
        instruments.ok_observer(api, trace[0])(_clock() - began)
        return result

    async def _send(
        self,
        api: str,
        timeout_ms: Optional[int],
        args: Tuple[Any, ...],
        kwargs: Dict[str, Any],
        trace: Optional[List[Optional[Address]]],
    ) -> Any:
        core = self._core
        method = self._methods[api]
        try:
            kwargs = args_to_kwargs(method.args_spec, *args, **kwargs)
        except ValueError as err:
            raise TApplicationException(
                TApplicationException.UNKNOWN_METHOD,
                "%s is a required argument of %s.%s" % (err.args[0], self.service_name, api),
            ) from None
        # Two clocks: the threaded helpers (_why_not_resend) take time.monotonic() deadlines,
        # the loop's timeouts take loop time.
        deadline = None if timeout_ms is None else time.monotonic() + timeout_ms / 1000.0
        loop_deadline = None if timeout_ms is None else self._loop.time() + timeout_ms / 1000.0
        retry = self._retry
        self._budget.deposit()
        sends = 0
        avoid: FrozenSet[Address] = frozenset()
        shed: Dict[Address, str] = {}
        never: FrozenSet[Address] = frozenset()
        sent_error: Optional[TTransportException] = None
        while True:
            try:
                conn, probing = await self._lend(avoid, loop_deadline, timeout_ms, never, trace, (api, kwargs))
            except NoAvailableNode as none:
                if sent_error is None:
                    if shed:
                        raise core._overloaded(api, shed, "then: %s" % none) from none
                    raise
                raise TTransportException(
                    sent_error.type, "%s; sending it again found no node: %s" % (sent_error.message, none)
                ) from sent_error
            address = conn.address
            # The exchange's time: the socket timeout, or what is left of the call's own (one
            # clock read per send serves the check below, the bound and the blame rule).
            now = self._loop.time()
            exchange_time = self._socket_timeout
            if loop_deadline is not None:
                exchange_time = min(exchange_time, loop_deadline - now)
            if exchange_time < _MIN_SEND_TIME:
                # The call's time ran out (connecting, waiting for a connection, earlier tries):
                # nothing more is sent, and the node is not to blame.
                self._pool.release(conn)
                if probing:
                    self._outliers.probe_abandoned(address)
                spent = "the call's timeout of %d ms ran out" % (timeout_ms or 0)
                if sent_error is not None:
                    raise TTransportException(
                        sent_error.type, "%s; not sent again: %s" % (sent_error.message, spent)
                    ) from sent_error
                if shed:
                    raise core._overloaded(api, shed, spent)
                raise TTransportException(TTransportException.TIMED_OUT, "%s.%s: %s before it was sent"
                                          % (self.service_name, api, spent))
            done = self._flights.start(address)
            if trace is not None:
                trace[0] = address
            tracked = self._tracks_load
            answered = False
            if tracked:
                self._balancer.begin(address)
                sent_at = _clock()
            try:
                reply = await self._exchange(conn, method, kwargs, now + exchange_time)
                answered = not (type(reply) is TApplicationException and reply.type == LOADSHEDDING)
            except _Unencodable as bad:
                if probing:
                    self._outliers.probe_abandoned(address)
                self._pool.discard(conn)  # the transport's write buffer holds part of it
                raise InvalidArgument(threaded._describe_unencodable(
                    self.service_name, method, kwargs, bad.error, False)) from bad.error
            except _TRANSPORT_ERRORS as err:
                self._pool.discard(conn)
                if self.closed:  # close() shut the connection under the call: not the node's doing
                    raise ThriftProbeError(
                        "client for %s/%s was closed during the call to %s:%d; it may have run"
                        % (self.appkey, self.service_name, address[0], address[1])
                    ) from err
                # Cut short by its own deadline after the call had spent most of its time before
                # sending (waiting for a connection, connecting, earlier tries), a timeout says
                # nothing about the node.
                starved = (
                    isinstance(err, TimeoutError) and timeout_ms is not None
                    and exchange_time < self._socket_timeout and exchange_time < timeout_ms / 2000.0
                )
                if starved:
                    if probing:
                        self._outliers.probe_abandoned(address)
                else:
                    eligible = core._eligible(self.table.snapshot)
                    self._outliers.failure(address, len(eligible), after_send=True, eligible=eligible)
                error = threaded._transport_error(err, "%s.%s on %s:%d" % (self.service_name, api, *address))
                sends += 1
                out_of_time = loop_deadline is not None and self._loop.time() >= loop_deadline - _MIN_SEND_TIME
                if not out_of_time and retry is not None and retry.may_retry(api, sends):
                    log.debug("%s.%s failed on %s:%d (%s); retrying", self.service_name, api, *address, err)
                    if self._instruments is not None:
                        self._instruments.retried(api, "transport_error")
                    avoid = avoid | {address}
                    sent_error = error
                    if error is not err:
                        error.__cause__ = err
                    continue
                if (
                    self._instruments is not None and retry is not None and not out_of_time
                    and api in retry.idempotent and sends < retry.attempts
                ):  # a retry the policy allowed and only the budget refused
                    self._instruments.budget_refused()
                if error is err:
                    raise
                raise error from err
            except BaseException:  # cancelled (wait_for, task.cancel()) mid-call: out of step
                self._pool.discard(conn)
                if probing:
                    self._outliers.probe_abandoned(address)
                raise
            finally:
                next(done)
                if tracked:
                    self._balancer.end(address, _clock() - sent_at, answered)
            self._pool.release(conn)
            self._outliers.success(address)
            if type(reply) is TApplicationException and reply.type == LOADSHEDDING:
                shed[address] = reply.message or ""
                never = frozenset(shed)
                why = core._why_not_resend(shed, deadline, timeout_ms)
                if why is None:
                    if self._instruments is not None:
                        self._instruments.retried(api, "overloaded")
                    continue
                if sent_error is not None:
                    overloaded = core._overloaded(api, shed, why)
                    raise TTransportException(
                        sent_error.type, "%s; sending it again: %s" % (sent_error.message, overloaded)
                    ) from sent_error
                raise core._overloaded(api, shed, why)
            return threaded._unpack(reply)

    async def _lend(
        self,
        avoid: FrozenSet[Address],
        deadline: Optional[float],
        timeout_ms: Optional[int],
        never: FrozenSet[Address],
        trace: Optional[List[Optional[Address]]],
        call: Any,
    ) -> Tuple[AioConnection, bool]:
        """Borrow a connection to a picked node (see the threaded ``_Core._lend``: the same
        ejection, panic mode and probe rules); ``deadline`` is loop time."""
        if self._closed:
            raise ThriftProbeError("client for %s/%s is closed" % (self.appkey, self.service_name))
        snapshot = self.table.snapshot
        pick = self._balancer.pick
        outliers = self._outliers
        ejected = outliers.excluded()
        probe: Optional[Address] = None
        if ejected:
            eligible = self._core._eligible(snapshot)
            barred = avoid | never
            probe = outliers.claim_probe(lambda address: address in eligible and address not in barred)
        tried: FrozenSet[Address] = never
        error: Optional[Exception] = None
        where = "service %r in env %s, appkey %s" % (self.service_name, self.env, self.appkey)
        while True:
            if probe is not None:
                address = probe
            else:
                node = pick(snapshot, ejected, avoid | tried if avoid else tried, call)
                if node is None and (ejected or avoid):
                    ejected = avoid = frozenset()
                    continue
                if node is None:
                    if tried is never and never:
                        raise NoAvailableNode("no node of %s is left that has not shed the call (shed: %s)"
                                              % (where, threaded._addresses(never)))
                    if not tried:
                        raise NoAvailableNode("no valid node of %s (%d registered, none valid with weight > 0)"
                                              % (where, len(snapshot.all_nodes)))
                    raise NoAvailableNode("no node of %s accepted a connection (tried %s)"
                                          % (where, threaded._addresses(tried - never) or "none")) from error
                address = node.address
            wire = snapshot.wires[address]
            try:
                return await self._pool.acquire(address, wire, deadline), probe is not None
            except NodeLeft:  # it left the table while this call waited for one of its connections
                if probe is not None:
                    outliers.probe_abandoned(probe)
                    probe = None
                snapshot = self.table.snapshot
                continue
            except TTransportException as err:
                if self.closed:  # close() closed the pool under this call: no node is to blame
                    if probe is not None:
                        outliers.probe_abandoned(probe)
                    raise ThriftProbeError(
                        "client for %s/%s was closed during the call; nothing was sent"
                        % (self.appkey, self.service_name)
                    ) from err
                if trace is not None:
                    trace[0] = address
                if deadline is not None and self._loop.time() >= deadline:
                    if probe is not None:
                        outliers.probe_abandoned(probe)
                    raise NoAvailableNode(
                        "no node of %s accepted a connection within the call's timeout of %d ms (tried %s)"
                        % (where, timeout_ms or 0, threaded._addresses((tried - never) | {address}))
                    ) from err
                log.debug("cannot connect to %s:%d (%s); trying another node", address[0], address[1], err)
                eligible = self._core._eligible(snapshot)
                outliers.failure(address, len(eligible), eligible=eligible)
                tried = tried | {address}
                probe = None
                error = err
            except OSError as err:
                if probe is not None:
                    outliers.probe_abandoned(probe)
                raise TTransportException(
                    TTransportException.NOT_OPEN,
                    "cannot open a connection to %s:%d here: %s; nothing was sent" % (address[0], address[1], err),
                ) from err
            except BaseException:
                if probe is not None:
                    outliers.probe_abandoned(probe)
                raise

    @staticmethod
    async def _exchange(conn: AioConnection, method: Any, kwargs: Dict[str, Any], until: float) -> Any:
        """Send one request and read its reply by ``until`` (loop time: the socket timeout or the
        call's deadline, whichever comes first). Raises _Unencodable, TimeoutError, transport
        errors."""
        proto = conn.protocol
        seqid = conn.seqid = (conn.seqid + 1) & 0x7FFFFFFF
        try:
            proto.write_message_begin(method.name, method.msg_type, seqid)
            args = method.args_cls()
            for key, value in kwargs.items():
                setattr(args, key, value)
            proto.write_struct(args)
            proto.write_message_end()
        except _ENCODE_ERRORS as err:
            raise _Unencodable(err) from err
        return await run_until(_send_and_read(proto, method, seqid), until)

    # -- life cycle -----------------------------------------------------------------------------

    def explain(self) -> Explanation:
        core = self._core
        presence = core._presence
        return explain(
            env=self.env, appkey=self.appkey, service=self.service_name,
            caller=presence.caller if presence is not None else DEFAULT_CALLER,
            presence=presence, attached=core._watch is not None, table=self.table,
            outliers=self._outliers, pool=cast(Any, self._pool), flights=self._flights, balancer=self._balancer,
        )

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            if asyncio.get_running_loop() is self._loop:
                await self._pool.close()
            elif self._loop.is_running():  # from another thread's loop: closed on the client's own
                coro = self._pool.close()
                pool_closing = asyncio.run_coroutine_threadsafe(coro, self._loop)
                waiting = asyncio.wrap_future(pool_closing)
                while not (await asyncio.wait({waiting}, timeout=0.1))[0]:
                    if not self._loop.is_running():  # it stopped before it got to the close
                        pool_closing.cancel()
                        coro.close()  # never started: nothing to finish
                        self._pool.abandon()
                        break
            else:  # its loop has ended (or is not running): the sockets are closed without it
                self._pool.abandon()
        finally:
            # The discovery is closed whatever happens to this task: cancelled, its wait still
            # ends in the thread; on a loop that can no longer run executors, right here.
            try:
                closing = asyncio.get_running_loop().run_in_executor(None, self._sync.close)
            except RuntimeError:
                self._sync.close()
            else:
                await asyncio.shield(closing)


async def _send_and_read(proto: Any, method: Any, seqid: int) -> Any:
    """Flush the encoded request and read its reply (None for a oneway call)."""
    await proto.trans.flush()
    if method.oneway:
        return None
    fname, mtype, rseqid = await proto.read_message_begin()
    if rseqid != seqid or fname != method.name:
        raise TTransportException(
            TTransportException.UNKNOWN,
            "reply %s#%d does not match request %s#%d" % (fname, rseqid, method.name, seqid),
        )
    reply = TApplicationException() if mtype == TMessageType.EXCEPTION else method.result_cls()
    await proto.read_struct(reply)
    await proto.read_message_end()
    return reply


class _Unencodable(Exception):
    def __init__(self, error: BaseException) -> None:
        super().__init__(str(error))
        self.error = error


def _method(core: _AioCore, api: str, timeout_ms: Optional[int]) -> Callable[..., Any]:
    call = core.call

    async def method(*args: Any, **kwargs: Any) -> Any:
        return await call(api, timeout_ms, args, kwargs)

    method.__name__ = method.__qualname__ = api
    return method


class AioProbeClient:
    """An asyncio client whose every call goes to a node of the service the balancer picks:
    ``await client.ping()``. Its attributes are the IDL's methods (coroutine functions), by
    their own names; ``close`` and ``with_timeout`` are the client's own (IDL methods named so
    are ``tclose``/``twith_timeout``). ``table``, ``env``, ``appkey``, ``service_name`` read its
    state when the IDL has no method of that name.

    It belongs to the event loop it was built on: share it between any number of tasks of that
    loop, never between loops or threads. Connections are lent per call, never shared mid-call.
    Errors are the threaded ``ProbeClient``'s (``NoAvailableNode``, ``Overloaded``,
    ``InvalidArgument``, ``TTransportException``, ``TApplicationException``, the IDL's
    exceptions). ``asyncio.wait_for`` around a call, or cancelling its task, is safe: the
    call's connection is closed, never reused. Close it (``await client.close()`` or
    ``async with``) to release its sockets and its share of the ZooKeeper session.
    """

    def __init__(self, core: _AioCore) -> None:
        attrs = self.__dict__
        attrs["_aio_core"] = core
        for name in core._methods:
            attrs[("t" + name) if name in _OWN_METHODS else name] = _method(core, name, None)
        for name in core._methods:
            if name not in _OWN_METHODS:
                attrs[name] = _method(core, name, None)

    def __getattr__(self, name: str) -> Any:
        core = self.__dict__.get("_aio_core")
        if core is None or name.startswith("__"):
            raise AttributeError(name)
        if name in ("table", "env", "appkey", "service_name"):
            return getattr(core, name)
        raise AttributeError("client of %s has no attribute or IDL method %r" % (core.service_name, name))

    def with_timeout(self, timeout_ms: int) -> "_TimeoutView":
        """A view whose calls end within ``timeout_ms`` in all, connects included."""
        if not isinstance(timeout_ms, int) or isinstance(timeout_ms, bool) or timeout_ms <= 0:
            raise InvalidArgument("timeout must be a positive number of milliseconds, got %r" % (timeout_ms,))
        return _TimeoutView(self.__dict__["_aio_core"], timeout_ms)

    def explain(self) -> Explanation:
        """The client's table now, node by node, as ``ProbeClient.explain`` shows it (weight,
        state, calls in flight, pooled connections, why a node would or would not be picked).
        Reads memory only: safe to call on the loop."""
        core: _AioCore = self.__dict__["_aio_core"]
        return core.explain()

    async def close(self) -> None:
        """Close the connections, then (in a thread of the executor) the discovery. Idempotent."""
        await self.__dict__["_aio_core"].close()

    async def __aenter__(self) -> "AioProbeClient":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def __repr__(self) -> str:
        core = self.__dict__["_aio_core"]
        return "<AioProbeClient %s/%s/%s, %d nodes>" % (
            core.env, core.appkey, core.service_name, len(core.table.snapshot.all_nodes))


class _TimeoutView:
    """``client.with_timeout(ms)``: the IDL's methods, each call bounded by ``ms`` in all."""

    def __init__(self, core: _AioCore, timeout_ms: int) -> None:
        self.__dict__["_aio_view"] = (core, timeout_ms)

    def __getattr__(self, api: str) -> Any:
        core, timeout_ms = self.__dict__["_aio_view"]
        if api not in core._methods:
            raise AttributeError("%s has no method %r" % (core.service_name, api))
        return _method(core, api, timeout_ms)


def _close_abandoned(building: "asyncio.Future[Any]") -> None:
    if building.cancelled() or building.exception() is not None:
        return
    sync = building.result()
    with contextlib.suppress(RuntimeError):  # the loop is closing: close it here instead
        asyncio.get_running_loop().run_in_executor(None, sync.close)
        return
    sync.close()


async def build_client(
    thrift_path: IdlSource,
    appkey: str,
    service_name: str,
    socket_timeout: int = 3000,
    *,
    connect_timeout: Optional[int] = None,
    config: Union[config_mod.Config, str, "os.PathLike[str]", None] = None,
    env: Optional[str] = None,
    balancer: Optional[Picker] = None,
    version: Optional[str] = "*",
    group: Optional[GroupSpec] = "",
    tags: Optional[Mapping[str, str]] = None,
    retry: Optional[Retry] = None,
    outlier_detection: Optional[OutlierDetector] = None,
    health_check_interval: Optional[float] = None,
    empty_grace: float = 10.0,
    cache_file: Union[str, "os.PathLike[str]", None] = None,
    cache_max_age: float = 3600.0,
    max_idle_per_node: int = 32,
    max_idle_age: Optional[float] = 30.0,
    caller: Optional[str] = None,
    metrics: Union[metrics_mod.Recorder, bool, None] = None,
    max_connections_per_node: int = 64,
) -> AioProbeClient:
    """Return an asyncio client for ``service_name`` of ``appkey``; the arguments are those of
    ``thriftprobe.build_client`` and mean the same, except that ``socket_timeout`` (ms) bounds
    each call's whole exchange (sending the request and reading its reply) rather than each
    read and write. ``max_connections_per_node`` (default 64) caps the connections open to one
    node: calls beyond wait, first come first served, for one to be given back, within the
    call's timeout (else ``socket_timeout``), then fail with ``aio.PoolExhausted`` (a
    ``NoAvailableNode``: nothing was sent). Discovery is built in a thread of the loop's default
    executor, so the loop never waits on ZooKeeper. Raises what ``thriftprobe.build_client``
    raises."""
    loop = asyncio.get_running_loop()
    if (
        not isinstance(max_connections_per_node, int) or isinstance(max_connections_per_node, bool)
        or max_connections_per_node < 1
    ):
        raise InvalidArgument("max_connections_per_node must be an integer >= 1, got %r" % (max_connections_per_node,))
    for label, value in (("socket_timeout", socket_timeout), ("connect_timeout", connect_timeout)):
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value <= 0):
            raise InvalidArgument("%s must be a positive number of milliseconds, got %r" % (label, value))

    def build() -> Any:
        return threaded.build_client(
            thrift_path, appkey, service_name, socket_timeout, connect_timeout=connect_timeout, config=config,
            env=env, balancer=balancer, version=version, group=group, tags=tags, retry=retry,
            outlier_detection=outlier_detection, health_check_interval=health_check_interval,
            empty_grace=empty_grace, cache_file=cache_file, cache_max_age=cache_max_age,
            max_idle_per_node=max_idle_per_node, max_idle_age=max_idle_age, caller=caller, metrics=metrics,
        )

    building = loop.run_in_executor(None, build)
    try:
        sync = await asyncio.shield(building)
    except asyncio.CancelledError:
        # The thread builds on regardless: a client it finishes is closed, never leaked.
        building.add_done_callback(_close_abandoned)
        raise
    pool_args = {
        "connect_timeout_ms": connect_timeout or socket_timeout,
        "max_per_node": max_connections_per_node,
        "max_wait_ms": socket_timeout,
        "max_idle": max_idle_per_node,
        "max_idle_age": max_idle_age,
    }
    return AioProbeClient(_AioCore(sync, loop, socket_timeout, pool_args))
