"""Whether this process runs cooperatively: gevent has monkey-patched its sockets or threads.

thriftprobe never imports gevent on its own: it looks only when ``gevent.monkey`` is already in
``sys.modules`` (the application imported it, normally to run ``gevent.monkey.patch_all()``
first). The registry then gives kazoo its gevent handler, and the provider's server waits on
sockets in ways the gevent hub can schedule (see ``registry/handlers.py`` and
``provider/server.py``). Everything else needs no change: the threads the library starts become
greenlets, and its locks, events, queues, sleeps and selectors are gevent's once patched.
"""

from __future__ import annotations

import sys

__all__ = ["gevent_patched"]


def gevent_patched() -> bool:
    """True when gevent has monkey-patched ``socket`` or ``threading`` in this process.

    Never imports gevent: reads ``gevent.monkey`` only when the application loaded
    it. Cheap; safe from any thread or greenlet.
    """
    # Patching needs gevent.monkey imported: when it is not loaded, nothing was patched.
    monkey = sys.modules.get("gevent.monkey")
    if monkey is None:
        return False
    return bool(monkey.is_module_patched("socket") or monkey.is_module_patched("threading"))
