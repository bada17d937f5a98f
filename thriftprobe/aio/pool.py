"""Connections per node for the asyncio client: lend one, take it back, or throw it away.

The asyncio twin of ``consumer.pool``. Each connection is an asyncio stream wrapped in
thriftpy2's asyncio transport and protocol (``thriftpy2.contrib.aio``) of the node's wire:
buffered or framed, binary or compact. thriftpy2's own ``TAsyncSocket`` is not used: it opens
connections on a thread of the default executor and bounds every read by its *connect* timeout
with a ``wait_for`` per read; here the connect is an ``asyncio.open_connection`` bounded by the
call's deadline and the client bounds a whole exchange with one timeout.

A connection whose call failed, timed out or was cancelled is never returned (its late reply
would be read as the next call's answer): the client discards it. An idle connection is checked
before it is lent (the peer closed it, or it was idle longer than ``max_idle_age``: closed
instead), and is kept only while its node is in the table and speaks the same wire.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import errno
import logging
import socket
import time
from typing import Any, Awaitable, Callable, Deque, Dict, Optional, Set, Tuple, TypeVar

from thriftpy2.contrib.aio.protocol import TAsyncBinaryProtocolFactory, TAsyncCompactProtocolFactory
from thriftpy2.contrib.aio.transport import TAsyncBufferedTransportFactory, TAsyncFramedTransportFactory
from thriftpy2.transport import TTransportException

from ..consumer.pool import PoolWatcher
from ..consumer.wire import Wire
from ..errors import NoAvailableNode

__all__ = ["AioConnection", "AioConnectionPool", "NodeLeft", "PoolExhausted", "run_until"]

log = logging.getLogger(__name__)

Address = Tuple[str, int]
KeepFunc = Callable[[Address, Wire], bool]

_TRANSPORTS: Dict[str, Any] = {"buffered": TAsyncBufferedTransportFactory(), "framed": TAsyncFramedTransportFactory()}
_PROTOCOLS: Dict[str, Any] = {"binary": TAsyncBinaryProtocolFactory(), "compact": TAsyncCompactProtocolFactory()}
# Failures to make a socket that are this process's trouble, not the node's.
_LOCAL_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})


class _StreamSocket:
    """The bottom of thriftpy2's asyncio transport stack over an asyncio stream pair (the
    interface of ``TAsyncSocket``: ``read``, ``write``, ``flush``, ``close``, ``is_open``)."""

    __slots__ = ("reader", "writer")

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    def is_open(self) -> bool:
        return not self.writer.is_closing()

    async def open(self) -> None:  # opened by the pool
        return None

    async def read(self, sz: int) -> bytes:
        data = await self.reader.read(sz)
        if not data:
            raise TTransportException(TTransportException.END_OF_FILE, "the node closed the connection")
        return data

    def write(self, buf: bytes) -> None:
        self.writer.write(buf)

    async def flush(self) -> None:
        await self.writer.drain()

    def close(self) -> None:
        self.writer.close()


class AioConnection:
    """One open connection to one node, speaking ``wire``. Used by one task at a time (the pool
    lends it); belongs to the event loop that opened it."""

    __slots__ = ("_sock", "address", "idle_since", "protocol", "seqid", "wire")

    def __init__(self, address: Address, wire: Wire, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.address = address
        self.wire = wire
        self._sock = _StreamSocket(reader, writer)
        transport = _TRANSPORTS[wire.transport].get_transport(self._sock)
        self.protocol = _PROTOCOLS[wire.protocol].get_protocol(transport)
        self.seqid = 0
        self.idle_since = 0.0

    def stale(self) -> bool:
        """Whether the peer closed it (or sent bytes nobody asked for) while it was idle."""
        reader = self._sock.reader
        return self._sock.writer.is_closing() or reader.at_eof() or bool(getattr(reader, "_buffer", b""))

    def close(self, abort: bool = False) -> None:
        """Close it; ``abort``: at once, dropping what is still unsent (a connection out of step,
        or one whose peer stopped reading would otherwise stay open until it reads)."""
        transport = self._sock.writer.transport
        try:
            if abort:
                transport.abort()
            else:
                self._sock.close()
        except RuntimeError:  # its event loop is closed: close the socket itself
            raw = self._sock.writer.get_extra_info("socket")
            with contextlib.suppress(OSError):
                getattr(raw, "_sock", raw).close()

    def shut(self) -> None:
        """Shut the socket down (the peer sees it closed) without its event loop, which closes
        the descriptor when it runs again (or is closed)."""
        raw = self._sock.writer.get_extra_info("socket")
        with contextlib.suppress(OSError, AttributeError):
            raw.shutdown(socket.SHUT_RDWR)

    async def wait_closed(self) -> None:
        with contextlib.suppress(OSError):  # a reset while closing: closed all the same
            await self._sock.writer.wait_closed()


class PoolExhausted(NoAvailableNode):
    """Every connection the client may open to the picked node stayed busy until the call's time
    ran out (``max_connections_per_node``); nothing was sent."""


class NodeLeft(Exception):
    """The node left the table while the call waited for one of its connections (internal: the
    client picks another node)."""


class AioConnectionPool:
    """At most ``max_per_node`` connections per node, open or opening; calls past that wait,
    first come first served, for one to be given back (at most the call's deadline, else
    ``max_wait_ms``). Idle connections at most ``max_idle`` per node, none older than
    ``max_idle_age`` s (None: no limit). Not thread-safe: it belongs to one event loop, and other
    threads reach it through ``loop.call_soon_threadsafe`` (the client does so for table changes).
    """

    def __init__(
        self,
        *,
        connect_timeout_ms: int,
        max_per_node: int,
        max_wait_ms: int,
        max_idle: int,
        max_idle_age: Optional[float],
        keep: KeepFunc,
        watcher: Optional[PoolWatcher] = None,
    ) -> None:
        self._connect_timeout = connect_timeout_ms / 1000.0
        self._max_per_node = max_per_node
        self._max_wait = max_wait_ms / 1000.0
        self._counts: Dict[Address, int] = {}  # open or opening, lent or idle
        self._waiters: Dict[Address, Deque["asyncio.Future[Optional[AioConnection]]"]] = {}
        self._max_idle = max_idle
        self._max_idle_age = max_idle_age
        self._keep = keep
        self._watcher = watcher
        self._idle: Dict[Address, Deque[AioConnection]] = {}
        self._open: Set[AioConnection] = set()
        self._closed = False

    @property
    def open_count(self) -> int:
        """Connections open now, idle or lent."""
        return len(self._open)

    def idle_count(self, address: Address) -> int:
        idle = self._idle.get(address)
        return len(idle) if idle else 0

    async def acquire(self, address: Address, wire: Wire, deadline: Optional[float]) -> AioConnection:
        """An idle connection to ``address`` in ``wire``, or a new one while fewer than
        ``max_per_node`` are open to it; else the next one a call gives back, or the next free
        place, first come first served. ``deadline`` (loop time; None: ``max_wait_ms`` from now
        for the wait, the connect timeout for the connect) bounds both. Raises
        TTransportException when the node cannot be reached (NOT_OPEN, TIMED_OUT),
        PoolExhausted when no connection to it freed up in time, NodeLeft when the node left the
        table while the call waited (nothing was sent in either case), OSError when no socket
        can be made here."""
        until: Optional[float] = None
        while True:
            if self._closed:
                raise TTransportException(TTransportException.NOT_OPEN, "the connection pool is closed")
            conn = self._idle_conn(address, wire)
            if conn is not None:
                return conn
            if self._counts.get(address, 0) < self._max_per_node and not self._waiters.get(address):
                return await self._connect(address, wire, deadline, reserved=False)
            if until is None:
                until = asyncio.get_running_loop().time() + self._max_wait if deadline is None else deadline
            handed = await self._wait(address, until)
            if handed is None:  # a place was freed and kept for this call
                if not self._keep(address, wire):
                    self._uncount(address)
                    raise NodeLeft(address)
                return await self._connect(address, wire, deadline, reserved=True)
            if handed.wire is wire and not handed.stale():
                return handed
            self._forget(handed)  # its wire changed meanwhile, or the peer closed it

    def _idle_conn(self, address: Address, wire: Wire) -> Optional[AioConnection]:
        idle = self._idle.get(address)
        if not idle:
            return None
        now = time.monotonic()
        max_age = self._max_idle_age
        while idle:
            conn = idle.pop()  # the most recently used: the warmest
            if conn.wire is not wire or conn.stale() or (max_age is not None and now - conn.idle_since > max_age):
                self._forget(conn)
                continue
            return conn
        return None

    async def _wait(self, address: Address, until: float) -> Optional[AioConnection]:
        """Wait (until ``until``, loop time) for a connection a call gives back (returned) or a
        place freed and counted for this call (None)."""
        loop = asyncio.get_running_loop()
        waiter: "asyncio.Future[Optional[AioConnection]]" = loop.create_future()
        queue = self._waiters.get(address)
        if queue is None:
            queue = self._waiters[address] = collections.deque()
        queue.append(waiter)
        try:
            return await run_until(waiter, until)
        except BaseException as err:
            # Cancelled, or out of time: whatever was handed over meanwhile goes to the next in line.
            if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                handed = waiter.result()
                if handed is not None:
                    self.release(handed)
                else:
                    self._uncount(address)  # the place kept for this call: to the next one
            if isinstance(err, TimeoutError):
                raise PoolExhausted(
                    "all %d connections to %s:%d stayed busy until the call's time ran out; nothing was sent"
                    % (self._max_per_node, address[0], address[1])
                ) from None
            raise
        finally:
            with contextlib.suppress(ValueError):
                queue.remove(waiter)
            if not queue and self._waiters.get(address) is queue:
                del self._waiters[address]

    def _handoff(self, conn: AioConnection) -> bool:
        """Give ``conn`` to the first call waiting for its node; False when none waits."""
        queue = self._waiters.get(conn.address)
        while queue:
            waiter = queue.popleft()
            if not waiter.done():
                waiter.set_result(conn)
                return True
        return False

    def _slot_freed(self, address: Address) -> None:
        """A connection to ``address`` closed: its place goes to the first call waiting for
        one, counted for it at once (so that no later call takes it first)."""
        queue = self._waiters.get(address)
        while queue:
            waiter = queue.popleft()
            if not waiter.done():
                self._counts[address] = self._counts.get(address, 0) + 1
                waiter.set_result(None)
                return

    async def _connect(self, address: Address, wire: Wire, deadline: Optional[float], reserved: bool) -> AioConnection:
        if not reserved:
            self._counts[address] = self._counts.get(address, 0) + 1  # the place is taken while connecting
        try:
            conn = await self._open_connection(address, wire, deadline)
        except BaseException:
            self._uncount(address)
            raise
        self._open.add(conn)
        if self._watcher is not None:
            self._watcher.opened(address)
        if self._closed:  # closed while connecting
            self._forget(conn)
            raise TTransportException(TTransportException.NOT_OPEN, "the connection pool is closed")
        return conn

    def _uncount(self, address: Address) -> None:
        left = self._counts[address] - 1
        if left:
            self._counts[address] = left
        else:
            del self._counts[address]
        self._slot_freed(address)

    async def _open_connection(self, address: Address, wire: Wire, deadline: Optional[float]) -> AioConnection:
        loop = asyncio.get_running_loop()
        until = loop.time() + self._connect_timeout
        if deadline is not None and deadline < until:
            until = deadline
        try:
            reader, writer = await run_until(
                asyncio.open_connection(address[0], address[1]), until, discard=lambda opened: opened[1].close()
            )
        except TimeoutError as err:
            if self._watcher is not None:
                self._watcher.failed(address)
            raise TTransportException(
                TTransportException.TIMED_OUT, "connecting to %s:%d timed out" % address
            ) from err
        except OSError as err:
            if err.errno in _LOCAL_ERRNOS:
                raise
            if self._watcher is not None:
                self._watcher.failed(address)
            raise TTransportException(
                TTransportException.NOT_OPEN, "could not connect to %s:%d: %s" % (address[0], address[1], err)
            ) from err
        return AioConnection(address, wire, reader, writer)

    def release(self, conn: AioConnection) -> None:
        """Take back a connection whose exchange completed in step: to the first call waiting
        for its node, else idle."""
        if self._closed or not self._keep(conn.address, conn.wire):
            self._forget(conn)
            return
        if self._handoff(conn):
            return
        idle = self._idle.get(conn.address)
        if idle is None:
            idle = self._idle[conn.address] = collections.deque()
        if len(idle) >= self._max_idle:
            self._forget(conn)
            return
        now = conn.idle_since = time.monotonic()
        idle.append(conn)
        max_age = self._max_idle_age
        while max_age is not None and now - idle[0].idle_since > max_age:  # the coldest, left unused too long
            self._forget(idle.popleft())

    def discard(self, conn: AioConnection) -> None:
        """Close a connection that is out of step (failed, timed out, cancelled mid-call), at
        once: what it still had to send is dropped."""
        self._forget(conn, abort=True)

    def drop(self, address: Address) -> None:
        """A node left the table: close its idle connections, and send the calls waiting for one
        of them back to pick another node."""
        for waiter in self._waiters.pop(address, ()):
            if not waiter.done():
                waiter.set_exception(NodeLeft(address))
        for conn in self._idle.pop(address, ()):
            self._forget(conn)

    def _forget(self, conn: AioConnection, abort: bool = False) -> None:
        if conn in self._open:
            self._open.discard(conn)
            if self._watcher is not None:
                self._watcher.closed(conn.address)
            self._uncount(conn.address)
        conn.close(abort)

    async def close(self) -> None:
        """Close every connection, idle or lent (a lent one's call then fails), and fail the
        calls waiting for one. Idempotent."""
        self._closed = True
        waiters = [waiter for queue in self._waiters.values() for waiter in queue]
        self._waiters.clear()
        for waiter in waiters:
            if not waiter.done():
                waiter.set_exception(TTransportException(TTransportException.NOT_OPEN, "the client was closed"))
        idle = {conn for queue in self._idle.values() for conn in queue}
        self._idle.clear()
        conns = list(self._open)
        for conn in conns:
            # An idle one may still be sending a oneway call's bytes: closed once they have left
            # (for at most a second); a lent one's call ends now.
            self._forget(conn, abort=conn not in idle)
        waits = {conn: asyncio.ensure_future(conn.wait_closed()) for conn in conns}
        if waits:
            await asyncio.wait(waits.values(), timeout=1.0)
        for conn, closed in waits.items():
            if not closed.done():  # its peer does not read what is left: closed now
                closed.cancel()
                conn.close(abort=True)

    def abandon(self) -> None:
        """Close every socket without the event loop they belong to (it is closed, or this is
        another loop). The calls waiting for a connection are left to that loop."""
        self._closed = True
        self._idle.clear()
        self._waiters.clear()
        for conn in list(self._open):
            conn.shut()
            self._forget(conn, abort=True)


_T = TypeVar("_T")


async def run_until(
    awaitable: Awaitable[_T], when: float, discard: Optional[Callable[[_T], None]] = None
) -> _T:
    """Await ``awaitable`` until ``when`` (loop time): its result, or TimeoutError (then it is
    cancelled). A cancellation from outside stays a cancellation, also when it comes in the
    same turn of the loop as the timeout. On Python 3.11+ ``asyncio.timeout_at``; before, the
    work runs as a task of its own that this one waits for (cancelling the caller's own task
    for a timeout, as ``async_timeout`` does, can swallow an outside cancel that comes at the
    same moment). ``discard`` takes a result that came too late to be returned (it closes it)."""
    timeout_at = getattr(asyncio, "timeout_at", None)
    if timeout_at is not None:
        async with timeout_at(when):
            return await awaitable
    loop = asyncio.get_running_loop()
    inner = asyncio.ensure_future(awaitable)
    try:
        done, _ = await asyncio.wait({inner}, timeout=max(0.0, when - loop.time()))
    except BaseException:  # cancelled from outside
        _abandon(inner, discard)
        raise
    if not done:
        _abandon(inner, discard)
        raise TimeoutError()
    return inner.result()


def _abandon(inner: "asyncio.Future[_T]", discard: Optional[Callable[[_T], None]]) -> None:
    inner.cancel()
    if discard is not None:
        def late(task: "asyncio.Future[_T]") -> None:
            if not task.cancelled() and task.exception() is None:
                discard(task.result())

        inner.add_done_callback(late)
