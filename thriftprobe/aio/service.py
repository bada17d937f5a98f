"""start_service for asyncio: ``async def`` handlers served from the running loop, registered the
same way as the threaded provider.

``await start_service(...)`` runs the threaded start (``provider.service.launch``: the appkey in
MySQL, the node settings from Redis, the request limits, the ephemeral znode) in a thread of the
loop's default executor, so the loop never waits on a backend, with ``aio.server.AioServer`` as
the server: connections and handlers live on the loop. Discovery, the settings audit and the
limits follower keep their own threads, as they do for threaded providers. Stopping runs the
threaded stop in the executor as well.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import logging
import os
import signal
import threading
import weakref
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple, Union

from .. import config as config_mod
from ..idl import IdlSource
from ..limits import ServiceLimits
from ..node import Node
from ..provider.hooks import ServerHooks
from ..provider.service import RunningService, launch
from .server import AioServer

__all__ = ["AioRunningService", "start_service"]

log = logging.getLogger(__name__)


class AioRunningService:
    """A started asyncio provider: its port, its node, ``await stop()``.

    It belongs to the loop it was started on. ``stop()`` may be awaited any number of times, by
    any task of that loop, a handler's too (a handler's stop goes on in the background, so that
    its own reply is still sent). ``serve_forever()`` waits until the service is stopped, by
    ``stop()`` or (in the main thread) by SIGTERM or SIGINT.
    """

    def __init__(self, running: RunningService, server: AioServer, loop: asyncio.AbstractEventLoop) -> None:
        self._running = running
        self._server = server
        self._loop = loop
        self._stop_requested = asyncio.Event()
        self._stopping: Optional["asyncio.Future[None]"] = None
        self.env = running.env
        self.appkey = running.appkey
        self.service_name = running.service_name
        self.port = running.port
        self.znode_path = running.znode_path
        self.metrics_port = running.metrics_port
        self.config = running.config

    @property
    def node(self) -> Node:
        """The node as last registered: address, current weight and valid flag, extras."""
        return self._running.node

    @property
    def stopped(self) -> bool:
        return self._running.stopped

    @property
    def limits(self) -> ServiceLimits:
        """The request limits in force (``RunningService.limits``)."""
        return self._running.limits

    def set_limits(self, limits: ServiceLimits) -> None:
        """``RunningService.set_limits``: in force from the next request."""
        self._running.set_limits(limits)

    def stats(self) -> Any:
        """The server's counts now: connections, idle, reading, running (``workers``), queued."""
        return self._server.stats()

    async def stop(self, timeout: Optional[float] = None, drain: Optional[float] = None) -> None:
        """Deregister, drain, stop accepting, finish in-flight calls (cancelling handlers still
        running at the deadline), release the backends: ``RunningService.stop``, with the same
        defaults and time limit, in a thread of the executor. Cancelling the wait does not cancel
        the stop. From a handler of this service, it returns at once and the stop goes on."""
        self._stop_requested.set()
        if self._stopping is None:
            self._stopping = asyncio.ensure_future(
                self._loop.run_in_executor(None, functools.partial(self._running.stop, timeout, drain))
            )
        if self._server.is_handler():
            return  # a handler's: waiting would wait for this very call
        await asyncio.shield(self._stopping)

    async def serve_forever(self) -> None:
        """Wait until stopped. In the main thread, SIGTERM and SIGINT stop the service gracefully
        (through the loop's ``add_signal_handler``; removed again after)."""
        with _Signals(self._loop, self._stop_requested.set, self.service_name):
            await self._stop_requested.wait()
            await self.stop()

    async def __aenter__(self) -> "AioRunningService":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def __repr__(self) -> str:
        return "<AioRunningService %s at %s:%d%s>" % (
            self.znode_path, self.node.host, self.port, " stopped" if self.stopped else "")


