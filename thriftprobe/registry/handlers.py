"""The one place that picks kazoo's concurrency handler for a new ZooKeeper client.

kazoo keeps its concurrency styles apart in ``kazoo.handlers`` behind one interface. Its threading
handler starts real OS threads and waits on queues that a gevent-patched process has replaced
with gevent's (kazoo and baseplate.py reports: pings stop and the session times out), so under
gevent the client gets ``SequentialGeventHandler``; otherwise the threading handler, as always.
Code that waits on the client catches ``client.handler.timeout_exception``, which is each
handler's own timeout class, and hands every function it links to an async result through
``completion`` (gevent runs those inside its hub, where nothing may wait).
"""

from __future__ import annotations

from typing import Any, Callable

from kazoo.handlers.threading import SequentialThreadingHandler
from kazoo.protocol.states import Callback

from ..cooperative import gevent_patched

__all__ = ["completion", "kazoo_handler"]


def kazoo_handler() -> Any:
    """A new kazoo handler for one client: gevent's when gevent has patched the process (see
    ``thriftprobe.cooperative``), else the threading one. One per client, never shared."""
    if gevent_patched():
        from kazoo.handlers.gevent import SequentialGeventHandler

        return SequentialGeventHandler()
    return SequentialThreadingHandler()


def completion(handler: Any, fn: Callable[[Any], None]) -> Callable[[Any], None]:
    """``fn`` made fit for ``rawlink`` on an async result of a client with ``handler``.

    kazoo's threading handler runs linked functions on its completion thread, where they may
    take locks and start threads. gevent's async results run them inside the hub, where any wait
    (a lock a greenlet holds, a thread's start) raises ``BlockingSwitchOutError``: there, the call
    is queued on the handler's callback greenlet, which runs callbacks one at a time in the order
    they were queued (replies keep their order). Once the handler is stopped, ``fn`` runs in a
    greenlet of its own (never in the hub).
    """
    if getattr(handler, "name", "") != "sequential_gevent_handler":
        return fn

    def dispatch(result: Any) -> None:
        if handler.running:
            handler.dispatch_callback(Callback("completion", fn, (result,)))
        else:
            handler.spawn(fn, result)

    return dispatch
