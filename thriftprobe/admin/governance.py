"""Operators steer live traffic: see the fleet, change a node's weight or switch it off/on.

A change is applied in this order:
1. the appkey is checked in MySQL;
2. the settings are written to Redis with compare-and-set and the next revision. This is the
   commit point: it survives restarts, and a provider reads it at start and at each audit;
3. they are written into the provider's live znode with a versioned set, only if their
   revision is newer than the znode's. The node keeps its owner: the operator's session never
   creates or deletes the ephemeral node, so the node neither outlives its provider nor vanishes
   when the admin tool exits;
4. the change is appended to the audit table.
Running consumers watch the znode and see the change within milliseconds.
"""

from __future__ import annotations

import dataclasses
import getpass
import logging
import math
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple

from ..config import Config
from ..consumer.tiers import warmup_factor
from ..errors import BackendError, InvalidArgument, SettingsError
from ..node import MAX_WEIGHT, Node, validate_appkey, validate_host, validate_names
from ..registry import Watch, open_registry
from ..stores import audit
from ..stores.appkeys import check_appkey
from ..stores.settings import NodeSettingsStore

__all__ = ["Change", "Dependencies", "FleetEvent", "Governance", "NodeView", "current_user"]

log = logging.getLogger(__name__)


def current_user() -> str:
    """The OS user running this process, for the audit trail."""
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "unknown"


@dataclass(frozen=True)
class NodeView:
    """One node as an operator sees it: live (a znode exists), offline (settings only), or
    corrupt (a znode whose data is not a node: ``problem`` says why; weight and valid are then
    the stored settings, or None without any)."""

    env: str
    appkey: str
    service: str
    host: str
    port: int
    weight: Optional[int]
    valid: Optional[bool]
    live: bool
    uptime: Optional[float]
    rev: int
    problem: Optional[str] = None
    traffic: Dict[str, Any] = dataclasses.field(default_factory=dict)
    """What a live node declares for traffic control: version, group, tags, priority (the
    ones it set), and ``warming`` (the share of its weight clients give it now) while it warms."""

    @property
    def state(self) -> str:
        return "corrupt" if self.problem is not None else "live" if self.live else "offline"

    def to_dict(self) -> Dict[str, Any]:
        data = {
            "env": self.env,
            "appkey": self.appkey,
            "service": self.service,
            "host": self.host,
            "port": self.port,
            "weight": self.weight,
            "valid": None if self.valid is None else int(self.valid),
            "state": self.state,
            "uptime": None if self.uptime is None else round(self.uptime, 1),
            "rev": self.rev,
        }
        if self.problem is not None:
            data["problem"] = self.problem
        data.update(self.traffic)
        return data


def _traffic(node: Node, now: float) -> Dict[str, Any]:
    """The traffic-control keys a live node declares (see ``NodeView.traffic``)."""
    found: Dict[str, Any] = {}
    if node.version:
        found["version"] = node.version
    if node.group:
        found["group"] = node.group
    if node.tags:
        found["tags"] = dict(node.tags)
    if node.priority:
        found["priority"] = node.priority
    share, _ = warmup_factor(node, now)
    if share < 1.0:
        found["warming"] = share
    return found


def _uptime(now: float, started: object) -> Optional[float]:
    """Seconds since ``start_time``, or None when it is not a plausible time (a corrupt or foreign znode)."""
    if not isinstance(started, (int, float)) or isinstance(started, bool) or not math.isfinite(started):
        return None
    uptime = now - started
    return uptime if 0 <= uptime < 1e10 else None


@dataclass(frozen=True)
class Change:
    """What ``set_node`` did. ``old`` is None when the node had no stored settings."""

    env: str
    appkey: str
    service: str
    old: Optional[Node]
    new: Node
    live: bool

    def to_dict(self) -> Dict[str, Any]:
        return {
            "env": self.env,
            "appkey": self.appkey,
            "service": self.service,
            "host": self.new.host,
            "port": self.new.port,
            "old": None if self.old is None else {"weight": self.old.weight, "valid": int(self.old.valid)},
            "new": {"weight": self.new.weight, "valid": int(self.new.valid)},
            "rev": self.new.rev,
            "live": self.live,
        }


