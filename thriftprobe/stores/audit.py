"""MySQL: the audit trail of operators' changes (table ``settings_audit``). Thread- and fork-safe."""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from typing import Any, Dict, List, Optional, Tuple

import pymysql

from ..config import MysqlConfig
from ..errors import InvalidArgument
from ..node import DEFAULT_WEIGHT
from .mysql import check_insertable, columns, connect, indexes

__all__ = ["ACTIONS", "AuditEntry", "check_ready", "history", "record", "recover_settings"]

log = logging.getLogger(__name__)

TABLE = "settings_audit"
_RECOVERY_INDEX = "ix_settings_audit_host"
# MySQL's "no such table", "unknown column" and "command / column denied": an audit trail this
# user cannot read is no trail.
_NO_TRAIL = (1146, 1054, 1142, 1143)
ACTIONS = ("set", "forget", "prune")
"""``set``: weight or on/off changed; ``forget``/``prune``: a node's stored settings removed."""

_TEXT_FIELDS = ("actor", "source", "action", "env", "appkey", "service", "host")
_INSERT_COLUMNS = (
    "actor", "source", "action", "env", "appkey", "service", "host", "port", "old_weight", "old_valid",
    "new_weight", "new_valid", "rev", "live",
)  # fmt: skip


@dataclass(frozen=True)
class AuditEntry:
    changed_at: str
    actor: str
    source: str
    env: str
    appkey: str
    service: str
    host: str
    port: int
    old_weight: Optional[int]
    old_valid: Optional[bool]
    new_weight: Optional[int]
    """None when the node's settings were removed (``forget``, ``prune``)."""
    new_valid: Optional[bool]
    rev: int
    live: bool
    action: str = "set"

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)

    def describe(self) -> str:
        old = "none" if self.old_weight is None else "weight %d %s" % (self.old_weight, _onoff(self.old_valid))
        if self.new_weight is None:
            new = "%s (settings removed)" % self.action
        else:
            new = "weight %d %s" % (self.new_weight, _onoff(self.new_valid))
        return "%s %s (%s) %s/%s %s:%d: %s -> %s%s" % (
            self.changed_at,
            self.actor,
            self.source,
            self.appkey,
            self.service,
            self.host,
            self.port,
            old,
            new,
            "" if self.live or self.action != "set" else " (not live)",
        )


def _onoff(valid: Optional[bool]) -> str:
    return "on" if valid else "off"


def _row(entry: AuditEntry) -> Tuple[Any, ...]:
    return (
        entry.actor,
        entry.source,
        entry.action,
        entry.env,
        entry.appkey,
        entry.service,
        entry.host,
        entry.port,
        entry.old_weight,
        None if entry.old_valid is None else int(entry.old_valid),
        entry.new_weight,
        None if entry.new_valid is None else int(entry.new_valid),
        entry.rev,
        int(entry.live),
    )


_INSERT = "INSERT INTO settings_audit (%s) VALUES (%s)" % (
    ", ".join(_INSERT_COLUMNS),
    ", ".join(["%s"] * len(_INSERT_COLUMNS)),
)


def check_ready(cfg: MysqlConfig, entry: AuditEntry) -> None:
    """Raise unless ``entry``, a change about to be made, can be recorded; called before anything
    changes, so that no change is ever made that cannot be audited.

    Checks that the table has every column (else BackendError: run ``thriftprobe db init``), that
    each text of the entry fits its column (else InvalidArgument naming the field, its length and
    the column's), and that this MySQL user may INSERT into it: a trial insert of the entry,
    rolled back (else BackendError). The values of the settings in ``entry`` do not matter.
    """
    if entry.action not in ACTIONS:
        raise InvalidArgument("audit action %r is not one of %s" % (entry.action, ", ".join(ACTIONS)))
    texts = {name: getattr(entry, name) for name in _TEXT_FIELDS}
    check_insertable(cfg, TABLE, _INSERT, _INSERT_COLUMNS, texts, _row(entry))


def record(cfg: MysqlConfig, entry: AuditEntry) -> None:
    """Append one change; ``entry.changed_at`` is ignored (the database clock stamps it)."""
    with connect(cfg) as conn, conn.cursor() as cur:
        cur.execute(_INSERT, _row(entry))


_NODE = "env = %s AND appkey = %s AND service = %s AND host = %s AND port = %s"


