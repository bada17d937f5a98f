"""The ZooKeeper registry: register a provider's node, and watch a service's nodes into a listener.

A process keeps ONE ZooKeeper session per ensemble (per connection string and session timeout),
shared by every provider and client in it and reference counted: it is closed when the last
``ZooKeeperRegistry`` using it is closed. The key includes the process id, so a child process
after ``fork()`` opens its own session instead of reusing the parent's socket. While the
ensemble is unreachable the session tries to reconnect at least every ``RECONNECT_MAX_DELAY``
seconds (kazoo's default backs off up to an hour), so nodes come back within about a second of
the ensemble answering again.

Layout: one ephemeral znode per node, ``/services/<env>/<appkey>/<service>_<ip>_<port>``,
holding the node's JSON (see ``thriftprobe.node``); and one ephemeral znode per consumer (a
client), ``/consumers/<env>/<appkey>/<service>/<name>``, holding what the consumer published
about itself (its caller appkey, host, pid...): who calls whom. Request limits are one
persistent znode per service, ``/limits/<env>/<appkey>/<service>``, holding the limits' JSON
(see ``thriftprobe.limits``): outside ``/services``, whose children consumers and Prometheus'
serverset discovery take for nodes.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
import time
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable, Dict, List, Optional, Set, Tuple

from kazoo.client import KazooClient
from kazoo.exceptions import (
    BadVersionError,
    ConnectionClosedError,
    ConnectionLoss,
    KazooException,
    NodeExistsError,
    NoNodeError,
    OperationTimeoutError,
    SessionExpiredError,
)
from kazoo.protocol.states import KazooState, KeeperState
from kazoo.retry import KazooRetry

from ..config import TlsConfig, ZooKeeperConfig
from ..errors import BackendError, InvalidArgument, ThriftProbeError
from ..limits import ServiceLimits
from ..node import Node, parse_znode_name, service_path
from . import ConsumerEntry, LimitsCallback, NodeEntry, NodeListener, Refresh, Registration, Registry, Retainer
from .handlers import completion, kazoo_handler

__all__ = [
    "RECONNECT_MAX_DELAY",
    "ServiceLimitsWatch",
    "ServiceWatch",
    "ZooKeeperConsumerRegistration",
    "ZooKeeperRegistration",
    "ZooKeeperRegistry",
    "apply_settings",
    "consumer_path",
    "kazoo_client",
    "limits_path",
]

log = logging.getLogger(__name__)

_SessionKey = Tuple[str, float, TlsConfig, int]


def kazoo_client(cfg: ZooKeeperConfig) -> KazooClient:
    """A (not yet started) KazooClient for ``cfg``, with its TLS settings: ``zkserver.<env>.ssl_mode``
    other than disabled means TLS or no connection (kazoo never falls back to plaintext).
    Raises BackendError when this kazoo cannot check host names (verify_identity needs 2.10)."""
    tls = cfg.tls
    kwargs: Dict[str, Any] = {}
    if tls.enabled:
        kwargs.update(
            use_ssl=True,
            verify_certs=tls.verify_cert,
            ca=tls.ca,
            certfile=tls.cert,
            keyfile=tls.key or tls.cert,  # kazoo loads a certificate only with a key file
            keyfile_password=tls.key_password,
        )
        if tls.check_hostname:
            kwargs["check_hostname"] = True
    try:
        return KazooClient(
            hosts=cfg.hosts,
            timeout=cfg.session_timeout,
            connection_retry=_connection_retry(),
            handler=kazoo_handler(),  # gevent's when gevent patched the process
            **kwargs,
        )
    except TypeError as err:  # kazoo < 2.10 has no check_hostname
        raise BackendError("%s: ssl_mode verify_identity needs kazoo >= 2.10 (%s)" % (cfg.describe(), err)) from err


@dataclass
class _Shared:
    client: KazooClient
    refs: int


_sessions: Dict[_SessionKey, _Shared] = {}
_sessions_lock = threading.Lock()

RECONNECT_MAX_DELAY = 0.8
"""Seconds between two attempts to reach an unreachable ensemble, at most (plus 25 % jitter)."""


def _connection_retry() -> KazooRetry:
    # kazoo's default connection retry doubles its delay up to 3,600 s: after a 45 s outage a
    # provider came back 22 s after the ensemble did, and consumers saw the service empty
    # meanwhile. Retry forever, but never more than about a second apart. One object per
    # client: kazoo sets its interrupt hook on it.
    return KazooRetry(max_tries=-1, delay=0.1, backoff=2, max_jitter=0.25, max_delay=RECONNECT_MAX_DELAY)


def _acquire(cfg: ZooKeeperConfig) -> KazooClient:
    key = (cfg.hosts, cfg.session_timeout, cfg.tls, os.getpid())
    with _sessions_lock:
        shared = _sessions.get(key)
        if shared is not None:  # kazoo reconnects a shared session by itself
            shared.refs += 1
    if shared is not None:
        # Another user's session may be reconnecting: a request now would wait for as long as
        # that takes, so wait for it like for a new connection, within connect_timeout.
        if _wait_connected(shared.client, cfg.connect_timeout):
            return shared.client
        _release(shared.client)
        raise BackendError("cannot reach %s within %.1f s (the process's session to it is reconnecting)"
                           % (cfg.describe(), cfg.connect_timeout))
    # Connect without holding the lock: other registries of the process must not wait on an
    # unreachable ensemble. Two threads racing here both connect; the loser closes its session.
    client = kazoo_client(cfg)
    try:
        client.start(timeout=cfg.connect_timeout)
    except (client.handler.timeout_exception, KazooException) as err:
        raise BackendError(
            "cannot connect to %s within %.1f s: %s" % (cfg.describe(), cfg.connect_timeout, err)
        ) from err
    with _sessions_lock:
        shared = _sessions.get(key)
        if shared is None:
            _sessions[key] = _Shared(client, 1)
            log.info("ZooKeeper session opened to %s (session timeout %.1f s)", cfg.hosts, cfg.session_timeout)
            return client
        shared.refs += 1
    client.stop()
    client.close()
    return shared.client


def _wait_connected(client: KazooClient, timeout: float) -> bool:
    if client.connected:
        return True
    connected = threading.Event()

    def listener(state: str) -> None:  # kazoo's connection thread: set a flag, nothing more
        if state == KazooState.CONNECTED:
            connected.set()

    client.add_listener(listener)
    try:
        return client.connected or connected.wait(timeout)
    finally:
        client.remove_listener(listener)


def _forget_parent_sessions() -> None:
    # In a child after fork(): the parent's sessions are not ours to use or to close (closing
    # would end them for the parent). Start from nothing, with a lock no thread holds.
    global _sessions_lock  # noqa: PLW0603 - the module-level lock itself must be replaced
    _sessions.clear()
    _sessions_lock = threading.Lock()


os.register_at_fork(after_in_child=_forget_parent_sessions)


def _release(client: KazooClient) -> None:
    with _sessions_lock:
        key = next((k for k, shared in _sessions.items() if shared.client is client), None)
        if key is not None:
            _sessions[key].refs -= 1
            if _sessions[key].refs > 0:
                return
            del _sessions[key]
    hosts = key[0] if key else client.hosts
    if client.connected or key is None:
        _close(client, hosts)
        return
    # Unreachable now: the server would keep the session, and its ephemeral nodes, for a whole
    # session timeout after it is back. Close it properly if it answers within that time (the
    # close request deletes our nodes at once); give up after it, when the session expires anyway.
    closer = threading.Thread(target=_close_when_connected, args=(client, hosts, key[1]),
                              name="thriftprobe-zk-close", daemon=True)
    try:
        closer.start()
    except RuntimeError:
        _close(client, hosts)


def _close_when_connected(client: KazooClient, hosts: str, session_timeout: float) -> None:
    _wait_connected(client, session_timeout)
    _close(client, hosts)


def _close(client: KazooClient, hosts: str) -> None:
    client.stop()
    client.close()
    log.info("ZooKeeper session to %s closed", hosts)


class ZooKeeperRegistry(Registry):
    """A handle on the process's shared session to one ZooKeeper ensemble.

    Thread-safe; one instance per user (provider or client), each closed by its owner.
    """

    def __init__(self, cfg: ZooKeeperConfig) -> None:
        self._cfg = cfg
        self._client: Optional[KazooClient] = _acquire(cfg)

    @property
    def client(self) -> KazooClient:
        if self._client is None:
            raise BackendError("registry for %s is closed" % self._cfg.describe())
        return self._client

    def register(
        self,
        env: str,
        appkey: str,
        service: str,
        node: Node,
        refresh: Refresh,
        audit_interval: float = 30.0,
    ) -> "ZooKeeperRegistration":
        """Create the node's ephemeral znode and keep it (see ZooKeeperRegistration) until
        ``deregister``. ``refresh`` is called after creation and at every audit."""
        path = service_path(env, appkey) + "/" + node.znode_name(service)
        reg = ZooKeeperRegistration(self.client, self._cfg, path, node, refresh, audit_interval)
        reg.create()
        try:
            reg.start_keeping()
        except BaseException:
            reg.delete()
            raise
        return reg

    def deregister(self, registration: Registration, timeout: Optional[float] = None) -> bool:
        """Stop keeping the node and delete it (see ZooKeeperRegistration.delete)."""
        if not isinstance(registration, ZooKeeperRegistration):
            raise TypeError("not a ZooKeeper registration: %r" % (registration,))
        return registration.delete(timeout)

    def update(self, env: str, appkey: str, service: str, settings: Node) -> Optional[Node]:
        """Apply an operator's settings to the node's live znode, if it is registered (see apply_settings).

        Returns the node now live: it carries ``settings.rev`` when they were applied, a higher
        revision when newer settings were already there."""
        path = service_path(env, appkey) + "/" + settings.znode_name(service)
        try:
            return apply_settings(self.client, path, settings)
        except KazooException as err:
            raise BackendError("cannot update %s in %s: %s" % (path, self._cfg.describe(), err)) from err

    def live_node(self, env: str, appkey: str, service: str, host: str, port: int) -> Optional[Node]:
        """The node's live znode, read once; None if it has none or its data is not a node."""
        path = service_path(env, appkey) + "/" + Node(host, port).znode_name(service)
        try:
            data, _ = self.client.get(path)
        except NoNodeError:
            return None
        except KazooException as err:
            raise BackendError("cannot read %s in %s: %s" % (path, self._cfg.describe(), err)) from err
        try:
            return Node.from_json(data)
        except ValueError as err:
            log.warning("znode %s holds bad data (%s); treating it as no node", path, err)
            return None

    def watch(self, env: str, appkey: str, service: Optional[str], listener: NodeListener) -> "ServiceWatch":
        """Fill ``listener`` with the service's nodes now (every service's if None), and keep it
        current until the watch is closed."""
        return ServiceWatch(self.client, self._cfg, env, appkey, service, listener)

    def watch_appkeys(self, env: str, on_appkeys: Callable[[List[str]], None]) -> Callable[[], None]:
        """Follow the children of ``/services/<env>`` (see _FolderWatch); the returned function ends it."""
        path = "/services/%s" % env
        folder = _FolderWatch(self.client, path, on_appkeys)
        try:
            self.client.ensure_path(path)
            folder.start()
        except KazooException as err:
            raise BackendError("cannot watch %s in %s: %s" % (path, self._cfg.describe(), err)) from err
        return folder.stop

    def appkeys(self, env: str) -> List[str]:
        """The appkeys that have (or had) nodes registered in ``env``."""
        try:
            return sorted(self.client.get_children("/services/%s" % env))
        except NoNodeError:
            return []
        except KazooException as err:
            raise BackendError("cannot list /services/%s in %s: %s" % (env, self._cfg.describe(), err)) from err

    def entries(self, env: str, appkey: str) -> List[NodeEntry]:
        """Every znode of an appkey that is named like a node, read once; one whose data is not a
        well-formed node is returned with ``problem`` set (and logged)."""
        folder = service_path(env, appkey)
        zk = self.client
        try:
            names = zk.get_children(folder)
        except NoNodeError:
            return []
        except KazooException as err:
            raise BackendError("cannot list %s in %s: %s" % (folder, self._cfg.describe(), err)) from err
        found = []
        reads = []
        for name in names:
            parsed = parse_znode_name(name)
            if parsed is not None:
                reads.append((parsed, zk.get_async(folder + "/" + name)))
        for (service, host, port), pending in reads:
            try:
                data, _ = pending.get()
            except NoNodeError:
                continue  # left while we looked
            except KazooException as err:
                raise BackendError("cannot read %s/%s: %s" % (folder, "%s_%s_%d" % (service, host, port), err)) from err
            try:
                found.append(NodeEntry(service, host, port, Node.from_json(data)))
            except ValueError as err:
                log.warning("znode %s/%s_%s_%d holds bad data: %s", folder, service, host, port, err)
                found.append(NodeEntry(service, host, port, None, str(err)))
        return found

    def register_consumer(
        self, env: str, appkey: str, service: str, name: str, info: Dict[str, Any], wait: float = 1.0
    ) -> "ZooKeeperConsumerRegistration":
        """Publish a consumer's ephemeral znode and keep it (see ZooKeeperConsumerRegistration):
        waits at most ``wait`` seconds for the first creation, then goes on in the background."""
        return _register_consumer(self.client, self._cfg, env, appkey, service, name, info, wait)

    def consumers(self, env: str, appkey: Optional[str] = None, service: Optional[str] = None) -> List[ConsumerEntry]:
        """Every consumer znode under ``/consumers/<env>`` (of one appkey, of one service), read once."""
        return _read_consumers(self.client, self._cfg, env, appkey, service)

    def publish_limits(self, env: str, appkey: str, service: str, limits: ServiceLimits) -> ServiceLimits:
        """Write the limits into ``/limits/<env>/<appkey>/<service>`` (created if missing) with a
        versioned set, only over a lower revision (or unreadable data); return what is there now."""
        path = limits_path(env, appkey, service)
        zk = self.client
        data = limits.to_json()
        try:
            while True:
                try:
                    raw, stat = zk.get(path)
                except NoNodeError:
                    zk.ensure_path(path.rsplit("/", 1)[0])
                    try:
                        zk.create(path, data)
                    except NodeExistsError:
                        continue  # another operator's push came first: compare with it
                    return limits
                there = _parse_limits(path, raw)
                if there is not None and there.rev >= limits.rev:
                    return there
                try:
                    zk.set(path, data, version=stat.version)
                except (BadVersionError, NoNodeError):
                    continue  # changed or deleted since read: look again
                return limits
        except KazooException as err:
            raise BackendError("cannot publish %s in %s: %s" % (path, self._cfg.describe(), err)) from err

    def live_limits(self, env: str, appkey: str, service: str) -> Optional[ServiceLimits]:
        """The limits in ``/limits/<env>/<appkey>/<service>`` now; None if none (or unreadable)."""
        path = limits_path(env, appkey, service)
        try:
            raw, _ = self.client.get(path)
        except NoNodeError:
            return None
        except KazooException as err:
            raise BackendError("cannot read %s in %s: %s" % (path, self._cfg.describe(), err)) from err
        return _parse_limits(path, raw)

    def limited_services(self, env: str, appkey: Optional[str] = None) -> List[Tuple[str, str]]:
        """Every (appkey, service) with a znode under ``/limits/<env>`` (of one appkey), sorted."""
        root = "/limits/%s" % env
        zk = self.client
        found: List[Tuple[str, str]] = []
        try:
            try:
                keys = [appkey] if appkey is not None else zk.get_children(root)
            except NoNodeError:
                return []
            for key in keys:
                try:
                    found.extend((key, service) for service in zk.get_children("%s/%s" % (root, key)))
                except NoNodeError:
                    continue
        except KazooException as err:
            raise BackendError("cannot list %s in %s: %s" % (root, self._cfg.describe(), err)) from err
        return sorted(found)

    def watch_limits(self, env: str, appkey: str, service: str, callback: LimitsCallback) -> "ServiceLimitsWatch":
        """Follow ``/limits/<env>/<appkey>/<service>`` (see ServiceLimitsWatch)."""
        return ServiceLimitsWatch(self.client, self._cfg, limits_path(env, appkey, service), callback)

    def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            _release(client)

    def __enter__(self) -> "ZooKeeperRegistry":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class ZooKeeperRegistration:
    """One provider node's ephemeral znode, kept alive and current until ``delete()``.

    A keeper thread (``thriftprobe-keeper-<znode>``) re-creates the node after the session was
    lost and a new one established, and audits it every ``audit_interval`` seconds: it exists, it
    belongs to our session, and it carries the newest settings (``refresh()`` reads them, from
    Redis in a provider). The kazoo state listener only flags the loss and wakes the keeper: it
    never calls ZooKeeper on kazoo's connection thread.

    The keeper is the node's only writer, and it also deletes it: ``delete()`` tells it to stop
    and waits (bounded) for the deletion. When ZooKeeper is unreachable at that moment, the keeper
    stays behind until it can delete the node once connected again (the session may be shared
    with other users of the process, so it does not end with this registration), or until the
    session is closed or expires, which removes the node too. Once ``delete()`` was called the
    node is never created again. Thread-safe; ``delete()`` is idempotent.
    """

    def __init__(
        self,
        client: KazooClient,
        cfg: ZooKeeperConfig,
        path: str,
        node: Node,
        refresh: Refresh,
        audit_interval: float,
    ) -> None:
        self._client = client
        self._cfg = cfg
        self.path = path
        self.node = node
        self._refresh = refresh
        self._audit_interval = audit_interval
        self._wake = threading.Event()
        self._stopping = False
        self._keeper: Optional[threading.Thread] = None
        self._settled = threading.Event()  # set by the keeper once deleted, or once it must wait for ZooKeeper
        self._withdrawn = False

    def create(self) -> None:
        """Create the znode. A leftover node at the same path from a session that is not ours
        (a previous incarnation on this host and port, killed before its session expired) is
        replaced: we hold the port now, so it cannot belong to a live provider."""
        data = self.node.to_json()
        zk = self._client
        try:
            zk.ensure_path(self.path.rsplit("/", 1)[0])
            try:
                zk.create(self.path, data, ephemeral=True)
            except NodeExistsError:
                stat = zk.exists(self.path)
                session = zk.client_id
                if stat is not None and session is not None and stat.ephemeralOwner == session[0]:
                    zk.set(self.path, data)
                else:
                    if stat is not None:
                        log.info("replacing stale znode %s of session 0x%x", self.path, stat.ephemeralOwner)
                        with contextlib.suppress(NoNodeError):
                            zk.delete(self.path, version=stat.version)
                    zk.create(self.path, data, ephemeral=True)
        except KazooException as err:
            raise BackendError("cannot create %s in %s: %s" % (self.path, self._cfg.describe(), err)) from err
        log.info("registered %s %s", self.path, data.decode())

    def start_keeping(self) -> None:
        """Reconcile once now (settings changed since they were read win), then keep the node."""
        try:
            self._audit()
        except (KazooException, ThriftProbeError) as err:  # the node exists; the keeper retries
            log.warning("first audit of %s failed (%s); the keeper retries", self.path, err)
            self._wake.set()
        self._start_keeper("thriftprobe-keeper-")

    def _start_keeper(self, prefix: str) -> None:
        """Listen to the session's states and start the keeper thread (named ``prefix`` + the
        znode's name); nothing is left listening if the thread cannot start."""
        keeper = threading.Thread(target=self._keep, name=prefix + self.path.rsplit("/", 1)[1], daemon=True)
        self._client.add_listener(self._on_state)
        try:
            keeper.start()
        except BaseException:
            self._client.remove_listener(self._on_state)
            raise
        self._keeper = keeper

    def _on_state(self, state: str) -> None:
        # kazoo's connection thread: flag and hand off, nothing else.
        if state == KazooState.CONNECTED:
            self._wake.set()
        elif state == KazooState.LOST:
            self._wake.set()  # a stopping keeper sees the session closed
            if not self._stopping:
                log.warning("ZooKeeper session lost; %s re-registers when a new session is up", self.path)

    def _keep(self) -> None:
        try:
            delay = self._audit_interval
            while True:
                self._wake.wait(delay)
                self._wake.clear()
                if self._stopping:
                    break
                try:
                    self._audit()
                    delay = self._audit_interval
                except (KazooException, ThriftProbeError) as err:
                    log.warning("audit of %s failed (%s); retrying", self.path, err)
                    delay = min(1.0, self._audit_interval)
                except Exception:  # the keeper must outlive any surprise, or the node is never repaired
                    log.exception("audit of %s failed unexpectedly; retrying", self.path)
                    delay = min(1.0, self._audit_interval)
            self._withdraw()
        finally:
            self._client.remove_listener(self._on_state)
            self._settled.set()

    def _read_settings(self) -> Node:
        try:
            return self._refresh(self.node)
        except ThriftProbeError as err:  # settings store unreachable: keep what we have
            log.warning(
                "cannot refresh settings of %s (%s); keeping weight %d valid %d",
                self.path,
                err,
                self.node.weight,
                self.node.valid,
            )
            return self.node

    def _audit(self) -> None:
        zk = self._client
        session = zk.client_id  # None while disconnected; read once, it can change under us
        if not zk.connected or session is None:
            return  # the CONNECTED state wakes us again
        try:
            data, stat = zk.get(self.path)
        except NoNodeError:
            stat = None
        if stat is not None and stat.ephemeralOwner == session[0]:
            self._adopt(data)
        current = self._read_settings()
        if stat is not None:
            stat = zk.exists(self.path)  # it may have gone while the settings were read
        if stat is None or stat.ephemeralOwner != session[0]:
            if self._stopping:
                return
            self.node = current
            self.create()
            # An operator's change that landed after the read above found no node to apply to:
            # read again now that the node exists. A change landing after this read finds the
            # node and applies itself, so none is lost.
            current = self._read_settings()
        live = apply_settings(zk, self.path, current)
        if live is not None:
            self.node = live

    def _adopt(self, data: bytes) -> None:
        """Take the settings an operator wrote into our znode since we last looked: ``refresh()``
        starts from them (and writes them back to a store that lost them)."""
        try:
            live = Node.from_json(data)
        except ValueError:
            return  # corrupt: the audit rewrites it from what we hold
        if live.rev > self.node.rev:
            self.node = self.node.with_settings(live.weight, live.valid, live.rev)

    def _session_closed(self) -> bool:
        return bool(self._client.client_state == KeeperState.CLOSED)

    def _withdraw(self) -> None:
        """On the keeper thread, after delete(): delete the node as soon as ZooKeeper answers.

        Ends once the node is deleted, is not ours (our session expired, which removed it; or it
        was replaced by a provider of another process), or the session was closed."""
        zk = self._client
        deferred = False
        while not self._session_closed():
            if not zk.connected:
                if not deferred:
                    log.warning("ZooKeeper unreachable: %s is deleted as soon as it is back", self.path)
                    deferred = True
                    self._settled.set()  # delete() need not wait for this
                self._wake.wait(1.0)  # the CONNECTED state wakes us
                self._wake.clear()
                continue
            try:
                if self._delete_if_ours():
                    log.info("deregistered %s%s", self.path, " (ZooKeeper reachable again)" if deferred else "")
                self._withdrawn = True
                return
            except (ConnectionLoss, OperationTimeoutError, SessionExpiredError, zk.handler.timeout_exception) as err:
                log.debug("deleting %s failed (%s); retrying", self.path, err)
                self._wake.wait(0.2)
                self._wake.clear()
            except KazooException as err:  # refused (an ACL...): retrying would not help
                log.warning("could not delete %s (%s); it goes when the session ends", self.path, err)
                return
        log.info("%s went with its ZooKeeper session", self.path)
        self._withdrawn = True

    def _delete_if_ours(self) -> bool:
        """Delete the node if it belongs to the session now; True if it was deleted. Bounded."""
        zk = self._client
        wait = self._cfg.session_timeout
        while True:
            session = zk.client_id
            if session is None:
                raise ConnectionLoss("disconnected")  # the caller waits for the connection
            stat = zk.exists_async(self.path).get(timeout=wait)
            if stat is None or stat.ephemeralOwner != session[0]:
                return False
            try:
                zk.delete_async(self.path, version=stat.version).get(timeout=wait)
            except NoNodeError:
                return False
            except BadVersionError:
                continue  # its data changed meanwhile (an operator's change): look again
            return True

    def delete(self, timeout: Optional[float] = None) -> bool:
        """Stop keeping the node and delete it, waiting at most ``timeout`` seconds (default: the
        session timeout). Returns True once it is deleted (or gone with its session); False while
        ZooKeeper is unreachable: the keeper then deletes it once it is back. Idempotent."""
        self._stopping = True
        self._wake.set()
        wait = self._cfg.session_timeout if timeout is None else max(0.0, timeout)
        keeper = self._keeper
        if keeper is None:  # never kept (start_keeping failed): delete it here, if we can
            return self._delete_unkept(wait)
        if keeper is threading.current_thread():
            return False
        deadline = time.monotonic() + wait
        self._settled.wait(wait)
        keeper.join(max(0.0, deadline - time.monotonic()) if self._withdrawn else 0.0)
        if not self._withdrawn:
            log.warning("%s not deleted yet (ZooKeeper %s); its keeper deletes it once it can",
                        self.path, "unreachable" if not self._client.connected else "slow")
        return self._withdrawn

    def _delete_unkept(self, wait: float) -> bool:
        if not self._client.connected:
            log.warning("ZooKeeper unreachable: %s goes when its session ends", self.path)
            return False
        try:
            self._client.delete_async(self.path).get(timeout=wait)
        except NoNodeError:
            pass
        except (KazooException, self._client.handler.timeout_exception) as err:
            log.warning("could not delete %s (%s); it goes when the session ends", self.path, err)
            return False
        log.info("deregistered %s", self.path)
        self._withdrawn = True
        return True