@dataclass(frozen=True)
class FleetEvent:
    """A join, leave or change seen by ``Governance.watch``."""

    kind: str  # "join" | "leave" | "change"
    appkey: str
    service: str
    node: Node
    old: Optional[Node] = None

    def to_dict(self) -> Dict[str, Any]:
        data: Dict[str, Any] = {
            "event": self.kind,
            "appkey": self.appkey,
            "service": self.service,
            "host": self.node.host,
            "port": self.node.port,
            "weight": self.node.weight,
            "valid": int(self.node.valid),
        }
        if self.old is not None:
            data["old"] = {"weight": self.old.weight, "valid": int(self.old.valid)}
        return data

    def describe(self) -> str:
        text = "%-6s %s/%s %s:%d weight %d %s" % (
            self.kind,
            self.appkey,
            self.service,
            self.node.host,
            self.node.port,
            self.node.weight,
            "on" if self.node.valid else "off",
        )
        if self.old is not None:
            text += " (was weight %d %s)" % (self.old.weight, "on" if self.old.valid else "off")
        return text


@dataclass(frozen=True)
class Pruned:
    """The settings of one node that ``Governance.prune`` removed, and how long it had not run."""

    appkey: str
    service: str
    host: str
    port: int
    offline_for: float

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class Dependencies:
    """Who calls whom in one environment, from the consumers' own entries in the registry.

    ``services``: for each called service, its callers (caller appkey, hosts, number of clients);
    ``callers``: for each caller appkey, what it calls. ``consumers``: every entry, as read
    (one per client; an entry whose data cannot be read has ``problem`` and caller ``?``)."""

    env: str
    consumers: List[Dict[str, Any]]

    @property
    def services(self) -> List[Dict[str, Any]]:
        grouped: Dict[Tuple[str, str], Dict[str, List[Dict[str, Any]]]] = {}
        for c in self.consumers:
            grouped.setdefault((c["appkey"], c["service"]), {}).setdefault(c["caller"], []).append(c)
        return [
            {"appkey": appkey, "service": service,
             "callers": [_summary({"caller": caller}, found) for caller, found in sorted(by_caller.items())]}
            for (appkey, service), by_caller in sorted(grouped.items())
        ]

    @property
    def callers(self) -> List[Dict[str, Any]]:
        grouped: Dict[str, Dict[Tuple[str, str], List[Dict[str, Any]]]] = {}
        for c in self.consumers:
            grouped.setdefault(c["caller"], {}).setdefault((c["appkey"], c["service"]), []).append(c)
        return [
            {"caller": caller,
             "calls": [_summary({"appkey": a, "service": s}, found) for (a, s), found in sorted(calls.items())]}
            for caller, calls in sorted(grouped.items())
        ]

    def to_dict(self) -> Dict[str, Any]:
        return {"env": self.env, "services": self.services, "callers": self.callers, "consumers": self.consumers}


def _summary(head: Dict[str, Any], consumers: List[Dict[str, Any]]) -> Dict[str, Any]:
    head.update(hosts=sorted({str(c["host"]) for c in consumers if c["host"] is not None}), count=len(consumers))
    return head


def _consumer_view(
    now: float, appkey: str, service: str, name: str, info: Any, problem: Optional[str]
) -> Dict[str, Any]:
    """One consumer entry for operators; fields of foreign or corrupt data are shown as None."""

    def text(key: str) -> Optional[str]:
        value = info.get(key)
        return value if isinstance(value, str) and value.isprintable() else None

    pid = info.get("pid")
    view: Dict[str, Any] = {
        "appkey": appkey, "service": service, "name": name,
        "caller": text("caller") or "?", "host": text("host"),
        "pid": pid if isinstance(pid, int) and not isinstance(pid, bool) else None,
        "sdk": text("sdk"), "uptime": _uptime(now, info.get("start_time")),
    }
    if view["uptime"] is not None:
        view["uptime"] = round(view["uptime"], 1)
    if problem is not None:
        view["problem"] = problem
    return view


def _check_filter(appkey: Optional[str], service: Optional[str]) -> None:
    """An appkey or service given to look at must be a valid name (``..`` would read the parent)."""
    if appkey is not None:
        validate_appkey(appkey)
    if service is not None:
        validate_names("x", service)


