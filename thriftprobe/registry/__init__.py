"""Where live nodes are published and watched: the interface the rest of the package codes against.

A provider publishes its node with ``register`` and the registry keeps it (re-publishes it after
a lost session, applies newer settings) until ``deregister``. Operators change a live node with
``update``. A consumer hands ``watch`` a ``NodeListener`` (its node table implements one) and the
registry keeps it current. The registry never imports the wings above it: it only calls the
listeners and callbacks they hand it.

ZooKeeper (``registry.zookeeper``) is the one backend today. The interface is written so that
another (an etcd v3 one is planned) fits behind ``open_registry`` without the wings above changing.

Consumers make themselves known too (who calls whom): ``register_consumer`` publishes one entry
per client, kept (re-published after a lost session) until the registration is closed, and
``consumers`` reads them back for operators.

Request limits (``thriftprobe.limits``) are pushed through the registry too: operators
``publish_limits`` (only a higher revision replaces what is there) and each provider
``watch_limits`` of its service.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Protocol, Set, Tuple

from ..config import Config
from ..limits import ServiceLimits
from ..node import Node

__all__ = [
    "ConsumerEntry",
    "ConsumerRegistration",
    "LimitsCallback",
    "LimitsWatch",
    "NodeEntry",
    "NodeListener",
    "Refresh",
    "Registration",
    "Registry",
    "Retainer",
    "TimedNodeListener",
    "Watch",
    "open_registry",
]

Refresh = Callable[[Node], Node]
"""``refresh(node)`` returns the node with its current settings (read from Redis in a provider);
it may raise ThriftProbeError, and the node then keeps the settings it has."""


@dataclass(frozen=True)
class NodeEntry:
    """One registered node as read once: its node, or (``node`` None) why its data is not one.

    ``host`` and ``port`` come from the entry's name, so a corrupt entry can still be named."""

    service: str
    host: str
    port: int
    node: Optional[Node]
    problem: Optional[str] = None


class NodeListener(Protocol):
    """Receives the nodes of a watched service, keyed by their name in the registry.

    Called on the registry's own threads: implementations return quickly and never block.
    """

    def upsert(self, name: str, node: Node) -> None:
        """A node joined, or its data changed."""

    def remove(self, name: str) -> None:
        """A node left."""

    def remove_many(self, names: Iterable[str]) -> None:
        """Several nodes left at once (one glitch, not one removal per node)."""


@dataclass(frozen=True)
class ConsumerEntry:
    """One registered consumer (a client) as read once: who calls ``appkey``/``service``.

    ``info`` is what the consumer published (``caller``, ``host``, ``pid``, ``sdk``,
    ``start_time``); ``problem`` says why it could not be read as a JSON object (``info`` is then
    empty): operators see such an entry instead of missing it."""

    appkey: str
    service: str
    name: str
    info: Mapping[str, Any]
    problem: Optional[str] = None


class ConsumerRegistration(Protocol):
    """One consumer's entry, kept published (best effort) until ``close``."""

    path: str
    """Where the entry is published (a znode path for ZooKeeper)."""

    def registered(self) -> bool:
        """Whether the entry is published now, as far as its keeper knows."""

    def close(self, timeout: Optional[float] = None) -> bool:
        """Stop keeping the entry and withdraw it, waiting at most ``timeout`` seconds; never
        raises. Returns True once withdrawn; False when the backend cannot be reached now (it is
        then withdrawn once it can be, or goes with the session). Idempotent."""


class TimedNodeListener(NodeListener, Protocol):
    """A NodeListener that also wants to know when each change happened in the registry (a
    consumer's table, for the discovery propagation lag). Optional: a watch calls ``upsert_at``
    instead of ``upsert`` when the listener has it, and keeps calling ``upsert`` on the others.

    ``upsert_at`` is called for the changes the watch saw happen while it ran: a node that joined
    or whose data changed. The nodes of the first fill (and of the fill after a new watch
    starts) come through ``upsert``: they changed before anyone was watching, so their age says
    nothing about propagation. Removals carry no time (a deleted znode leaves no stamp)."""

    def upsert_at(self, name: str, node: Node, changed_at: float) -> None:
        """``upsert``, for a change the registry recorded at ``changed_at``: seconds since the
        epoch by the registry server's clock (ZooKeeper: the znode's mtime). That clock may
        differ from this host's: the time since can come out negative."""


class Retainer(Protocol):
    """A listener that can also drop every node but the named ones (see ``Watch.retain_only_watched``)."""

    def retain(self, names: Set[str]) -> None: ...


LimitsCallback = Callable[[Optional[ServiceLimits]], None]
"""``callback(limits)`` gets a service's pushed limits (None: none pushed, or unreadable)."""


class LimitsWatch(Protocol):
    """A running watch of one service's pushed limits."""

    def close(self) -> None:
        """Stop calling the callback; nothing of the watch stays on the session. Idempotent."""


class Registration(Protocol):
    """One published node, kept alive and current until its registry's ``deregister``."""

    path: str
    """Where the node is published (a znode path for ZooKeeper)."""

    node: Node
    """The node as last published: address, current weight and valid flag, extras."""


class Watch(Protocol):
    """A running watch of one service (or of every service of an appkey) into a NodeListener."""

    def names(self) -> Set[str]:
        """The names of the nodes the watch follows now."""

    def confirmed_at(self) -> Optional[float]:
        """When (``time.time()``) the registry last confirmed that the listener holds what it has:
        now while the watch is connected and in step, else the moment it stopped being; None if
        never. (A node cache's age is measured from it.)"""

    def retain_only_watched(self, listener: Retainer) -> None:
        """Drop from ``listener`` every node the watch does not follow, so that nodes known from
        elsewhere (a cache file, a parent process) leave once the registry is the source."""

    def close(self) -> None:
        """Stop calling the listener. Idempotent."""


