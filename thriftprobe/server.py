"""start_service and the RunningService handle that stops it.

Start order (nothing is left behind when a step fails: no znode, no bound port, no thread):
validate -> config -> appkey in MySQL -> IDL -> bind -> node settings from Redis -> ephemeral
znode -> accept connections. Stop order: delete the znode, stop accepting, let in-flight calls
finish, release ZooKeeper.

The server runs one thread per connection and never drops an idle connection (thriftpy2's
``make_server`` closes connections idle for 3 s, which would break every pooled client).
"""

from __future__ import annotations

import errno
import logging
import os
import select
import signal
import socket
import threading
import time
import types
from typing import Any, Dict, Optional, Union

from thriftpy2.protocol import TBinaryProtocolFactory
from thriftpy2.thrift import TApplicationException, TProcessor
from thriftpy2.transport import TBufferedTransportFactory, TSocket, TTransportException

from . import __version__
from . import config as config_mod
from .appkeys import check_appkey
from .errors import InvalidArgument, ThriftProbeError
from .idl import load_service
from .node import Node, validate_names
from .registry import Registration, ZooKeeperRegistry
from .settings import NodeSettingsStore

__all__ = ["start_service", "RunningService"]

log = logging.getLogger(__name__)

_WILDCARDS = ("", "0.0.0.0", "::")


class _ConnTransport(TSocket):
    """A server-side socket that, between messages, waits for either data or the stop signal.

    ``at_boundary`` is set by the serving loop before each message. The first read of a message
    polls the socket and the server's wake pipe together: if only the wake pipe fires, the server
    is stopping and the idle connection ends; a connection in the middle of a call is never cut.
    """

    def __init__(self, sock: socket.socket, wake_fd: int) -> None:
        super().__init__(sock=sock)
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
        return super().read(sz)  # type: ignore[no-any-return]


class _Server:
    """Accepts connections on a bound socket and serves each on its own named daemon thread."""

    def __init__(self, processor: TProcessor, listener: socket.socket, label: str, io_timeout: Optional[float]) -> None:
        self._processor = processor
        self._listener = listener
        self._label = label
        self._io_timeout = io_timeout
        self._trans_factory = TBufferedTransportFactory()
        self._proto_factory = TBinaryProtocolFactory()
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
                self._process(proto)
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

    def _process(self, proto: Any) -> None:
        processor = self._processor
        api, seqid, result, call = processor.process_in(proto)
        if isinstance(result, TApplicationException):
            processor.send_exception(proto, api, result, seqid)
            return
        assert call is not None
        try:
            result.success = call()
        except TApplicationException as exc:
            processor.send_exception(proto, api, exc, seqid)
            return
        except Exception as exc:
            if not processor.handle_exception(exc, result):
                log.exception("%s: %s raised an exception the IDL does not declare", self._label, api)
                if not result.oneway:
                    processor.send_exception(
                        proto,
                        api,
                        TApplicationException(
                            TApplicationException.INTERNAL_ERROR, "%s: %s" % (type(exc).__name__, exc)
                        ),
                        seqid,
                    )
                return
        if not result.oneway:
            processor.send_result(proto, api, result, seqid)

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
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        for thread in stuck:
            thread.join(1.0)
        os.close(self._wake_r)
        os.close(self._wake_w)

    def close_unstarted(self) -> None:
        self._listener.close()
        os.close(self._wake_r)
        os.close(self._wake_w)


