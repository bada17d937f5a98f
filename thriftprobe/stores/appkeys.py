"""MySQL: which appkeys are registered (table ``serviceapp``). Thread- and fork-safe."""

from __future__ import annotations

from dataclasses import dataclass
from typing import List

import pymysql

from ..config import MysqlConfig
from ..errors import AppkeyNotRegistered
from ..node import validate_appkey
from .mysql import connect

_DUPLICATE_ENTRY = 1062  # MySQL ER_DUP_ENTRY

__all__ = ["TABLE", "Appkey", "add_appkey", "check_appkey", "list_appkeys", "remove_appkey"]

TABLE = "serviceapp"


@dataclass(frozen=True)
class Appkey:
    appkey: str
    owner: str
    description: str
    created_at: str


def add_appkey(cfg: MysqlConfig, appkey: str, owner: str = "", description: str = "") -> bool:
    """Register an appkey. Returns False if it was already registered (nothing is changed).

    Raises InvalidArgument for a malformed appkey, BackendError for anything MySQL refuses (a
    plain INSERT: INSERT IGNORE would store a too-long value cut short, and say it was added)."""
    validate_appkey(appkey)
    with connect(cfg) as conn, conn.cursor() as cur:
        try:
            cur.execute(
                "INSERT INTO serviceapp (appkey, owner, description) VALUES (%s, %s, %s)",
                (appkey, owner, description),
            )
        except pymysql.err.IntegrityError as err:
            if err.args and err.args[0] == _DUPLICATE_ENTRY:
                return False
            raise
    return True


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