def recover_settings(
    cfg: MysqlConfig, env: str, appkey: str, service: str, host: str, port: int
) -> Optional[Tuple[int, bool, int]]:
    """What the audit trail says a node's settings are, as (weight, valid, rev), for a node whose
    Redis field is gone (Redis lost it); None when the trail knows nothing of the node.

    The settings are those of the highest revision set since the node's settings were last
    removed (``forget``, ``prune``): revisions are what orders changes, not the time their rows
    were written. After a removal with no change since, the defaults (weight 10, valid 1) at the
    removed settings' revision, so that revisions never go backwards across a removal.

    An audit table this version cannot use (missing, older schema without ``action``, no index
    on the node: run ``thriftprobe db init``; or no SELECT privilege) is logged and counts as an
    empty trail: the lookup must never scan a large table on every start. Raises BackendError if
    MySQL fails.
    """
    node = (env, appkey, service, host, port)
    with connect(cfg) as conn, conn.cursor() as cur:
        try:
            present = columns(cur, cfg.database, TABLE)
            missing = [c for c in ("action", "rev", "new_weight", "new_valid") if c not in present]
            if missing or _RECOVERY_INDEX not in indexes(cur, cfg.database, TABLE):
                log.warning(
                    "the audit table %s of %s %s; settings cannot be recovered from it (run 'thriftprobe db init')",
                    TABLE,
                    cfg.describe(),
                    "is missing" if not present else "lacks " + (", ".join(missing) or "index " + _RECOVERY_INDEX),
                )
                return None
            cur.execute(
                "SELECT id, rev FROM settings_audit WHERE " + _NODE + " AND action IN ('forget', 'prune')"
                " ORDER BY id DESC LIMIT 1",
                node,
            )
            removed = cur.fetchone()
            cur.execute(
                "SELECT new_weight, new_valid, rev FROM settings_audit WHERE " + _NODE + " AND action = 'set'"
                " AND id > %s AND new_weight IS NOT NULL AND new_valid IS NOT NULL ORDER BY rev DESC, id DESC LIMIT 1",
                (*node, 0 if removed is None else removed[0]),
            )
            row = cur.fetchone()
        except pymysql.MySQLError as err:
            if err.args and err.args[0] in _NO_TRAIL:
                log.warning(
                    "cannot read the audit table %s of %s (%s); no settings to recover", TABLE, cfg.describe(), err
                )
                return None
            raise  # connect() reports it
    if row is not None:
        return int(row[0]), bool(row[1]), int(row[2])
    if removed is not None:
        return DEFAULT_WEIGHT, True, int(removed[1])
    return None


def history(
    cfg: MysqlConfig, env: str, appkey: Optional[str] = None, service: Optional[str] = None, limit: int = 50
) -> List[AuditEntry]:
    """The newest ``limit`` (>= 1) changes of an environment (or of one appkey / service), newest first.

    Raises InvalidArgument for a limit below 1, BackendError if MySQL fails."""
    if not isinstance(limit, int) or isinstance(limit, bool) or limit < 1:
        raise InvalidArgument("limit must be an integer >= 1, got %r" % (limit,))
    where, params = ["env = %s"], [env]
    if appkey:
        where.append("appkey = %s")
        params.append(appkey)
    if service:
        where.append("service = %s")
        params.append(service)
    with connect(cfg) as conn, conn.cursor() as cur:
        cur.execute(
            "SELECT changed_at, actor, source, env, appkey, service, host, port, old_weight, old_valid,"
            " new_weight, new_valid, rev, live, action FROM settings_audit WHERE "
            + " AND ".join(where)
            + " ORDER BY id DESC LIMIT %s",
            (*params, limit),
        )
        rows = cur.fetchall()
    return [
        AuditEntry(
            changed_at=row[0].isoformat(sep=" ", timespec="milliseconds"),
            actor=row[1],
            source=row[2],
            env=row[3],
            appkey=row[4],
            service=row[5],
            host=row[6],
            port=int(row[7]),
            old_weight=row[8],
            old_valid=None if row[9] is None else bool(row[9]),
            new_weight=None if row[10] is None else int(row[10]),
            new_valid=None if row[11] is None else bool(row[11]),
            rev=int(row[12]),
            live=bool(row[13]),
            action=row[14],
        )
        for row in rows
    ]
