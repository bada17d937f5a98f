"""build_client and ProbeClient, the TClient that picks a node for every call.

The call path touches no ZooKeeper and takes no lock of its own: it reads the table's current
snapshot, asks the balancer for a node, borrows a pooled connection, sends, reads the reply and
gives the connection back.

``ProbeClient`` is a thin face over ``_Core``, which holds the client's state and call path: the
face's attributes are the IDL's methods, so an IDL method named ``table``, ``env`` or ``_pool``
is called by its name and can never overwrite the client's own state.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import types
import weakref
from typing import Any, Callable, Dict, FrozenSet, List, Mapping, Optional, Tuple, Union

from thriftpy2.protocol import TBinaryProtocol
from thriftpy2.protocol.exc import TProtocolException
from thriftpy2.thrift import TApplicationException, TClient, TDecodeException, TMessageType, args_to_kwargs
from thriftpy2.transport import TMemoryBuffer, TTransportException

from .. import config as config_mod
from .. import metrics as metrics_mod
from ..errors import LOADSHEDDING, BackendError, InvalidArgument, NoAvailableNode, Overloaded, ThriftProbeError
from ..idl import IdlSource, load_service
from ..node import Node, validate_names
from ..registry import Registry, Watch, open_registry
from .balancer import Call, Picker, WeightedRandom
from .cache import CacheWriter, TableCache
from .health import HealthChecker, OutlierDetector
from .instruments import ClientInstruments
from .pool import ConnectionPool, PooledConnection
from .presence import DEFAULT_CALLER, Explanation, InFlight, Presence, check_caller, explain
from .retry import Retry, RetryBudget
from .selector import GroupSpec, Selector
from .table import NodeTable, Snapshot

try:  # the compiled protocol's own error type, when thriftpy2 was built with Cython
    from thriftpy2.protocol.cybin import ProtocolError as _CyProtocolError  # type: ignore[attr-defined]
except ImportError:  # pragma: no cover
    _CyProtocolError = TProtocolException

__all__ = ["ProbeClient", "build_client"]

log = logging.getLogger(__name__)

Address = Tuple[str, int]

# What a failure of the connection or of the byte stream looks like, once a request was sent.
_TRANSPORT_ERRORS = (OSError, EOFError, TTransportException, TProtocolException, TDecodeException, _CyProtocolError)
# What encoding a caller's arguments raises when one does not fit its IDL type.
_ENCODE_ERRORS = (TDecodeException, TypeError, ValueError, OverflowError)
# The key of a ProbeClient's core in its __dict__: not an identifier, so no IDL method can be named so.
_CORE = "thriftprobe client core"
# The client's own methods. An IDL method of the same name is ``t<name>`` on the client
# (thriftpy2's TClient does so for ``close``: ``tclose``), and keeps its name on with_timeout views.
_OWN_METHODS = frozenset({"close", "with_timeout"})


class _Unencodable(Exception):
    """The request could not be encoded (the caller's argument); ``partly_sent``: some of its
    bytes had already been written through to the socket."""

    def __init__(self, error: BaseException, partly_sent: bool) -> None:
        super().__init__(str(error))
        self.error = error
        self.partly_sent = partly_sent


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


class _Core:
    """The state and the call path of one ProbeClient (see there). Thread-safe like it."""

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
        balancer: Picker,
        retry: Optional[Retry],
        outliers: OutlierDetector,
        health_check_interval: Optional[float],
        cache_writer: Optional[CacheWriter] = None,
        presence: Optional[Presence] = None,
        instruments: Optional[ClientInstruments] = None,
        claim: Optional["_Claim"] = None,
    ) -> None:
        self._claim = claim  # holds the balancer for this client while it is open
        self._service = service
        self.env = cfg.env
        self.appkey = appkey
        self.service_name = service_name
        self.table = table
        self._cfg = cfg
        self._registry = registry
        self._watch = watch
        self._pool = pool
        self._balancer = balancer
        self._tracks_load = bool(getattr(balancer, "tracks_load", False))
        self._retry = retry
        # Sending a shed call to another node is a retry too: it draws from the same budget,
        # which a client without a Retry policy still has for that.
        self._budget = retry.budget if retry is not None else RetryBudget()
        self._outliers = outliers
        self._health_check_interval = health_check_interval
        self._health: Optional[HealthChecker] = None
        self._eligible_cache: Tuple[Optional[Snapshot], FrozenSet[Address]] = (None, frozenset())
        self._cache_writer = cache_writer
        self._presence = presence
        self._flights = InFlight()  # calls in flight per node, for explain()
        self._methods: Dict[str, _Method] = {name: _Method(service, name) for name in service.thrift_services}
        self._close_lock = threading.Lock()
        self._closed = False
        self._forked = False
        self._fork_lock = threading.Lock()
        self._instruments = instruments
        if instruments is not None:
            me = weakref.ref(self)
            instruments.watch_nodes(lambda: _node_states(me))
            instruments.watch_pool(lambda address: _idle_count(me, address))
            outliers.add_ejection_listener(instruments.ejected)
        # A connection coming back to the pool for an address without an idle list is kept only
        # if its node is still in the (current) table; and connections are made, lent and kept
        # in the wire the node speaks now.
        pool.set_keep(self._keeps)
        table.on_change(self._table_changed, call_now=True)
        table.on_remove(self._node_left)
        self._attacher: Optional[threading.Thread] = None
        self._attach_stop = threading.Event()
        if cache_writer is not None:
            cache_writer.start(self._cache_confirmed_at, write_now=True)
        if registry is None:  # started from the node cache while ZooKeeper was unreachable
            self._start_attaching(first_wait=1.0)
        self._start_health_check()
        if registry is not None and presence is not None:
            presence.attach(registry)  # best effort, bounded: never fails the client
        _live_clients.add(self)

    # -- the call path -------------------------------------------------------------------------

    def _keeps(self, address: Address) -> bool:
        """Whether the pool keeps a connection to ``address`` (its node is in the table)."""
        return address in self.table.snapshot.wires

    def _table_changed(self, nodes: object) -> None:
        """The table's change listener (under its lock, after it published the new snapshot).
        After fork it stays on the child's copy of the table, and feeds the child's pool."""
        snapshot = self.table.snapshot
        self._pool.set_wires(snapshot.wires)
        if self._instruments is not None:
            self._instruments.nodes_changed(snapshot.addresses)

    def _eligible(self, snapshot: Snapshot) -> FrozenSet[Address]:
        """The addresses of the snapshot's nodes that can take calls (built once per snapshot)."""
        cached, addresses = self._eligible_cache
        if cached is not snapshot:
            addresses = frozenset(node.address for node in snapshot.available)
            self._eligible_cache = (snapshot, addresses)
        return addresses

    def _call(self, api: str, timeout_ms: Optional[int], args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Any:
        instruments = self._instruments
        if instruments is None:
            return self._send(api, timeout_ms, args, kwargs, None)
        began = _clock()
        trace: List[Optional[Address]] = [None]  # the node that answered, or was tried last
        try:
            result = self._send(api, timeout_ms, args, kwargs, trace)
        except BaseException as err:
            instruments.call_failed(api, trace[0], err, _clock() - began, timeout_ms)
            raise
        instruments.ok_observer(api, trace[0])(_clock() - began)
        return result

    def _send(
        self,
        api: str,
        timeout_ms: Optional[int],
        args: Tuple[Any, ...],
        kwargs: Dict[str, Any],
        trace: Optional[List[Optional[Address]]],
    ) -> Any:
        """The call: ``trace[0]`` (when given) is set to each node a request goes to, or that a
        connect to failed."""
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
        deadline = None if timeout_ms is None else time.monotonic() + timeout_ms / 1000.0
        retry = self._retry
        self._budget.deposit()
        sends = 0  # sends that may have run: a shed reply says its send did not
        avoid: FrozenSet[Address] = frozenset()
        shed: Dict[Address, str] = {}  # the nodes that shed this call, with what they said
        never: FrozenSet[Address] = frozenset()  # the same nodes, never to be sent this call again
        sent_error: Optional[TTransportException] = None  # the last failure after sending
        while True:
            try:
                conn, probing = self._lend(avoid, deadline, timeout_ms, never, trace, (api, kwargs))
            except NoAvailableNode as none:
                if sent_error is None:
                    if shed:
                        raise self._overloaded(api, shed, "then: %s" % none) from none
                    raise
                # The request was sent already (it may have run): never "nothing was sent". The
                # original failure is the cause; the retry's NoAvailableNode the context.
                raise TTransportException(
                    sent_error.type, "%s; sending it again found no node: %s" % (sent_error.message, none)
                ) from sent_error
            done = self._flights.start(conn.address)
            if trace is not None:
                trace[0] = conn.address
            tracked = self._tracks_load
            answered = False  # for a load-tracking balancer: a reply other than "not executed"
            if tracked:
                self._balancer.begin(conn.address)  # type: ignore[attr-defined]
                sent_at = _clock()
            try:
                reply = self._exchange(conn, method, kwargs, deadline)
                if tracked:
                    answered = not (type(reply) is TApplicationException and reply.type == LOADSHEDDING)
            except _Unencodable as bad:
                # The caller's argument: no node is to blame, nothing ran, nothing is retried.
                if probing:
                    self._outliers.probe_abandoned(conn.address)
                conn.set_deadline(None)
                if not bad.partly_sent and conn.drop_unsent():
                    self._pool.release(conn)
                else:  # half a request went out: the connection is out of step
                    self._pool.discard(conn)
                message = _describe_unencodable(self.service_name, method, kwargs, bad.error, bad.partly_sent)
                raise InvalidArgument(message) from bad.error
            except _TRANSPORT_ERRORS as err:
                self._pool.discard(conn)
                eligible = self._eligible(self.table.snapshot)
                self._outliers.failure(conn.address, len(eligible), after_send=True, eligible=eligible)
                error = _transport_error(err, "%s.%s on %s:%d" % (self.service_name, api, *conn.address))
                sends += 1
                # A call whose own timeout ran out is not sent again: no budget token, no retry counted.
                out_of_time = deadline is not None and time.monotonic() >= deadline
                if not out_of_time and retry is not None and retry.may_retry(api, sends):
                    log.debug("%s.%s failed on %s:%d (%s); retrying", self.service_name, api, *conn.address, err)
                    if self._instruments is not None:
                        self._instruments.retried(api, "transport_error")
                    avoid = avoid | {conn.address}
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
            except BaseException:
                self._pool.discard(conn)
                if probing:
                    self._outliers.probe_abandoned(conn.address)
                raise
            finally:
                next(done)
                if tracked:
                    self._balancer.end(conn.address, _clock() - sent_at, answered)  # type: ignore[attr-defined]
            self._pool.release(conn)
            self._outliers.success(conn.address)
            # (_exchange makes a TApplicationException of this very class of an EXCEPTION reply)
            if type(reply) is TApplicationException and reply.type == LOADSHEDDING:
                shed[conn.address] = reply.message or ""
                never = frozenset(shed)
                why = self._why_not_resend(shed, deadline, timeout_ms)
                if why is None:
                    if self._instruments is not None:
                        self._instruments.retried(api, "overloaded")
                    log.debug("%s.%s was shed by %s:%d (%s); sending it to another node",
                              self.service_name, api, conn.address[0], conn.address[1], reply.message)
                    continue
                if sent_error is not None:  # an earlier send may have run: not "never ran anywhere"
                    overloaded = self._overloaded(api, shed, why)
                    raise TTransportException(
                        sent_error.type, "%s; sending it again: %s" % (sent_error.message, overloaded)
                    ) from sent_error
                raise self._overloaded(api, shed, why)
            return _unpack(reply)

    def _why_not_resend(
        self, shed: Dict[Address, str], deadline: Optional[float], timeout_ms: Optional[int]
    ) -> Optional[str]:
        """After a node shed a call (``LOADSHEDDING``: it did not run the handler), None when the
        call may go to another node; otherwise why not.

        Such a reply is no failure of the node: it answered at once and in step, so its
        connection goes back to the pool and outlier detection counts it as a success (the node
        is busy, not broken; ejecting busy nodes would pile their load onto the rest). The call
        is safe to send elsewhere even for a method that is not idempotent, since nothing ran:
        to a node that has not shed it yet, while the call's timeout lasts and the retry budget
        (shared with the retries after failures) allows, so an overloaded fleet does not face
        a retry storm on top of its load.
        """
        if deadline is not None and time.monotonic() >= deadline:
            return "the call's timeout of %d ms ran out" % (timeout_ms or 0)
        if all(node.address in shed for node in self.table.snapshot.available):
            return "no other node is left"
        if not self._budget.withdraw():
            if self._instruments is not None:
                self._instruments.budget_refused()
            return "the retry budget allows no further try"
        return None

    def _overloaded(self, api: str, shed: Dict[Address, str], why: str) -> Overloaded:
        said = ", ".join("%s:%d (%r)" % (address[0], address[1], message) for address, message in shed.items())
        return Overloaded(
            "%s.%s did not run: %d node(s) shed it as overloaded (LOADSHEDDING): %s; %s"
            % (self.service_name, api, len(shed), said, why)
        )

    def _lend(
        self,
        avoid: FrozenSet[Address],
        deadline: Optional[float],
        timeout_ms: Optional[int],
        never: FrozenSet[Address] = frozenset(),
        trace: Optional[List[Optional[Address]]] = None,
        call: Optional[Call] = None,
    ) -> Tuple[PooledConnection, bool]:
        """Borrow a connection to a picked node, in the node's wire; on a connect failure
        try the other nodes. Returns it, and whether this call is the probe of a node whose
        ejection just ended.

        Ejected nodes and ``avoid`` (nodes this call already failed on) are skipped while any
        other node is left; when none is, every node is eligible again (panic mode). ``never``
        (nodes that shed this call) are skipped even then. A node whose ejection ended is avoided
        too, except by the one call that claims its probe. Connects end by ``deadline``
        (``time.monotonic()`` seconds), if given.
        """
        if self._closed:
            raise ThriftProbeError("client for %s/%s is closed" % (self.appkey, self.service_name))
        snapshot = self.table.snapshot
        pick = self._balancer.pick
        outliers = self._outliers
        # Ejected nodes count against their tier's health; the nodes this call failed on
        # (avoid) are skipped. Both are given up when no other node is left (panic mode);
        # ``tried`` (connects that failed now, and the nodes that shed the call) never are.
        ejected = outliers.excluded()
        probe: Optional[Address] = None
        if ejected:
            eligible = self._eligible(snapshot)
            barred = avoid | never
            probe = outliers.claim_probe(lambda address: address in eligible and address not in barred)
        tried: FrozenSet[Address] = never
        error: Optional[Exception] = None
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
                        raise NoAvailableNode(
                            "no node of service %r in env %s, appkey %s is left that has not shed the call (shed: %s)"
                            % (self.service_name, self.env, self.appkey, _addresses(never))
                        )
                    if not tried:
                        raise NoAvailableNode(
                            "no valid node of service %r in env %s, appkey %s "
                            "(%d registered, none valid with weight > 0)"
                            % (self.service_name, self.env, self.appkey, len(snapshot.all_nodes))
                        )
                    raise NoAvailableNode(
                        "no node of service %r in env %s, appkey %s accepted a connection (tried %s)"
                        % (self.service_name, self.env, self.appkey, _addresses(tried - never) or "none")
                    ) from error
                address = node.address
            try:
                # In the wire the node speaks now (the pool follows the table: see _table_changed).
                return self._pool.acquire(address, deadline), probe is not None
            except TTransportException as err:
                if trace is not None:
                    trace[0] = address
                if deadline is not None and time.monotonic() >= deadline:
                    # The call's own timeout ran out: that says nothing about the node.
                    if probe is not None:
                        outliers.probe_abandoned(probe)
                    raise NoAvailableNode(
                        "no node of service %r in env %s, appkey %s accepted a connection within the call's "
                        "timeout of %d ms (tried %s)"
                        % (self.service_name, self.env, self.appkey, timeout_ms or 0,
                           _addresses((tried - never) | {address}))
                    ) from err
                log.debug("cannot connect to %s:%d (%s); trying another node", address[0], address[1], err)
                eligible = self._eligible(snapshot)
                outliers.failure(address, len(eligible), eligible=eligible)
                tried = tried | {address}
                probe = None
                error = err
            except OSError as err:
                # No socket could be made here (EMFILE, ENOBUFS...): the process's trouble, not
                # the node's. Nothing was sent; a claimed probe goes back for a later call.
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
    def _exchange(conn: PooledConnection, method: _Method, kwargs: Dict[str, Any], deadline: Optional[float]) -> Any:
        """Send one request and read its reply. Raises _Unencodable when the arguments do not
        fit the IDL (before anything but a full buffer was written); otherwise transport errors."""
        if deadline is not None:
            conn.set_deadline(deadline)
        proto = conn.protocol
        seqid = conn.seqid = (conn.seqid + 1) & 0x7FFFFFFF
        sock = conn.tsocket
        written = sock.written
        try:
            proto.write_message_begin(method.name, method.msg_type, seqid)
            args = method.args_cls()
            for key, value in kwargs.items():
                setattr(args, key, value)
            args.write(proto)
            proto.write_message_end()
        except _ENCODE_ERRORS as err:
            raise _Unencodable(err, sock.written != written) from err
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
        if deadline is not None:
            conn.set_deadline(None)
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
            self._flights = InFlight()
            self.table = self.table.copy_for_child()
            self.table.on_remove(self._node_left)
            self._outliers.reinit_after_fork()
            self._budget.reinit_after_fork()
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
        if self._presence is not None:
            self._presence.attach(registry)

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
        self._flights.forget(node.address)
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
        release = getattr(self._balancer, "release", None)
        if release is not None and self._claim is not None:
            release(self._claim)  # the balancer may serve another client now
        if self._instruments is not None:
            self._instruments.close()
            self._outliers.remove_ejection_listener(self._instruments.ejected)
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
        if self._presence is not None:
            self._presence.close()  # before the registry's handle, whose session it uses
        if self._registry is not None:
            if self._watch is not None:
                self._watch.close()
            self._registry.close()
        if self._cache_writer is not None:
            self._cache_writer.close()  # last: it writes the table as it is now

    def explain(self) -> Explanation:
        """The table as the call path sees it now, node by node (see ``ProbeClient.explain``)."""
        if self._forked:
            self._adopt_after_fork()
        return explain(
            env=self.env, appkey=self.appkey, service=self.service_name,
            caller=self._presence.caller if self._presence is not None else DEFAULT_CALLER,
            presence=self._presence, attached=self._watch is not None, table=self.table,
            outliers=self._outliers, pool=self._pool, flights=self._flights, balancer=self._balancer,
        )

    def __enter__(self) -> "_Core":
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


class ProbeClient(TClient):
    """A thriftpy2 TClient whose every call goes to a weighted-random valid node of the service.

    Its attributes are the IDL's methods, each by its own name, whatever the name: the client's
    state lives elsewhere, so a method named ``table`` or ``env`` neither breaks the client nor
    is hidden by it. Two names are the client's own: ``close()`` closes the client and
    ``with_timeout(ms)`` gives a per-call timeout; IDL methods named so are called as
    ``client.tclose()`` / ``client.twith_timeout()`` (thriftpy2's TClient rule for ``close``),
    or by their own names on ``client.with_timeout(ms)``, which has nothing but the IDL's
    methods. Other names (``env``, ``appkey``, ``service_name``, ``table``) read the client's
    state when the IDL has no method of that name.

    One instance is safe to share between any number of threads: connections are lent per call
    from a pool, never shared mid-call. It survives ``fork()``: a child process's first call
    drops what it inherited without touching it (the parent keeps using its sockets and its
    ZooKeeper session) and builds its own, starting from the inherited table of nodes.
    Close it (or use ``with``) to release its sockets and its share of the ZooKeeper session.

    Each node is spoken to with the transport and protocol its znode advertises (buffered or
    framed, binary or compact; buffered binary when it says nothing); a node advertising others
    takes no calls.

    A reply ``TApplicationException(LOADSHEDDING)`` says the node did not run the handler
    (overloaded, or over a limit): the call goes on to a node that has not shed it, whatever
    the method, within the call's timeout and the retry budget.

    Errors of a call: ``NoAvailableNode`` when no node is available or none accepted a connection
    (within the call's timeout, for ``with_timeout``): nothing was sent; ``Overloaded`` (a
    ``NoAvailableNode``) when the nodes tried shed the call and no other may be tried (none
    left, the budget spent, the timeout over): it ran nowhere; ``InvalidArgument`` when
    an argument does not fit its IDL type: nothing was sent and no node is blamed; thriftpy2's
    ``TTransportException`` when the connection failed or timed out after the request was sent
    and the retry policy did not (or could not) send it again; ``TApplicationException`` and the
    IDL's exceptions as the provider raised them.
    """

    def __init__(self, core: _Core) -> None:  # TClient.__init__ would set attributes an IDL may name
        attrs = self.__dict__
        attrs[_CORE] = core
        for name in core._methods:
            if name in _OWN_METHODS:
                attrs["t" + name] = _method_caller(core, name, None)
        for name in core._methods:  # an IDL name beats a t<name> alias
            if name not in _OWN_METHODS:
                # A real attribute per IDL method spares every call a __getattr__ and a partial.
                attrs[name] = _method_caller(core, name, None)

    def __getattr__(self, name: str) -> Any:
        """Only reached for names that are not IDL methods: the client's state (``table``...)."""
        core = self.__dict__.get(_CORE)
        if core is None or (name.startswith("__") and name.endswith("__")):
            raise AttributeError(name)
        try:
            return getattr(core, name)
        except AttributeError:
            raise AttributeError(
                "client of %s has no attribute or IDL method %r" % (core.service_name, name)
            ) from None

    def __setattr__(self, name: str, value: Any) -> None:
        core = self.__dict__.get(_CORE)
        if core is None or name in core._methods:
            object.__setattr__(self, name, value)
        else:
            setattr(core, name, value)

    def __dir__(self) -> List[str]:
        return sorted({name for name in self.__dict__ if name != _CORE} | _OWN_METHODS | {"explain"})

    def _req(self, _api: str, *args: Any, **kwargs: Any) -> Any:
        return self.__dict__[_CORE]._call(_api, None, args, kwargs)

    def with_timeout(self, timeout_ms: int) -> "_TimeoutView":
        """A view of this client whose calls end within ``timeout_ms``, connects included: one
        deadline across every node tried, then the rest of it for each read and write.

        ``client.with_timeout(200).ping()``; the view shares everything else with the client.
        Its attributes are the IDL's methods only, by their own names (``close`` included).
        """
        if not isinstance(timeout_ms, int) or isinstance(timeout_ms, bool) or timeout_ms <= 0:
            raise InvalidArgument("timeout must be a positive number of milliseconds, got %r" % (timeout_ms,))
        return _TimeoutView(self.__dict__[_CORE], timeout_ms)

    def close(self) -> None:
        """Release the sockets and this client's share of the ZooKeeper session. Idempotent."""
        self.__dict__[_CORE].close()

    def explain(self) -> Explanation:
        """The client's table now, node by node: weight, switch, state (valid, disabled, ejected,
        held), the ejection's remaining time, calls in flight, pooled connections, and why the
        node would or would not be picked. ``print(client.explain())`` shows it as a table;
        ``.to_dict()`` gives JSON. (An IDL method named ``explain`` takes the name on the
        client; this one is then ``ProbeClient.explain(client)``.)"""
        core: _Core = self.__dict__[_CORE]
        return core.explain()

    def __enter__(self) -> "ProbeClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.__dict__[_CORE].close()

    def __repr__(self) -> str:
        return repr(self.__dict__[_CORE])


def _method_caller(core: _Core, api: str, timeout_ms: Optional[int]) -> Callable[..., Any]:
    call = core._call

    def method(*args: Any, **kwargs: Any) -> Any:
        return call(api, timeout_ms, args, kwargs)

    method.__name__ = method.__qualname__ = api
    return method


class _TimeoutView:
    """``client.with_timeout(ms)``: the IDL's methods, each call bounded by ``ms`` in all. Its
    state is kept under a key no IDL method can be named, so every IDL name reaches __getattr__."""

    def __init__(self, core: _Core, timeout_ms: int) -> None:
        self.__dict__[_CORE] = (core, timeout_ms)

    def __getattr__(self, api: str) -> Any:
        core, timeout_ms = self.__dict__[_CORE]
        if api not in core._methods:
            raise AttributeError("%s has no method %r" % (core.service_name, api))
        return _method_caller(core, api, timeout_ms)


_live_clients: "weakref.WeakSet[_Core]" = weakref.WeakSet()


class _Claim:
    """What a client holds its balancer by (see ``Balancer.claim``): the balancer keeps only a
    weak reference, so a client that was never built (an error in ``build_client``) or was
    garbage-collected frees it."""

    __slots__ = ("__weakref__", "label")

    def __init__(self, label: str) -> None:
        self.label = label


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
        if client._presence is not None:
            client._presence.forget_after_fork()  # the parent's entry; the child registers its own
        client.table.reinit_after_fork()
        if client._cache_writer is not None:
            client._cache_writer.reinit_after_fork()
        reinit = getattr(client._balancer, "reinit_after_fork", None)
        if reinit is not None:
            reinit()  # its locks (close() releases the claim under one) and the parent's plans


os.register_at_fork(after_in_child=_mark_clients_forked)


_clock = time.perf_counter


def _node_states(ref: "weakref.ReferenceType[_Core]") -> Dict[str, int]:
    """The client's table nodes by state (see ``instruments.NODE_STATES``), for the gauges."""
    core = ref()
    counts = {"valid": 0, "disabled": 0, "ejected": 0, "held": 0}
    if core is None or core._closed:
        return counts
    snapshot = core.table.snapshot
    excluded = core._outliers.excluded()
    available = core._eligible(snapshot)
    held = snapshot.held
    for node in snapshot.all_nodes:
        address = node.address
        if address in held:
            counts["held"] += 1
        elif address not in available:
            counts["disabled"] += 1
        elif address in excluded:
            counts["ejected"] += 1
        else:
            counts["valid"] += 1
    return counts


def _idle_count(ref: "weakref.ReferenceType[_Core]", address: Address) -> int:
    core = ref()
    return 0 if core is None or core._closed else core._pool.idle_count(address)


def _transport_error(err: BaseException, where: str) -> TTransportException:
    if isinstance(err, TTransportException):
        return err
    if isinstance(err, socket.timeout):
        return TTransportException(TTransportException.TIMED_OUT, "%s timed out" % where)
    return TTransportException(TTransportException.UNKNOWN, "%s failed: %s: %s" % (where, type(err).__name__, err))


def _addresses(addresses: FrozenSet[Address]) -> str:
    return ", ".join("%s:%d" % a for a in sorted(addresses))


def _describe_unencodable(
    service_name: str, method: _Method, kwargs: Dict[str, Any], err: BaseException, partly_sent: bool
) -> str:
    """Name the argument that did not fit its IDL type, the field and the type it needs, and
    the value's type: never the value (it can be large, or hold a secret). The error path only."""
    where = "%s.%s" % (service_name, method.name)
    outcome = "the request was cut short and its connection closed; nothing ran" if partly_sent else "nothing was sent"
    if isinstance(err, TDecodeException) and err.struct_name == method.args_cls.__name__:
        return "argument %r of %s must be %s, got a %s; %s" % (
            err.field, where, err.type_repr, type(err.value).__name__, outcome,
        )
    if isinstance(err, TDecodeException):
        why = "field '%s(%s)' of '%s' needs type '%s', got a %s" % (
            err.field, err.fid, err.struct_name, err.type_repr, type(err.value).__name__,
        )
    else:
        why = "%s: %s" % (type(err).__name__, str(err)[:100])
    for name, value in kwargs.items():  # a nested field: find the argument that holds it
        alone = method.args_cls()
        setattr(alone, name, value)
        try:
            alone.write(TBinaryProtocol(TMemoryBuffer()))
        except _ENCODE_ERRORS:
            return "argument %r of %s cannot be encoded: %s; %s" % (name, where, why, outcome)
    return "the arguments of %s cannot be encoded: %s; %s" % (where, why, outcome)


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
) -> ProbeClient:
    """Return a client for ``service_name`` of ``appkey``, as defined in the IDL ``thrift_path``:
    a .thrift file's path, a module thriftpy2 loaded from one, or the service class. The IDL's
    exceptions are raised as classes of that module; given a path, of the module this process
    already loaded from that file, if any (so ``except calc_thrift.DivByZero`` matches).

    The client watches ``/services/<env>/<appkey>`` in ZooKeeper, so the table of nodes is filled
    before this returns and kept current afterwards. ``socket_timeout`` (ms) bounds each read and
    write of a call; ``connect_timeout`` (ms, default: the socket timeout) bounds opening a
    connection. ``config`` is a loaded Config or a path (see ``thriftprobe.config``).

    Each node is spoken to in the transport and protocol its znode advertises (see ``wire``).

    Traffic control (see the README's "Traffic control"): ``version``, ``group`` and ``tags``
    select the nodes this client calls (see ``selector.Selector``: by default any version, only
    nodes without a group, any tags); ``balancer`` is the strategy that picks one per call
    (``WeightedRandom()`` by default; ``RoundRobin()``, ``LeastLoaded()``,
    ``ConsistentHash(key=...)``), always within the best priority tier that has healthy capacity
    and with the weights of warming nodes ramped. Give each client its own balancer instance.

    Resilience (see the README's "Failure behaviour"): ``retry`` says which methods are idempotent
    and may be sent again after a failure that followed sending (default: none are); its budget
    also bounds sending a call a node shed (``LOADSHEDDING``) on to another node, which happens
    whatever the method (default: a ``RetryBudget()`` of the client's own);
    ``outlier_detection`` ejects nodes that keep failing (default: ``OutlierDetector()``);
    ``health_check_interval`` (s) starts an active TCP health check (default: off);
    ``empty_grace`` (s) is how long the last nodes are kept when the registry suddenly shows none.
    ``cache_file``: keep the last known nodes in this file, and start from it (if younger than
    ``cache_max_age`` s) when ZooKeeper is unreachable; the client then attaches to ZooKeeper
    in the background as soon as it answers.
    ``max_idle_per_node`` connections are kept idle per node, none for longer than
    ``max_idle_age`` s (None: no limit): a connection a NAT or load balancer dropped silently
    (often after 240-350 s) must never be lent. Keep it below the providers' idle timeout too.
    ``caller``: the appkey of the application making the calls (default: ``client.<env>.caller``
    in the config file, else ``"unknown"``). The client registers itself as a consumer of the
    service under ``/consumers/<env>/<appkey>/<service>`` (best effort: an unreachable
    ZooKeeper never fails it), so operators see who calls whom; ``close()`` withdraws it.
    ``metrics``: where the client records its calls, connections, table and discovery lag (see
    the README's "Consumer metrics"): None (the default) records into
    ``thriftprobe.metrics.default_recorder()`` when prometheus_client is installed and records
    nothing otherwise; False records nothing; a ``thriftprobe.metrics.Recorder`` records into it.

    Raises InvalidArgument, ConfigError, IdlError, or BackendError when ZooKeeper is unreachable.
    """
    validate_names(appkey, service_name)
    for label, value in (("socket_timeout", socket_timeout), ("connect_timeout", connect_timeout)):
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value <= 0):
            raise InvalidArgument("%s must be a positive number of milliseconds, got %r" % (label, value))
    if not isinstance(max_idle_per_node, int) or max_idle_per_node < 0:
        raise InvalidArgument("max_idle_per_node must be an integer >= 0, got %r" % (max_idle_per_node,))
    if max_idle_age is not None and (isinstance(max_idle_age, bool) or not max_idle_age > 0):
        raise InvalidArgument("max_idle_age must be a number of seconds > 0 or None, got %r" % (max_idle_age,))
    if empty_grace < 0 or cache_max_age < 0 or (health_check_interval is not None and health_check_interval <= 0):
        raise InvalidArgument("empty_grace and cache_max_age must be >= 0, health_check_interval > 0")
    if isinstance(balancer, type):
        raise InvalidArgument("balancer must be an instance, e.g. %s(), not the class" % balancer.__name__)
    if balancer is not None and not callable(getattr(balancer, "pick", None)):
        raise InvalidArgument("balancer must have a pick method (e.g. thriftprobe.RoundRobin()), got %r" % (balancer,))
    try:
        recorder = metrics_mod.resolve(metrics)
    except TypeError as err:
        raise InvalidArgument(str(err)) from None
    cfg = config_mod.resolve(config, env)
    caller = check_caller(caller if caller is not None else cfg.client.caller or DEFAULT_CALLER)
    selector = Selector(version, group, tags)
    balancer = balancer or WeightedRandom()
    claim = _Claim("%s/%s" % (appkey, service_name))
    claim_balancer = getattr(balancer, "claim", None)
    if claim_balancer is not None:
        claim_balancer(claim)  # one client per balancer: its plans are of one table
    try:
        service = load_service(thrift_path, service_name)
        instruments = ClientInstruments(recorder, appkey, service_name) if recorder is not None else None
        outliers = outlier_detection or OutlierDetector()
        pool = ConnectionPool(
            connect_timeout_ms=connect_timeout or socket_timeout,
            socket_timeout_ms=socket_timeout,
            max_idle=max_idle_per_node,
            max_idle_age=max_idle_age,
            watcher=instruments,
        )
        table = NodeTable(
            empty_grace, "%s/%s/%s" % (cfg.env, appkey, service_name), None if selector.matches_all else selector
        )
        if instruments is not None:
            table.set_lag_observer(instruments.observe_lag)
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
        return ProbeClient(_Core(
            service,
            cfg=cfg,
            appkey=appkey,
            service_name=service_name,
            registry=registry,
            table=table,
            watch=watch,
            pool=pool,
            balancer=balancer,
            claim=claim,
            retry=retry,
            outliers=outliers,
            health_check_interval=health_check_interval,
            cache_writer=writer,
            presence=Presence(cfg.env, appkey, service_name, caller),
            instruments=instruments,
        ))
    except BaseException:
        # Nothing half-done: the balancer is free again (a kept exception's traceback would
        # otherwise keep the claim alive).
        release = getattr(balancer, "release", None)
        if release is not None:
            release(claim)
        raise
