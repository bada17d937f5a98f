"""The one place that picks kazoo's concurrency handler for a new ZooKeeper client.

kazoo keeps its concurrency styles apart in ``kazoo.handlers`` behind one interface. Its threading
handler starts real OS threads and waits on queues that a gevent-patched process has replaced
with gevent's (kazoo and baseplate.py reports: pings stop and the session times out), so under
gevent the client gets ``SequentialGeventHandler``; otherwise the threading handler, as always.
Code that waits on the client catches ``client.handler.timeout_exception``, which is each
handler's own timeout class.
"""

from __future__ import annotations

from typing import Any

from kazoo.handlers.threading import SequentialThreadingHandler

from ..cooperative import gevent_patched

__all__ = ["kazoo_handler"]


def kazoo_handler() -> Any:
    """A new kazoo handler for one client: gevent's when gevent has patched the process (see
    ``thriftprobe.cooperative``), else the threading one. One per client, never shared."""
    if gevent_patched():
        from kazoo.handlers.gevent import SequentialGeventHandler

        return SequentialGeventHandler()
    return SequentialThreadingHandler()
