"""Connections per node: lend one, take it back, or throw it away after an error.

A connection that failed or timed out mid-call is never returned (its late reply would be read as
the next call's answer). Before an idle connection is lent it is polled with a zero timeout: any
event on an idle socket means the peer closed it (or sent bytes nobody asked for), so it is
replaced and the call does not fail on a connection a restarted or idle-closing provider dropped.
A connection idle for longer than ``max_idle_age`` is closed instead of lent: a NAT or load
balancer that silently forgot it would otherwise fail the next call after sending.

Each connection is opened with the transport and protocol (the ``Wire``) its caller asks for,
the node's as advertised. A node's idle connections are all of one wire: when a node comes back
on the same host and port speaking another one, its idle connections of the old wire are closed
instead of lent, and a connection of the old wire that comes back from a call is not kept.
"""

from __future__ import annotations

import io
import logging
import os
import select
import socket
import threading
import time
from typing import Callable, Deque, Dict, Mapping, Optional, Protocol, Tuple

from thriftpy2.protocol.base import TProtocolBase
from thriftpy2.transport import TSocket, TTransportException
from thriftpy2.transport.base import TTransportBase

from .wire import BUFFERED_BINARY, Wire

__all__ = ["ConnectionPool", "PoolWatcher", "PooledConnection"]

log = logging.getLogger(__name__)

Address = Tuple[str, int]
KeepFunc = Callable[[Address], bool]
_STALE_EVENTS = select.POLLIN | select.POLLPRI | select.POLLERR | select.POLLHUP


class PoolWatcher(Protocol):
    """Told when a pool opens, fails to open and closes connections, by address (a client's
    metrics): never per call, so lending and taking back cost nothing. Called on the calling
    threads: each method must be quick and never raise."""

    def opened(self, address: Address) -> None:
        """A new connection was opened."""

    def failed(self, address: Address) -> None:
        """Opening a connection failed (refused, timed out...)."""

    def closed(self, address: Address) -> None:
        """A connection the pool opened was closed (or forgotten after fork); once per connection."""


class _CallSocket(TSocket):
    """A TSocket that counts the bytes handed to the kernel and can bound its I/O by a deadline.

    ``written`` tells a call whose request failed to encode whether part of it already left (the
    buffered transport writes through once its buffer is full): then the connection carries half
    a request and must be closed; otherwise it is clean. ``deadline`` (``time.monotonic()``
    seconds, or None for the socket's own timeout) is set for a call with a per-call timeout:
    every read and write then gets only what is left of it.
    """

    written = 0
    deadline: Optional[float] = None

    def open(self) -> None:
        # TSocket.open reports every failure as NOT_OPEN; a timeout is told apart here.
        try:
            super().open()  # type: ignore[no-untyped-call]
        except TTransportException as err:
            if isinstance(err.__context__, socket.timeout):
                err.type = TTransportException.TIMED_OUT
            raise

    def _arm(self, deadline: float) -> None:
        left = deadline - time.monotonic()
        if left <= 0:
            raise socket.timeout("timed out (the call's timeout was spent)")
        self.sock.settimeout(left)

    def read(self, sz: int) -> bytes:
        if self.deadline is not None:
            self._arm(self.deadline)
        return super().read(sz)  # type: ignore[no-untyped-call,no-any-return]

    def write(self, buf: bytes) -> None:
        self.written += len(buf)  # before sending: a partial send counts as sent
        if self.deadline is not None:
            self._arm(self.deadline)
        super().write(buf)  # type: ignore[no-untyped-call]


class PooledConnection:
    """One open connection to one node, speaking ``wire``. Used by one thread at a time (the
    pool hands it out)."""

    __slots__ = (
        "_default_timeout", "_poll", "_socket", "_transport", "address", "idle_since", "on_close", "protocol", "seqid",
        "tsocket", "wire",
    )

    def __init__(
        self,
        address: Address,
        sock: _CallSocket,
        transport: TTransportBase,
        protocol: TProtocolBase,
        wire: Wire = BUFFERED_BINARY,
    ) -> None:
        self.address = address
        self.wire = wire
        self.protocol = protocol
        self._transport = transport
        self.tsocket = sock
        self._socket = sock.sock
        self._default_timeout = self._socket.gettimeout()
        poller = select.poll()
        poller.register(self._socket.fileno(), _STALE_EVENTS)
        self._poll = poller.poll
        self.seqid = 0
        self.idle_since = time.monotonic()
        self.on_close: Optional[Callable[[Address], None]] = None  # told once, at the first close

    @property
    def written(self) -> int:
        """Bytes written to the socket since it was opened."""
        return self.tsocket.written

    def set_deadline(self, deadline: Optional[float]) -> None:
        """Bound the next reads and writes by ``deadline`` (``time.monotonic()`` seconds); None
        restores the pool's socket timeout."""
        if deadline is None:
            self.tsocket.deadline = None
            self._socket.settimeout(self._default_timeout)
        else:
            self.tsocket.deadline = deadline

    def drop_unsent(self) -> bool:
        """Forget a request that was being encoded but never reached the socket: empty the
        transport's write buffer. Returns False when the transport offers no way to (the caller
        then closes the connection)."""
        transport = self._transport
        clean = getattr(transport, "clean", None)  # thriftpy2's compiled transports
        if callable(clean):
            clean()
            return True
        if isinstance(getattr(transport, "_wbuf", None), io.BytesIO):  # thriftpy2's pure-Python TBufferedTransport
            transport._wbuf = io.BytesIO()  # type: ignore[attr-defined]
            return True
        return False

    def is_stale(self) -> bool:
        """True if the idle socket has anything to report: EOF, reset or unexpected bytes."""
        return bool(self._poll(0))

    def close(self) -> None:
        on_close, self.on_close = self.on_close, None
        self._transport.close()
        if on_close is not None:
            on_close(self.address)

    def forget(self) -> None:
        """Release this process's handle on the socket without shutting the connection down
        (after fork, the parent still uses it)."""
        on_close, self.on_close = self.on_close, None
        self._socket.close()
        if on_close is not None:
            on_close(self.address)


