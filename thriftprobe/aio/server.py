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
import contextvars
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
from ..provider.server import _ACCEPT_BACKOFF, _LINGERING_CLOSE, ServerCore, ServerOptions, shed_reply

__all__ = ["AioServer"]

log = logging.getLogger(__name__)

_MAX_SWEEP = 1.0

IDLE, READING, BUSY, DRAINING, CLOSED = range(5)


class _Conn(asyncio.Protocol):
    """One client connection: its bytes in, its state, its place in the server's tables."""

    def __init__(self, server: "AioServer", sock: socket.socket, peer: Peer, rejecting: Optional[str]) -> None:
        self.server = server
        self.sock = sock  # until the transport takes it over
        self.transport: Optional[asyncio.Transport] = None
        self.peer = peer
        self.reader = server._new_reader()
        self.inbuf = bytearray()
        self.state = IDLE
        self.since = 0.0  # IDLE: idle since; READING: first byte at; DRAINING: draining since
        self.write_since = 0.0  # the reply waits in the transport's buffer since (0: it does not)
        self.rejecting = rejecting  # answer the first request LOADSHEDDING for this reason
        self.admitted: Optional[str] = None  # the method the limiter admitted the request as, until released
        self.paused = False
        self.await_drain = False  # the request is answered; go on once the reply has left
        self.peer_done = False  # the peer half-closed while its request ran: answer, then close
        self.advancing = False  # _advance runs for it (it loops instead of recursing)
        self.close_after: Optional[str] = None  # DRAINING: why it will be closed
        self.whole_at = 0.0
        self.found: Optional[Tuple[int, int]] = None  # a queued request's place in ``inbuf``

    # -- asyncio.Protocol ---------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        if self.state == CLOSED:  # closed (evicted, stopping) before the transport was made
            transport.abort()
            return
        # Told as soon as any reply byte waits in the buffer, and when it has all gone: the
        # write timeout runs while it waits, and the connection reads on only after.
        transport.set_write_buffer_limits(high=0, low=0)
        self.server._made(self)

    def data_received(self, data: bytes) -> None:
        state = self.state
        if state in (DRAINING, CLOSED):
            return
        self.inbuf += data
        server = self.server
        if state == IDLE:
            server._idle.pop(self, None)
            self.state = READING
            self.since = time.monotonic()
            server._reading[self] = None
            server._advance(self)
        elif state == READING:
            server._advance(self)
        elif len(self.inbuf) > server._opts.max_message_size and not self.paused:
            # BUSY: a client that sends ahead is held at one message's worth, as a thread would be.
            self.paused = True
            assert self.transport is not None
            self.transport.pause_reading()

    def eof_received(self) -> Optional[bool]:
        if self.state == BUSY:  # half-closed after its request: keep the way back open for the reply
            self.peer_done = True
            return True
        return False

    def pause_writing(self) -> None:
        if not self.write_since and self.state != CLOSED:
            self.write_since = time.monotonic()
            self.server._writing[self] = None

    def resume_writing(self) -> None:
        self.write_since = 0.0
        self.server._writing.pop(self, None)
        if self.await_drain:
            self.await_drain = False
            self.server._after_request(self)

    def connection_lost(self, exc: Optional[BaseException]) -> None:
        self.server._forget(self, self.close_after or ("error" if exc is not None else "peer_closed"))