def apply_settings(zk: KazooClient, path: str, settings: Node) -> Optional[Node]:
    """Write ``settings`` (weight, valid, rev) into the live znode at ``path``, keeping its other data.

    Only a higher revision replaces what is there, and the write is a versioned set, so concurrent
    writers converge on the newest settings and none of them takes over the ephemeral node (its
    owner stays the provider's session). Returns the node now live, or None if there is no znode.
    """
    while True:
        try:
            data, stat = zk.get(path)
        except NoNodeError:
            return None
        try:
            live: Optional[Node] = Node.from_json(data)
        except ValueError:
            live = None
        if live is not None and live.rev >= settings.rev:
            return live
        new = (live or settings).with_settings(settings.weight, settings.valid, settings.rev)
        try:
            zk.set(path, new.to_json(), version=stat.version)
        except BadVersionError:
            continue
        except NoNodeError:
            return None
        return new


def _owner(watcher: Any) -> Any:
    """The object a watcher function belongs to (a bound method's, or a partial of one's)."""
    return getattr(getattr(watcher, "func", watcher), "__self__", None)


def _forget_watchers(client: KazooClient, owner: object, path: str) -> None:
    """Remove from the session the watchers ``owner`` left on ``path`` and below it.

    kazoo keeps a watcher until its znode changes, and has no call to remove one: a closed watch
    would stay reachable from the shared session (with everything it references) for as long as
    its znodes stay quiet. The server's own one-shot watch stays; when it fires, kazoo finds no
    watcher of ours and calls nothing.
    """
    full = (client.chroot or "").rstrip("/") + path
    below = full + "/"
    for table in (client._child_watchers, client._data_watchers):
        for key, watchers in list(table.items()):
            if key == full or key.startswith(below):
                for watcher in list(watchers):
                    if _owner(watcher) is owner:
                        watchers.discard(watcher)


