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

Request limits (``set_limit``, ``clear_limit``) go the same way: the appkey is checked; the
service's limits are changed in Redis with compare-and-set (the commit point; a change that
lost a race with another operator's is made again on top of it); pushed to the providers
through the registry (only a higher revision replaces what is there); audited in
``limits_audit``. A push that fails is reported, never passed off as applied: the providers read
the record from Redis at their next audit, reconnection or restart.
"""

from __future__ import annotations

import dataclasses
import getpass
import logging
import math
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, List, Optional, Set, Tuple

from ..config import Config
from ..consumer.tiers import warmup_factor
from ..errors import BackendError, ConcurrentChange, InvalidArgument, SettingsError
from ..limits import ALL_METHODS, MethodLimit, ServiceLimits, check_method
from ..node import MAX_WEIGHT, Node, validate_appkey, validate_host, validate_names
from ..registry import Watch, open_registry
from ..stores import audit, limits_audit
from ..stores.appkeys import check_appkey
from ..stores.limits import LimitsStore
from ..stores.settings import NodeSettingsStore

__all__ = [
    "Change", "Dependencies", "FleetEvent", "Governance", "LimitChange", "LimitsView", "NodeView", "current_user",
]  # fmt: skip

_LIMIT_ATTEMPTS = 50

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
class LimitChange:
    """What ``set_limit`` / ``clear_limit`` did to one method's limits (``"*"``: the service as a
    whole). ``old`` / ``new`` are None when there were none / there are none now; ``limits``
    are the service's limits as stored after the change; ``pushed`` says whether they reached
    the registry the providers watch."""

    env: str
    appkey: str
    service: str
    method: str
    old: Optional[MethodLimit]
    new: Optional[MethodLimit]
    limits: ServiceLimits
    pushed: bool
    replaced_corrupt: Optional[str] = None
    """The start of the corrupt record this change replaced (None: the record was sound)."""
    dropped: Optional[List[str]] = None
    """For ``reset_limits``: the methods whose limits were dropped (None for set / clear)."""
    warnings: Tuple[str, ...] = ()
    """What the operator should check: no live provider of the service, a method they do not have."""

    def to_dict(self) -> Dict[str, Any]:
        data: Dict[str, Any] = {
            "env": self.env,
            "appkey": self.appkey,
            "service": self.service,
            "method": self.method,
            "old": None if self.old is None else self.old.to_dict(),
            "new": None if self.new is None else self.new.to_dict(),
            "rev": self.limits.rev,
            "limits": self.limits.to_dict(),
            "pushed": self.pushed,
            "replaced_corrupt": self.replaced_corrupt,
            "warnings": list(self.warnings),
        }
        if self.dropped is not None:
            data["dropped"] = self.dropped
        return data


@dataclass(frozen=True)
class LimitsView:
    """One service's limits as an operator sees them: the record in Redis (``limits``; None and
    ``problem`` when it is corrupt, or when there is none: ``recorded`` False) and what was pushed
    to its providers (``pushed``: None when nothing was, or the registry could not be read).

    Providers follow the higher revision of the two (a provider never goes back to a lower one):
    ``follows`` says which, and ``in_step`` whether both say the same."""

    env: str
    appkey: str
    service: str
    limits: Optional[ServiceLimits]
    pushed_rev: Optional[int]
    problem: Optional[str] = None
    pushed: Optional[ServiceLimits] = None
    recorded: bool = True
    """False when Redis holds no record of the service (never set, or lost) and ``limits`` is None."""

    @property
    def in_step(self) -> bool:
        """Whether the providers were pushed exactly the record (same revision, same limits), or
        neither holds any limit."""
        if self.limits is None:
            return False
        if self.pushed is None:
            return self.limits.rev == 0 and not self.limits.methods
        return self.pushed == self.limits

    @property
    def follows(self) -> str:
        """What the providers follow: ``"record"`` (Redis; also when both agree), ``"pushed"``
        (ZooKeeper: a higher revision than the record's, or the record is lost or corrupt), or
        ``"either"`` (both at one revision, with different limits: each provider keeps the one it
        saw first)."""
        if self.pushed is None:
            return "record"
        if self.limits is None or self.pushed.rev > self.limits.rev:
            return "pushed"
        if self.pushed.rev == self.limits.rev and self.pushed != self.limits:
            return "either"
        return "record"

    @property
    def in_force(self) -> Optional[ServiceLimits]:
        """The limits the providers follow (None: unknown, see ``follows`` and ``problem``)."""
        if self.follows == "pushed":
            return self.pushed
        return self.limits if self.follows == "record" else None

    def to_dict(self) -> Dict[str, Any]:
        data: Dict[str, Any] = {
            "env": self.env,
            "appkey": self.appkey,
            "service": self.service,
            "rev": None if self.limits is None else self.limits.rev,
            "methods": None if self.limits is None else self.limits.to_dict()["methods"],
            "pushed_rev": self.pushed_rev,
            "pushed_methods": None if self.pushed is None else self.pushed.to_dict()["methods"],
            "in_step": self.in_step,
            "follows": self.follows,
            "recorded": self.recorded,
        }
        if self.problem is not None:
            data["problem"] = self.problem
        return data


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


def _check_actor(actor: Optional[str]) -> str:
    actor = actor or current_user()
    if not isinstance(actor, str) or not actor.isprintable():
        # A newline in the actor would forge a line of 'thriftprobe history'.
        raise InvalidArgument("actor %r is invalid: it must be printable text" % (actor,))
    return actor


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
            self._limits_store = LimitsStore(cfg.redis, cfg.env)
        except BaseException:
            self._store.close()
            raise
        try:
            self._registry = open_registry(cfg)
        except BaseException:
            self._store.close()
            self._limits_store.close()
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
        actor = _check_actor(actor)
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

    # -- request limits -------------------------------------------------------------------------

    def set_limit(
        self,
        appkey: str,
        service: str,
        method: str,
        *,
        qps: Optional[float] = None,
        burst: Optional[int] = None,
        concurrency: Optional[int] = None,
        actor: Optional[str] = None,
    ) -> LimitChange:
        """Set the limits of one method of a service (``"*"``: of the service as a whole), per
        provider node, replacing those it had; see the module docstring for the steps.

        ``qps`` (requests per second, a token bucket of ``burst`` tokens: by default a tenth of
        a second's worth) and/or ``concurrency`` (requests admitted and not yet answered).
        The method is not refused for being unknown (governance does not load the IDL): any Thrift
        identifier, or ``"*"``; but the change's ``warnings`` say when no live node of the service
        runs, or when the live nodes (which list their methods in the registry) have no such
        method. A corrupt record is replaced (compare-and-set against its exact
        bytes) by the limits the providers were pushed, changed, at a revision above both; the
        change says so (``replaced_corrupt``) and so does its audit row. Raises InvalidArgument
        (bad names or values; nothing to set), AppkeyNotRegistered, BackendError (also when the
        change is stored and audited but could not be pushed: said so).
        """
        limit = MethodLimit(qps, burst, concurrency)
        if limit.empty:
            raise InvalidArgument("nothing to set: give qps and/or concurrency (clearing a method's limits is "
                                  "clear_limit / 'thriftprobe limit clear')")
        change = self._change_limit(appkey, service, method, limit, actor)
        assert change is not None  # a limit that is set always changes the record
        return dataclasses.replace(change, warnings=self._limit_warnings(appkey, service, method))

    def _limit_warnings(self, appkey: str, service: str, method: str) -> Tuple[str, ...]:
        """What is odd about a limit just set, as far as the live nodes tell (their znodes list
        their methods): no live node of the service, or none that has the method. Best effort:
        nothing when the registry cannot be read."""
        try:
            nodes = [node for svc, node in self._registry.nodes(self.env, appkey) if svc == service]
        except BackendError as err:
            log.warning("cannot list the live nodes of %s/%s to check the limit: %s", appkey, service, err)
            return ()
        if not nodes:
            return ("no live provider of %s/%s in env %s: the limit applies when one starts; check the service's "
                    "name" % (appkey, service, self.env),)
        advertised: Set[str] = set()
        for node in nodes:
            names = node.extras.get("methods")
            if isinstance(names, list):
                advertised.update(n for n in names if isinstance(n, str))
        if method != ALL_METHODS and advertised and method not in advertised:
            return ("the live providers of %s/%s have no method %r (they have: %s): this limit limits nothing; "
                    "check the method's name" % (appkey, service, method, ", ".join(sorted(advertised))),)
        return ()

    def clear_limit(
        self, appkey: str, service: str, method: str, *, actor: Optional[str] = None
    ) -> Optional[LimitChange]:
        """Remove the limits of one method (``"*"``: the service-wide ones). Returns None, and
        changes and audits nothing, when the method had none and the record is not corrupt.
        Raises as ``set_limit``."""
        return self._change_limit(appkey, service, method, None, actor)

    def reset_limits(self, appkey: str, service: str, *, actor: Optional[str] = None) -> Optional[LimitChange]:
        """Drop every limit of a service: the record becomes "no limits" at a revision above the
        record's and the pushed ones, pushed and audited (one row per method dropped). It also
        replaces a corrupt record, whatever it holds. Returns None, and changes nothing, when the
        service has no limits stored or pushed and its record is not corrupt. Raises as
        ``set_limit``."""
        return self._change_limit(appkey, service, ALL_METHODS, None, actor, reset=True)

    def _change_limit(
        self,
        appkey: str,
        service: str,
        method: str,
        limit: Optional[MethodLimit],
        actor: Optional[str],
        *,
        reset: bool = False,
    ) -> Optional[LimitChange]:
        validate_names(appkey, service)
        check_method(method)
        actor = _check_actor(actor)
        check_appkey(self.cfg.mysql, self.env, appkey)
        entry = limits_audit.LimitsAuditEntry(
            "", actor, self._source, self.env, appkey, service, method, None, limit, 0, False
        )
        # Fail before changing anything: a change the audit table cannot record is never made.
        limits_audit.check_ready(self.cfg.mysql, entry)
        # Revisions never go backwards: when Redis lost the record, the change starts from what
        # the providers were pushed, or they would ignore it.
        try:
            pushed_before = self._registry.live_limits(self.env, appkey, service)
        except BackendError as err:  # the push below says what happened
            log.warning("cannot read the pushed limits of %s/%s: %s", appkey, service, err)
            pushed_before = None
        for _ in range(_LIMIT_ATTEMPTS):
            record = self._limits_store.read(appkey, service)
            # What the providers follow: the higher revision of the record and the push. A corrupt
            # record is replaced by what they were pushed (they never applied it), changed.
            base = record.limits if record.limits is not None else ServiceLimits()
            if pushed_before is not None and (record.corrupt or pushed_before.rev > base.rev):
                base = pushed_before
            old = base.get(method)
            dropped: Dict[str, MethodLimit] = dict(base.methods) if reset else {}
            if limit is None and not record.corrupt and not (dropped if reset else old):
                return None  # nothing to clear (or to reset), and nothing to repair
            rev = max(record.rev, base.rev) + 1
            new_limits = ServiceLimits(rev=rev) if reset else base.with_method(method, limit, rev)
            try:
                stored = self._limits_store.replace(appkey, service, record, new_limits)
                break
            except ConcurrentChange:
                log.debug("concurrent change of the limits of %s/%s; retrying on top of it", appkey, service)
        else:
            raise BackendError("gave up changing the limits of %s/%s after %d concurrent changes"
                               % (appkey, service, _LIMIT_ATTEMPTS))
        corrupt = limits_audit.excerpt(record.raw) if record.corrupt else None
        if corrupt is not None:
            log.warning("replaced the corrupt limits record of %s/%s/%s (%r) with rev %d", self.env, appkey, service,
                        corrupt, stored.rev)
        # Stored: from here on the change is real (providers read it at their next audit), so
        # it is audited whatever happens to the push.
        push_error: Optional[BackendError] = None
        try:
            now = self._registry.publish_limits(self.env, appkey, service, stored)
            pushed = now.rev >= stored.rev
        except BackendError as err:
            pushed, push_error = False, err
        change = LimitChange(self.env, appkey, service, method, old, stored.get(method), stored, pushed,
                             replaced_corrupt=corrupt, dropped=sorted(dropped) if reset else None)
        rows: List[Tuple[str, Optional[MethodLimit]]] = sorted(dropped.items()) if reset else [(method, old)]
        if not rows:
            rows = [(ALL_METHODS, None)]  # a reset of a corrupt record when no valid limits were pushed
        try:
            for i, (name, before) in enumerate(rows):
                limits_audit.record(self.cfg.mysql, dataclasses.replace(
                    entry, method=name, old=before, new=stored.get(name), rev=stored.rev, pushed=pushed,
                    corrupt=corrupt if i == 0 else None,
                ))
        except BackendError as err:
            raise BackendError(
                "the limits change (rev %d) is stored%s, but its audit record failed: %s"
                % (stored.rev, " and pushed" if pushed else "", err)
            ) from err
        if push_error is not None:
            raise BackendError(
                "the limits change (rev %d) is stored and audited, but was not pushed to the running providers (%s); "
                "each reads it from Redis at its next audit (every 30 s by default), when it reconnects to the "
                "registry, or when it restarts" % (stored.rev, push_error)
            ) from push_error
        log.info("%s %s the limits of %s/%s/%s %s: %s (rev %d)", actor,
                 "reset" if reset else "set" if limit else "cleared", self.env, appkey, service, method,
                 change.to_dict()["new"], stored.rev)
        return change

    def limits(self, appkey: Optional[str] = None, service: Optional[str] = None) -> List[LimitsView]:
        """Every service of the environment with limits stored or pushed (of one appkey; of one
        service of it, shown even without limits): the record and what its providers were pushed,
        side by side (``LimitsView``). A service whose limits exist only in the registry (Redis lost
        the record) is listed with ``recorded`` False. Raises InvalidArgument for a malformed appkey
        or service, BackendError."""
        _check_filter(appkey, service)
        if service is not None and appkey is None:
            raise InvalidArgument("a service needs its appkey")
        found: Dict[Tuple[str, str], Tuple[Optional[ServiceLimits], Optional[str], bool]] = {}
        if appkey is not None and service is not None:
            record = self._limits_store.read(appkey, service)
            found[(appkey, service)] = (record.limits, record.problem, record.raw is not None)
            names = [(appkey, service)]
        else:
            for key, svc, stored, problem in self._limits_store.scan(appkey):
                found[(key, svc)] = (stored, problem, True)
            try:
                names = sorted(set(found) | set(self._registry.limited_services(self.env, appkey)))
            except BackendError as err:
                log.warning("cannot list the pushed limits of %s: %s", self.env, err)
                names = sorted(found)
        views = []
        for key, svc in names:
            stored, problem, recorded = found.get((key, svc), (None, None, False))
            try:
                live = self._registry.live_limits(self.env, key, svc)
            except BackendError as err:
                log.warning("cannot read the pushed limits of %s/%s: %s", key, svc, err)
                live = None
            if not recorded:
                if live is None and service is None:
                    continue  # listed, then gone
                stored = None if live is not None else ServiceLimits()
            views.append(LimitsView(self.env, key, svc, stored, None if live is None else live.rev, problem, live,
                                    recorded))
        return views

    def limits_history(
        self, appkey: Optional[str] = None, service: Optional[str] = None, limit: int = 50
    ) -> List[limits_audit.LimitsAuditEntry]:
        """The newest ``limit`` changes of request limits (of one appkey / service), newest first."""
        _check_filter(appkey, service)
        return limits_audit.history(self.cfg.mysql, self.env, appkey, service, limit)

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
        self._limits_store.close()

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