_SERVING: "contextvars.ContextVar[Optional[AioServer]]" = contextvars.ContextVar("thriftprobe_serving", default=None)
"""The server whose handler runs in this context (tasks a handler starts inherit it)."""


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
        self._conns: Set[_Conn] = set()  # every connection not yet closed, its transport made or not
        # By state, each in the order its clock started (oldest first): the sweep looks at heads.
        self._idle: "collections.OrderedDict[_Conn, None]" = collections.OrderedDict()
        self._reading: "collections.OrderedDict[_Conn, None]" = collections.OrderedDict()
        self._writing: "collections.OrderedDict[_Conn, None]" = collections.OrderedDict()
        self._draining: "collections.OrderedDict[_Conn, None]" = collections.OrderedDict()
        self._waiting: Deque[_Conn] = collections.deque()  # whole requests waiting to run
        self._tasks: Set["asyncio.Task[None]"] = set()
        self._running = 0
        self._stopping = False
        self._stopped = False
        self._accepting = False
        self._sweeper: Optional[asyncio.TimerHandle] = None
        self._sweep_every = max(0.02, min(_MAX_SWEEP, options.read_timeout / 8, options.idle_timeout / 8))
        self._settled: Optional[asyncio.Event] = None  # set while stopping, when nothing runs or waits

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
        self._listener.setblocking(False)
        self._loop.add_reader(self._listener.fileno(), self._accept)
        self._accepting = True
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
            with contextlib.suppress(Exception):
                if conn.transport is not None:
                    conn.transport.abort()
                else:
                    conn.sock.close()

    async def _stop(self, timeout: float) -> None:
        if self._stopped:
            return
        self._stopped = True
        self._stopping = True
        loop = self._loop
        # Handlers still running are cancelled a moment before the deadline, so that they have
        # unwound and their connections are closed by the deadline itself.
        margin = min(0.25, max(0.0, timeout) / 10)
        deadline = loop.time() + max(0.0, timeout) - margin
        self._stop_accepting()
        self._listener.close()
        for conn in list(self._idle):
            self._close(conn, "stopping")
        self._settled = asyncio.Event()
        self._check_settled()
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._settled.wait(), max(0.0, deadline - loop.time()))
        for conn in list(self._waiting):
            self._shed_unrun(conn)
        tasks = [task for task in self._tasks if not task.done()]
        if tasks:
            log.warning("%s: %d handler(s) still running at the stop deadline; cancelled", self._label, len(tasks))
            for task in tasks:
                task.cancel()
            await asyncio.wait(tasks, timeout=max(margin, 0.01))
        # Replies on their way out (and "not executed" answers) get what is left of the time.
        until = deadline + margin
        while any(c.write_since or c.await_drain for c in self._conns) and loop.time() < until:
            await asyncio.sleep(0.01)
        for conn in list(self._conns):
            self._close(conn, "stopping")
        if self._sweeper is not None:
            self._sweeper.cancel()
        await asyncio.sleep(0)  # the transports' own closing callbacks

    def _check_settled(self) -> None:
        if self._settled is not None and not self._running and not self._waiting:
            self._settled.set()

    # -- accepting, on the loop -----------------------------------------------------------------

    def _stop_accepting(self) -> None:
        if self._accepting:
            self._accepting = False
            with contextlib.suppress(Exception):
                self._loop.remove_reader(self._listener.fileno())

    def _resume_accepting(self) -> None:
        if not self._stopping and not self._accepting:
            self._loop.add_reader(self._listener.fileno(), self._accept)
            self._accepting = True

    _EVICTION_FREES_AT_ONCE = False  # the loop closes the evicted socket on its next turn

    def _oldest_idle(self) -> Optional[_Conn]:
        return next(iter(self._idle), None)

    def _pause_accepting(self) -> None:
        self._stop_accepting()
        self._loop.call_later(_ACCEPT_BACKOFF, self._resume_accepting)

    def _admit(self, sock: socket.socket, peer: Peer) -> None:
        if not self._prepare(sock):
            return
        admitted, rejecting = self._room(sock, peer, time.monotonic())
        if not admitted:
            return
        conn = _Conn(self, sock, peer, rejecting)
        self._conns.add(conn)
        if self._hooks is not None:
            self._hook("connection_opened", peer)
        self._loop.create_task(self._attach(conn, sock))

    async def _attach(self, conn: _Conn, sock: socket.socket) -> None:
        try:
            await self._loop.connect_accepted_socket(lambda: conn, sock)
        except Exception as err:  # noqa: BLE001 - the socket failed before its transport was made
            log.debug("%s: connection from %s:%d lost before it was served: %s", self._label, *conn.peer, err)
            sock.close()
            self._forget(conn, "error")

    def _made(self, conn: _Conn) -> None:
        """The transport exists: the connection's clock starts."""
        conn.since = time.monotonic()
        if conn.rejecting is None:
            self._idle[conn] = None
        else:  # must send its request within read_timeout, and is never evicted
            conn.state = READING
            self._reading[conn] = None

    # -- connections, on the loop ---------------------------------------------------------------

    def _forget(self, conn: _Conn, reason: str) -> bool:
        """Take a connection out of every table and count, once; False if it already was."""
        if conn.state == CLOSED:
            return False
        conn.state = CLOSED
        for table in (self._idle, self._reading, self._writing, self._draining):
            table.pop(conn, None)
        if conn.found is not None:  # queued: never runs now
            conn.found = None
            with contextlib.suppress(ValueError):
                self._waiting.remove(conn)
            self._release(conn, cancel=True)
            self._check_settled()
        if conn in self._conns:
            self._conns.discard(conn)
            if conn.rejecting is not None:
                self._rejecting -= 1
            if self._hooks is not None:
                self._hook("connection_closed", conn.peer, reason)
        return True

    def _close(self, conn: _Conn, reason: str) -> None:
        """Close now: out of the tables and the count at once, the socket on the loop's next turn."""
        if not self._forget(conn, reason):
            return
        if conn.transport is not None:
            conn.transport.abort()
        # else: connection_made aborts it

    def _advance(self, conn: _Conn) -> None:
        """For a READING connection: start (or queue, or shed) each whole request buffered, in
        order, until one runs or waits, or the buffer holds no whole request. Loops rather than
        recursing through the replies it sheds (a pipelined flood would exhaust the stack)."""
        if conn.advancing:
            return  # the caller's loop goes on
        conn.advancing = True
        try:
            while conn.state == READING:
                try:
                    found = conn.reader.feed(conn.inbuf)
                except MessageError as err:
                    self._refuse(conn, err)
                    return
                if found is None:
                    if conn.peer_done:  # half-closed with half a request: nothing more will come
                        self._close(conn, "peer_closed")
                    return
                self._reading.pop(conn, None)
                conn.state = BUSY
                if self._hooks is not None:
                    conn.whole_at = time.time()
                reason = conn.rejecting or ("stopping" if self._stopping else None)
                refusal: Optional[Refusal] = None
                if reason is None:
                    if self._limiter.enabled:
                        name = conn.reader.name or ""
                        refusal = self._limiter.admit(name)
                        if refusal is None:
                            conn.admitted = name
                    if refusal is None:
                        if self._running < self._opts.workers:
                            self._run(conn, found)
                            return
                        if len(self._waiting) < self._queue_size:
                            conn.found = found
                            self._waiting.append(conn)
                            return
                        self._release(conn, cancel=True)
                        reason = OVERLOADED
                    else:
                        reason = refusal.reason
                self._shed(conn, found, reason, refusal)
                self._after_request(conn)
        finally:
            conn.advancing = False

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
        # A fresh copy of the server's context for each request (create_task would copy the
        # current one: a finishing handler's, when this request was queued behind it).
        task = self._context.copy().run(self._loop.create_task, self._serve(conn, name, proto))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _serve(self, conn: _Conn, name: str, proto: Any) -> None:
        _SERVING.set(self)
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
        except BaseException as exc:  # SystemExit and the like: this connection ends, the server lives on
            log.error("%s: the handler of %s raised %s; closing the connection from %s:%d", self._label,
                      method, type(exc).__name__, *conn.peer, exc_info=exc)
            outcome = "transport_error"
            self._release(conn)
            self._close(conn, "error")
        finally:
            self._running -= 1
            if hooks is not None:
                self._hook("request_finished", method, conn.peer, wall, outcome, time.perf_counter() - started)
            self._next_waiting()
            if conn.state == BUSY:
                self._after_request(conn)

    def _next_waiting(self) -> None:
        while self._waiting and self._running < self._opts.workers:
            conn = self._waiting.popleft()
            found, conn.found = conn.found, None
            if conn.state == BUSY and found is not None:
                self._run(conn, found)
        self._check_settled()

    def _after_request(self, conn: _Conn) -> None:
        """A BUSY connection's request is answered: once the reply has left, read on, serve what
        is buffered, or close."""
        transport = conn.transport
        if conn.state != BUSY or transport is None or transport.is_closing():
            return  # closing: connection_lost does the rest
        if transport.get_write_buffer_size():
            # The client has not taken the reply yet: nothing more is read or run for it until it
            # has (resume_writing), or the write timeout closes it.
            conn.await_drain = True
            if not conn.paused:
                conn.paused = True
                transport.pause_reading()
            return
        if conn.rejecting is not None:
            self._lingering_close(conn, conn.rejecting)
            return
        if conn.close_after is not None:
            self._lingering_close(conn, conn.close_after)
            return
        if (self._stopping or conn.peer_done) and not conn.inbuf:
            self._lingering_close(conn, "stopping" if self._stopping else "peer_closed")
            return
        if conn.paused:
            conn.paused = False
            transport.resume_reading()
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

    def _shed_unrun(self, conn: _Conn) -> None:
        """A queued request that will never run (the stop deadline passed): answered "not
        executed", then the connection is closed."""
        conn.found = None
        with contextlib.suppress(ValueError):
            self._waiting.remove(conn)
        self._release(conn, cancel=True)
        reader = conn.reader
        if reader.name is not None and reader.mtype == TMessageType.CALL and conn.transport is not None:
            error = shed_reply(self._label, reader.name, "stopping")
            conn.transport.write(self._frame(self._dispatcher.exception_reply(reader.name, reader.seqid or 0, error)))
        self._hook_rejected(reader.name, conn.peer, "stopping")
        conn.close_after = "stopping"
        conn.inbuf.clear()
        self._after_request(conn)

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
        conn.state = BUSY
        conn.inbuf.clear()
        conn.close_after = reason
        reply = self._dispatcher.exception_reply(
            reader.name, reader.seqid or 0, TApplicationException(TApplicationException.PROTOCOL_ERROR, str(err))
        )
        assert conn.transport is not None
        conn.transport.write(self._frame(reply))
        self._after_request(conn)

    def _lingering_close(self, conn: _Conn, reason: str) -> None:
        """The reply has left: stop sending, discard what the client still sends for a moment,
        then close (closing with unread bytes would reset the connection and could destroy the
        reply)."""
        transport = conn.transport
        assert transport is not None
        conn.close_after = reason
        conn.inbuf.clear()
        if conn.paused:
            conn.paused = False
            transport.resume_reading()
        if conn.peer_done or not transport.can_write_eof():
            self._close(conn, reason)
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

    def is_handler(self) -> bool:
        """Whether the caller runs in one of this server's requests (a handler, or a task it started)."""
        return _SERVING.get() is self

    def stats(self) -> Dict[str, int]:
        """Counts now: connections, idle and reading ones, requests running and waiting."""
        return {
            "connections": len(self._conns),
            "idle": len(self._idle),
            "reading": len(self._reading),
            "workers": self._running,
            "queued": len(self._waiting),
        }

    def _sweep(self) -> None:
        """Close connections past their deadlines; runs every ``_sweep_every`` seconds."""
        now = time.monotonic()
        idle_limit = now - self._opts.idle_timeout
        while self._idle and next(iter(self._idle)).since <= idle_limit:
            self._close(next(iter(self._idle)), "idle_timeout")
        read_limit = now - self._opts.read_timeout
        while self._reading and next(iter(self._reading)).since <= read_limit:
            conn = next(iter(self._reading))
            log.debug("%s: closing the connection from %s:%d: its request did not arrive whole within %.1f s",
                      self._label, conn.peer[0], conn.peer[1], self._opts.read_timeout)
            self._close(conn, "read_timeout")
        while self._writing and next(iter(self._writing)).write_since <= read_limit:
            self._close(next(iter(self._writing)), "write_timeout")
        while self._draining and next(iter(self._draining)).since <= now - _LINGERING_CLOSE:
            conn = next(iter(self._draining))
            self._close(conn, conn.close_after or "error")
        if not self._stopped or self._conns:
            self._sweeper = self._loop.call_later(self._sweep_every, self._sweep)


def _running_loop() -> Optional[asyncio.AbstractEventLoop]:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None
