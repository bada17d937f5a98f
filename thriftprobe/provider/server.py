"""The provider's server core: accept connections on a bound socket and run the handler's calls.

It runs one thread per connection and never drops an idle connection (thriftpy2's
``make_server`` closes connections idle for 3 s, which would break every pooled client).
``service.py`` builds it, registers the node, and stops it.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import select
import socket
import threading
import time
from typing import Any, Dict, Optional

from thriftpy2.transport import TBufferedTransportFactory, TSocket, TTransportException

from .dispatch import Dispatcher

__all__ = ["Server"]

log = logging.getLogger(__name__)


class _ConnTransport(TSocket):
    """A server-side socket that, between messages, waits for either data or the stop signal.

    ``at_boundary`` is set by the serving loop before each message. The first read of a message
    polls the socket and the server's wake pipe together: if only the wake pipe fires, the server
    is stopping and the idle connection ends; a connection in the middle of a call is never cut.
    """

    def __init__(self, sock: socket.socket, wake_fd: int) -> None:
        super().__init__(sock=sock)  # type: ignore[no-untyped-call]
        self.at_boundary = True
        self._fd = sock.fileno()
        poller = select.poll()
        poller.register(self._fd, select.POLLIN | select.POLLPRI)
        poller.register(wake_fd, select.POLLIN)
        self._poll = poller.poll

    def read(self, sz: int) -> bytes:
        if self.at_boundary:
            self.at_boundary = False
            events = self._poll()
            if not any(fd == self._fd for fd, _ in events):
                raise TTransportException(TTransportException.END_OF_FILE, "server stopping")
        return super().read(sz)  # type: ignore[no-untyped-call,no-any-return]


class Server:
    """Accepts connections on a bound socket and serves each on its own named daemon thread.

    ``start()`` once; ``stop()`` (or ``close_unstarted()`` when it never started) once, from any
    thread but one of its own connection threads."""

    def __init__(
        self,
        dispatcher: Dispatcher,
        listener: socket.socket,
        label: str,
        io_timeout: Optional[float],
        proto_factory: Any,
    ) -> None:
        self._dispatcher = dispatcher
        self._listener = listener
        self._label = label
        self._io_timeout = io_timeout
        self._trans_factory = TBufferedTransportFactory()
        self._proto_factory = proto_factory
        self._wake_r, self._wake_w = os.pipe()
        self._lock = threading.Lock()
        self._conns: Dict[threading.Thread, socket.socket] = {}
        self._count = 0
        self._accept_thread = threading.Thread(
            target=self._accept_loop, name="thriftprobe-accept-" + label, daemon=True
        )

    def start(self) -> None:
        self._accept_thread.start()

    def _accept_loop(self) -> None:
        listener = self._listener
        listener.setblocking(False)
        poller = select.poll()
        poller.register(listener.fileno(), select.POLLIN)
        poller.register(self._wake_r, select.POLLIN)
        try:
            while True:
                if any(fd == self._wake_r for fd, _ in poller.poll()):
                    return
                try:
                    sock, _peer = listener.accept()
                except BlockingIOError:
                    continue
                except OSError as err:
                    if err.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                        log.error("%s: cannot accept a connection: %s", self._label, err)
                        select.select([self._wake_r], [], [], 0.1)  # back off, but wake at stop
                    continue
                try:
                    self._spawn(sock)
                except Exception:  # e.g. no thread can be started: drop this one, keep accepting
                    log.exception("%s: cannot serve a new connection", self._label)
                    sock.close()
                    select.select([self._wake_r], [], [], 0.1)
        finally:
            listener.close()

    def _spawn(self, sock: socket.socket) -> None:
        sock.setblocking(True)
        sock.settimeout(self._io_timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        # Idle connections are never timed out, so a consumer host that vanishes without a FIN
        # must be found by TCP keepalive (about 2 minutes), or its thread would wait forever.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        for option, value in (("TCP_KEEPIDLE", 60), ("TCP_KEEPINTVL", 10), ("TCP_KEEPCNT", 6)):
            if hasattr(socket, option):
                sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, option), value)
        with self._lock:
            self._count += 1
            thread = threading.Thread(
                target=self._serve_conn,
                args=(sock,),
                name="thriftprobe-conn-%s-%d" % (self._label, self._count),
                daemon=True,
            )
            self._conns[thread] = sock
        thread.start()

    def _serve_conn(self, sock: socket.socket) -> None:
        raw = _ConnTransport(sock, self._wake_r)
        trans = self._trans_factory.get_transport(raw)
        proto = self._proto_factory.get_protocol(trans)
        try:
            while True:
                raw.at_boundary = True
                self._dispatcher.handle(proto)
        except TTransportException:
            pass  # peer closed, or the server is stopping
        except OSError as err:
            log.debug("%s: connection ended: %s", self._label, err)
        except Exception:
            log.exception("%s: connection failed", self._label)
        finally:
            trans.close()
            with self._lock:
                self._conns.pop(threading.current_thread(), None)

    def stop(self, timeout: float) -> None:
        """Stop accepting, let in-flight calls finish for up to ``timeout`` seconds, then cut the rest."""
        os.write(self._wake_w, b"x")  # never drained: every poller sees it from now on
        if self._accept_thread.ident is not None:
            self._accept_thread.join()
        deadline = time.monotonic() + timeout
        with self._lock:
            threads = list(self._conns)
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        with self._lock:
            stuck = dict(self._conns)
        for thread, sock in stuck.items():
            log.warning("%s: %s still busy after %.1f s; closing its connection", self._label, thread.name, timeout)
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        for thread in stuck:
            thread.join(1.0)
        os.close(self._wake_r)
        os.close(self._wake_w)

    def close_unstarted(self) -> None:
        self._listener.close()
        os.close(self._wake_r)
        os.close(self._wake_w)