def _forget_watchers_when_settled(client: KazooClient, owner: object, path: str) -> None:
    """``_forget_watchers`` now, and again once every request sent so far has been answered.

    kazoo records a read's watcher when its reply arrives, so a read still in flight would leave
    one behind. Replies come in the order requests were sent, and kazoo records each reply's
    watcher before it reads the next reply: once a request sent now is answered, every earlier
    one's watcher is recorded. The owner must send nothing more before calling this.
    """
    _forget_watchers(client, owner, path)
    with contextlib.suppress(KazooException):  # a closed session dropped every watcher itself
        client.exists_async(path).rawlink(completion(client.handler, lambda _: _forget_watchers(client, owner, path)))


class _ZnodeFollower:
    """The reading half both watches below share: read one znode (its children, or its data) with
    a watch, read again on every change and after every reconnection, and while the znode does
    not exist, wait for its creation with an exists watch. Subclasses say what to read
    (``_request``) and what to do with it (``_got``, or ``_vanished`` for no znode); calls of
    those never overlap, and none starts once ``_end()`` has returned."""

    def __init__(self, client: KazooClient, path: str) -> None:
        self._client = client
        self._path = path
        # Reentrant: kazoo runs a reply's callbacks inline when its handler is stopped. Requests
        # are sent under it, so that after _end() nothing more is sent.
        self._lock = threading.RLock()
        self._stopped = False

    def _request(self) -> Any:
        """Send the read (with ``watch=self._on_event``); return kazoo's async result."""
        raise NotImplementedError

    def _got(self, result: Any) -> None:
        raise NotImplementedError

    def _vanished(self) -> None:
        raise NotImplementedError

    def _read(self) -> None:
        with self._lock:
            if self._stopped:
                return
            try:
                pending = self._request()
            except KazooException as err:  # the session is closed
                log.debug("cannot read %s (%s)", self._path, err)
                return
            pending.rawlink(completion(self._client.handler, self._on_reply))

    def _on_reply(self, pending: Any) -> None:
        try:
            result = pending.get()
        except NoNodeError:
            self._vanished()
            self._await_creation()
            return
        except (ConnectionLoss, SessionExpiredError, ConnectionClosedError) as err:
            log.debug("reading %s failed (%s); read again on reconnect", self._path, err)
            return
        except KazooException as err:
            log.warning("cannot read %s: %s", self._path, err)
            return
        self._got(result)

    def _await_creation(self) -> None:
        with self._lock:
            if self._stopped:
                return
            try:
                pending = self._client.exists_async(self._path, watch=self._on_event)
            except KazooException as err:
                log.debug("cannot watch for %s (%s)", self._path, err)
                return
            pending.rawlink(completion(self._client.handler, self._on_exists))

    def _on_exists(self, pending: Any) -> None:
        try:
            stat = pending.get()
        except KazooException as err:  # connection loss: read again on reconnect
            log.debug("watching for %s failed (%s)", self._path, err)
            return
        if stat is not None:
            self._read()  # created meanwhile; otherwise its creation fires the exists watch

    def _on_event(self, event: Any) -> None:
        if event.type != "NONE" and not self._stopped:  # NONE: the connection dropped
            self._read()

    def _on_state(self, state: str) -> None:
        # kazoo's connection thread: only schedule work, never block here.
        if state == KazooState.CONNECTED and not self._stopped:
            self._client.handler.spawn(self._read)

    def _end(self) -> None:
        """No call after this returns, no watcher or listener left. Idempotent."""
        with self._lock:
            if self._stopped:
                return
            self._stopped = True
        self._client.remove_listener(self._on_state)
        _forget_watchers_when_settled(self._client, self, self._path)


