"""Connections per node: lend one, take it back, or throw it away after an error.

A connection that failed or timed out mid-call is never returned (its late reply would be read as
the next call's answer). Before an idle connection is lent it is polled with a zero timeout: any
event on an idle socket means the peer closed it (or sent bytes nobody asked for), so it is
replaced and the call does not fail on a connection a restarted or idle-closing provider dropped.
"""

from __future__ import annotations

import collections
import logging
import os
import select
import socket
import threading
from typing import Callable, Deque, Dict, Optional, Tuple

from thriftpy2.protocol import TBinaryProtocolFactory
from thriftpy2.protocol.base import TProtocolBase, TProtocolFactory
from thriftpy2.transport import TBufferedTransportFactory, TSocket
from thriftpy2.transport.base import TTransportBase, TTransportFactory

__all__ = ["ConnectionPool", "PooledConnection"]

log = logging.getLogger(__name__)

Address = Tuple[str, int]
_STALE_EVENTS = select.POLLIN | select.POLLPRI | select.POLLERR | select.POLLHUP


class PooledConnection:
    """One open connection to one node. Used by one thread at a time (the pool hands it out)."""

    __slots__ = ("_default_timeout", "_poll", "_socket", "_transport", "address", "protocol", "seqid")

    def __init__(self, address: Address, sock: TSocket, transport: TTransportBase, protocol: TProtocolBase) -> None:
        self.address = address
        self.protocol = protocol
        self._transport = transport
        self._socket = sock.sock
        self._default_timeout = self._socket.gettimeout()
        poller = select.poll()
        poller.register(self._socket.fileno(), _STALE_EVENTS)
        self._poll = poller.poll
        self.seqid = 0

    def set_timeout(self, timeout_ms: Optional[int]) -> None:
        """Use ``timeout_ms`` for the next reads and writes; None restores the pool's default."""
        self._socket.settimeout(self._default_timeout if timeout_ms is None else timeout_ms / 1000.0)

    def is_stale(self) -> bool:
        """True if the idle socket has anything to report: EOF, reset or unexpected bytes."""
        return bool(self._poll(0))

    def close(self) -> None:
        self._transport.close()

    def forget(self) -> None:
        """Release this process's handle on the socket without shutting the connection down
        (after fork, the parent still uses it)."""
        self._socket.close()


class ConnectionPool:
    """Idle connections kept per node address, at most ``max_idle`` each.

    Thread-safe: any number of threads may acquire and release concurrently. After fork, a child
    calls ``abandon_after_fork()`` and uses the pool it returns.
    """

    def __init__(
        self,
        *,
        connect_timeout_ms: int,
        socket_timeout_ms: int,
        max_idle: int = 32,
        proto_factory: Optional[TProtocolFactory] = None,
        trans_factory: Optional[TTransportFactory] = None,
        keep: Optional[Callable[[Address], bool]] = None,
    ) -> None:
        self._connect_timeout_ms = connect_timeout_ms
        self._socket_timeout_ms = socket_timeout_ms
        self._max_idle = max_idle
        self._proto_factory = proto_factory or TBinaryProtocolFactory()
        self._trans_factory = trans_factory or TBufferedTransportFactory()
        # Whether a connection to an address is still worth keeping when it comes back and the
        # address has no idle list (the node may have left while the call was out).
        self._keep = keep or (lambda address: True)
        self._idle: Dict[Address, Deque[PooledConnection]] = {}
        self._lock = threading.Lock()
        self._closed = False
        self.owner_pid = os.getpid()

    def set_keep(self, keep: Callable[[Address], bool]) -> None:
        self._keep = keep

    def acquire(self, address: Address) -> PooledConnection:
        """Lend a live connection to ``address``, opening one if none is idle.

        Raises thriftpy2's TTransportException (type NOT_OPEN) when the connection cannot be
        opened: nothing was sent, so the caller may try another node.
        """
        idle = self._idle.get(address)
        while idle:
            try:
                conn = idle.pop()
            except IndexError:  # another thread took the last one
                break
            if not conn.is_stale():
                return conn
            log.debug("dropping a connection to %s:%d closed by the peer", *address)
            conn.close()
        return self._open(address)

    def _open(self, address: Address) -> PooledConnection:
        sock = TSocket(
            address[0],
            address[1],
            socket_family=socket.AF_INET6 if ":" in address[0] else socket.AF_INET,
            socket_timeout=self._socket_timeout_ms,
            connect_timeout=self._connect_timeout_ms,
        )
        transport = self._trans_factory.get_transport(sock)
        transport.open()  # raises TTransportException(NOT_OPEN); TSocket closes its socket then
        log.debug("opened a connection to %s:%d", *address)
        return PooledConnection(address, sock, transport, self._proto_factory.get_protocol(transport))

    def release(self, conn: PooledConnection) -> None:
        """Take back a connection whose last call completed cleanly."""
        idle = self._idle.get(conn.address)
        if idle is None:
            if not self._keep(conn.address):  # its node left while the call was out
                conn.close()
                return
            with self._lock:
                if self._closed:
                    conn.close()
                    return
                idle = self._idle.setdefault(conn.address, collections.deque())
        if len(idle) >= self._max_idle:
            conn.close()
            return
        idle.append(conn)
        if self._idle.get(conn.address) is not idle:  # dropped or closed meanwhile: leave nothing behind
            try:
                idle.remove(conn)
            except ValueError:  # another thread took it and owns it now
                return
            conn.close()

    @staticmethod
    def discard(conn: PooledConnection) -> None:
        """Close a connection whose state is unknown (transport error, timeout)."""
        conn.close()

    def drop(self, address: Address) -> None:
        """Close the idle connections to a node that left the registry."""
        with self._lock:
            idle = self._idle.pop(address, None)
        while idle:
            try:
                conn = idle.pop()
            except IndexError:
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
            proto_factory=self._proto_factory,
            trans_factory=self._trans_factory,
            keep=self._keep,
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