class RunningService:
    """A started provider: its bound port, its registered node, and ``stop()``.

    ``stop()`` may be called from any thread, any number of times. ``serve_forever()`` blocks until
    the service is stopped, by ``stop()`` or (in the main thread) by SIGTERM or SIGINT.
    """

    def __init__(
        self,
        *,
        cfg: config_mod.Config,
        appkey: str,
        service_name: str,
        server: _Server,
        registry: ZooKeeperRegistry,
        registration: Registration,
        store: NodeSettingsStore,
        stop_timeout: float,
        drain: float,
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
        self._stopped = False

    @property
    def node(self) -> Node:
        """The node as last registered: address, current weight and valid flag, extras."""
        return self._registration.node

    @property
    def stopped(self) -> bool:
        return self._stopped

    def stop(self, timeout: Optional[float] = None, drain: Optional[float] = None) -> None:
        """Deregister, keep serving for ``drain`` seconds while consumers drop the node, stop
        accepting, finish in-flight calls (up to ``timeout`` s), close ZooKeeper and Redis.
        Both default to what ``start_service`` was given."""
        self._stop_requested.set()
        with self._stop_lock:
            if self._stopped:
                return
            log.info("stopping %s on port %d", self.service_name, self.port)
            self._registration.delete()
            drain = self._drain if drain is None else drain
            if drain > 0:
                log.info("draining %s on port %d for %.1f s", self.service_name, self.port, drain)
                threading.Event().wait(drain)
            self._server.stop(self._stop_timeout if timeout is None else timeout)
            self._registry.close()
            self._store.close()
            self._stopped = True
            log.info("stopped %s on port %d", self.service_name, self.port)

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


def _valid_host(host: object) -> bool:
    return isinstance(host, str) and not any(c in host for c in "_/| \t")


def _check_handler(handler: object, service: types.ModuleType, service_name: str) -> None:
    if handler is None:
        raise InvalidArgument("handler for service %r is None" % service_name)
    missing = [name for name in service.thrift_services if not callable(getattr(handler, name, None))]
    if missing:
        raise InvalidArgument(
            "handler %s does not implement %s of service %r"
            % (type(handler).__name__, ", ".join(sorted(missing)), service_name)
        )


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(128)
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
    thrift_path: Union[str, "os.PathLike[str]"],
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
    io_timeout: Optional[int] = 30000,
    stop_timeout: float = 10.0,
    drain: float = 1.0,
    audit_interval: float = 30.0,
) -> RunningService:
    """Serve ``handler`` as ``service_name`` of ``appkey`` and register it for discovery.

    ``port=0`` lets the OS choose; the bound port is the one registered. ``advertise_host`` is
    the address written to ZooKeeper (default: see ``_advertised_host``). With ``block=True`` (the
    default) this serves until SIGTERM/SIGINT or ``stop()`` from another thread, then returns the
    stopped handle; with ``block=False`` it returns the running handle at once.
    ``io_timeout`` (ms) bounds reading one request and writing one reply, never idle time.
    Stopping (``stop()``, SIGTERM, SIGINT) deregisters first, keeps serving for ``drain`` seconds
    while consumers drop the node, then stops accepting and gives in-flight calls up to
    ``stop_timeout`` seconds to finish.
    Every ``audit_interval`` seconds, and whenever a lost ZooKeeper session is replaced, the
    node is checked and repaired: re-created if missing, with the settings now in Redis.

    Raises InvalidArgument, ConfigError, AppkeyNotRegistered, IdlError, BackendError,
    SettingsError, or ThriftProbeError when the port cannot be bound. On any error nothing is
    left behind: no znode, no bound port, no thread.
    """
    validate_names(appkey, service_name)
    if not isinstance(port, int) or isinstance(port, bool) or not 0 <= port < 65536:
        raise InvalidArgument("port must be an integer 0..65535, got %r" % (port,))
    if not audit_interval > 0:
        raise InvalidArgument("audit_interval must be > 0 seconds, got %r" % (audit_interval,))
    if not (drain >= 0 and stop_timeout >= 0):
        raise InvalidArgument("drain and stop_timeout must be >= 0 seconds")
    if io_timeout is not None and (not isinstance(io_timeout, int) or io_timeout <= 0):
        raise InvalidArgument("io_timeout must be a positive number of milliseconds or None, got %r" % (io_timeout,))
    for label, value in (("bind_host", bind_host), ("advertise_host", advertise_host)):
        if value is not None and not _valid_host(value):
            raise InvalidArgument("%s %r is invalid: no '_', '/', '|' or spaces (it becomes part of the znode name)"
                                  % (label, value))
    cfg = config_mod.resolve(config, env)
    check_appkey(cfg.mysql, cfg.env, appkey)
    service = load_service(thrift_path, service_name)
    _check_handler(handler, service, service_name)

    listener = _bind(bind_host, port)
    store: Optional[NodeSettingsStore] = None
    try:
        bound_port = listener.getsockname()[1]
        host = advertise_host or _advertised_host(bind_host, cfg.zookeeper.hosts)
        extras = {
            "protocol": "binary",
            "transport": "buffered",
            "pid": os.getpid(),
            "start_time": int(time.time()),
            "sdk": "thriftprobe/" + __version__,
        }
        store = NodeSettingsStore(cfg.redis, cfg.env)
        node = store.load_or_init(appkey, service_name, Node(host, bound_port, extras=extras))
        label = "%s-%d" % (service_name, bound_port)
        server = _Server(TProcessor(service, handler), listener, label, io_timeout / 1000.0 if io_timeout else None)
    except BaseException:
        listener.close()
        if store is not None:
            store.close()
        raise

    def refresh(current: Node) -> Node:
        """The node with its settings as stored now (an operator may have changed them)."""
        stored = store.get(appkey, service_name, current.host, current.port)
        if stored is None:  # settings deleted by hand: keep ours, never fall back to defaults
            return current
        return current.with_settings(stored.weight, stored.valid, stored.rev)

    registry: Optional[ZooKeeperRegistry] = None
    try:
        registry = ZooKeeperRegistry(cfg.zookeeper)
        registration = registry.register(cfg.env, appkey, service_name, node, refresh, audit_interval)
    except BaseException:
        server.close_unstarted()
        store.close()
        if registry is not None:
            registry.close()
        raise
    server.start()
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
    )
    log.info("serving %s/%s/%s on %s:%d", cfg.env, appkey, service_name, host, bound_port)
    if block:
        running.serve_forever()
    return running