class _FolderWatch(_ZnodeFollower):
    """Follows the children of one znode, also while that znode does not exist.

    ``on_children(names)`` is called with the children now (on the caller's thread) and after
    every change (on kazoo's completion thread), with ``[]`` while the folder does not exist. A
    deleted folder is followed with an exists watch, so the children of a folder created again
    are seen (kazoo's ChildrenWatch ends for good on a deleted folder). kazoo drops every watch
    with the connection: the children are read again when it is back. A list older than one
    already given (replies can be handed over out of order) is dropped. Calls never overlap.
    ``stop()`` ends it and removes its watchers and listener from the session. Thread-safe.
    """

    def __init__(self, client: KazooClient, path: str, on_children: Callable[[List[str]], None]) -> None:
        super().__init__(client, path)
        self._on_children = on_children
        self._pzxid = -1  # the newest children list given (its parent's pzxid)

    def start(self) -> None:
        """Read the children, give them to ``on_children`` on this thread, and keep following.
        Raises KazooException when the first read fails."""
        self._client.add_listener(self._on_state)
        try:
            for _ in range(3):  # the folder may be deleted and created again meanwhile
                try:
                    children, stat = self._client.get_children(self._path, watch=self._on_event, include_data=True)
                except NoNodeError:
                    if self._client.exists(self._path, watch=self._on_event) is not None:
                        continue  # created meanwhile: its exists watch fired too, harmlessly
                    self._give([], None)
                else:
                    self._give(children, stat)
                return
            self._give([], None)
        except BaseException:
            self.stop()
            raise

    def _give(self, children: List[str], stat: Any) -> None:
        with self._lock:
            if self._stopped:
                return
            if stat is not None:
                if stat.pzxid < self._pzxid:
                    return  # an older list than one already given
                self._pzxid = stat.pzxid
            self._on_children(children)

    def _request(self) -> Any:
        return self._client.get_children_async(self._path, watch=self._on_event, include_data=True)

    def _got(self, result: Any) -> None:
        self._give(*result)

    def _vanished(self) -> None:
        self._give([], None)

    def stop(self) -> None:
        """Stop following: no call after this returns, no watcher or listener left. Idempotent."""
        self._end()


