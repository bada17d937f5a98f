"""What a provider's server reports as it works: requests and connections, for metrics and logs.

Subclass ``ServerHooks``, override what you need, and pass an instance to ``start_service(hooks=)``.
Without hooks the server does not even build the arguments. Methods are called on the server's
own threads: request methods on the worker that runs the request, connection and rejection
methods on the I/O thread that every connection shares. Keep them quick and non-blocking (count,
observe, enqueue); a hook that waits stalls the server. A hook that raises is logged and ignored.
One instance serves every thread at once: make what it updates thread-safe.
"""

from __future__ import annotations

import logging
from typing import Any, Optional, Tuple

__all__ = ["CLOSE_REASONS", "OVERLOADED", "REJECT_REASONS", "Peer", "ServerHooks", "notify"]

log = logging.getLogger(__name__)

Peer = Tuple[str, int]
"""The client's address and port, as the socket reports it."""

OVERLOADED = "overloaded"
"""Outcome of a request answered "not executed" (LOADSHEDDING) without running its handler."""

REJECT_REASONS = ("overloaded", "max_connections", "stopping", "too_large", "qps", "concurrency")
"""Why a request was answered without running (``request_rejected``): every worker busy and the
queue full; over ``max_connections``; the server is stopping; bigger than ``max_message_size``;
over a request limit (``thriftprobe.limits``) on requests per second, or on requests at once."""

CLOSE_REASONS = (
    "peer_closed", "idle_timeout", "read_timeout", "write_timeout", "evicted", "max_connections", "too_large",
    "protocol_error", "stopping", "error",
)  # fmt: skip
"""Why a connection ended (``connection_closed``). ``evicted``: the longest-idle connection,
closed to make room for a new one at ``max_connections``."""


class ServerHooks:
    """Called by the server around each request and on connection open, close and reject.

    Every method does nothing here. ``outcome`` is one of ``dispatch.OUTCOMES`` (``ok``,
    ``declared_exception``, ``application_error``), ``transport_error`` when the reply could not
    be sent, or ``protocol_error`` when the request could not be decoded (the connection is then
    closed). Times: ``start`` is ``time.time()`` when the request had arrived whole, ``duration``
    seconds from then (the wait for a worker included) until the reply was handed to the socket.
    Every ``request_started`` is followed by one ``request_finished``.
    """

    def connection_opened(self, peer: Peer) -> None:
        """A connection was accepted."""

    def connection_closed(self, peer: Peer, reason: str) -> None:
        """A connection ended; ``reason`` is one of ``CLOSE_REASONS``."""

    def request_started(self, method: str, peer: Peer) -> None:
        """A worker starts running a request (after it waited in the queue, if it did)."""

    def request_finished(self, method: str, peer: Peer, start: float, outcome: str, duration: float) -> None:
        """A request ran and its reply (if any) was sent or failed to be."""

    def request_rejected(self, method: Optional[str], peer: Peer, reason: str) -> None:
        """A request was answered without running (LOADSHEDDING, or PROTOCOL_ERROR when too large);
        ``method`` is None when not even its header could be read."""


def notify(hooks: ServerHooks, label: str, name: str, *args: Any) -> None:
    """Call ``hooks.<name>(*args)``; a hook that raises is logged (naming the server ``label``)
    and ignored: a hook must never break the server."""
    try:
        getattr(hooks, name)(*args)
    except Exception:
        log.exception("%s: server hook %s failed", label, name)
