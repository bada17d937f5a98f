"""MySQL: the audit trail of operators' changes to request limits (table ``limits_audit``).

One row per change of one method's limits (``"*"``: the service as a whole): who, from where
(``cli``, ``console``), the method's limits before and after as JSON (NULL: none), the service's
revision after the change, and whether it was pushed to the running providers. A change that
replaced a corrupt record (``thriftprobe limit set/clear/reset`` over it) says so: its
``old_limit`` JSON carries the key ``"corrupt_record"`` with the start of the bytes it replaced
(beside the method's limits, if the providers had been pushed any). Connections are
short-lived (see ``stores.mysql``): thread- and fork-safe.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Any, Dict, List, Optional, Tuple

from ..config import MysqlConfig
from ..errors import InvalidArgument
from ..limits import MethodLimit, plain_number
from .mysql import check_insertable, connect

__all__ = ["CORRUPT_KEY", "LimitsAuditEntry", "check_ready", "excerpt", "history", "record"]

TABLE = "limits_audit"
_TEXT_FIELDS = ("actor", "source", "env", "appkey", "service", "method")
_INSERT_COLUMNS = (
    "actor", "source", "env", "appkey", "service", "method", "old_limit", "new_limit", "rev", "pushed",
)  # fmt: skip
_INSERT = "INSERT INTO limits_audit (%s) VALUES (%s)" % (
    ", ".join(_INSERT_COLUMNS),
    ", ".join(["%s"] * len(_INSERT_COLUMNS)),
)


@dataclass(frozen=True)
class LimitsAuditEntry:
    """One recorded change of one method's limits. ``old`` / ``new``: None when there were none
    (a first limit, a cleared one)."""

    changed_at: str
    actor: str
    source: str
    env: str
    appkey: str
    service: str
    method: str
    old: Optional[MethodLimit]
    new: Optional[MethodLimit]
    rev: int
    pushed: bool
    corrupt: Optional[str] = None
    """The start of the corrupt record this change replaced; None for an ordinary change."""

    def to_dict(self) -> Dict[str, Any]:
        data = asdict(self)
        data["old"] = None if self.old is None else self.old.to_dict()
        data["new"] = None if self.new is None else self.new.to_dict()
        return data

    def describe(self) -> str:
        return "%s %s (%s) %s/%s %s: %s%s -> %s (rev %d%s)" % (
            self.changed_at,
            self.actor,
            self.source,
            self.appkey,
            self.service,
            self.method,
            "" if self.corrupt is None else "replaced corrupt record %r, " % self.corrupt,
            describe_limit(self.old),
            describe_limit(self.new),
            self.rev,
            "" if self.pushed else ", not pushed",
        )


def describe_limit(limit: Optional[MethodLimit]) -> str:
    """``qps 200 burst 20 concurrency 8``, or ``none``."""
    if limit is None or limit.empty:
        return "none"
    parts = []
    if limit.qps is not None:
        parts.append("qps %s" % plain_number(limit.qps))
        parts.append("burst %d%s" % (limit.bucket or 0, "" if limit.burst is not None else " (default)"))
    if limit.concurrency is not None:
        parts.append("concurrency %d" % limit.concurrency)
    return " ".join(parts)


_COLUMN_WIDTH = 255  # old_limit, new_limit
CORRUPT_KEY = "corrupt_record"


def _json(limit: Optional[MethodLimit], corrupt: Optional[str] = None) -> Optional[str]:
    data: Dict[str, Any] = {} if limit is None or limit.empty else limit.to_dict()
    if corrupt is not None:
        # As much of the corrupt bytes as the column holds beside the limits (escaping may grow it).
        for size in (160, 120, 80, 40, 0):
            data[CORRUPT_KEY] = corrupt[:size]
            text = json.dumps(data, sort_keys=True, separators=(",", ":"))
            if len(text) <= _COLUMN_WIDTH:
                return text
    if not data:
        return None
    return json.dumps(data, sort_keys=True, separators=(",", ":"))


def excerpt(raw: Optional[bytes]) -> str:
    """The start of a corrupt record, as text, for an audit row."""
    return (raw or b"").decode("utf-8", "replace")[:160]


def _row(entry: LimitsAuditEntry) -> Tuple[Any, ...]:
    return (
        entry.actor, entry.source, entry.env, entry.appkey, entry.service, entry.method,
        _json(entry.old, entry.corrupt), _json(entry.new), entry.rev, int(entry.pushed),
    )  # fmt: skip


def check_ready(cfg: MysqlConfig, entry: LimitsAuditEntry) -> None:
    """Raise unless ``entry``, a change about to be made, can be recorded; called before anything
    changes, so that no change is made that cannot be audited.

    BackendError when the table lacks a column (run ``thriftprobe db init``) or this MySQL user
    cannot INSERT into it (a trial insert, rolled back); InvalidArgument naming the field when a
    text is longer than its column.
    """
    texts = {name: getattr(entry, name) for name in _TEXT_FIELDS}
    check_insertable(cfg, TABLE, _INSERT, _INSERT_COLUMNS, texts, _row(entry))


def record(cfg: MysqlConfig, entry: LimitsAuditEntry) -> None:
    """Append one change; ``entry.changed_at`` is ignored (the database clock stamps it).
    Raises BackendError."""
    with connect(cfg) as conn, conn.cursor() as cur:
        cur.execute(_INSERT, _row(entry))


def _limit(raw: Optional[str]) -> Tuple[Optional[MethodLimit], Optional[str]]:
    """The limits in a column, and the corrupt record the change replaced (if it says so)."""
    if raw is None:
        return None, None
    try:
        data = json.loads(raw)
        corrupt = data.pop(CORRUPT_KEY, None) if isinstance(data, dict) else None
        limit = MethodLimit.from_dict(data)
    except (ValueError, TypeError):
        return None, None  # a row edited by hand: shown as none rather than failing the whole history
    return (None if limit.empty else limit), (None if corrupt is None else str(corrupt))


def history(
    cfg: MysqlConfig, env: str, appkey: Optional[str] = None, service: Optional[str] = None, limit: int = 50
) -> List[LimitsAuditEntry]:
    """The newest ``limit`` (>= 1) changes of limits in an environment (or of one appkey /
    service), newest first. Raises InvalidArgument for a limit below 1, BackendError."""
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
            "SELECT changed_at, actor, source, env, appkey, service, method, old_limit, new_limit, rev, pushed"
            " FROM limits_audit WHERE " + " AND ".join(where) + " ORDER BY id DESC LIMIT %s",
            (*params, limit),
        )
        rows = cur.fetchall()
    return [
        LimitsAuditEntry(
            changed_at=row[0].isoformat(sep=" ", timespec="milliseconds"),
            actor=row[1],
            source=row[2],
            env=row[3],
            appkey=row[4],
            service=row[5],
            method=row[6],
            old=_limit(row[7])[0],
            new=_limit(row[8])[0],
            rev=int(row[9]),
            pushed=bool(row[10]),
            corrupt=_limit(row[7])[1],
        )
        for row in rows
    ]
