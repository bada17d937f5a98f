"""The provider's server core on an asyncio event loop: ``async def`` handlers, the same limits.

The asyncio twin of ``provider.server``, serving a ``provider.dispatch.Dispatcher`` whose handler
methods may be coroutine functions (awaited on the loop) or plain functions (run on the loop: keep
them quick). Each connection is an ``asyncio.Protocol``; ``provider.framing`` tells when a request
is whole, so a slow or silent peer holds nothing but its buffer. Every limit of the threaded core
holds, and a client sees the same at each:

- ``workers`` requests running at once (a request runs from its decode to its encoded reply,
  awaiting included) and ``queue_size`` whole requests waiting: beyond that, answered at once,
  unrun, with ``TApplicationException(LOADSHEDDING)``; the connection stays open;
- over a request limit (``set_limits``, ``provider.limiter``): answered the same way, naming it;
- ``max_connections``: the longest-idle connection (idle >= 1 s) is closed to make room; if none
  is, the new connection's first request is answered LOADSHEDDING and the connection closed;
- ``max_message_size``: refused with ``PROTOCOL_ERROR`` when its header could be read, closed;
- ``read_timeout``: a request not whole that long after its first byte, or a reply the client
  does not take within it, closes the connection; ``idle_timeout`` likewise for no request;
- malformed bytes close the connection; a handler's failure is answered as ``Dispatcher`` says.

Requests of one connection are served one after the other, in order. ``stop(timeout)`` stops
accepting, closes idle connections, answers new requests LOADSHEDDING, lets running and queued
ones finish until the deadline, then cancels handlers still running (unlike a thread, a task
can be cancelled) and closes every connection.

Thread-safety: the server belongs to its loop. ``start``, ``stop``, ``set_limits``, ``stats``
and ``close_unstarted`` may be called from any thread but the loop's own (``start`` and ``stop``
wait for the loop to do the work): that is how ``provider.service.launch`` drives it.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import inspect
import logging
import socket
import time
from typing import Any, Deque, Dict, Optional, Set, Tuple

from thriftpy2.thrift import TApplicationException, TMessageType
from thriftpy2.transport import TMemoryBuffer

from ..errors import ThriftProbeError
from ..provider.dispatch import APPLICATION_ERROR, Dispatcher
from ..provider.framing import MessageError
from ..provider.hooks import OVERLOADED, Peer, ServerHooks
from ..provider.limiter import Refusal
from ..provider.server import ServerCore, ServerOptions, shed_reply

__all__ = ["AioServer"]

log = logging.getLogger(__name__)

_MIN_EVICT_IDLE = 1.0
"""A connection idle for less than this is never closed to make room (as in ``provider.server``)."""
_MAX_REJECTING = 64
"""Connections over ``max_connections`` held at once to be answered LOADSHEDDING; more are closed."""
_LINGERING_CLOSE = 1.0
"""After an error reply, how long the input is drained before closing (so that unread request
bytes do not turn the close into a reset that destroys the reply)."""
_MAX_SWEEP = 1.0

IDLE, READING, BUSY, DRAINING, CLOSED = range(5)


class _Conn(asyncio.Protocol):
    """One client connection: its bytes in, its state, its place in the server's tables."""

    def __init__(self, server: "AioServer") -> None:
        self.server = server
        self.transport: Optional[asyncio.Transport] = None
        self.peer: Peer = ("", 0)
        self.reader = server._new_reader()
        self.inbuf = bytearray()
        self.state = IDLE
        self.since = 0.0  # IDLE: idle since; READING: first byte at; DRAINING: draining since
        self.write_since = 0.0  # the reply waits in the transport's buffer since (0: it does not)
        self.rejecting: Optional[str] = None  # answer the first request LOADSHEDDING for this reason
        self.admitted: Optional[str] = None  # the method the limiter admitted the request as, until released
        self.paused = False
        self.close_after: Optional[str] = None
        self.task: Optional["asyncio.Task[None]"] = None
        self.whole_at = 0.0
        self.found: Optional[Tuple[int, int]] = None  # a queued request's place in ``inbuf``

    # -- asyncio.Protocol ---------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        peer = transport.get_extra_info("peername")
        self.peer = (str(peer[0]), int(peer[1])) if isinstance(peer, tuple) else ("", 0)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        # Told as soon as any reply byte waits in the buffer, and when it has all gone: the
        # write timeout runs while it waits.
        transport.set_write_buffer_limits(high=0, low=0)
        self.server._opened(self)

    def data_received(self, data: bytes) -> None:
        server = self.server
        if self.state == DRAINING or self.state == CLOSED:
            return
        self.inbuf += data
        if self.state == IDLE:
            server._idle.pop(self, None)
            self.state = READING
            self.since = time.monotonic()
            server._reading[self] = None
            server._advance(self)
        elif self.state == READING:
            server._advance(self)
        elif len(self.inbuf) > server._opts.max_message_size and not self.paused:
            # BUSY: a client that sends ahead is held at one message's worth, as a thread would be.
            self.paused = True
            assert self.transport is not None
            self.transport.pause_reading()

    def eof_received(self) -> Optional[bool]:
        return False  # the peer is done sending: close (a reply in progress could not be read)

    def pause_writing(self) -> None:
        if not self.write_since:
            self.write_since = time.monotonic()
            self.server._writing[self] = None

    def resume_writing(self) -> None:
        self.write_since = 0.0
        self.server._writing.pop(self, None)

    def connection_lost(self, exc: Optional[BaseException]) -> None:
        reason = self.close_after or ("error" if exc is not None else "peer_closed")
        self.server._lost(self, reason)


