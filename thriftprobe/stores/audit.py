"""MySQL: the audit trail of operators' changes (table ``settings_audit``). Thread- and fork-safe."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Dict, List, Optional

from ..config import MysqlConfig
from .mysql import connect

__all__ = ["AuditEntry", "check_ready", "history", "record"]


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
    new_weight: int
    new_valid: bool
    rev: int
    live: bool

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)

    def describe(self) -> str:
        old = "none" if self.old_weight is None else "weight %d %s" % (self.old_weight, _onoff(self.old_valid))
        return "%s %s (%s) %s/%s %s:%d: %s -> weight %d %s%s" % (
            self.changed_at,
            self.actor,
            self.source,
            self.appkey,
            self.service,
            self.host,
            self.port,
            old,
            self.new_weight,
            _onoff(self.new_valid),
            "" if self.live else " (not live)",
        )


def _onoff(valid: Optional[bool]) -> str:
    return "on" if valid else "off"


def check_ready(cfg: MysqlConfig) -> None:
    """Raise BackendError unless the audit table can be written (checked before a change is made)."""
    with connect(cfg) as conn, conn.cursor() as cur:
        cur.execute("SELECT 1 FROM settings_audit LIMIT 0")


def record(cfg: MysqlConfig, entry: AuditEntry) -> None:
    """Append one change; ``entry.changed_at`` is ignored (the database clock stamps it)."""
    with connect(cfg) as conn, conn.cursor() as cur:
        cur.execute(
            "INSERT INTO settings_audit (actor, source, env, appkey, service, host, port, old_weight, old_valid,"
            " new_weight, new_valid, rev, live) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
            (
                entry.actor,
                entry.source,
                entry.env,
                entry.appkey,
                entry.service,
                entry.host,
                entry.port,
                entry.old_weight,
                None if entry.old_valid is None else int(entry.old_valid),
                entry.new_weight,
                int(entry.new_valid),
                entry.rev,
                int(entry.live),
            ),
        )


def history(
    cfg: MysqlConfig, env: str, appkey: Optional[str] = None, service: Optional[str] = None, limit: int = 50
) -> List[AuditEntry]:
    """The newest ``limit`` changes of an environment (or of one appkey / service), newest first."""
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
            " new_weight, new_valid, rev, live FROM settings_audit WHERE "
            + " AND ".join(where)
            + " ORDER BY id DESC LIMIT %s",
            (*params, int(limit)),
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
            new_weight=int(row[10]),
            new_valid=bool(row[11]),
            rev=int(row[12]),
            live=bool(row[13]),
        )
        for row in rows
    ]