class Registry(abc.ABC):
    """A handle on one registry backend. Thread-safe; one per user (a provider, a client, an
    operator's tool), closed by its owner; usable in ``with``."""

    @abc.abstractmethod
    def register(
        self, env: str, appkey: str, service: str, node: Node, refresh: Refresh, audit_interval: float = 30.0
    ) -> Registration:
        """Publish ``node`` as one of ``service``'s and keep it published and current until
        ``deregister``: re-published after a lost session, audited every ``audit_interval``
        seconds against ``refresh(node)``. Raises BackendError."""

    @abc.abstractmethod
    def deregister(self, registration: Registration, timeout: Optional[float] = None) -> bool:
        """Stop keeping the node and withdraw it, waiting at most ``timeout`` seconds (default:
        the backend's session timeout). Idempotent; never raises. Returns True once the node is
        withdrawn; False when the backend cannot be reached now: the node is then withdrawn as
        soon as it can be, or goes when the backend ends the session or lease, and is never
        published again."""

    @abc.abstractmethod
    def update(self, env: str, appkey: str, service: str, settings: Node) -> Optional[Node]:
        """Apply an operator's settings (weight, valid, rev) to the node's live entry, if it is
        registered. Only a higher revision replaces what is there. Returns the node now live, or
        None when no such node is registered. Raises BackendError."""

    @abc.abstractmethod
    def live_node(self, env: str, appkey: str, service: str, host: str, port: int) -> Optional[Node]:
        """The node as registered now, read once: None when it is not registered, or when its
        entry is not a well-formed node. Raises BackendError."""

    @abc.abstractmethod
    def watch(self, env: str, appkey: str, service: Optional[str], listener: NodeListener) -> Watch:
        """Fill ``listener`` with the nodes of ``service`` (of every service of the appkey if
        None) now, and keep it current until the watch is closed. Raises BackendError."""

    @abc.abstractmethod
    def watch_appkeys(self, env: str, on_appkeys: Callable[[List[str]], None]) -> Callable[[], None]:
        """Call ``on_appkeys(names)`` with the appkeys of ``env`` now and after every change, on
        the registry's thread (keep it short). Returns a function that stops it. Raises BackendError."""

    @abc.abstractmethod
    def appkeys(self, env: str) -> List[str]:
        """The appkeys that have (or had) nodes registered in ``env``, read once."""

    @abc.abstractmethod
    def entries(self, env: str, appkey: str) -> List[NodeEntry]:
        """Every registered node of an appkey, read once, including those whose data is not a
        well-formed node (shown, not skipped: an operator must see them). Raises BackendError."""

    def nodes(self, env: str, appkey: str) -> List[Tuple[str, Node]]:
        """(service, node) for every live, well-formed node of an appkey, read once."""
        return [(e.service, e.node) for e in self.entries(env, appkey) if e.node is not None]

    @abc.abstractmethod
    def register_consumer(
        self, env: str, appkey: str, service: str, name: str, info: Dict[str, Any], wait: float = 1.0
    ) -> ConsumerRegistration:
        """Publish that a consumer named ``name`` (unique among the consumers of the service)
        calls ``appkey``/``service``, with ``info``, and keep it published until the
        registration is closed: re-published after a lost session. Best effort: never raises for
        an unreachable backend; it waits at most ``wait`` seconds for the first publication, and
        goes on trying in the background. Raises BackendError only when this handle is closed."""

    @abc.abstractmethod
    def consumers(self, env: str, appkey: Optional[str] = None, service: Optional[str] = None) -> List[ConsumerEntry]:
        """The consumers registered in ``env`` (of one appkey, of one service of it), read once.
        Raises BackendError."""

    @abc.abstractmethod
    def publish_limits(self, env: str, appkey: str, service: str, limits: ServiceLimits) -> ServiceLimits:
        """Push a service's limits to its running providers: written only if ``limits.rev`` is
        higher than what is published (compare-and-set), so concurrent pushes converge on the
        newest. Returns what is published now: ``limits``, or a newer revision already there.
        Raises BackendError."""

    @abc.abstractmethod
    def live_limits(self, env: str, appkey: str, service: str) -> Optional[ServiceLimits]:
        """The limits published for a service now, read once; None when none are (or they are
        unreadable). Raises BackendError."""

    @abc.abstractmethod
    def limited_services(self, env: str, appkey: Optional[str] = None) -> List[Tuple[str, str]]:
        """Every (appkey, service) of ``env`` (of one appkey) with limits published, sorted, read
        once (whatever the record in the settings store says: it may have lost them). Raises
        BackendError."""

    @abc.abstractmethod
    def watch_limits(self, env: str, appkey: str, service: str, callback: LimitsCallback) -> LimitsWatch:
        """Call ``callback`` with the service's published limits now (on the caller's thread),
        after every change, and after every reconnection to the backend (a new session too),
        changed or not, so that a watcher can also re-read the record it missed changes of. It
        runs on the registry's threads: it must return quickly and never block. Raises BackendError."""

    @abc.abstractmethod
    def close(self) -> None:
        """Release this handle. Idempotent."""

    def __enter__(self) -> "Registry":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_registry(cfg: Config) -> Registry:
    """Open a handle on the registry ``cfg`` names (ZooKeeper, the only backend today).

    Raises BackendError when it cannot be reached within the configured connect timeout.
    """
    from .zookeeper import ZooKeeperRegistry  # the backend is chosen here, and only here

    return ZooKeeperRegistry(cfg.zookeeper)
