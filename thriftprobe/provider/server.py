"""The provider's server core: one I/O thread for every connection, a bounded pool of workers.

The I/O thread multiplexes the listening socket and every connection with ``selectors`` (epoll
on Linux; no fd-number limit). It reads what connections send and, with ``framing.py``, knows
when a request is whole; only then does a worker get it, so a slow or silent peer never holds a
worker, and an idle connection costs a file descriptor and a few hundred bytes, never a thread.
Workers (at most ``workers``, started as needed) decode, run the handler and send the reply. A
worker that finished a request keeps its connection for a moment (``_LINGER``) when no other
request waits, and serves the next request of a busy connection without a trip through the I/O
thread: at low concurrency a call costs what it costs on a thread-per-connection server.

Limits, and what a client sees when one is hit:
- every worker busy and ``queue_size`` requests waiting: the request is answered at once, without
  running, with ``TApplicationException(LOADSHEDDING)`` ("not executed", safe to retry elsewhere);
- over a request limit (``set_limits``: requests per second or at once, per method and for the
  service; ``limiter.py`` decides): answered the same way, naming the limit; the connection stays
  open. A request is admitted before it is queued or run, and counts until its reply is encoded
  (released before the reply is written to the socket);
- ``max_connections`` reached: the longest-idle connection is closed to make room (its client's
  pool replaces it before use); if none is idle, the new connection's first request is answered
  LOADSHEDDING and the connection closed;
- a request over ``max_message_size`` (or a header claiming more): refused before anything is
  allocated, with ``TApplicationException(PROTOCOL_ERROR)`` when its header could be read, and the
  connection closed;
- a request not whole ``read_timeout`` seconds after its first byte, or a reply the client does
  not take within it: the connection is closed;
- no request for ``idle_timeout`` seconds: the connection is closed;
- malformed bytes: the connection is closed (its place in the stream is lost).
The accept loop survives EMFILE/ENFILE (backs off 100 ms, logs once per burst) and any error of
one connection; one connection's failure never touches another.

``service.py`` builds the server, registers the node and stops it. ``stop()`` works from any
thread, a worker's included.
"""

from __future__ import annotations

import collections
import contextlib
import contextvars
import errno
import logging
import queue
import resource
import selectors
import socket
import struct
import threading
import time
from dataclasses import dataclass
from typing import Any, Deque, Dict, List, Optional, Set, Tuple

from thriftpy2.protocol import TBinaryProtocolFactory, TCompactProtocolFactory
from thriftpy2.thrift import TApplicationException, TMessageType
from thriftpy2.transport import TMemoryBuffer

from ..cooperative import gevent_patched
from ..errors import LOADSHEDDING, InvalidArgument
from ..limits import ServiceLimits
from .dispatch import Dispatcher
from .framing import BINARY, PROTOCOLS, TRANSPORTS, MessageError, MessageReader
from .hooks import OVERLOADED, Peer, ServerHooks, notify
from .limiter import Limiter, Refusal

__all__ = ["Server", "ServerCore", "ServerOptions", "default_max_connections", "protocol_factory", "shed_reply"]

log = logging.getLogger(__name__)

_LINGER = 0.002
"""How long a worker that sent a reply waits for the same connection's next request before
handing the connection back to the I/O thread (only while no other request waits)."""
_LINGER_MAX_ACTIVE = 2
"""Workers linger only while at most this many are active (serving or lingering): at low
concurrency a linger saves a trip through the I/O thread per call; with many connections busy,
handing connections back is faster (measured by tests/bench_server.py: 1.02x against 0.90x of
thriftpy2's threaded server at 1 connection, 1.2x against 1.0x at 16)."""
_MAX_STICKY = 1000
"""Requests a worker serves in a row on one connection before it lets the I/O thread decide
again (it also stops as soon as another request waits for a worker)."""
_RECV = 65536
_SWEEP_BATCH = 32
_ACCEPT_BATCH = 16
_ACCEPT_BACKOFF = 0.1
_LINGERING_CLOSE = 1.0
"""After an error reply, how long the input is drained before closing (so that the reply is not
lost to a reset triggered by unread request bytes)."""
_MIN_EVICT_IDLE = 1.0
"""A connection idle for less than this is never closed to make room: its client may be about to
use it (a request on a connection the server just closed fails as "may have run")."""
_MAX_REJECTING = 64
"""Connections over ``max_connections`` held at once to be answered LOADSHEDDING; more are closed."""

_FRAME = struct.Struct("!i")

IDLE, READING, BUSY, WRITING, DRAINING, CLOSED = range(6)


def _head(table: "collections.OrderedDict[int, _Conn]") -> _Conn:
    return next(iter(table.values()))


def default_max_connections() -> int:
    """The open-file limit minus a margin for everything else the process opens, at least 64."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return 10000
    return max(64, min(10000, soft - max(64, soft // 10)))


def shed_reply(label: str, method: str, reason: str, refusal: Optional[Refusal] = None) -> TApplicationException:
    """The LOADSHEDDING answer ("not executed") to a request of ``method`` shed for ``reason``
    (``OVERLOADED``, ``max_connections``, ``stopping``) or, with ``refusal``, over a request limit."""
    if refusal is not None:
        text = "%s is over its %s; %snot executed" % (
            label, refusal.describe(), "" if refusal.scope == method else method + " ",
        )
    else:
        text = {
            OVERLOADED: "%s is overloaded: every worker is busy and the queue is full; not executed" % label,
            "max_connections": "%s has too many connections; not executed" % label,
            "stopping": "%s is stopping; not executed" % label,
        }[reason]
    return TApplicationException(LOADSHEDDING, text)


def protocol_factory(protocol: str) -> Any:
    """thriftpy2's factory for ``protocol`` (``binary``, with the compiled codec; ``compact``)."""
    return TBinaryProtocolFactory() if protocol == BINARY else TCompactProtocolFactory()