class _Token:
    """Identifies one node's data watch, so a cancelled watch never touches a newer one's entry."""

    __slots__ = ("cancelled", "first", "mzxid", "watcher")

    def __init__(self, first: bool = False) -> None:
        self.cancelled = False
        self.first = first  # of the watch's first fill: its first data is no change seen live
        self.mzxid = -1  # the newest version applied, so a late reply never wins over a newer one
        self.watcher: Callable[[Any], None] = lambda event: None  # one object per node: kazoo keeps it once


class ServiceWatch:
    """Keeps a NodeListener (a client's node table, an operator's event printer) in step with
    the znodes of one service, or of every service of the appkey when ``service`` is None.

    A children watch on the appkey folder notices joins and leaves; it follows the folder also
    while it does not exist (deleted while empty, or not created yet). Each node of the service
    has a one-shot data watch, re-armed by the read that each change triggers, so a change to one
    node costs one read of that node, never a re-read of every node. Reads are asynchronous: the
    first fill of 1,000 nodes is 1,000 reads in flight at once, not 1,000 round trips in a row.
    kazoo drops every watch when the connection drops; when it is back, every node is read again.

    The children list decides which nodes are in: a node leaves only when the list no longer has
    it. A read answering "no node" for a listed name (the znode was deleted and maybe created
    again under the same name, as a provider restarted on its port does) is followed by an exists
    watch, so the node's current data arrives whichever order kazoo's threads hand replies over.

    The listener is called on kazoo's threads (the first fill on the caller's), under the watch's
    lock: it must not block. Thread-safe. ``close()`` leaves no watcher or listener of this watch
    on the shared session.
    """

    def __init__(
        self,
        client: KazooClient,
        cfg: ZooKeeperConfig,
        env: str,
        appkey: str,
        service: Optional[str],
        listener: NodeListener,
    ) -> None:
        self._client = client
        self._service = service
        self._listener = listener
        # A listener that wants each change's time (TimedNodeListener) gets the znode's mtime.
        self._upsert_at: Optional[Callable[[str, Node, float], None]] = getattr(listener, "upsert_at", None)
        self._path = service_path(env, appkey)
        # Reentrant: kazoo runs a reply's callbacks inline when its handler is stopped. Requests
        # are sent under it too, so that after close() nothing more is sent (see close()).
        self._lock = threading.RLock()
        self._tokens: Dict[str, _Token] = {}
        self._closed = False
        self._in_step = False  # the listener holds what ZooKeeper has (connected, list applied)
        self._confirmed_at: Optional[float] = None  # when it last was, if it is not now
        self._first_reads: Optional[List[Tuple[str, _Token, Any]]] = []
        self._folder = _FolderWatch(client, self._path, self._on_children)
        try:
            client.ensure_path(self._path)
            client.add_listener(self._on_state)
            self._folder.start()
        except KazooException as err:
            self.close()
            raise BackendError("cannot watch %s in %s: %s" % (self._path, cfg.describe(), err)) from err
        with self._lock:
            first, self._first_reads = self._first_reads or [], None
        # Wait for the first reads' replies themselves (set by kazoo's connection thread), not for
        # their callbacks: this may run on kazoo's completion thread (an operator's watch of every
        # appkey starts one from there), which would then wait for itself.
        deadline = time.monotonic() + cfg.connect_timeout + cfg.session_timeout
        late = 0
        for name, token, pending in first:
            if pending.wait(max(0.0, deadline - time.monotonic())):
                self._on_data(name, token, pending)  # again when its callback runs: applied once
            else:
                late += 1
        if late:
            log.warning("%s: %d node(s) could not be read at start; they follow as they arrive", self._path, late)

    def _on_children(self, children: List[str]) -> None:
        mine = set()
        for name in children:
            parsed = parse_znode_name(name)
            if parsed is not None and (self._service is None or parsed[0] == self._service):
                mine.add(name)
        with self._lock:
            if self._closed:
                return
            gone = set(self._tokens) - mine
            for name in gone:
                token = self._tokens.pop(name)
                token.cancelled = True
                self._forget_node_watcher(name, token)
            if gone:
                self._listener.remove_many(gone)  # at once: all N gone at once is one glitch, not N removals
            for name in mine - set(self._tokens):
                token = self._tokens[name] = _Token(first=self._first_reads is not None)
                token.watcher = partial(self._on_event, name, token)
                pending = self._fetch(name, token)
                if pending is not None and self._first_reads is not None:
                    self._first_reads.append((name, token, pending))
            self._in_step = self._client.connected

    def _forget_node_watcher(self, name: str, token: _Token) -> None:
        full = (self._client.chroot or "").rstrip("/") + self._path + "/" + name
        watchers = self._client._data_watchers.get(full)
        if watchers is not None:
            watchers.discard(token.watcher)

    def _fetch(self, name: str, token: _Token) -> Any:
        """Read a node and leave a watch on it; the reply arrives in ``_on_data``."""
        with self._lock:
            if token.cancelled or self._closed:
                return None
            try:
                pending = self._client.get_async(self._path + "/" + name, watch=token.watcher)
            except KazooException as err:  # the session is closed
                log.debug("cannot read %s/%s (%s)", self._path, name, err)
                return None
            pending.rawlink(completion(self._client.handler, partial(self._on_data, name, token)))
            return pending

    def _recheck(self, name: str, token: _Token) -> None:
        """The list has the node but a read found none: watch for it, and read it if it is back."""
        with self._lock:
            if token.cancelled or self._closed:
                return
            try:
                pending = self._client.exists_async(self._path + "/" + name, watch=token.watcher)
            except KazooException as err:
                log.debug("cannot watch for %s/%s (%s)", self._path, name, err)
                return
            pending.rawlink(completion(self._client.handler, partial(self._on_exists, name, token)))

    def _on_exists(self, name: str, token: _Token, pending: Any) -> None:
        try:
            stat = pending.get()
        except KazooException as err:  # connection loss: everything is read again on reconnect
            log.debug("watching for %s/%s failed (%s)", self._path, name, err)
            return
        if stat is not None:
            self._fetch(name, token)  # otherwise its creation fires the watch, or the list drops it

    def _on_event(self, name: str, token: _Token, event: Any) -> None:
        if token.cancelled or self._closed:
            return
        if event.type == "NONE":
            return  # the connection dropped; _on_state reads every node again when it is back
        self._fetch(name, token)

    def _on_data(self, name: str, token: _Token, pending: Any) -> None:
        try:
            data, stat = pending.get()
        except NoNodeError:
            # Deleted, and maybe created again under the same name already (the list may have
            # it again, and then says nothing more): never drop a listed node on this reply.
            self._recheck(name, token)
            return
        except KazooException as err:  # connection loss: everything is read again on reconnect
            log.debug("reading %s/%s failed (%s); it is read again on reconnect", self._path, name, err)
            return
        with self._lock:
            if token.cancelled or self._closed or stat.mzxid <= token.mzxid:
                return
            token.mzxid = stat.mzxid
            seen_live, token.first = not token.first, False
            try:
                node = Node.from_json(data or b"")
            except ValueError as err:
                log.warning("skipping znode %s/%s with bad data %r: %s", self._path, name, data, err)
                self._listener.remove(name)
            else:
                if seen_live and self._upsert_at is not None:
                    self._upsert_at(name, node, stat.mtime / 1000.0)  # mtime: ms, the server's clock
                else:
                    self._listener.upsert(name, node)

    def _on_state(self, state: str) -> None:
        # kazoo's connection thread: record and schedule work on kazoo's worker, never block here.
        if self._closed:
            return
        if state == KazooState.CONNECTED:
            self._client.handler.spawn(self._refetch_all)
        elif self._in_step:  # SUSPENDED or LOST: ZooKeeper confirmed the listener until now
            self._confirmed_at = time.time()
            self._in_step = False

    def _refetch_all(self) -> None:
        with self._lock:
            tokens = [(name, token) for name, token in self._tokens.items() if not token.cancelled]
        for name, token in tokens:
            self._fetch(name, token)

    def names(self) -> Set[str]:
        """The znode names of the nodes this watch follows now."""
        with self._lock:
            return set(self._tokens)

    def confirmed_at(self) -> Optional[float]:
        """When (``time.time()``) ZooKeeper last confirmed that the listener holds what it has:
        now while the session is connected and the children list applied, else the moment the
        connection dropped; None if never."""
        if self._in_step and not self._closed:
            return time.time()
        return self._confirmed_at

    def retain_only_watched(self, listener: Retainer) -> None:
        """Drop from ``listener`` the nodes this watch does not follow (cached or inherited ones the
        registry no longer has). Under the watch's lock, so no node joining meanwhile is lost."""
        with self._lock:
            listener.retain(set(self._tokens))

    def close(self) -> None:
        """Stop calling the listener, and remove this watch's watchers and listeners from the
        session (the last ones once the replies in flight are in). Idempotent."""
        self._folder.stop()
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._in_step = False
            for token in self._tokens.values():
                token.cancelled = True
            self._tokens.clear()
        self._client.remove_listener(self._on_state)
        _forget_watchers_when_settled(self._client, self, self._path)


