"""MySQL: which appkeys are registered (table ``serviceapp``). Thread- and fork-safe."""

from __future__ import annotations

from dataclasses import dataclass
from typing import List

from ..config import MysqlConfig
from ..errors import AppkeyNotRegistered
from .mysql import connect

__all__ = ["TABLE", "Appkey", "add_appkey", "check_appkey", "list_appkeys", "remove_appkey"]

TABLE = "serviceapp"


@dataclass(frozen=True)
class Appkey:
    appkey: str
    owner: str
    description: str
    created_at: str


def add_appkey(cfg: MysqlConfig, appkey: str, owner: str = "", description: str = "") -> bool:
    """Register an appkey. Returns False if it was already registered (nothing is changed)."""
    with connect(cfg) as conn, conn.cursor() as cur:
        added = cur.execute(
            "INSERT IGNORE INTO serviceapp (appkey, owner, description) VALUES (%s, %s, %s)",
            (appkey, owner, description),
        )
    return bool(added)


def remove_appkey(cfg: MysqlConfig, appkey: str) -> bool:
    """Unregister an appkey. Returns False if it was not registered."""
    with connect(cfg) as conn, conn.cursor() as cur:
        return bool(cur.execute("DELETE FROM serviceapp WHERE appkey = %s", (appkey,)))


def list_appkeys(cfg: MysqlConfig) -> List[Appkey]:
    with connect(cfg) as conn, conn.cursor() as cur:
        cur.execute("SELECT appkey, owner, description, created_at FROM serviceapp ORDER BY appkey")
        return [Appkey(a, o, d, str(c)) for a, o, d, c in cur.fetchall()]


def check_appkey(cfg: MysqlConfig, env: str, appkey: str) -> None:
    """Raise AppkeyNotRegistered unless ``appkey`` is in ``serviceapp``; BackendError if MySQL fails."""
    with connect(cfg) as conn, conn.cursor() as cur:
        cur.execute("SELECT 1 FROM serviceapp WHERE appkey = %s LIMIT 1", (appkey,))
        found = cur.fetchone() is not None
    if not found:
        raise AppkeyNotRegistered("appkey %r is not in table %s of %s (env %s)" % (appkey, TABLE, cfg.describe(), env))