@dataclass(frozen=True)
class ServerOptions:
    """The server's limits; see the module docstring for what a client sees at each."""

    workers: int = 64
    queue_size: Optional[int] = None
    """Requests waiting for a worker before new ones are shed (None: as many as ``workers``)."""
    max_connections: Optional[int] = None
    """None: ``default_max_connections()`` (from the open-file limit)."""
    max_message_size: int = 16 * 1024 * 1024
    read_timeout: float = 10.0
    idle_timeout: float = 120.0
    transport: str = "buffered"
    protocol: str = BINARY

    def check(self) -> "ServerOptions":
        """Raise InvalidArgument naming the first bad option; return self."""
        for name in ("workers", "max_message_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise InvalidArgument("%s must be an integer >= 1, got %r" % (name, value))
        for name in ("queue_size", "max_connections"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
                raise InvalidArgument("%s must be an integer >= 0 or None, got %r" % (name, value))
        for name in ("read_timeout", "idle_timeout"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 or value == float("inf"):
                raise InvalidArgument("%s must be a number of seconds > 0, got %r" % (name, value))
        if self.transport not in TRANSPORTS:
            raise InvalidArgument("transport must be one of %s, got %r" % (", ".join(TRANSPORTS), self.transport))
        if self.protocol not in PROTOCOLS:
            raise InvalidArgument("protocol must be one of %s, got %r" % (", ".join(PROTOCOLS), self.protocol))
        return self


class _Conn:
    """One client connection. Owned by the I/O thread, except while BUSY: then by one worker."""

    __slots__ = (
        "admitted", "advancing", "again", "blocking", "close_after", "fd", "handed_back", "inbuf", "out",
        "out_deadline", "peer", "read_start", "reader", "rejecting", "since", "sock", "state", "whole_at",
    )  # fmt: skip

    def __init__(self, sock: socket.socket, peer: Peer, reader: MessageReader, now: float) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.peer = peer
        self.reader = reader
        self.inbuf = bytearray()
        self.state = IDLE
        self.since = now  # IDLE: idle since; DRAINING: draining since
        self.read_start = 0.0
        self.out: Optional[memoryview] = None
        self.out_deadline = 0.0
        self.close_after: Optional[str] = None  # after ``out`` is sent: drain and close, for this reason
        self.rejecting: Optional[str] = None  # answer the first request LOADSHEDDING for this reason
        self.handed_back = False  # set by the worker that gave it back to the I/O thread
        self.blocking = False  # a worker put the socket in blocking mode to linger on it
        self.whole_at = 0.0  # time.time() when the request being served was whole (for hooks)
        self.admitted: Optional[str] = None  # the method the limiter admitted this request as, until released
        self.advancing = False  # the I/O thread's _advance loop runs for it
        self.again = False  # ... and must look at the buffer once more


class ServerCore:
    """What both server cores (this module's threaded ``Server`` and ``aio.server.AioServer``)
    share: the options, the request limits, the hooks, the reply framing. Not used alone."""

    def __init__(
        self,
        dispatcher: Dispatcher,
        listener: socket.socket,
        label: str,
        options: ServerOptions,
        hooks: Optional[ServerHooks] = None,
    ) -> None:
        self._dispatcher = dispatcher
        self._listener = listener
        self._label = label
        self._opts = options
        self._hooks = hooks
        self._limiter = Limiter(dispatcher.methods, label=label)
        self._framed = options.transport == "framed"
        # Requests are read leniently, like Apache Thrift servers: old non-strict binary messages too.
        self._in_factory: Any = (
            TBinaryProtocolFactory(strict_read=False) if options.protocol == BINARY else TCompactProtocolFactory()
        )
        self._max_conns = options.max_connections if options.max_connections is not None else default_max_connections()
        self._queue_size = options.workers if options.queue_size is None else options.queue_size
        # Each request runs in a fresh copy of the context the server was built in: what one
        # handler sets in a ContextVar (a user, a tenant, a trace id) never reaches the next.
        self._context = contextvars.copy_context()
        self._rejecting = 0  # connections over max_connections, held to be answered "not executed"
        self._accept_error_logged = False

    def set_limits(self, limits: ServiceLimits) -> None:
        """Apply ``limits`` (``thriftprobe.limits``) from the next request on; from any thread.
        The caller decides which revision wins: this applies whatever it is given. Limits of
        methods the service does not have (an operator's typo) limit nothing: logged as a
        WARNING once per revision."""
        self._limiter.set(limits)

    @property
    def limits(self) -> ServiceLimits:
        """The request limits applied now (none set: an empty ``ServiceLimits``)."""
        return self._limiter.limits

    # -- accepting, shared: the subclass has ``_conns``, ``_rejecting``, ``_close(conn, reason)``,
    # ``_admit(sock, peer)``, ``_oldest_idle()`` and ``_pause_accepting()`` -----------------------

    _conns: Any  # every connection not yet closed (a subclass's own table)
    _EVICTION_FREES_AT_ONCE = True
    """Whether an evicted connection's descriptor is free when ``_close`` returns (else on the
    next turn: then the accept waits for that turn)."""

    def _accept(self) -> None:
        """Accept what waits, a few at a time, then let the others have their turn. Out of file
        descriptors: lower ``max_connections`` to the number open, close the longest-idle
        connection to make room, or back off ``_ACCEPT_BACKOFF`` (logged once per burst)."""
        conns = self._conns
        for _ in range(_ACCEPT_BATCH):
            try:
                sock, peer = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as err:
                if err.errno in (errno.ECONNABORTED, errno.EPROTO, errno.EINTR):
                    continue
                out_of_fds = err.errno in (errno.EMFILE, errno.ENFILE)
                if out_of_fds and len(conns) < self._max_conns:
                    # The process's other files leave less room than max_connections assumed: from
                    # now on, make room (evict the longest-idle) at the number open now.
                    self._max_conns = max(1, len(conns))
                    log.warning(
                        "%s: out of file descriptors with %d connections open; max_connections lowered to %d",
                        self._label, len(conns), self._max_conns,
                    )
                oldest = self._oldest_idle() if out_of_fds else None
                if oldest is not None and oldest.since <= time.monotonic() - _MIN_EVICT_IDLE:
                    self._close(oldest, "evicted")
                    if self._EVICTION_FREES_AT_ONCE:
                        continue
                    return
                # EMFILE, ENFILE, ENOBUFS, ENOMEM and anything else: back off and keep accepting.
                if not self._accept_error_logged:
                    log.error(
                        "%s: cannot accept connections (%s); retrying every %.1f s, %d connections open",
                        self._label, err, _ACCEPT_BACKOFF, len(conns),
                    )
                    self._accept_error_logged = True
                self._pause_accepting()
                return
            if self._accept_error_logged:
                log.warning("%s: accepting connections again", self._label)
                self._accept_error_logged = False
            self._admit(sock, (str(peer[0]), int(peer[1])) if isinstance(peer, tuple) else ("", 0))

    @staticmethod
    def _prepare(sock: socket.socket) -> bool:
        """Make an accepted socket non-blocking, without Nagle, with keepalive; False (and closed)
        when it was reset before that."""
        try:
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        except OSError:
            sock.close()
            return False
        return True

    def _room(self, sock: socket.socket, peer: Peer, now: float) -> Tuple[bool, Optional[str]]:
        """At ``max_connections``, make room for a new connection: close the longest-idle one (if
        idle for ``_MIN_EVICT_IDLE``), or admit it to be answered "not executed" and closed (at
        most ``_MAX_REJECTING`` at once; beyond, it is closed now). ``(admitted, rejecting)``."""
        if len(self._conns) < self._max_conns:
            return True, None
        oldest = self._oldest_idle()
        if oldest is not None and oldest.since <= now - _MIN_EVICT_IDLE:
            self._close(oldest, "evicted")
            return True, None
        if self._rejecting >= _MAX_REJECTING:
            sock.close()
            self._hook_rejected(None, peer, "max_connections")
            return False, None
        self._rejecting += 1
        return True, "max_connections"

    def _oldest_idle(self) -> Any:
        raise NotImplementedError

    def _close(self, conn: Any, reason: str) -> None:
        raise NotImplementedError

    def _admit(self, sock: socket.socket, peer: Peer) -> None:
        raise NotImplementedError

    def _pause_accepting(self) -> None:
        raise NotImplementedError

    def _new_reader(self) -> MessageReader:
        return MessageReader(self._opts.protocol, self._framed, self._opts.max_message_size)

    def _frame(self, reply: bytes) -> bytes:
        return _FRAME.pack(len(reply)) + reply if self._framed else reply

    def _hook(self, name: str, *args: Any) -> None:
        if self._hooks is not None:
            notify(self._hooks, self._label, name, *args)

    def _hook_rejected(self, method: Optional[str], peer: Peer, reason: str) -> None:
        if self._hooks is not None:
            notify(self._hooks, self._label, "request_rejected", method, peer, reason)


class Server(ServerCore):
    """Serves one dispatcher on a bound, listening socket.

    ``start()`` once; then ``stop(timeout)`` once (or ``close_unstarted()`` when it never
    started). Both may be called from any thread.
    """

    def __init__(
        self,
        dispatcher: Dispatcher,
        listener: socket.socket,
        label: str,
        options: ServerOptions,
        hooks: Optional[ServerHooks] = None,
    ) -> None:
        super().__init__(dispatcher, listener, label, options, hooks)
        self._sel = selectors.DefaultSelector()  # gevent's when patched: waits in the hub
        self._cooperative = gevent_patched()  # lingering waits on the socket's own timeout
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._conns: Dict[int, _Conn] = {}
        self._idle: "collections.OrderedDict[int, _Conn]" = collections.OrderedDict()  # oldest first
        # Connections by state, each in the order of its deadline (the time it entered the state),
        # so that finding the next deadline looks at the head only.
        self._reading: "collections.OrderedDict[int, _Conn]" = collections.OrderedDict()
        self._writing: "collections.OrderedDict[int, _Conn]" = collections.OrderedDict()
        self._draining: "collections.OrderedDict[int, _Conn]" = collections.OrderedDict()
        self._accept_paused_until = 0.0
        self._rbuf = bytearray(_RECV)
        self._rview = memoryview(self._rbuf)
        # Workers.
        self._jobs: "queue.SimpleQueue[Optional[_Conn]]" = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._workers: List[threading.Thread] = []
        self._idle_workers = 0  # waiting for a job, or about to (handed their connection back)
        # Workers waiting for their connection's next request (they yield to a job). A set, so
        # that the call path adds and discards without a lock (each is one atomic operation).
        self._lingering: Set[int] = set()
        self._running: Set[int] = set()  # workers in a request (decode, handler, reply)
        self._pending = 0  # jobs queued and not yet taken by a worker

        # Connections workers hand back to the I/O thread.
        self._returns: Deque[_Conn] = collections.deque()
        self._woken = False
        self._io_done = False
        self._stopping = False
        self._stop_deadline = float("inf")
        self._io_thread = threading.Thread(target=self._io_loop, name="thriftprobe-io-" + label, daemon=True)

    # -- lifecycle -------------------------------------------------------------------------------

    def start(self) -> None:
        self._listener.setblocking(False)
        self._sel.register(self._listener, selectors.EVENT_READ, None)
        self._sel.register(self._wake_r, selectors.EVENT_READ, self._wake_r)
        self._io_thread.start()

    def stop(self, timeout: float) -> None:
        """Stop accepting; close idle connections; answer requests that arrive from now on with
        LOADSHEDDING; let requests already running finish, all together, until ``timeout``
        seconds from now; then close every connection. Workers still in a handler at the deadline
        end when it returns (a thread cannot be killed); they are logged."""
        me = threading.current_thread()
        with self._lock:
            from_worker = me in self._workers
        if from_worker:  # waiting here would wait for this very request: stop on a thread of its own
            threading.Thread(
                target=self.stop, args=(timeout,), name="thriftprobe-server-stop-" + self._label, daemon=True
            ).start()
            return
        deadline = time.monotonic() + max(0.0, timeout)
        with self._lock:
            self._stopping = True
            self._stop_deadline = deadline
        self._wake()
        if self._io_thread.ident is None:  # never started
            self._listener.close()
        elif self._io_thread is not me:
            self._io_thread.join(max(0.0, deadline - time.monotonic()) + 1.0)
        with self._lock:
            workers = list(self._workers)
        for _ in workers:
            self._jobs.put(None)
        for worker in workers:
            if worker is not me:
                worker.join(max(0.0, deadline - time.monotonic()))
        stuck = [w.name for w in workers if w.is_alive() and w is not me]
        if stuck:
            log.warning(
                "%s: %d handler(s) still running after the stop deadline (%s); their threads end when they return",
                self._label, len(stuck), ", ".join(stuck),
            )
        if not self._io_thread.is_alive():
            self._sel.close()
        for sock in (self._wake_r, self._wake_w):
            sock.close()

    def close_unstarted(self) -> None:
        self._listener.close()
        self._sel.close()
        for sock in (self._wake_r, self._wake_w):
            sock.close()

    # -- request limits --------------------------------------------------------------------------

    def _release(self, conn: _Conn) -> None:
        """The request the limiter admitted on ``conn`` was answered, or will never run."""
        method = conn.admitted
        if method is not None:
            conn.admitted = None
            self._limiter.release(method)

    def _wake(self) -> None:
        with contextlib.suppress(OSError):  # full (a wake is pending anyway) or closed
            self._wake_w.send(b"x")

    # -- the I/O thread --------------------------------------------------------------------------

    def _io_loop(self) -> None:
        try:
            self._serve()
        except Exception:  # never expected: close everything rather than hang with a dead loop
            log.exception("%s: the I/O thread failed; closing every connection", self._label)
        finally:
            self._shutdown()

    def _serve(self) -> None:
        sel = self._sel
        listening = True
        while True:
            now = time.monotonic()
            if self._stopping:
                if listening:
                    listening = False
                    self._close_listener()
                    for conn in list(self._idle.values()):
                        self._close(conn, "stopping")
                if not self._conns or now >= self._stop_deadline:
                    return
            elif self._accept_paused_until and now >= self._accept_paused_until:
                self._accept_paused_until = 0.0
                sel.register(self._listener, selectors.EVENT_READ, None)
            accept = False
            for key, mask in sel.select(self._timeout(now)):
                data = key.data
                if data is None:
                    accept = True  # after the connections' events: requests first, newcomers next
                elif data is self._wake_r:
                    with contextlib.suppress(OSError):
                        self._wake_r.recv(4096)
                elif data.state != CLOSED:  # not closed by an earlier event of this batch
                    if mask & selectors.EVENT_READ:
                        self._on_readable(data)
                    if mask & selectors.EVENT_WRITE and data.state == WRITING:
                        self._flush(data)
            self._take_returns()
            if accept:
                self._accept()
            self._sweep(time.monotonic())

    def _timeout(self, now: float) -> float:
        """How long the selector may wait: until the next deadline, at most 1 s."""
        until = now + 1.0
        if self._idle:
            until = min(until, _head(self._idle).since + self._opts.idle_timeout)
        if self._reading:
            until = min(until, _head(self._reading).read_start + self._opts.read_timeout)
        if self._writing:
            until = min(until, _head(self._writing).out_deadline)
        if self._draining:
            until = min(until, _head(self._draining).since + _LINGERING_CLOSE)
        if self._accept_paused_until:
            until = min(until, self._accept_paused_until)
        if self._stopping:
            until = min(until, self._stop_deadline)
        return max(0.0, until - now)

    def _close_listener(self) -> None:
        with contextlib.suppress(KeyError, ValueError):
            self._sel.unregister(self._listener)
        self._listener.close()

    def _oldest_idle(self) -> Optional[_Conn]:
        return _head(self._idle) if self._idle else None

    def _pause_accepting(self) -> None:
        self._sel.unregister(self._listener)
        self._accept_paused_until = time.monotonic() + _ACCEPT_BACKOFF

    def _admit(self, sock: socket.socket, peer: Peer) -> None:
        if not self._prepare(sock):
            return
        now = time.monotonic()
        admitted, rejecting = self._room(sock, peer, now)
        if not admitted:
            return
        conn = _Conn(sock, peer, self._new_reader(), now)
        conn.rejecting = rejecting
        self._conns[conn.fd] = conn
        if conn.rejecting is None:
            self._idle[conn.fd] = conn
        else:  # must send its request within read_timeout, and is never evicted
            conn.state = READING
            conn.read_start = now
            self._reading[conn.fd] = conn
        try:
            self._sel.register(sock, selectors.EVENT_READ, conn)
        except (OSError, ValueError):
            self._close(conn, "error")
            return
        if self._hooks is not None:
            self._hook("connection_opened", peer)

    def _on_readable(self, conn: _Conn) -> None:
        if conn.state == DRAINING:
            self._drain(conn)
            return
        try:
            n = conn.sock.recv_into(self._rbuf)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as err:
            log.debug("%s: connection from %s:%d failed: %s", self._label, conn.peer[0], conn.peer[1], err)
            self._close(conn, "error")
            return
        if n == 0:
            self._close(conn, "peer_closed")
            return
        conn.inbuf += self._rview[:n]
        if conn.state == IDLE:
            del self._idle[conn.fd]
            conn.state = READING
            conn.read_start = time.monotonic()
            self._reading[conn.fd] = conn
        self._advance(conn)

    def _advance(self, conn: _Conn) -> None:
        """On the I/O thread, for a READING connection: hand a whole request on, if there is one.
        A request answered at once (shed, refused) leads back here through ``_after_request``
        for the next buffered one: that turn is taken by this loop, not by recursion (a
        pipelined flood of shed requests would exhaust the stack)."""
        if conn.advancing:
            conn.again = True
            return
        conn.advancing = True
        try:
            while True:
                conn.again = False
                self._advance_once(conn)
                if not conn.again:
                    return
        finally:
            conn.advancing = False

    def _advance_once(self, conn: _Conn) -> None:
        try:
            found = conn.reader.feed(conn.inbuf)
        except MessageError as err:
            self._refuse(conn, err)
            return
        if found is None:
            return
        del self._reading[conn.fd]
        conn.state = BUSY
        self._sel.unregister(conn.sock)
        if self._hooks is not None:
            conn.whole_at = time.time()
        reason = conn.rejecting or ("stopping" if self._stopping else None)
        if reason is None:
            if self._limiter.enabled:
                name = conn.reader.name or ""
                refusal = self._limiter.admit(name)
                if refusal is not None:
                    self._shed(conn, found, refusal.reason, refusal)
                    return
                conn.admitted = name
            if self._submit(conn):
                return
            if conn.admitted is not None:  # it never runs: as if the limiter had not admitted it
                self._limiter.cancel(conn.admitted)
                conn.admitted = None
            reason = OVERLOADED
        self._shed(conn, found, reason)

    def _shed(self, conn: _Conn, found: Tuple[int, int], reason: str, refusal: Optional[Refusal] = None) -> None:
        """Answer the whole request at the head of ``conn.inbuf`` LOADSHEDDING, without running it
        (over a request limit: ``refusal`` says which). Overloaded or over a request limit, the
        connection stays open; otherwise it is closed after the reply."""
        reader = conn.reader
        name, seqid, oneway = reader.name or "", reader.seqid or 0, reader.mtype == TMessageType.ONEWAY
        del conn.inbuf[: found[1]]
        reader.reset()
        self._hook_rejected(name, conn.peer, reason)
        close = None if reason == OVERLOADED or refusal is not None else reason
        if oneway:
            self._after_request(conn, close)
            return
        reply = self._dispatcher.exception_reply(name, seqid, shed_reply(self._label, name, reason, refusal))
        self._send_from_io(conn, self._frame(reply), close)

    def _refuse(self, conn: _Conn, err: MessageError) -> None:
        """A malformed or oversized request: answer what can be answered, then close."""
        reader = conn.reader
        reason = "too_large" if err.too_large else "protocol_error"
        log.info("%s: closing the connection from %s:%d: %s", self._label, conn.peer[0], conn.peer[1], err)
        if not err.too_large or reader.name is None or reader.mtype != TMessageType.CALL:
            if err.too_large:
                self._hook_rejected(reader.name, conn.peer, reason)
            self._close(conn, reason)
            return
        self._hook_rejected(reader.name, conn.peer, reason)
        del self._reading[conn.fd]
        conn.state = BUSY
        self._sel.unregister(conn.sock)
        conn.inbuf.clear()
        reply = self._dispatcher.exception_reply(
            reader.name, reader.seqid or 0, TApplicationException(TApplicationException.PROTOCOL_ERROR, str(err))
        )
        self._send_from_io(conn, self._frame(reply), reason)

    def _send_from_io(self, conn: _Conn, data: bytes, close: Optional[str]) -> None:
        """On the I/O thread, for a BUSY (unregistered) connection: send ``data`` without
        blocking, then go on (or drain and close, for ``close``)."""
        conn.close_after = close
        self._begin_write(conn, memoryview(data))

    def _begin_write(self, conn: _Conn, out: memoryview) -> None:
        conn.out = out
        conn.out_deadline = time.monotonic() + self._opts.read_timeout
        conn.state = WRITING
        self._writing[conn.fd] = conn
        try:
            self._sel.register(conn.sock, selectors.EVENT_WRITE, conn)
        except (OSError, ValueError):
            self._close(conn, "error")
            return
        self._flush(conn)

    def _flush(self, conn: _Conn) -> None:
        out = conn.out
        assert out is not None
        try:
            while out:
                sent = conn.sock.send(out)
                out = out[sent:]
        except (BlockingIOError, InterruptedError):
            conn.out = out
            return
        except OSError as err:
            log.debug("%s: cannot reply to %s:%d: %s", self._label, conn.peer[0], conn.peer[1], err)
            self._close(conn, "error")
            return
        conn.out = None
        del self._writing[conn.fd]
        self._sel.unregister(conn.sock)
        conn.state = BUSY
        self._after_request(conn, conn.close_after)

    def _after_request(self, conn: _Conn, close: Optional[str]) -> None:
        """On the I/O thread, for a BUSY (unregistered) connection whose request is answered:
        read on, serve a request already buffered, or drain and close."""
        if conn.rejecting is not None:
            close = conn.rejecting
        if close is not None:
            self._lingering_close(conn, close)
            return
        if self._stopping and not conn.inbuf:
            self._close(conn, "stopping")
            return
        try:
            self._sel.register(conn.sock, selectors.EVENT_READ, conn)
        except (OSError, ValueError):
            self._close(conn, "error")
            return
        if conn.inbuf:
            conn.state = READING
            conn.read_start = time.monotonic()
            self._reading[conn.fd] = conn
            self._advance(conn)
        else:
            conn.state = IDLE
            conn.since = time.monotonic()
            self._idle[conn.fd] = conn

    def _lingering_close(self, conn: _Conn, reason: str) -> None:
        """Stop sending, read and discard what the client still sends for a moment, then close:
        closing with unread bytes would reset the connection and could destroy the reply."""
        try:
            conn.sock.shutdown(socket.SHUT_WR)
            self._sel.register(conn.sock, selectors.EVENT_READ, conn)
        except (OSError, ValueError):
            self._close(conn, reason)
            return
        conn.inbuf.clear()
        conn.state = DRAINING
        conn.since = time.monotonic()
        conn.close_after = reason
        self._draining[conn.fd] = conn

    def _drain(self, conn: _Conn) -> None:
        try:
            n = conn.sock.recv_into(self._rbuf)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            n = 0
        if n == 0:
            self._close(conn, conn.close_after or "error")

    def _take_returns(self) -> None:
        """Connections workers handed back: go on reading them, or finish their reply."""
        with self._lock:
            if not self._returns:
                self._woken = False
                return
            returns = list(self._returns)
            self._returns.clear()
            self._woken = False
        for conn in returns:
            if conn.state == CLOSED:
                continue
            if conn.close_after is not None and conn.out is None:
                if conn.close_after == "peer_closed":
                    self._close(conn, "peer_closed")
                else:
                    self._lingering_close(conn, conn.close_after)
            elif conn.out is not None:
                self._begin_write(conn, conn.out)
            else:
                self._after_request(conn, None)

    def _sweep(self, now: float) -> None:
        """Close connections past their deadlines, at most ``_SWEEP_BATCH`` of each kind per turn
        (connections opened in a burst expire in a burst: closing them all at once would hold up
        the requests of everyone else; the selector does not wait while some are overdue)."""
        budget = _SWEEP_BATCH
        idle_limit = now - self._opts.idle_timeout
        while self._idle and _head(self._idle).since <= idle_limit and budget:
            budget -= 1
            self._close(_head(self._idle), "idle_timeout")
        budget = _SWEEP_BATCH
        read_limit = now - self._opts.read_timeout
        while self._reading and _head(self._reading).read_start <= read_limit and budget:
            budget -= 1
            conn = _head(self._reading)
            log.debug(  # debug: a slowloris attack would flood the log
                "%s: closing the connection from %s:%d: %s within %.1f s",
                self._label, conn.peer[0], conn.peer[1],
                "no request" if conn.rejecting and not conn.inbuf else "its request did not arrive whole",
                self._opts.read_timeout,
            )
            self._close(conn, "read_timeout")
        while self._writing and _head(self._writing).out_deadline <= now:
            self._close(_head(self._writing), "write_timeout")
        while self._draining and _head(self._draining).since <= now - _LINGERING_CLOSE:
            conn = _head(self._draining)
            self._close(conn, conn.close_after or "error")

    def _close(self, conn: _Conn, reason: str) -> None:
        """On the I/O thread: close a connection it owns (not BUSY with a worker)."""
        if conn.state == CLOSED:
            return
        fd = conn.fd
        for table in (self._idle, self._reading, self._writing, self._draining):
            table.pop(fd, None)
        if self._conns.pop(fd, None) is not None and conn.rejecting is not None:
            self._rejecting -= 1
        with contextlib.suppress(KeyError, ValueError, OSError):
            self._sel.unregister(conn.sock)
        conn.state = CLOSED
        conn.sock.close()
        if self._hooks is not None:
            self._hook("connection_closed", conn.peer, reason)

    def _shutdown(self) -> None:
        """The I/O thread's end: nothing is accepted; every connection it owns is closed, and
        those a worker still has are shut down (the worker closes them when its handler returns)."""
        with self._lock:
            self._io_done = True
            queued = []
            while True:  # requests still queued never run now: answered "not executed" below
                try:
                    job = self._jobs.get_nowait()
                except queue.Empty:
                    break
                if job is not None:
                    self._pending -= 1
                    queued.append(job)
            busy = [c for c in self._conns.values() if c.state == BUSY and c not in self._returns and c not in queued]
        for conn in queued:
            self._shed_unrun(conn)
        self._close_listener()
        for conn in list(self._conns.values()):
            if conn in busy:
                with contextlib.suppress(OSError):
                    conn.sock.shutdown(socket.SHUT_RDWR)
            else:
                self._close(conn, "stopping")

    # -- workers ---------------------------------------------------------------------------------

    def _submit(self, conn: _Conn) -> bool:
        """Queue a request for a worker (starting one if none is idle and fewer than ``workers``
        run); False when it must be shed."""
        start = False
        with self._lock:
            if self._pending >= self._idle_workers and len(self._workers) < self._opts.workers:
                start = True  # no worker waits for a job: one more
            elif self._pending - (len(self._workers) - len(self._running)) >= self._queue_size:
                # Every worker runs a handler and the queue is full. (Workers not in a handler,
                # lingering or handing a connection back, take a job within _LINGER.)
                return False
            self._pending += 1
            if start:
                worker = threading.Thread(
                    target=self._work,
                    name="thriftprobe-worker-%s-%d" % (self._label, len(self._workers) + 1),
                    daemon=True,
                )
                self._workers.append(worker)
        if start:
            try:
                worker.start()
            except RuntimeError:  # no thread can be started now: the queue still has room
                log.exception("%s: cannot start a worker thread", self._label)
                with self._lock:
                    self._workers.remove(worker)
                    if not self._workers:
                        self._pending -= 1
                        return False
        conn.handed_back = False
        self._jobs.put(conn)
        return True

    def _work(self) -> None:
        # Reused for every request this worker decodes.
        inbuf = TMemoryBuffer()
        proto = self._in_factory.get_protocol(inbuf)
        jobs = self._jobs
        with self._lock:
            self._idle_workers += 1
        while True:
            conn = jobs.get()
            with self._lock:
                self._idle_workers -= 1
                if conn is not None:
                    self._pending -= 1
                io_done = self._io_done
            if conn is None:
                return
            if io_done:  # past the stop deadline: never run it
                self._shed_unrun(conn)
                with self._lock:
                    self._idle_workers += 1
                continue
            try:
                self._serve_conn(conn, inbuf, proto)
            except BaseException:  # even SystemExit from a handler: the worker must live on
                log.exception("%s: serving a connection from %s:%d failed", self._label, *conn.peer)
                if not conn.handed_back:  # (giving it back releases its request, if admitted)
                    conn.close_after = "error"
                    conn.out = None
                    self._give_back(conn)

    def _serve_conn(self, conn: _Conn, inbuf: Any, proto: Any) -> None:
        """Run the whole request at the head of ``conn.inbuf``, send the reply, and serve the
        connection's next requests while they come quickly and nothing else waits."""
        found = conn.reader.feed(conn.inbuf)  # a worker is only handed a whole request
        served = 0
        limiter = self._limiter
        while found is not None and served < _MAX_STICKY:
            if served and limiter.enabled:  # read here, not by the I/O thread: admit it here
                method = conn.reader.name or ""
                if limiter.admit(method) is not None:
                    break  # the I/O thread admits it again, or answers it unrun
                conn.admitted = method
            served += 1
            start, end = found
            buf = conn.inbuf
            if start == 0 and end == len(buf):
                data = bytes(buf)
                buf.clear()
            else:
                data = bytes(buf[start:end])
                del buf[:end]
            name = conn.reader.name or ""
            conn.reader.reset()
            inbuf.setvalue(data)
            if not self._run(conn, name, proto):
                return  # handed back (released by _run once answered, or by _give_back)
            if self._pending or self._stopping:
                break
            if not conn.inbuf:
                if len(self._workers) - self._idle_workers - len(self._lingering) > _LINGER_MAX_ACTIVE:
                    break  # many connections are busy: the I/O thread watches this one
                if not self._await_next(conn):
                    return
            try:
                found = conn.reader.feed(conn.inbuf)
            except MessageError:
                break  # the I/O thread refuses it
            if found is not None and self._stop_begun():
                break  # arrived while the server stops: the I/O thread answers it, unrun
            if found is not None and self._hooks is not None:
                conn.whole_at = time.time()
        self._give_back(conn)

    def _stop_begun(self) -> bool:
        return self._stopping

    def _run(self, conn: _Conn, name: str, proto: Any) -> bool:
        """Decode (from ``proto``, over the request's bytes), run and answer one request; False
        when the connection was handed back. The worker counts as running (unavailable for a
        queued request) while it decodes and runs the handler, not while it sends the reply."""
        hooks = self._hooks
        started = time.perf_counter()
        wall = 0.0
        if hooks is not None:
            wall = conn.whole_at or time.time()
            started -= max(0.0, time.time() - wall)  # the duration counts the wait for a worker
            conn.whole_at = 0.0
            self._hook("request_started", name, conn.peer)
        me = threading.get_ident()
        self._running.add(me)
        try:
            reply, method, outcome = self._context.copy().run(self._dispatcher.handle, proto)
        except Exception as err:  # noqa: BLE001 - malformed arguments: the stream cannot be trusted
            self._running.discard(me)
            log.info("%s: closing the connection from %s:%d: bad request: %s", self._label, *conn.peer, err)
            if hooks is not None:
                self._hook("request_finished", name, conn.peer, wall, "protocol_error", time.perf_counter() - started)
            conn.close_after = "protocol_error"
            self._give_back(conn)
            return False
        except BaseException:
            self._running.discard(me)
            raise
        self._running.discard(me)
        if conn.admitted is not None:
            # Answered: its place is free before the reply is handed to the socket, or a client that
            # waits for the reply and then calls again (on any connection) could find it still taken.
            self._release(conn)
        if reply is not None:
            if self._framed:
                reply = _FRAME.pack(len(reply)) + reply
            try:
                sent = conn.sock.send(reply)
                if sent < len(reply):
                    conn.out = memoryview(reply)[sent:]  # the I/O thread sends the rest as the client reads
            except (BlockingIOError, InterruptedError, socket.timeout):  # timeout: gevent's, nothing sent
                conn.out = memoryview(reply)
            except OSError as err:
                log.debug("%s: cannot reply to %s:%d: %s", self._label, conn.peer[0], conn.peer[1], err)
                outcome = "transport_error"
                conn.close_after = "error"
        if hooks is not None:
            self._hook("request_finished", method, conn.peer, wall, outcome, time.perf_counter() - started)
        if conn.out is not None or conn.close_after is not None:
            self._give_back(conn)
            return False
        return True

    def _await_next(self, conn: _Conn) -> bool:
        """Wait up to ``_LINGER`` for the connection's next bytes and read them; False when the
        connection was handed back (closed by the peer, or failed).

        The wait is a blocking ``recv`` bounded by the socket's receive timeout (SO_RCVTIMEO):
        one system call when the request comes, as on a thread-per-connection server. Under gevent
        (``thriftprobe.cooperative``) the kernel's timeout would never apply (gevent keeps the
        descriptor non-blocking and the recv would wait in the hub for good), so the socket's own
        timeout bounds the wait instead, and the hub runs other greenlets meanwhile. While it
        waits, the worker counts as available, and a job queued meanwhile waits at most
        ``_LINGER`` (the linger only happens while at most ``_LINGER_MAX_ACTIVE`` workers are active).
        """
        sock = conn.sock
        if _LINGER <= 0:
            return True
        if not conn.blocking:
            try:
                if self._cooperative:
                    # gevent keeps the descriptor non-blocking and waits in its hub: the kernel's
                    # timeouts never apply, and only the socket's own timeout bounds the wait.
                    sock.settimeout(_LINGER)
                else:  # SO_SNDTIMEO too: a blocking send must never wait long on a client that does not read
                    timeval = struct.pack("ll", 0, max(1, int(_LINGER * 1_000_000)))
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, timeval)
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, timeval)
                    sock.setblocking(True)
            except OSError:
                return True
            conn.blocking = True
        me = threading.get_ident()
        self._lingering.add(me)
        try:
            data = sock.recv(_RECV)
        except (BlockingIOError, InterruptedError, socket.timeout):
            return True  # nothing came: hand the connection back
        except OSError:
            data = b""
        finally:
            self._lingering.discard(me)
        if not data:
            conn.close_after = "peer_closed"
            self._give_back(conn)
            return False
        conn.inbuf += data
        conn.read_start = time.monotonic()
        return True

    def _give_back(self, conn: _Conn) -> None:
        """From a worker, once per request it was handed: give the connection back to the I/O
        thread (or close it, if that ended). The worker counts as idle from here on. A request
        the limiter admitted is released first: once given back, the connection may carry the
        next request's admission."""
        if conn.admitted is not None:
            self._release(conn)
        conn.handed_back = True
        if conn.blocking:
            conn.blocking = False
            with contextlib.suppress(OSError):
                conn.sock.setblocking(False)
        with self._lock:
            self._idle_workers += 1
            if not self._io_done:
                self._returns.append(conn)
                if self._woken:
                    return
                self._woken = True
            else:
                conn.state = CLOSED
                conn.sock.close()
                return
        self._wake()

    def _shed_unrun(self, conn: _Conn) -> None:
        """A queued request that will never run (the stop deadline passed): answer it "not
        executed" if the socket takes the reply at once, then close the connection."""
        self._release(conn)
        reader = conn.reader
        if reader.name is not None and reader.mtype == TMessageType.CALL:
            error = shed_reply(self._label, reader.name, "stopping")
            reply = self._frame(self._dispatcher.exception_reply(reader.name, reader.seqid or 0, error))
            with contextlib.suppress(OSError):
                conn.sock.send(reply)
        self._hook_rejected(reader.name, conn.peer, "stopping")
        conn.state = CLOSED
        conn.sock.close()
        if self._hooks is not None:
            self._hook("connection_closed", conn.peer, "stopping")

    # -- helpers ---------------------------------------------------------------------------------

    # -- introspection, for tests and the benchmark -------------------------------------------------

    def stats(self) -> Dict[str, int]:
        """Counts now: connections by state, worker threads, requests waiting for a worker."""
        with self._lock:
            return {
                "connections": len(self._conns),
                "idle": len(self._idle),
                "reading": len(self._reading),
                "workers": len(self._workers),
                "queued": self._pending,
            }