# -- request limits ---------------------------------------------------------------------------------


def limits_path(env: str, appkey: str, service: str) -> str:
    """The persistent znode that holds one service's pushed limits."""
    return "/limits/%s/%s/%s" % (env, appkey, service)


def _parse_limits(path: str, raw: Optional[bytes]) -> Optional[ServiceLimits]:
    try:
        return ServiceLimits.from_json(raw or b"")
    except InvalidArgument as err:
        log.warning("znode %s holds bad limits (%s); treating it as none", path, err)
        return None


class ServiceLimitsWatch(_ZnodeFollower):
    """Follows one service's limits znode into a callback, also while the znode does not exist.

    ``callback(limits)`` runs with the znode's limits (None: no znode, or unreadable data) once
    on the caller's thread at the start, then on kazoo's threads after every change and after
    every reconnection, a new session's included (kazoo drops watches with a lost session; the
    state listener reads again, which also re-arms the watch). A reply older than one already
    given is dropped; calls never overlap. The callback must not block. Thread-safe; ``close()``
    leaves no watcher or listener of this watch on the shared session.
    """

    def __init__(self, client: KazooClient, cfg: ZooKeeperConfig, path: str, callback: LimitsCallback) -> None:
        super().__init__(client, path)
        self._callback = callback
        self._mzxid = -1  # the newest version given, so a late reply never wins over a newer one
        client.add_listener(self._on_state)
        try:
            try:
                raw, stat = client.get(path, watch=self._on_event)
            except NoNodeError:
                client.exists(path, watch=self._on_event)  # its creation fires the watch
                self._give(None, None)
            else:
                self._give(raw, stat)
        except KazooException as err:
            self.close()
            raise BackendError("cannot watch %s in %s: %s" % (path, cfg.describe(), err)) from err
        except BaseException:
            self.close()
            raise

    def _give(self, raw: Optional[bytes], stat: Any) -> None:
        with self._lock:
            if self._stopped:
                return
            if stat is not None:
                if stat.mzxid < self._mzxid:
                    return
                self._mzxid = stat.mzxid
            limits = None if stat is None else _parse_limits(self._path, raw)
            try:
                self._callback(limits)
            except Exception:  # a callback's bug must not end the watch
                log.exception("the limits callback of %s failed", self._path)

    def _request(self) -> Any:
        return self._client.get_async(self._path, watch=self._on_event)

    def _got(self, result: Any) -> None:
        self._give(*result)

    def _vanished(self) -> None:
        self._give(None, None)

    def close(self) -> None:
        """Stop calling the callback: none starts after this returns. Idempotent."""
        self._end()