class AioServer(ServerCore):
    """Serves one dispatcher on a bound, listening socket from ``loop`` (see the module)."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        dispatcher: Dispatcher,
        listener: socket.socket,
        label: str,
        options: ServerOptions,
        hooks: Optional[ServerHooks] = None,
    ) -> None:
        super().__init__(dispatcher, listener, label, options, hooks)
        self._loop = loop
        self._conns: Set[_Conn] = set()
        # By state, each in the order its clock started (oldest first): the sweep looks at heads.
        self._idle: "collections.OrderedDict[_Conn, None]" = collections.OrderedDict()
        self._reading: "collections.OrderedDict[_Conn, None]" = collections.OrderedDict()
        self._writing: "collections.OrderedDict[_Conn, None]" = collections.OrderedDict()
        self._draining: "collections.OrderedDict[_Conn, None]" = collections.OrderedDict()
        self._waiting: Deque[_Conn] = collections.deque()  # whole requests waiting to run
        self._tasks: Set["asyncio.Task[None]"] = set()
        self._running = 0
        self._rejecting = 0
        self._stopping = False
        self._server: Optional[asyncio.AbstractServer] = None
        self._sweeper: Optional[asyncio.TimerHandle] = None
        self._sweep_every = max(0.02, min(_MAX_SWEEP, options.read_timeout / 8, options.idle_timeout / 8))
        self._started = False
        self._stopped = False

    # -- life cycle, from other threads ---------------------------------------------------------

    def _on_loop(self, coro: Any, timeout: Optional[float]) -> Any:
        """Run ``coro`` on the loop from another thread and wait for it."""
        if _running_loop() is self._loop:
            coro.close()
            raise ThriftProbeError("%s: the asyncio server cannot be driven from its own loop's thread" % self._label)
        future = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return future.result(timeout)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise

    def start(self) -> None:
        """Serve from the loop (waits until it does). Raises ThriftProbeError when the loop does
        not take the work within 10 s (it is blocked, or not running)."""
        try:
            self._on_loop(self._open(), 10.0)
        except concurrent.futures.TimeoutError:
            raise ThriftProbeError("%s: the event loop did not start the server within 10 s" % self._label) from None
        except RuntimeError as err:  # the loop is closed
            raise ThriftProbeError("%s: cannot serve on a closed event loop" % self._label) from err

    async def _open(self) -> None:
        self._started = True
        self._server = await self._loop.create_server(
            lambda: _Conn(self), sock=self._listener, backlog=socket.SOMAXCONN
        )
        self._sweeper = self._loop.call_later(self._sweep_every, self._sweep)

    def stop(self, timeout: float) -> None:
        """Stop as the module says, within ``timeout`` seconds (plus a second for the loop to
        close the connections); waits for it. From the loop's own thread, it only starts."""
        if self._stopped:
            return
        if _running_loop() is self._loop:
            self._loop.create_task(self._stop(timeout))
            return
        try:
            self._on_loop(self._stop(timeout), max(0.0, timeout) + 5.0)
        except RuntimeError:  # the loop is closed: nothing runs on it any more
            self._abandon()
        except concurrent.futures.TimeoutError:
            log.warning("%s: the event loop did not finish stopping the server in time", self._label)

    def close_unstarted(self) -> None:
        self._stopped = True
        self._listener.close()

    def _abandon(self) -> None:
        """The loop is gone: close what is left without it."""
        self._stopped = True
        self._listener.close()
        for conn in list(self._conns):
            if conn.transport is not None:
                with contextlib.suppress(Exception):
                    conn.transport.abort()

    async def _stop(self, timeout: float) -> None:
        if self._stopped:
            return
        self._stopped = True
        # Handlers still running are cancelled a moment before the deadline, so that they have
        # unwound and their connections are closed by the deadline itself.
        margin = min(0.25, max(0.0, timeout) / 10)
        deadline = self._loop.time() + max(0.0, timeout) - margin
        self._stopping = True
        if self._server is not None:
            self._server.close()  # no more accepts; open connections stay
        else:
            self._listener.close()
        for conn in list(self._idle):
            self._close(conn, "stopping")
        while (self._running or self._waiting) and self._loop.time() < deadline:
            self._idle_event = asyncio.Event()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._idle_event.wait(), deadline - self._loop.time())
        for conn in list(self._waiting):
            self._shed_unrun(conn)
        self._waiting.clear()
        tasks = [task for task in self._tasks if not task.done()]
        if tasks:
            log.warning("%s: %d handler(s) still running at the stop deadline; cancelled", self._label, len(tasks))
            for task in tasks:
                task.cancel()
            await asyncio.wait(tasks, timeout=max(margin, 0.01))
        for conn in list(self._conns):
            self._close(conn, "stopping")
        if self._sweeper is not None:
            self._sweeper.cancel()

    _idle_event: Optional[asyncio.Event] = None

    # -- request limits -------------------------------------------------------------------------

    def is_handler(self, task: Optional["asyncio.Task[Any]"]) -> bool:
        """Whether ``task`` is one of this server's requests (a handler running)."""
        return task is not None and task in self._tasks

    def stats(self) -> Dict[str, int]:
        """Counts now: connections, idle and reading ones, requests running and waiting."""
        return {
            "connections": len(self._conns),
            "idle": len(self._idle),
            "reading": len(self._reading),
            "workers": self._running,
            "queued": len(self._waiting),
        }

    # -- connections, on the loop ---------------------------------------------------------------

    def _opened(self, conn: _Conn) -> None:
        now = time.monotonic()
        transport = conn.transport
        assert transport is not None
        if self._stopping:  # accepted just before the listener closed
            conn.close_after = "stopping"
            conn.state = CLOSED
            transport.abort()
            return
        if len(self._conns) >= self._max_conns:
            if self._idle and next(iter(self._idle)).since <= now - _MIN_EVICT_IDLE:
                self._close(next(iter(self._idle)), "evicted")
            elif self._rejecting >= _MAX_REJECTING:
                conn.close_after = None
                conn.state = CLOSED
                transport.abort()
                self._hook_rejected(None, conn.peer, "max_connections")
                return
            else:
                conn.rejecting = "max_connections"
                self._rejecting += 1
        self._conns.add(conn)
        if conn.rejecting is None:
            conn.since = now
            self._idle[conn] = None
        else:  # must send its request within read_timeout, and is never evicted
            conn.state = READING
            conn.since = now
            self._reading[conn] = None
        if self._hooks is not None:
            self._hook("connection_opened", conn.peer)

    def _lost(self, conn: _Conn, reason: str) -> None:
        conn.state = CLOSED
        for table in (self._idle, self._reading, self._writing, self._draining):
            table.pop(conn, None)
        if conn in self._waiting:  # never runs now
            self._waiting.remove(conn)
            self._release(conn, cancel=True)
            self._wake_stop()
        if conn in self._conns:
            self._conns.discard(conn)
            if conn.rejecting is not None:
                self._rejecting -= 1
            if self._hooks is not None:
                self._hook("connection_closed", conn.peer, reason)

    def _close(self, conn: _Conn, reason: str) -> None:
        """Close now (whatever the transport still buffers is dropped for timeouts, flushed
        otherwise)."""
        if conn.state == CLOSED or conn.transport is None:
            return
        conn.close_after = reason
        if reason in ("read_timeout", "write_timeout", "error", "protocol_error", "stopping"):
            conn.transport.abort()
        else:
            conn.transport.close()

    def _advance(self, conn: _Conn) -> None:
        """For a READING connection: start (or queue, or shed) a whole request, if there is one."""
        try:
            found = conn.reader.feed(conn.inbuf)
        except MessageError as err:
            self._refuse(conn, err)
            return
        if found is None:
            return
        self._reading.pop(conn, None)
        conn.state = BUSY
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
            if self._running < self._opts.workers:
                self._run(conn, found)
                return
            if len(self._waiting) < self._queue_size:
                conn.found = found
                self._waiting.append(conn)
                return
            self._release(conn, cancel=True)
            reason = OVERLOADED
        self._shed(conn, found, reason)

    def _take(self, conn: _Conn, found: Tuple[int, int]) -> Any:
        """The protocol over the request's bytes, which leave the connection's buffer."""
        data = bytes(conn.inbuf[found[0] : found[1]])
        del conn.inbuf[: found[1]]
        conn.reader.reset()
        return self._in_factory.get_protocol(TMemoryBuffer(data))

    def _run(self, conn: _Conn, found: Tuple[int, int]) -> None:
        name = conn.reader.name or ""
        proto = self._take(conn, found)
        self._running += 1
        task = self._loop.create_task(self._serve(conn, name, proto))
        conn.task = task
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _serve(self, conn: _Conn, name: str, proto: Any) -> None:
        hooks = self._hooks
        started = time.perf_counter()
        wall = 0.0
        if hooks is not None:
            wall = conn.whole_at or time.time()
            started -= max(0.0, time.time() - wall)  # the duration counts the wait in the queue
            self._hook("request_started", name, conn.peer)
        outcome = APPLICATION_ERROR
        method = name
        try:
            try:
                call = self._dispatcher.decode(proto)
            except Exception as err:  # noqa: BLE001 - malformed arguments: the stream cannot be trusted
                log.info("%s: closing the connection from %s:%d: bad request: %s", self._label, *conn.peer, err)
                outcome = "protocol_error"
                self._release(conn)
                self._close(conn, "protocol_error")
                return
            if isinstance(call, tuple):
                reply, method, outcome = call
            else:
                try:
                    value = call.method.func(*call.args)
                    if inspect.isawaitable(value):
                        value = await value
                except Exception as exc:  # noqa: BLE001 - answered, and logged if undeclared
                    reply, method, outcome = self._dispatcher.answer(call, None, exc)
                else:
                    reply, method, outcome = self._dispatcher.answer(call, value, None)
            self._release(conn)
            if reply is not None:
                transport = conn.transport
                if conn.state == CLOSED or transport is None or transport.is_closing():
                    outcome = "transport_error"
                else:
                    transport.write(self._frame(reply))
        except asyncio.CancelledError:
            outcome = "transport_error"
            self._release(conn)
            self._close(conn, "stopping")
            raise
        finally:
            self._running -= 1
            if hooks is not None:
                self._hook("request_finished", method, conn.peer, wall, outcome, time.perf_counter() - started)
            conn.task = None
            self._next_waiting()
            if conn.state == BUSY:
                self._after_request(conn)

    def _next_waiting(self) -> None:
        while self._waiting and self._running < self._opts.workers:
            conn = self._waiting.popleft()
            found, conn.found = conn.found, None
            if conn.state == BUSY and found is not None:
                self._run(conn, found)
        self._wake_stop()

    def _wake_stop(self) -> None:
        if self._stopping and self._idle_event is not None and not self._running and not self._waiting:
            self._idle_event.set()

    def _after_request(self, conn: _Conn) -> None:
        """A BUSY connection's request is answered: read on, serve what is buffered, or close."""
        if conn.transport is None or conn.transport.is_closing():
            return  # closed meanwhile: connection_lost does the rest
        if conn.rejecting is not None:
            self._lingering_close(conn, conn.rejecting)
            return
        if conn.close_after is not None:
            self._lingering_close(conn, conn.close_after)
            return
        if self._stopping and not conn.inbuf:
            self._close(conn, "stopping")
            return
        if conn.paused:
            conn.paused = False
            assert conn.transport is not None
            conn.transport.resume_reading()
        conn.since = time.monotonic()
        if conn.inbuf:
            conn.state = READING
            self._reading[conn] = None
            self._advance(conn)
        else:
            conn.state = IDLE
            self._idle[conn] = None

    def _shed(self, conn: _Conn, found: Tuple[int, int], reason: str, refusal: Optional[Refusal] = None) -> None:
        """Answer the whole request at the head of the buffer LOADSHEDDING without running it
        (over a request limit: ``refusal`` says which). Overloaded or over a limit, the connection
        stays open; otherwise it is closed after the reply."""
        reader = conn.reader
        name, seqid, oneway = reader.name or "", reader.seqid or 0, reader.mtype == TMessageType.ONEWAY
        del conn.inbuf[: found[1]]
        reader.reset()
        self._hook_rejected(name, conn.peer, reason)
        if reason != OVERLOADED and refusal is None:
            conn.close_after = reason
        if not oneway:
            reply = self._dispatcher.exception_reply(name, seqid, shed_reply(self._label, name, reason, refusal))
            assert conn.transport is not None
            conn.transport.write(self._frame(reply))
        self._after_request(conn)

    def _shed_unrun(self, conn: _Conn) -> None:
        """A queued request that will never run (the stop deadline passed)."""
        self._release(conn, cancel=True)
        reader = conn.reader
        if reader.name is not None and reader.mtype == TMessageType.CALL and conn.transport is not None:
            error = shed_reply(self._label, reader.name, "stopping")
            conn.transport.write(self._frame(self._dispatcher.exception_reply(reader.name, reader.seqid or 0, error)))
        self._hook_rejected(reader.name, conn.peer, "stopping")
        self._lingering_close(conn, "stopping")

    def _refuse(self, conn: _Conn, err: MessageError) -> None:
        """A malformed or oversized request: answer what can be answered, then close."""
        reader = conn.reader
        reason = "too_large" if err.too_large else "protocol_error"
        log.info("%s: closing the connection from %s:%d: %s", self._label, conn.peer[0], conn.peer[1], err)
        if err.too_large:
            self._hook_rejected(reader.name, conn.peer, reason)
        if not err.too_large or reader.name is None or reader.mtype != TMessageType.CALL:
            self._close(conn, reason)
            return
        self._reading.pop(conn, None)
        conn.inbuf.clear()
        reply = self._dispatcher.exception_reply(
            reader.name, reader.seqid or 0, TApplicationException(TApplicationException.PROTOCOL_ERROR, str(err))
        )
        assert conn.transport is not None
        conn.transport.write(self._frame(reply))
        self._lingering_close(conn, reason)

    def _lingering_close(self, conn: _Conn, reason: str) -> None:
        """Send what is buffered, stop sending, discard what the client still sends for a
        moment, then close: closing with unread bytes would reset the connection and could
        destroy the reply."""
        transport = conn.transport
        assert transport is not None
        self._idle.pop(conn, None)
        self._reading.pop(conn, None)
        conn.close_after = reason
        conn.inbuf.clear()
        if conn.paused:
            conn.paused = False
            transport.resume_reading()
        if not transport.can_write_eof():
            transport.close()
            return
        with contextlib.suppress(OSError, RuntimeError):
            transport.write_eof()
        conn.state = DRAINING
        conn.since = time.monotonic()
        self._draining[conn] = None

    def _release(self, conn: _Conn, cancel: bool = False) -> None:
        method = conn.admitted
        if method is not None:
            conn.admitted = None
            if cancel:
                self._limiter.cancel(method)
            else:
                self._limiter.release(method)

    def _sweep(self) -> None:
        """Close connections past their deadlines; runs every ``_sweep_every`` seconds."""
        now = time.monotonic()
        idle_limit = now - self._opts.idle_timeout
        while self._idle and next(iter(self._idle)).since <= idle_limit:
            conn = next(iter(self._idle))
            self._idle.pop(conn)
            self._close(conn, "idle_timeout")
        read_limit = now - self._opts.read_timeout
        while self._reading and next(iter(self._reading)).since <= read_limit:
            conn = next(iter(self._reading))
            self._reading.pop(conn)
            log.debug("%s: closing the connection from %s:%d: its request did not arrive whole within %.1f s",
                      self._label, conn.peer[0], conn.peer[1], self._opts.read_timeout)
            self._close(conn, "read_timeout")
        while self._writing and next(iter(self._writing)).write_since <= read_limit:
            conn = next(iter(self._writing))
            self._writing.pop(conn)
            self._close(conn, "write_timeout")
        while self._draining and next(iter(self._draining)).since <= now - _LINGERING_CLOSE:
            conn = next(iter(self._draining))
            self._draining.pop(conn)
            if conn.transport is not None:
                conn.transport.abort()
        if not self._stopped or self._conns:
            self._sweeper = self._loop.call_later(self._sweep_every, self._sweep)

def _running_loop() -> Optional[asyncio.AbstractEventLoop]:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None