class _Idle(Deque[PooledConnection]):
    """A node's idle connections, all speaking ``wire``."""

    __slots__ = ("wire",)

    def __init__(self, wire: Wire) -> None:
        super().__init__()
        self.wire = wire


class ConnectionPool:
    """Idle connections kept per node address, at most ``max_idle`` each, none idle for longer
    than ``max_idle_age`` seconds (None: no limit). All of one node's idle connections speak
    one wire (see the module docstring).

    Thread-safe: any number of threads may acquire and release concurrently. After fork, a child
    calls ``abandon_after_fork()`` and uses the pool it returns.
    """

    def __init__(
        self,
        *,
        connect_timeout_ms: int,
        socket_timeout_ms: int,
        max_idle: int = 32,
        max_idle_age: Optional[float] = 30.0,
        keep: Optional[KeepFunc] = None,
        wires: Optional[Mapping[Address, Wire]] = None,
        watcher: Optional[PoolWatcher] = None,
    ) -> None:
        self._connect_timeout_ms = connect_timeout_ms
        self._socket_timeout_ms = socket_timeout_ms
        self._max_idle = max_idle
        self._max_idle_age = float("inf") if max_idle_age is None else max_idle_age
        # Whether a connection to an address is still worth keeping when it comes back and the
        # address has no idle list (the node may have left while the call was out).
        self._keep: KeepFunc = keep or (lambda address: True)
        # The wire each node speaks now (see set_wires); a node missing: no word on it.
        self._wires: Mapping[Address, Wire] = {} if wires is None else wires
        self._idle: Dict[Address, _Idle] = {}
        self._lock = threading.Lock()
        self._closed = False
        self.owner_pid = os.getpid()
        self._watcher = watcher

    def set_watcher(self, watcher: Optional[PoolWatcher]) -> None:
        """Tell ``watcher`` about the connections opened, failed to open and closed from now on."""
        self._watcher = watcher

    def set_keep(self, keep: KeepFunc) -> None:
        self._keep = keep

    def set_wires(self, wires: Mapping[Address, Wire]) -> None:
        """The wire each node speaks now, by address: replaced whole when the table changes (the
        pool only reads it). A connection is opened in its node's wire; one of another wire is
        neither lent nor kept."""
        self._wires = wires

    def acquire(
        self, address: Address, deadline: Optional[float] = None, wire: Optional[Wire] = None
    ) -> PooledConnection:
        """Lend a live connection to ``address`` speaking ``wire`` (by default the node's, as
        ``set_wires`` gave it, else buffered binary), opening one if none is idle. Idle
        connections of another wire (the node's before it restarted speaking this one) are
        closed.

        ``deadline`` (``time.monotonic()`` seconds) caps the connect timeout by the time a call
        has left. Raises thriftpy2's TTransportException (NOT_OPEN, or TIMED_OUT when the connect
        timed out) when the connection cannot be opened: nothing was sent, so the caller may try
        another node.
        """
        if wire is None:
            wire = self._wires.get(address, BUFFERED_BINARY)
        idle = self._idle.get(address)
        if idle is not None and idle.wire is not wire:
            self._drop_list(address, idle)
            log.info("node %s:%d now speaks %s (was %s): its idle connections are closed", *address, wire, idle.wire)
        elif idle:
            oldest_allowed = time.monotonic() - self._max_idle_age
            while idle:
                try:
                    conn = idle.pop()
                except IndexError:  # another thread took the last one
                    break
                if conn.idle_since < oldest_allowed:
                    # The newest idle one is too old, so are the others: this loop closes them all.
                    log.debug("closing a connection to %s:%d idle for longer than %.0f s", *address, self._max_idle_age)
                elif not conn.is_stale():
                    return conn
                else:
                    log.debug("dropping a connection to %s:%d closed by the peer", *address)
                conn.close()
        return self._open(address, deadline, wire)

    def _open(self, address: Address, deadline: Optional[float], wire: Wire) -> PooledConnection:
        connect_timeout_ms: float = self._connect_timeout_ms
        if deadline is not None:
            left_ms = (deadline - time.monotonic()) * 1000.0
            if left_ms <= 0:
                raise TTransportException(TTransportException.TIMED_OUT, "no time left to connect to %s:%d" % address)
            connect_timeout_ms = min(connect_timeout_ms, left_ms)
        sock = _CallSocket(  # type: ignore[no-untyped-call]
            address[0],
            address[1],
            socket_family=socket.AF_INET6 if ":" in address[0] else socket.AF_INET,
            socket_timeout=self._socket_timeout_ms,
            connect_timeout=connect_timeout_ms,
        )
        transport = wire.transport_factory.get_transport(sock)
        watcher = self._watcher
        try:
            transport.open()  # raises TTransportException(NOT_OPEN); TSocket closes its socket then
        except BaseException:
            if watcher is not None:
                watcher.failed(address)
            raise
        log.debug("opened a %s connection to %s:%d", wire, *address)
        conn = PooledConnection(address, sock, transport, wire.protocol_factory.get_protocol(transport), wire)
        if watcher is not None:
            conn.on_close = watcher.closed
            watcher.opened(address)
        return conn

    def release(self, conn: PooledConnection) -> None:
        """Take back a connection whose last call completed cleanly."""
        now = conn.idle_since = time.monotonic()
        address = conn.address
        idle = self._idle.get(address)
        if idle is None or idle.wire is not conn.wire:
            stale: Optional[_Idle] = None
            with self._lock:
                # Checked under the lock that drop() takes: a node removed after this check is
                # dropped after this list exists, so neither the list nor the socket outlives it.
                current = self._wires.get(address)
                if (
                    self._closed
                    or not self._keep(address)  # closed, or its node left meanwhile
                    or (current is not None and current is not conn.wire)  # it speaks another wire now
                ):
                    conn.close()
                    return
                idle = self._idle.get(address)
                if idle is not None and idle.wire is not conn.wire:
                    if current is None:  # no word on which wire is the node's: the list stays
                        idle = None
                    else:  # the list is of the node's old wire
                        stale = self._idle.pop(address)
                        idle = self._idle[address] = _Idle(conn.wire)
                elif idle is None:
                    idle = self._idle[address] = _Idle(conn.wire)
                kept = False
                if idle is not None and len(idle) < self._max_idle:
                    idle.append(conn)
                    kept = True
            if not kept:
                conn.close()
            self._close_all(stale)
            return
        if len(idle) >= self._max_idle:
            conn.close()
            return
        self._close_expired(idle, now)
        idle.append(conn)
        if self._idle.get(address) is not idle:  # dropped, closed or replaced meanwhile: leave nothing behind
            try:
                idle.remove(conn)
            except ValueError:  # another thread took it and owns it now
                return
            conn.close()

    def _close_expired(self, idle: Deque[PooledConnection], now: float) -> None:
        """Close the connections at the old end of ``idle`` that are past the maximum idle age,
        so that a quiet pool does not keep sockets a NAT dropped long ago."""
        while idle and now - idle[0].idle_since > self._max_idle_age:
            try:
                conn = idle.popleft()
            except IndexError:
                return
            if now - conn.idle_since > self._max_idle_age:
                conn.close()
            else:  # a younger one taken from under another thread's nose: keep it
                idle.appendleft(conn)
                return

    @staticmethod
    def discard(conn: PooledConnection) -> None:
        """Close a connection whose state is unknown (transport error, timeout)."""
        conn.close()

    def drop(self, address: Address) -> None:
        """Close the idle connections to a node that left the registry."""
        with self._lock:
            idle = self._idle.pop(address, None)
        self._close_all(idle)

    def _drop_list(self, address: Address, idle: _Idle) -> None:
        """Close ``idle`` and forget it, if it still is the address's list."""
        with self._lock:
            if self._idle.get(address) is idle:
                del self._idle[address]
        self._close_all(idle)

    @staticmethod
    def _close_all(idle: Optional[_Idle]) -> None:
        while idle:
            try:
                conn = idle.pop()
            except IndexError:  # another thread took the last one; it sees the list is gone
                return
            conn.close()

    def abandon_after_fork(self) -> "ConnectionPool":
        """In a child process: forget the parent's connections (never shutting them down, the
        parent still uses them) and return an empty pool with the same settings."""
        for idle in list(self._idle.values()):
            for conn in list(idle):
                conn.forget()
        self._idle = {}
        return ConnectionPool(
            connect_timeout_ms=self._connect_timeout_ms,
            socket_timeout_ms=self._socket_timeout_ms,
            max_idle=self._max_idle,
            max_idle_age=None if self._max_idle_age == float("inf") else self._max_idle_age,
            keep=self._keep,
            wires=self._wires,
            watcher=self._watcher,
        )

    def idle_count(self, address: Address) -> int:
        idle = self._idle.get(address)
        return len(idle) if idle else 0

    def close(self) -> None:
        """Close every idle connection; connections out on loan are closed when returned."""
        with self._lock:
            self._closed = True
            addresses = list(self._idle)
        for address in addresses:
            self.drop(address)