# -- consumers: who calls whom ----------------------------------------------------------------------


def consumer_path(env: str, appkey: str, service: str) -> str:
    """The ZooKeeper folder that holds the consumers of one service."""
    return "/consumers/%s/%s/%s" % (env, appkey, service)


_NOT_A_NODE = Node("consumer", 1, weight=0, valid=False)


class ZooKeeperConsumerRegistration(ZooKeeperRegistration):
    """One consumer's ephemeral znode, kept (best effort) until ``close()``.

    The provider's keeper, reused: a keeper thread creates the znode, creates it again after the
    session was lost and a new one established, checks it every ``audit_interval`` seconds, and
    deletes it on ``close()`` (later, once ZooKeeper answers, if it cannot now). Unlike a
    provider's node, its data never changes and nobody else writes it, so the audit only checks
    that it exists and is ours. Every ZooKeeper request is made on the keeper thread, never on
    the caller's: an unreachable ZooKeeper delays the entry, never the consumer.
    """

    def __init__(self, client: KazooClient, cfg: ZooKeeperConfig, path: str, data: bytes,
                 audit_interval: float = 30.0) -> None:
        super().__init__(client, cfg, path, _NOT_A_NODE, lambda node: node, audit_interval)
        self.data = data
        self._published = threading.Event()

    def create(self) -> None:
        """Create the znode; a leftover of another session under the same name is replaced."""
        zk = self._client
        try:
            zk.ensure_path(self.path.rsplit("/", 1)[0])
            try:
                zk.create(self.path, self.data, ephemeral=True)
            except NodeExistsError:
                stat = zk.exists(self.path)
                session = zk.client_id
                if stat is None or session is None or stat.ephemeralOwner != session[0]:
                    if stat is not None:
                        log.info("replacing stale consumer znode %s of session 0x%x", self.path, stat.ephemeralOwner)
                        with contextlib.suppress(NoNodeError):
                            zk.delete(self.path, version=stat.version)
                    zk.create(self.path, self.data, ephemeral=True)
        except KazooException as err:
            raise BackendError("cannot create %s in %s: %s" % (self.path, self._cfg.describe(), err)) from err
        self._published.set()
        log.debug("registered consumer %s %s", self.path, self.data.decode())

    def _audit(self) -> None:
        zk = self._client
        session = zk.client_id
        if not zk.connected or session is None:
            self._published.clear()
            return  # the CONNECTED state wakes the keeper again
        stat = zk.exists(self.path)
        if stat is not None and stat.ephemeralOwner == session[0]:
            self._published.set()
            return
        self._published.clear()
        if not self._stopping:
            self.create()

    def _on_state(self, state: str) -> None:
        if state != KazooState.CONNECTED:
            self._published.clear()
        super()._on_state(state)

    def keep(self, wait: float) -> None:
        """Start the keeper, which creates the znode at once; wait at most ``wait`` seconds for it."""
        self._wake.set()  # the keeper's first round creates the znode
        self._start_keeper("thriftprobe-consumer-")
        if wait > 0:
            self._published.wait(wait)

    def registered(self) -> bool:
        """Whether the znode exists now, as far as the keeper knows."""
        return self._published.is_set() and not self._stopping

    def close(self, timeout: Optional[float] = None) -> bool:
        """Stop keeping the znode and delete it (see ZooKeeperRegistration.delete). Never raises."""
        self._published.clear()
        try:
            return self.delete(timeout)
        except Exception as err:  # noqa: BLE001 - best effort: the znode goes with the session anyway
            log.warning("could not withdraw consumer %s (%s); it goes with the session", self.path, err)
            return False