async def start_service(
    thrift_path: IdlSource,
    appkey: str,
    service_name: str,
    handler: object,
    port: int = 8081,
    *,
    config: Union[config_mod.Config, str, "os.PathLike[str]", None] = None,
    env: Optional[str] = None,
    bind_host: str = "0.0.0.0",
    advertise_host: Optional[str] = None,
    block: bool = True,
    stop_timeout: float = 10.0,
    drain: float = 1.0,
    audit_interval: float = 30.0,
    expose_errors: bool = False,
    concurrency: Optional[int] = None,
    queue_size: Optional[int] = None,
    max_connections: Optional[int] = None,
    max_message_size: Optional[int] = None,
    read_timeout: Optional[float] = None,
    idle_timeout: Optional[float] = None,
    transport: Optional[str] = None,
    protocol: Optional[str] = None,
    hooks: Optional[ServerHooks] = None,
    metrics: Any = None,
    metrics_port: Optional[int] = None,
    version: str = "",
    group: str = "",
    tags: Optional[Mapping[str, str]] = None,
    priority: int = 0,
    warmup: Optional[float] = None,
) -> AioRunningService:
    """Serve ``handler`` as ``service_name`` of ``appkey`` from the running event loop, and
    register it for discovery. The arguments are ``thriftprobe.start_service``'s and mean the
    same, with these differences:

    - the handler's methods may be ``async def`` (awaited on the loop) or plain functions (run on
      the loop: they must not block it);
    - ``concurrency`` (the threaded ``workers``; also the config file's ``provider.<env>.workers``;
      default 64) is how many requests run at once, awaiting included; ``queue_size`` more wait
      (default: as many), and beyond that a request is answered at once, unrun, LOADSHEDDING;
    - ``hooks`` are called on the loop (keep them quick);
    - ``block=True`` (the default) waits, without blocking the loop, until SIGTERM/SIGINT or
      ``stop()``, then returns the stopped handle; ``block=False`` returns the running one.

    The loop never waits on MySQL, Redis or ZooKeeper: the start and the stop run in threads of
    its default executor. Raises what ``thriftprobe.start_service`` raises; on any error, and when
    the awaiting task is cancelled, nothing is left behind (a start that finishes after its
    task was cancelled is stopped at once).
    """
    loop = asyncio.get_running_loop()
    servers = []

    def make_server(*args: Any) -> AioServer:
        server = AioServer(loop, *args)
        servers.append(server)
        return server

    start = functools.partial(
        launch, make_server, thrift_path=thrift_path, appkey=appkey, service_name=service_name, handler=handler,
        port=port, config=config, env=env, bind_host=bind_host, advertise_host=advertise_host, block=False,
        stop_timeout=stop_timeout, drain=drain, audit_interval=audit_interval, expose_errors=expose_errors,
        workers=concurrency, queue_size=queue_size, max_connections=max_connections,
        max_message_size=max_message_size, read_timeout=read_timeout, idle_timeout=idle_timeout,
        transport=transport, protocol=protocol, hooks=hooks, metrics=metrics, metrics_port=metrics_port,
        version=version, group=group, tags=tags, priority=priority, warmup=warmup,
    )
    # With block=True, SIGTERM/SIGINT are heeded from the start on (an orchestrator may stop a
    # pod whose start is slow): the service then stops as soon as it has started.
    requested = asyncio.Event()
    with _Signals(loop, requested.set, service_name) if block else contextlib.nullcontext():
        # In a copy of this task's context (as asyncio.to_thread does): the server's requests run
        # in copies of the context it is built in, so they see what the application set before.
        starting = loop.run_in_executor(None, contextvars.copy_context().run, start)
        try:
            running = await asyncio.shield(starting)
        except asyncio.CancelledError:
            starting.add_done_callback(_stop_abandoned)
            raise
        service = AioRunningService(running, servers[-1], loop)
        if block:
            service._stop_requested = requested
            try:
                await requested.wait()
            finally:  # stopped by a signal, by stop(), or this task cancelled: the service stops
                await asyncio.shield(service.stop())
    return service


class _SignalHub:
    """SIGTERM and SIGINT of one loop, fanned out to every service that waits for them. Installed
    with the first subscriber and removed with the last; a signal the application already
    handles (its own handler, or one of another loop) is left to it."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._subscribers: Dict[int, Tuple[Callable[[], None], str]] = {}
        self._next = 0
        self._installed: List[int] = []

    def subscribe(self, on_signal: Callable[[], None], name: str) -> int:
        if not self._subscribers:
            self._install()
        self._next += 1
        self._subscribers[self._next] = (on_signal, name)
        return self._next

    def unsubscribe(self, token: int) -> None:
        self._subscribers.pop(token, None)
        if not self._subscribers:
            for sig in self._installed:
                if self._replaced(sig):
                    continue  # the application set its own handler since: it stays
                with contextlib.suppress(RuntimeError, ValueError):
                    self._loop.remove_signal_handler(sig)  # back to the default, as before us
            self._installed = []

    def _replaced(self, sig: int) -> bool:
        """Whether the loop's handler for ``sig`` is no longer this hub's (asyncio keeps them in
        ``_signal_handlers``; a loop without it is taken as unchanged)."""
        handlers = getattr(self._loop, "_signal_handlers", None)
        handle = handlers.get(sig) if isinstance(handlers, dict) else None
        return handle is not None and getattr(handle, "_callback", self._heard) != self._heard

    def _install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in (signal.SIGTERM, signal.SIGINT):
            if signal.getsignal(sig) not in (signal.SIG_DFL, signal.default_int_handler, None):
                log.info("signal %d already has a handler; leaving it to the application", sig)
                continue
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                self._loop.add_signal_handler(sig, self._heard, sig)
                self._installed.append(sig)

    def _heard(self, signum: int) -> None:
        for on_signal, name in list(self._subscribers.values()):
            log.info("signal %d received; stopping %s", signum, name)
            on_signal()


_HUBS: "weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _SignalHub]" = weakref.WeakKeyDictionary()


class _Signals:
    """While entered: SIGTERM and SIGINT call ``on_signal`` (see ``_SignalHub``)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, on_signal: Callable[[], None], name: str) -> None:
        hub = _HUBS.get(loop)
        if hub is None:
            hub = _HUBS[loop] = _SignalHub(loop)
        self._hub = hub
        self._on_signal = on_signal
        self._name = name
        self._token = 0

    def __enter__(self) -> "_Signals":
        self._token = self._hub.subscribe(self._on_signal, self._name)
        return self

    def __exit__(self, *exc: object) -> None:
        self._hub.unsubscribe(self._token)


def _stop_abandoned(starting: "asyncio.Future[RunningService]") -> None:
    """A start whose task was cancelled finished anyway: stop it (in a thread: stop waits)."""
    if starting.cancelled() or starting.exception() is not None:
        return
    running = starting.result()
    threading.Thread(target=running.stop, kwargs={"drain": 0}, name="thriftprobe-stop-abandoned", daemon=True).start()
