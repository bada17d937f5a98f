"""ZooKeeper: register a provider's node, and watch a service's nodes into a NodeTable.

A process keeps ONE ZooKeeper session per ensemble (per connection string and session timeout),
shared by every provider and client in it and reference counted: it is closed when the last
``ZooKeeperRegistry`` using it is closed. The key includes the process id, so a child process
after ``fork()`` opens its own session instead of reusing the parent's socket.

``ZooKeeperRegistry`` is the seam for other registry backends: ``register`` and ``watch`` are
all the provider and consumer use.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass
from functools import partial
from typing import Any, Dict, List, Optional, Tuple

from kazoo.client import KazooClient
from kazoo.exceptions import KazooException, NodeExistsError, NoNodeError
from kazoo.handlers.threading import KazooTimeoutError
from kazoo.recipe.watchers import ChildrenWatch, DataWatch

from .config import ZooKeeperConfig
from .errors import BackendError
from .node import Node, parse_znode_name, service_path
from .table import NodeTable

__all__ = ["ZooKeeperRegistry", "Registration", "ServiceWatch"]

log = logging.getLogger(__name__)

_SessionKey = Tuple[str, float, int]


@dataclass
class _Shared:
    client: KazooClient
    refs: int


_sessions: Dict[_SessionKey, _Shared] = {}
_sessions_lock = threading.Lock()


def _acquire(cfg: ZooKeeperConfig) -> KazooClient:
    key = (cfg.hosts, cfg.session_timeout, os.getpid())
    with _sessions_lock:
        shared = _sessions.get(key)
        if shared is not None:  # kazoo reconnects a shared session by itself
            shared.refs += 1
            return shared.client
        client = KazooClient(hosts=cfg.hosts, timeout=cfg.session_timeout)
        try:
            client.start(timeout=cfg.connect_timeout)
        except (KazooTimeoutError, KazooException) as err:
            raise BackendError(
                "cannot connect to %s within %.1f s: %s" % (cfg.describe(), cfg.connect_timeout, err)
            ) from err
        _sessions[key] = _Shared(client, 1)
        log.info("ZooKeeper session opened to %s (session timeout %.1f s)", cfg.hosts, cfg.session_timeout)
        return client


def _release(client: KazooClient) -> None:
    with _sessions_lock:
        key = next((k for k, shared in _sessions.items() if shared.client is client), None)
        if key is not None:
            _sessions[key].refs -= 1
            if _sessions[key].refs > 0:
                return
            del _sessions[key]
    client.stop()
    client.close()
    log.info("ZooKeeper session to %s closed", key[0] if key else client.hosts)


class ZooKeeperRegistry:
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

    def register(self, env: str, appkey: str, service: str, node: Node) -> "Registration":
        """Create the node's ephemeral znode and return the handle that removes it."""
        reg = Registration(self.client, self._cfg, service_path(env, appkey) + "/" + node.znode_name(service), node)
        reg.create()
        return reg

    def watch(self, env: str, appkey: str, service: str, table: NodeTable) -> "ServiceWatch":
        """Fill ``table`` with the service's nodes now, and keep it current until closed."""
        return ServiceWatch(self.client, self._cfg, env, appkey, service, table)

    def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            _release(client)

    def __enter__(self) -> "ZooKeeperRegistry":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Registration:
    """One provider node's ephemeral znode. ``delete()`` is idempotent; thread-safe."""

    def __init__(self, client: KazooClient, cfg: ZooKeeperConfig, path: str, node: Node) -> None:
        self._client = client
        self._cfg = cfg
        self.path = path
        self.node = node

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
                if stat is not None and stat.ephemeralOwner == zk.client_id[0]:
                    zk.set(self.path, data)
                else:
                    if stat is not None:
                        log.info("replacing stale znode %s of session 0x%x", self.path, stat.ephemeralOwner)
                        try:
                            zk.delete(self.path, version=stat.version)
                        except NoNodeError:
                            pass
                    zk.create(self.path, data, ephemeral=True)
        except KazooException as err:
            raise BackendError("cannot create %s in %s: %s" % (self.path, self._cfg.describe(), err)) from err
        log.info("registered %s %s", self.path, data.decode())

    def delete(self) -> None:
        try:
            self._client.delete(self.path)
        except NoNodeError:
            return
        except KazooException as err:
            # The session is closing anyway; its ephemeral node goes with it.
            log.warning("could not delete %s (%s); it goes when the session ends", self.path, err)
            return
        log.info("deregistered %s", self.path)


class _Token:
    """Identifies one DataWatch so a cancelled watch never touches a newer one's entry."""

    __slots__ = ("cancelled",)

    def __init__(self) -> None:
        self.cancelled = False


class ServiceWatch:
    """Keeps a NodeTable in step with the znodes of one service.

    One ChildrenWatch on the appkey folder notices joins and leaves; one DataWatch per node of the
    service notices weight and on/off changes. A change to one node therefore costs one read of
    that node, never a re-read of every node. Callbacks run on kazoo's worker thread; the table
    they update is safe to read from any thread.
    """

    def __init__(
        self, client: KazooClient, cfg: ZooKeeperConfig, env: str, appkey: str, service: str, table: NodeTable
    ) -> None:
        self._client = client
        self._service = service
        self._table = table
        self._path = service_path(env, appkey)
        self._lock = threading.Lock()
        self._tokens: Dict[str, _Token] = {}
        self._closed = False
        try:
            client.ensure_path(self._path)
            ChildrenWatch(client, self._path, self._on_children)
        except KazooException as err:
            raise BackendError("cannot watch %s in %s: %s" % (self._path, cfg.describe(), err)) from err

    def _on_children(self, children: List[str]) -> Optional[bool]:
        if self._closed:
            return False
        mine = set()
        for name in children:
            parsed = parse_znode_name(name)
            if parsed is not None and parsed[0] == self._service:
                mine.add(name)
        with self._lock:
            for name in set(self._tokens) - mine:
                self._tokens.pop(name).cancelled = True
                self._table.remove(name)
            fresh = {name: _Token() for name in mine - set(self._tokens)}
            self._tokens.update(fresh)
        for name, token in fresh.items():
            DataWatch(self._client, self._path + "/" + name, partial(self._on_data, name, token))
        return None

    def _on_data(self, name: str, token: _Token, data: Optional[bytes], stat: Any) -> Optional[bool]:
        with self._lock:
            if token.cancelled or self._closed:
                return False
            if stat is None:  # the node is gone; the children watch may not have said so yet
                token.cancelled = True
                if self._tokens.get(name) is token:
                    del self._tokens[name]
                self._table.remove(name)
                return False
            try:
                node = Node.from_json(data or b"")
            except ValueError as err:
                log.warning("skipping znode %s/%s with bad data %r: %s", self._path, name, data, err)
                self._table.remove(name)
                return None
            self._table.upsert(name, node)
        return None

    def close(self) -> None:
        """Stop updating the table. Idempotent."""
        with self._lock:
            self._closed = True
            for token in self._tokens.values():
                token.cancelled = True
            self._tokens.clear()