def _register_consumer(
    client: KazooClient, cfg: ZooKeeperConfig, env: str, appkey: str, service: str, name: str,
    info: Dict[str, Any], wait: float,
) -> ZooKeeperConsumerRegistration:
    path = consumer_path(env, appkey, service) + "/" + name
    data = json.dumps(info, sort_keys=True, separators=(",", ":")).encode("utf-8")
    registration = ZooKeeperConsumerRegistration(client, cfg, path, data)
    registration.keep(wait)
    return registration


def _children(client: KazooClient, cfg: ZooKeeperConfig, path: str) -> List[str]:
    try:
        return sorted(client.get_children(path))
    except NoNodeError:
        return []
    except KazooException as err:
        raise BackendError("cannot list %s in %s: %s" % (path, cfg.describe(), err)) from err


def _consumer_info(data: bytes) -> Dict[str, Any]:
    """A consumer znode's JSON object. Raises ValueError."""
    try:
        info = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, RecursionError, ValueError) as err:
        raise ValueError("not JSON: %s" % err) from None
    if not isinstance(info, dict):
        raise ValueError("not a JSON object: %r" % (info,))  # noqa: TRY004 - bad data is a ValueError here
    return info


def _read_consumers(
    client: KazooClient, cfg: ZooKeeperConfig, env: str, appkey: Optional[str], service: Optional[str]
) -> List[ConsumerEntry]:
    root = "/consumers/%s" % env
    found: List[ConsumerEntry] = []
    reads: List[Tuple[str, str, str, Any]] = []
    for key in [appkey] if appkey else _children(client, cfg, root):
        for svc in [service] if service else _children(client, cfg, "%s/%s" % (root, key)):
            folder = consumer_path(env, key, svc)
            reads.extend((key, svc, name, client.get_async(folder + "/" + name))
                         for name in _children(client, cfg, folder))
    for key, svc, name, pending in reads:
        try:
            data, _ = pending.get()
        except NoNodeError:
            continue  # left while we looked
        except KazooException as err:
            raise BackendError("cannot read %s/%s: %s" % (consumer_path(env, key, svc), name, err)) from err
        try:
            found.append(ConsumerEntry(key, svc, name, _consumer_info(data or b"")))
        except ValueError as err:
            found.append(ConsumerEntry(key, svc, name, {}, str(err)))
    return found
