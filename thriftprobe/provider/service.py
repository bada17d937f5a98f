"""start_service and the RunningService handle that stops it.

Start order (nothing is left behind when a step fails: no znode, no bound port, no thread):
validate -> config -> appkey in MySQL -> IDL -> bind -> stamp the node as running -> node
settings from Redis (from the audit trail in MySQL if Redis lost them) -> request limits from
Redis, applied -> ephemeral znode -> accept connections -> follow the limits (pushed through
ZooKeeper, re-read from Redis: ``limits_follower.py``). Stop order: delete the znode, drain,
stop accepting, let in-flight calls finish, release ZooKeeper and Redis; on a thread of its
own, so that ``stop()`` returns in time whatever the backends do, and works from any thread.
The server itself is ``server.py``.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
import time
import types
from typing import Any, Callable, Dict, List, Mapping, Optional, Union

from .. import config as config_mod
from .. import metrics as metrics_mod
from .._version import __version__
from ..errors import ConfigError, InvalidArgument, ThriftProbeError
from ..idl import IdlSource, load_service
from ..limits import ServiceLimits
from ..node import Node, validate_host, validate_names, validate_traffic
from ..registry import Registration, Registry, open_registry
from ..stores import audit
from ..stores.appkeys import check_appkey
from ..stores.limits import LimitsStore
from ..stores.settings import NodeSettingsStore
from .dispatch import Dispatcher
from .hooks import ServerHooks
from .limits_follower import LimitsFollower
from .monitor import ProviderMonitor, chain
from .server import Server, ServerOptions, protocol_factory

__all__ = ["RunningService", "launch", "start_service"]

log = logging.getLogger(__name__)

_WILDCARDS = ("", "0.0.0.0", "::")
DEFAULT_WARMUP = 600.0  # Dubbo's ten minutes


class RunningService:
    """A started provider: its bound port, its registered node, and ``stop()``.

    ``stop()`` may be called from any thread (a handler's too), any number of times, and returns
    within its time limit. ``serve_forever()`` blocks until the service is stopped, by ``stop()``
    or (in the main thread) by SIGTERM or SIGINT.
    """

    def __init__(
        self,
        *,
        cfg: config_mod.Config,
        appkey: str,
        service_name: str,
        server: Server,
        registry: Registry,
        registration: Registration,
        store: NodeSettingsStore,
        stop_timeout: float,
        drain: float,
        label: str,
        monitor: Optional[ProviderMonitor] = None,
        endpoint: Optional[metrics_mod.SharedEndpoint] = None,
        limits_store: Optional[LimitsStore] = None,
        limits: Optional[ServiceLimits] = None,
    ) -> None:
        self.config = cfg
        self.env = cfg.env
        self.appkey = appkey
        self.service_name = service_name
        self.port: int = registration.node.port
        self.znode_path: str = registration.path
        self._server = server
        self._registry = registry
        self._registration = registration
        self._store = store
        self._stop_timeout = stop_timeout
        self._drain = drain
        self._stop_requested = threading.Event()
        self._stop_lock = threading.Lock()
        self._stopper: Optional[threading.Thread] = None
        self._stopped = False
        self._label = label
        self._monitor = monitor
        self._endpoint = endpoint
        self._limits_store = limits_store
        self._limits = limits if limits is not None else ServiceLimits()
        self._follower: Optional[LimitsFollower] = None
        self.metrics_port: Optional[int] = None if endpoint is None else endpoint.port
        """The port of the ``/metrics`` endpoint this service advertises; None without one."""
        # The server core names its worker threads thriftprobe-worker-<label>-<n> (see the README).
        self._handler_threads = "thriftprobe-worker-%s-" % label

    @property
    def node(self) -> Node:
        """The node as last registered: address, current weight and valid flag, extras."""
        return self._registration.node

    @property
    def stopped(self) -> bool:
        return self._stopped

    @property
    def limits(self) -> ServiceLimits:
        """The request limits in force (those operators set, as last applied; no limits at rev 0
        when none are set)."""
        return self._limits

    def set_limits(self, limits: ServiceLimits) -> None:
        """Put ``limits`` in force from the next request (``Server.set_limits``). Called by the
        limits follower with each newer revision operators set; thread-safe. Limits set here
        directly last until the next revision operators store."""
        self._server.set_limits(limits)
        self._limits = limits

    def stop(self, timeout: Optional[float] = None, drain: Optional[float] = None) -> None:
        """Deregister, keep serving for ``drain`` seconds while consumers drop the node, stop
        accepting, finish in-flight calls, close ZooKeeper and Redis. Both default to what
        ``start_service`` was given.

        Returns within ``drain + timeout`` seconds whatever the backends do: the znode's deletion
        is awaited for at most half of ``timeout``. While ZooKeeper is unreachable the node is
        deleted as soon as it is back (or goes with the session, if no one else in the process
        shares it); it is never registered again. Steps still running at the limit finish in the
        background, and ``stopped`` turns True when they have.
        From one of this service's handler threads it returns at once and the stop goes on in the
        background (waiting would wait for that very call): its reply is still sent.
        """
        self._stop_requested.set()
        timeout = self._stop_timeout if timeout is None else max(0.0, timeout)
        drain = self._drain if drain is None else max(0.0, drain)
        deadline = time.monotonic() + drain + timeout
        with self._stop_lock:
            stopper = self._stopper
            if stopper is None:
                stopper = threading.Thread(
                    target=self._stop_steps,
                    args=(deadline, drain),
                    name="thriftprobe-stop-" + self._label,
                    daemon=True,
                )
                self._stopper = stopper
                try:
                    stopper.start()
                except RuntimeError:  # no thread can be started: stop here, without the time limit
                    log.warning("cannot start a thread to stop %s; stopping in this one", self.service_name)
                    self._stop_steps(deadline, drain)
                    return
        if stopper.ident is None or threading.current_thread().name.startswith(self._handler_threads):
            return  # stopped without a thread of its own; or a handler's call, which must not wait for itself
        stopper.join(max(0.0, deadline - time.monotonic()))
        if stopper.is_alive():
            log.warning("%s on port %d: stop still finishing in the background", self.service_name, self.port)

    def _stop_steps(self, deadline: float, drain: float) -> None:
        """The stop, on its own thread. Every step runs even if an earlier one failed."""
        log.info("stopping %s on port %d", self.service_name, self.port)

        def left() -> float:
            return max(0.0, deadline - time.monotonic())

        try:
            self._registry.deregister(self._registration, timeout=max(0.0, left() - drain) / 2)
        except Exception:  # a stop must get to the end: the port and threads are still held
            log.exception("deregistering %s failed", self.znode_path)
        drain = min(drain, left())
        if drain > 0:
            log.info("draining %s on port %d for %.1f s", self.service_name, self.port, drain)
            threading.Event().wait(drain)
        steps: List[Callable[[], None]] = []
        if self._follower is not None:
            steps.append(self._follower.close)
        steps += [self._stop_server(left), self._registry.close, self._store.close]
        if self._limits_store is not None:
            steps.append(self._limits_store.close)
        if self._monitor is not None:
            steps.append(self._monitor.close)
        if self._endpoint is not None:
            steps.append(self._endpoint.release)
        for step in steps:
            try:
                step()
            except Exception:
                log.exception("stopping %s on port %d: a step failed", self.service_name, self.port)
        self._stopped = True
        log.info("stopped %s on port %d", self.service_name, self.port)

    def _stop_server(self, left: Callable[[], float]) -> Callable[[], None]:
        return lambda: self._server.stop(left())

    def serve_forever(self) -> None:
        """Block until stopped. In the main thread, SIGTERM and SIGINT stop the service gracefully."""
        previous: Dict[signal.Signals, Any] = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                previous[sig] = signal.signal(sig, self._on_signal)
        try:
            self._stop_requested.wait()
            self.stop()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _on_signal(self, signum: int, _frame: Optional[types.FrameType]) -> None:
        log.info("signal %d received; stopping %s", signum, self.service_name)
        self._stop_requested.set()

    def __enter__(self) -> "RunningService":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        return "<RunningService %s at %s:%d%s>" % (
            self.znode_path,
            self.node.host,
            self.port,
            " stopped" if self._stopped else "",
        )


def _server_options(cfg: config_mod.Config, **explicit: Any) -> ServerOptions:
    """The server's options: the arguments given, else the config file's ``provider.<env>``,
    else the defaults. A bad value is an InvalidArgument, or a ConfigError naming the file."""
    from_file = cfg.provider.set_values()
    try:
        ServerOptions(**from_file).check()
    except InvalidArgument as err:
        raise ConfigError("config file %s: provider.%s: %s" % (cfg.path, cfg.env, err)) from None
    given = {k: v for k, v in explicit.items() if v is not None}
    return ServerOptions(**{**from_file, **given}).check()


def _check_handler(handler: object, service: types.ModuleType, service_name: str) -> None:
    if handler is None:
        raise InvalidArgument("handler for service %r is None" % service_name)
    missing = [name for name in service.thrift_services if not callable(getattr(handler, name, None))]
    if missing:
        raise InvalidArgument(
            "handler %s does not implement %s of service %r"
            % (type(handler).__name__, ", ".join(sorted(missing)), service_name)
        )


def _check_metrics_port(value: object, what: str) -> None:
    if value is not None and (not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < 65536):
        raise InvalidArgument("%s must be an integer 0..65535 (0: the OS picks) or None, got %r" % (what, value))


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(socket.SOMAXCONN)  # a fleet reconnecting at once must not overflow it
    except OSError as err:
        sock.close()
        raise ThriftProbeError("cannot listen on %s:%d: %s" % (host, port, err)) from err
    return sock


def _advertised_host(bind_host: str, zk_hosts: str) -> str:
    """The address consumers should dial: the bind address if specific, else the local address
    the OS routes to the first ZooKeeper server from (consumers reach ZooKeeper too). Never
    ``gethostbyname(getfqdn())``, which is 127.0.1.1 on Debian."""
    if bind_host not in _WILDCARDS:
        return bind_host
    first = zk_hosts.split(",", 1)[0].split("/", 1)[0]
    host, _, port = first.rpartition(":")
    host = host.strip("[]") or first
    try:
        family, _, _, _, addr = socket.getaddrinfo(host, int(port or 2181), type=socket.SOCK_DGRAM)[0]
        with socket.socket(family, socket.SOCK_DGRAM) as probe:
            probe.connect(addr)  # UDP connect: picks a route, sends nothing
            return str(probe.getsockname()[0])
    except (OSError, ValueError) as err:
        raise ThriftProbeError(
            "cannot find a local address towards ZooKeeper %s (%s); pass advertise_host=" % (first, err)
        ) from err


def start_service(
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
    workers: Optional[int] = None,
    queue_size: Optional[int] = None,
    max_connections: Optional[int] = None,
    max_message_size: Optional[int] = None,
    read_timeout: Optional[float] = None,
    idle_timeout: Optional[float] = None,
    transport: Optional[str] = None,
    protocol: Optional[str] = None,
    hooks: Optional[ServerHooks] = None,
    io_timeout: Optional[int] = None,
    metrics: Any = None,
    metrics_port: Optional[int] = None,
    version: str = "",
    group: str = "",
    tags: Optional[Mapping[str, str]] = None,
    priority: int = 0,
    warmup: Optional[float] = None,
) -> RunningService:
    """Serve ``handler`` as ``service_name`` of ``appkey`` and register it for discovery.

    ``thrift_path`` is the IDL: a .thrift file's path, a module thriftpy2 loaded (``calc_thrift =
    thriftpy2.load("calc.thrift")``) or the service class (``calc_thrift.Calculator``). The
    handler may raise the IDL's exceptions from any load of that IDL: they are sent as declared.
    Any other exception reaches the caller as a generic TApplicationException with an error id
    that the provider logs with the traceback; ``expose_errors=True`` sends the exception's text
    too (for development: such text often holds addresses, queries or secrets).
    ``port=0`` lets the OS choose; the bound port is the one registered. ``advertise_host`` is
    the address written to ZooKeeper (default: see ``_advertised_host``). With ``block=True`` (the
    default) this serves until SIGTERM/SIGINT or ``stop()`` from another thread, then returns the
    stopped handle; with ``block=False`` it returns the running handle at once.

    The server (``server.py``): one I/O thread holds every connection; at most ``workers``
    threads (default 64) run handlers. Limits, each with a default, also settable for the whole
    environment in the config file's ``provider.<env>`` section (the arguments here win):
    ``queue_size`` requests may wait for a worker (default: as many as ``workers``); beyond that a
    request is answered at once, unrun, with TApplicationException LOADSHEDDING, which
    thriftprobe consumers retry on another node. ``max_connections`` (default: from the
    open-file limit), ``max_message_size`` bytes per request (default 16 MiB), ``read_timeout``
    seconds for a request to arrive whole once begun and for a reply to be taken (default 10),
    ``idle_timeout`` seconds a connection may stay without a request (default 120, longer than
    consumers keep idle connections). ``transport`` ``buffered`` (default) or ``framed``,
    ``protocol`` ``binary`` (default) or ``compact``: advertised in the znode, and consumers
    follow them node by node. ``hooks`` (a ``ServerHooks``) is called around every request and on
    connection open, close and reject. ``io_timeout`` (ms) is the former name of
    ``read_timeout``.
    Monitoring (``thriftprobe.metrics``; needs the ``metrics`` extra): ``metrics`` is where the
    calls are recorded: None (the default) the process's recorder on prometheus_client's
    registry when the extra is installed, else nothing; False nothing; or a ``Recorder``. They
    are recorded alongside ``hooks``, which are still called. ``metrics_port`` (also the config
    file's ``provider.<env>.metrics_port``; 0 = the OS picks; unset = none) serves ``/metrics`` on
    ``bind_host`` and advertises it in the znode as the serverset endpoint ``metrics``; providers
    of one process share one endpoint (it shows them all; ``port=0`` joins it), closed with the
    last of them.
    Traffic control (README "Traffic control"), written in the znode for consumers to select and
    weigh by: ``version`` (exact, e.g. ``"1.4.2"``), ``group`` (e.g. ``"blue"``; "" = none),
    ``tags`` (free names and values, e.g. ``{"zone": "eu-1"}``), ``priority`` (0 = primary tier;
    consumers spill to higher numbers as a tier's healthy share drops), ``warmup`` (seconds over
    which consumers ramp this node's weight from 2% to full after it starts; default 600, or
    ``provider.<env>.warmup`` of the config file; 0 = none).
    Stopping (``stop()``, SIGTERM, SIGINT) deregisters first, keeps serving for ``drain`` seconds
    while consumers drop the node, then stops accepting and gives in-flight calls up to
    ``stop_timeout`` seconds to finish.
    Every ``audit_interval`` seconds, and whenever a lost ZooKeeper session is replaced, the
    node is checked and repaired: re-created if missing, with the settings now in Redis.
    The request limits operators set (``thriftprobe limit``) are read from Redis before the
    first request and followed while it runs: pushed through ZooKeeper within milliseconds,
    and re-read from Redis after every reconnection and every ``audit_interval`` seconds
    (``RunningService.limits`` shows those in force).

    Raises InvalidArgument, ConfigError, AppkeyNotRegistered, IdlError, BackendError,
    SettingsError, or ThriftProbeError when the port (or the metrics port) cannot be bound. On any error nothing is
    left behind: no znode, no bound port, no thread.
    """
    return launch(
        Server,
        thrift_path=thrift_path, appkey=appkey, service_name=service_name, handler=handler, port=port,
        config=config, env=env, bind_host=bind_host, advertise_host=advertise_host, block=block,
        stop_timeout=stop_timeout, drain=drain, audit_interval=audit_interval, expose_errors=expose_errors,
        workers=workers, queue_size=queue_size, max_connections=max_connections, max_message_size=max_message_size,
        read_timeout=read_timeout, idle_timeout=idle_timeout, transport=transport, protocol=protocol, hooks=hooks,
        io_timeout=io_timeout, metrics=metrics, metrics_port=metrics_port, version=version, group=group, tags=tags,
        priority=priority, warmup=warmup,
    )


def launch(make_server: Callable[..., Any],
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
    workers: Optional[int] = None,
    queue_size: Optional[int] = None,
    max_connections: Optional[int] = None,
    max_message_size: Optional[int] = None,
    read_timeout: Optional[float] = None,
    idle_timeout: Optional[float] = None,
    transport: Optional[str] = None,
    protocol: Optional[str] = None,
    hooks: Optional[ServerHooks] = None,
    io_timeout: Optional[int] = None,
    metrics: Any = None,
    metrics_port: Optional[int] = None,
    version: str = "",
    group: str = "",
    tags: Optional[Mapping[str, str]] = None,
    priority: int = 0,
    warmup: Optional[float] = None,
) -> RunningService:
    """``start_service`` with the server that ``make_server(dispatcher, listener, label, options,
    hooks)`` builds (``server.Server``, or the asyncio server of ``thriftprobe.aio``): it must have
    Server's ``start``, ``stop``, ``close_unstarted``, ``set_limits`` and ``stats``."""
    validate_names(appkey, service_name)
    if not isinstance(port, int) or isinstance(port, bool) or not 0 <= port < 65536:
        raise InvalidArgument("port must be an integer 0..65535, got %r" % (port,))
    if not audit_interval > 0:
        raise InvalidArgument("audit_interval must be > 0 seconds, got %r" % (audit_interval,))
    if not (drain >= 0 and stop_timeout >= 0):
        raise InvalidArgument("drain and stop_timeout must be >= 0 seconds")
    if io_timeout is not None:
        if not isinstance(io_timeout, int) or isinstance(io_timeout, bool) or io_timeout <= 0:
            raise InvalidArgument("io_timeout must be a positive number of milliseconds, got %r" % (io_timeout,))
        if read_timeout is None:
            read_timeout = io_timeout / 1000.0
    if hooks is not None and not isinstance(hooks, ServerHooks):
        raise InvalidArgument("hooks must be a thriftprobe.provider.ServerHooks, got %s" % type(hooks).__name__)
    try:
        recorder = metrics_mod.resolve(metrics)
    except TypeError as err:
        raise InvalidArgument(str(err)) from None
    _check_metrics_port(metrics_port, "metrics_port")
    for label, value in (("bind_host", bind_host), ("advertise_host", advertise_host)):
        if value is None or (label == "bind_host" and value == ""):  # "" = every interface
            continue
        try:
            validate_host(value)  # it becomes part of the znode name and the Redis field
        except InvalidArgument as err:
            raise InvalidArgument("%s: %s" % (label, err)) from None
    cfg = config_mod.resolve(config, env)
    if warmup is None:
        warmup = cfg.provider.warmup if cfg.provider.warmup is not None else DEFAULT_WARMUP
    traffic = validate_traffic(version, group, tags, priority, warmup)
    options = _server_options(
        cfg,
        workers=workers,
        queue_size=queue_size,
        max_connections=max_connections,
        max_message_size=max_message_size,
        read_timeout=read_timeout,
        idle_timeout=idle_timeout,
        transport=transport,
        protocol=protocol,
    )
    if metrics_port is None:
        metrics_port = cfg.provider.metrics_port
        where = "config file %s: provider.%s.metrics_port" % (cfg.path, cfg.env)
    else:
        where = "metrics_port"
    if metrics_port is not None and not metrics_mod.available():
        raise InvalidArgument("%s: serving metrics needs prometheus_client: pip install 'thriftprobe[metrics]'" % where)
    check_appkey(cfg.mysql, cfg.env, appkey)
    service = load_service(thrift_path, service_name)
    _check_handler(handler, service, service_name)

    listener = _bind(bind_host, port)
    store: Optional[NodeSettingsStore] = None
    limits_store: Optional[LimitsStore] = None
    endpoint: Optional[metrics_mod.SharedEndpoint] = None
    monitor: Optional[ProviderMonitor] = None
    try:
        bound_port = listener.getsockname()[1]
        host = advertise_host or _advertised_host(bind_host, cfg.zookeeper.hosts)
        extras: Dict[str, Any] = {
            "protocol": options.protocol,
            "transport": options.transport,
            "pid": os.getpid(),
            "start_time": int(time.time()),
            "sdk": "thriftprobe/" + __version__,
            # Finagle's serverset member fields: Prometheus' serverset_sd_configs reads them.
            "serviceEndpoint": {"host": host, "port": bound_port},
            "status": "ALIVE",
            "methods": sorted(service.thrift_services),  # so that 'limit set' can check a method's name
        }
        extras.update(traffic)
        if metrics_port is not None:
            registry_ = recorder.registry if recorder is not None else None
            try:
                endpoint = metrics_mod.acquire_endpoint(metrics_port, bind_host, registry_)
            except OSError as err:
                raise ThriftProbeError("cannot serve metrics on %s:%d: %s" % (bind_host, metrics_port, err)) from err
            extras["additionalEndpoints"] = {"metrics": {"host": host, "port": endpoint.port}}
        store = NodeSettingsStore(cfg.redis, cfg.env)
        # Stamped before the settings are read, so that a prune deciding by an older stamp
        # leaves this node's settings alone (its compare-and-delete sees the new stamp).
        store.mark_seen(appkey, service_name, host, bound_port)

        def recover() -> Optional[Node]:
            found = audit.recover_settings(cfg.mysql, cfg.env, appkey, service_name, host, bound_port)
            return None if found is None else Node(host, bound_port, found[0], found[1], rev=found[2])

        node = store.load_or_init(appkey, service_name, Node(host, bound_port, extras=extras), recover)
        # The limits operators set, in force before the first request (Redis down, or corrupt
        # limits: no start, as for the node settings; never serving without the limits set).
        limits_store = LimitsStore(cfg.redis, cfg.env)
        limits = limits_store.load(appkey, service_name)
        if limits.methods:
            log.info("limits of %s/%s/%s: rev %d %s", cfg.env, appkey, service_name, limits.rev,
                     limits.to_dict()["methods"])
        label = "%s-%d" % (service_name, bound_port)
        proto_factory = protocol_factory(options.protocol)
        dispatcher = Dispatcher(service, handler, proto_factory, label=label, expose_errors=expose_errors)
        if recorder is not None:
            node_label = "%s:%d" % (host, bound_port)
            monitor = ProviderMonitor(recorder, appkey, service_name, node_label, service.thrift_services)
        server = make_server(dispatcher, listener, label, options, chain(monitor, hooks))
        if monitor is not None:
            monitor.watch_queue(lambda: server.stats()["queued"])
        server.set_limits(limits)
    except BaseException:
        listener.close()
        if store is not None:
            store.close()
        if limits_store is not None:
            limits_store.close()
        if monitor is not None:
            monitor.close()
        if endpoint is not None:
            endpoint.release()
        raise

    def refresh(current: Node) -> Node:
        """The node with its settings as stored now (an operator may have changed them); and
        the record that it runs, which ``thriftprobe node prune`` goes by. Settings Redis lost
        (or holds at a lower revision) are written back from the running node, so that the next
        start does not fall back to the defaults."""
        try:
            store.mark_seen(appkey, service_name, current.host, current.port)
        except ThriftProbeError as err:  # never in the way of the settings themselves
            log.debug("cannot record %s:%d as seen: %s", current.host, current.port, err)
        stored = store.restore(appkey, service_name, current)
        return current.with_settings(stored.weight, stored.valid, stored.rev)

    registry: Optional[Registry] = None
    registration: Optional[Registration] = None
    try:
        registry = open_registry(cfg)
        # The pushed limits too, before the first request: when Redis lost the record, the
        # znode still holds what operators set (the higher revision wins, as the follower's).
        try:
            pushed = registry.live_limits(cfg.env, appkey, service_name)
        except ThriftProbeError as err:
            log.warning("cannot read the pushed limits of %s/%s (%s); serving with rev %d from Redis",
                        appkey, service_name, err, limits.rev)
            pushed = None
        if pushed is not None and pushed.rev > limits.rev:
            limits = pushed
            server.set_limits(limits)
        registration = registry.register(cfg.env, appkey, service_name, node, refresh, audit_interval)
        server.start()
    except BaseException:
        if registry is not None and registration is not None:
            registry.deregister(registration)
        server.close_unstarted()
        store.close()
        limits_store.close()
        if registry is not None:
            registry.close()
        if monitor is not None:
            monitor.close()
        if endpoint is not None:
            endpoint.release()
        raise
    running = RunningService(
        cfg=cfg,
        appkey=appkey,
        service_name=service_name,
        server=server,
        registry=registry,
        registration=registration,
        store=store,
        stop_timeout=stop_timeout,
        drain=drain,
        label=label,
        monitor=monitor,
        endpoint=endpoint,
        limits_store=limits_store,
        limits=limits,
    )
    follower = LimitsFollower(
        limits_store, registry, cfg.env, appkey, service_name, limits, running.set_limits,
        interval=audit_interval, label=label,
    )
    running._follower = follower
    try:
        follower.start()
    except BaseException:
        running.stop(timeout=stop_timeout, drain=0)
        raise
    log.info("serving %s/%s/%s on %s:%d", cfg.env, appkey, service_name, host, bound_port)
    if block:
        running.serve_forever()
    return running