def check_weight(weight: object) -> int:
    if not isinstance(weight, int) or isinstance(weight, bool) or not 0 <= weight <= MAX_WEIGHT:
        raise InvalidArgument("weight must be an integer 0..%d (0 = no traffic), got %r" % (MAX_WEIGHT, weight))
    return weight


class Governance:
    """The operator's view of one environment and the levers on it.

    Holds a share of the process's ZooKeeper session and a Redis client; thread-safe (the web
    console shares one between requests). ``close()`` releases both.
    """

    def __init__(self, cfg: Config, *, source: str = "cli") -> None:
        self.cfg = cfg
        self.env = cfg.env
        self._source = source
        self._store = NodeSettingsStore(cfg.redis, cfg.env)
        try:
            self._registry = open_registry(cfg)
        except BaseException:
            self._store.close()
            raise

    # -- looking ---------------------------------------------------------------------------------

    def fleet(self, appkey: Optional[str] = None, service: Optional[str] = None) -> List[NodeView]:
        """Every node of the environment (or of one appkey / service): live ones from ZooKeeper,
        offline ones from the settings Redis keeps for nodes that are not running.
        Raises InvalidArgument for a malformed appkey or service, BackendError."""
        _check_filter(appkey, service)
        now = time.time()
        views: Dict[Tuple[str, str, str, int], NodeView] = {}
        corrupt: Dict[Tuple[str, str, str, int], str] = {}
        for key in [appkey] if appkey else self._registry.appkeys(self.env):
            for entry in self._registry.entries(self.env, key):
                if service and entry.service != service:
                    continue
                where = (key, entry.service, entry.host, entry.port)
                node = entry.node
                if node is None:
                    corrupt[where] = entry.problem or "not a node"
                    continue
                uptime = _uptime(now, node.extras.get("start_time"))
                views[where] = NodeView(
                    self.env, key, entry.service, node.host, node.port, node.weight, node.valid, True, uptime, node.rev,
                    traffic=_traffic(node, now),
                )
        for key, svc, node in self._store.scan(appkey):
            if service and svc != service:
                continue
            where = (key, svc, node.host, node.port)
            view = NodeView(self.env, key, svc, node.host, node.port, node.weight, node.valid, False, None, node.rev)
            if where in corrupt:
                view = dataclasses.replace(view, live=True, problem=corrupt.pop(where))
            views.setdefault(where, view)
        for (key, svc, host, port), problem in corrupt.items():  # corrupt, and no stored settings
            views[(key, svc, host, port)] = NodeView(self.env, key, svc, host, port, None, None, True, None, 0, problem)
        return [views[k] for k in sorted(views)]

    def metrics_endpoints(
        self, appkey: Optional[str] = None, service: Optional[str] = None
    ) -> List[Tuple[str, str, Tuple[str, int, Optional[Tuple[str, int]]]]]:
        """(appkey, service, (host, port, metrics endpoint)) of every live node, the endpoint read
        from its znode's ``additionalEndpoints.metrics`` (None when it serves none).
        Raises InvalidArgument for a malformed appkey or service, BackendError."""
        _check_filter(appkey, service)
        found: List[Tuple[str, str, Tuple[str, int, Optional[Tuple[str, int]]]]] = []
        for key in [appkey] if appkey else self._registry.appkeys(self.env):
            for svc, node in self._registry.nodes(self.env, key):
                if service and svc != service:
                    continue
                endpoint = None
                extra = node.extras.get("additionalEndpoints")
                metrics = extra.get("metrics") if isinstance(extra, dict) else None
                if isinstance(metrics, dict):
                    host, port = metrics.get("host"), metrics.get("port")
                    if isinstance(host, str) and host and isinstance(port, int) and 0 < port < 65536:
                        endpoint = (host, port)
                found.append((key, svc, (node.host, node.port, endpoint)))
        return found

    def callers(self, appkey: Optional[str] = None, service: Optional[str] = None) -> Dependencies:
        """Who calls the services of the environment (of one appkey, of one service of it), from
        the consumers' entries. Raises InvalidArgument for a malformed appkey or service, BackendError."""
        _check_filter(appkey, service)
        if service is not None and appkey is None:
            raise InvalidArgument("a service needs its appkey")
        now = time.time()
        entries = self._registry.consumers(self.env, appkey, service)
        return Dependencies(self.env, [
            _consumer_view(now, e.appkey, e.service, e.name, e.info, e.problem)
            for e in sorted(entries, key=lambda e: (e.appkey, e.service, e.name))
        ])

    def history(
        self, appkey: Optional[str] = None, service: Optional[str] = None, limit: int = 50
    ) -> List[audit.AuditEntry]:
        return audit.history(self.cfg.mysql, self.env, appkey, service, limit)

    # -- changing --------------------------------------------------------------------------------

    def _check_target(self, appkey: str, service: str, host: str, port: int, actor: Optional[str]) -> str:
        """Validate a change's node and actor, and that the appkey is registered; return the actor."""
        validate_names(appkey, service)
        validate_host(host)
        if not isinstance(port, int) or isinstance(port, bool) or not 0 < port < 65536:
            raise InvalidArgument("port must be an integer 1..65535, got %r" % (port,))
        actor = actor or current_user()
        if not isinstance(actor, str) or not actor.isprintable():
            # A newline in the actor would forge a line of 'thriftprobe history'.
            raise InvalidArgument("actor %r is invalid: it must be printable text" % (actor,))
        check_appkey(self.cfg.mysql, self.env, appkey)
        return actor

    def _probe_entry(
        self, action: str, actor: str, appkey: str, service: str, host: str, port: int
    ) -> audit.AuditEntry:
        """The identity of an audit row about to be written (for ``audit.check_ready``, and the
        base of the row itself)."""
        return audit.AuditEntry(
            changed_at="",
            actor=actor,
            source=self._source,
            env=self.env,
            appkey=appkey,
            service=service,
            host=host,
            port=port,
            old_weight=None,
            old_valid=None,
            new_weight=0 if action == "set" else None,
            new_valid=False if action == "set" else None,
            rev=0,
            live=False,
            action=action,
        )

    def set_node(
        self,
        appkey: str,
        service: str,
        host: str,
        port: int,
        *,
        weight: Optional[int] = None,
        valid: Optional[bool] = None,
        actor: Optional[str] = None,
    ) -> Change:
        """Change a node's weight and/or switch it on or off; see the module docstring.

        A node that is not registered may be changed (the change applies when it starts):
        ``Change.live`` is then False. Raises InvalidArgument (bad weight, names or port),
        AppkeyNotRegistered, SettingsError (corrupt stored settings) or BackendError.
        """
        if weight is None and valid is None:
            raise InvalidArgument("nothing to change: give a weight, or switch the node on or off")
        if weight is not None:
            check_weight(weight)
        actor = self._check_target(appkey, service, host, port, actor)
        # Fail before changing anything, not after: a change the audit table cannot record
        # (a name longer than its column, no INSERT privilege) is never made.
        audit.check_ready(self.cfg.mysql, self._probe_entry("set", actor, appkey, service, host, port))
        # Revisions never go backwards: when Redis lost the node's settings (or holds older
        # ones), the change starts from the live node, or the live node would ignore it.
        try:
            current = self._registry.live_node(self.env, appkey, service, host, port)
        except BackendError as err:  # still stored; the live update below says what happened
            log.warning("cannot read the live node %s:%d of %s/%s: %s", host, port, appkey, service, err)
            current = None
        def recover() -> Optional[Node]:
            found = audit.recover_settings(self.cfg.mysql, self.env, appkey, service, host, port)
            return None if found is None else Node(host, port, found[0], found[1], rev=found[2])

        old, new = self._store.update(appkey, service, host, port, weight, valid, live=current, recover=recover)
        # Persisted: from here on the change is real (providers apply it at their next audit),
        # so it is audited whatever happens to the live update.
        live_error: Optional[BackendError] = None
        now_newer = False
        try:
            now = self._registry.update(self.env, appkey, service, new)
            live = now is not None
            if now is not None and now.rev > new.rev and not self._superseded_in_store(appkey, service, now):
                # Something wrote a newer revision into the znode behind the settings store's
                # back since we read it: the change did not reach the node. Say so.
                live, now_newer = False, True
                live_error = BackendError(
                    "the live node holds rev %d (weight %d %s), written since it was read and not through the "
                    "settings store; make the change again to apply it on top"
                    % (now.rev, now.weight, "on" if now.valid else "off")
                )
        except BackendError as err:
            live, live_error = False, err
        change = Change(self.env, appkey, service, old, new, live)
        try:
            audit.record(
                self.cfg.mysql,
                dataclasses.replace(
                    self._probe_entry("set", actor, appkey, service, host, port),
                    old_weight=None if old is None else old.weight,
                    old_valid=None if old is None else old.valid,
                    new_weight=new.weight,
                    new_valid=new.valid,
                    rev=new.rev,
                    live=live,
                ),
            )
        except BackendError as err:
            raise BackendError(
                "the change (rev %d) is stored%s, but its audit record failed: %s"
                % (new.rev, " and live" if live else "", err)
            ) from err
        if live_error is not None:
            raise BackendError(
                "the change (rev %d) is stored and audited, but the live node was not updated (%s)%s"
                % (new.rev, live_error, "" if now_newer else "; its provider applies it at its next audit")
            ) from live_error
        log.info(
            "%s set %s/%s/%s %s:%d to weight %d valid %d (rev %d, %s)",
            actor,
            self.env,
            appkey,
            service,
            host,
            port,
            new.weight,
            new.valid,
            new.rev,
            "live" if live else "not live",
        )
        return change

    def forget_node(self, appkey: str, service: str, host: str, port: int, *, actor: Optional[str] = None) -> bool:
        """Remove the stored settings of a node that is not running (its Redis field grows the hash
        forever otherwise: a port 0 start, a pod's changing IP), and audit it (action ``forget``).

        Returns False when nothing was stored. Refuses a live node (InvalidArgument): its provider
        would keep running on settings nothing records, and start on the defaults next time.
        Raises InvalidArgument, AppkeyNotRegistered or BackendError, all before anything changes.
        """
        actor = self._check_target(appkey, service, host, port, actor)
        audit.check_ready(self.cfg.mysql, self._probe_entry("forget", actor, appkey, service, host, port))
        if any((e.service, e.host, e.port) == (service, host, port) for e in self._registry.entries(self.env, appkey)):
            raise InvalidArgument(
                "%s/%s %s:%d is live: forget only removes the settings of nodes that are gone (stop it first)"
                % (appkey, service, host, port)
            )
        return self._remove_settings("forget", actor, appkey, service, host, port)

    def _remove_settings(
        self, action: str, actor: str, appkey: str, service: str, host: str, port: int, seen: Optional[float] = None
    ) -> bool:
        """Remove a node's stored settings and audit it as ``action``; False if none were stored
        (or, given ``seen``, if the node was stamped as running since that stamp)."""
        removed, old = self._store.remove(appkey, service, host, port, seen=seen)
        if not removed:
            return False
        entry = dataclasses.replace(
            self._probe_entry(action, actor, appkey, service, host, port),
            old_weight=None if old is None else old.weight,
            old_valid=None if old is None else old.valid,
            rev=0 if old is None else old.rev,
        )
        try:
            audit.record(self.cfg.mysql, entry)
        except BackendError as err:
            raise BackendError("the settings are removed, but their audit record failed: %s" % err) from err
        log.info("%s removed (%s) the settings of %s/%s/%s %s:%d", actor, action, self.env, appkey, service, host, port)
        return True

    def prune(
        self,
        older_than: float,
        appkey: Optional[str] = None,
        *,
        actor: Optional[str] = None,
        dry_run: bool = False,
        now: Optional[float] = None,
    ) -> List[Pruned]:
        """Remove the stored settings of every node (of the env, or of one appkey) that has not
        run for ``older_than`` seconds, each audited as ``prune``; return what was (or, with
        ``dry_run``, would be) removed.

        A node's age is the time since its provider last recorded it as running (at start and at
        every audit). A node with no record (an older SDK, settings written by hand) has its
        clock started by the first prune that finds it offline, so nothing is removed on the
        first run that sees it. Live nodes are never touched. Raises InvalidArgument and
        BackendError; an entry that cannot be audited is not removed.
        """
        if isinstance(older_than, bool) or not isinstance(older_than, (int, float)) or not older_than > 0:
            raise InvalidArgument("older_than must be a number of seconds > 0, got %r" % (older_than,))
        # Ages by the clock of the Redis server providers stamp with, never this machine's.
        now = self._store.server_time() if now is None else now
        keys = [appkey] if appkey else self._registry.appkeys(self.env)
        live = {(key, e.service, e.host, e.port) for key in keys for e in self._registry.entries(self.env, key)}
        pruned: List[Pruned] = []
        for key, service, node in list(self._store.scan(appkey)):
            if (key, service, node.host, node.port) in live:
                continue
            seen = self._store.last_seen(key, service, node.host, node.port)
            if seen is None:
                if not dry_run:
                    self._store.mark_seen(key, service, node.host, node.port, when=now)
                continue
            if seen > now + 60:  # a stamp from the future (a clock that jumped): its clock starts now
                if not dry_run:
                    self._store.mark_seen(key, service, node.host, node.port, when=now)
                continue
            if now - seen < older_than:
                continue
            if not dry_run:
                who = self._check_target(key, service, node.host, node.port, actor)
                audit.check_ready(self.cfg.mysql, self._probe_entry("prune", who, key, service, node.host, node.port))
                # A node may have started since the fleet was read: it stamps itself before it
                # reads its settings, so the removal below (only if the stamp is still ``seen``)
                # and this last look at the registry leave a starting node alone.
                if self._registry.live_node(self.env, key, service, node.host, node.port) is not None:
                    continue
                if not self._remove_settings("prune", who, key, service, node.host, node.port, seen=seen):
                    continue
            pruned.append(Pruned(key, service, node.host, node.port, now - seen))
        return pruned

    def _superseded_in_store(self, appkey: str, service: str, live: Node) -> bool:
        """True when the newer revision ``live`` carries came through the settings store, so it
        was made on top of ours (another operator's change right after this one)."""
        try:
            stored = self._store.get(appkey, service, live.host, live.port)
        except SettingsError:
            return False
        return stored is not None and stored.rev >= live.rev

    # -- following ------------------------------------------------------------------------------

    def watch(
        self, on_event: Callable[[FleetEvent], None], appkey: Optional[str] = None, service: Optional[str] = None
    ) -> Callable[[], None]:
        """Report joins, leaves and changes as they happen; return a function that stops it.
        Raises InvalidArgument for a malformed appkey or service, BackendError.

        Nodes present at the start are reported as joins. ``on_event`` runs on kazoo's worker
        thread: keep it short.
        """
        _check_filter(appkey, service)
        lock = threading.Lock()
        watches: Dict[str, Watch] = {}
        stopped = threading.Event()
        stop_appkeys: Optional[Callable[[], None]] = None

        def follow(key: str) -> None:
            with lock:
                if stopped.is_set() or key in watches:
                    return
                watches[key] = self._registry.watch(self.env, key, service, _EventSink(key, on_event, stopped))

        if appkey:
            follow(appkey)
        else:

            def on_appkeys(children: List[str]) -> None:
                for key in children:
                    follow(key)

            stop_appkeys = self._registry.watch_appkeys(self.env, on_appkeys)

        def stop() -> None:
            stopped.set()
            if stop_appkeys is not None:
                stop_appkeys()
            with lock:
                for w in watches.values():
                    w.close()
                watches.clear()

        return stop

    def close(self) -> None:
        self._registry.close()
        self._store.close()

    def __enter__(self) -> "Governance":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _EventSink:
    """A NodeListener that turns a registry watch's updates into FleetEvents for one appkey."""

    def __init__(self, appkey: str, on_event: Callable[[FleetEvent], None], stopped: threading.Event) -> None:
        self._appkey = appkey
        self._on_event = on_event
        self._stopped = stopped
        self._nodes: Dict[str, Node] = {}

    def upsert(self, name: str, node: Node) -> None:
        old = self._nodes.get(name)
        self._nodes[name] = node
        if old is not None and (old.weight, old.valid) == (node.weight, node.valid):
            return
        self._emit(FleetEvent("join" if old is None else "change", self._appkey, name.rsplit("_", 2)[0], node, old))

    def remove(self, name: str) -> None:
        old = self._nodes.pop(name, None)
        if old is not None:
            self._emit(FleetEvent("leave", self._appkey, name.rsplit("_", 2)[0], old))

    def remove_many(self, names: Iterable[str]) -> None:
        for name in names:
            self.remove(name)

    def _emit(self, event: FleetEvent) -> None:
        if not self._stopped.is_set():
            self._on_event(event)
