"""MySQL: the ``serviceapp`` schema and the question "is this appkey registered?".

Every function opens its own short-lived connection and closes it; nothing here is shared, so
all of it is thread- and fork-safe. SQL is parameterised; the only identifier spliced into SQL is
the database name, which config validation restricts to ``^\\w+$``.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from typing import Iterator, List, Tuple

import pymysql

from .config import MysqlConfig
from .errors import AppkeyNotRegistered, BackendError

__all__ = ["TABLE", "SCHEMA", "create_schema", "add_appkey", "list_appkeys", "check_appkey"]

log = logging.getLogger(__name__)

TABLE = "serviceapp"

SCHEMA: Tuple[str, ...] = (
    """
    CREATE TABLE IF NOT EXISTS serviceapp (
        id          BIGINT UNSIGNED NOT NULL AUTO_INCREMENT PRIMARY KEY,
        appkey      VARCHAR(128)    NOT NULL,
        owner       VARCHAR(128)    NOT NULL DEFAULT '',
        description VARCHAR(512)    NOT NULL DEFAULT '',
        created_at  TIMESTAMP       NOT NULL DEFAULT CURRENT_TIMESTAMP,
        UNIQUE KEY uk_serviceapp_appkey (appkey)
    ) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4
    """,
)


@contextmanager
def _connect(cfg: MysqlConfig, with_database: bool = True) -> Iterator[pymysql.connections.Connection]:
    try:
        conn = pymysql.connect(
            host=cfg.host,
            port=cfg.port,
            user=cfg.username,
            password=cfg.password,
            database=cfg.database if with_database else None,
            connect_timeout=cfg.connect_timeout,
            read_timeout=max(cfg.connect_timeout, 5.0),
            write_timeout=max(cfg.connect_timeout, 5.0),
            charset="utf8mb4",
            autocommit=True,
            ssl_disabled=not cfg.ssl,
        )
    except pymysql.MySQLError as err:
        raise BackendError("cannot connect to %s as %r: %s" % (cfg.describe(), cfg.username, err)) from err
    try:
        yield conn
    except pymysql.MySQLError as err:
        raise BackendError("%s failed: %s" % (cfg.describe(), err)) from err
    finally:
        conn.close()


def create_schema(cfg: MysqlConfig) -> None:
    """Create the database and tables if they are missing. Idempotent."""
    with _connect(cfg, with_database=False) as conn, conn.cursor() as cur:
        cur.execute("CREATE DATABASE IF NOT EXISTS `%s` DEFAULT CHARACTER SET utf8mb4" % cfg.database)
        cur.execute("USE `%s`" % cfg.database)
        for statement in SCHEMA:
            cur.execute(statement)
    log.info("schema ready in %s", cfg.describe())


def add_appkey(cfg: MysqlConfig, appkey: str, owner: str = "", description: str = "") -> bool:
    """Register an appkey. Returns False if it was already registered (nothing is changed)."""
    with _connect(cfg) as conn, conn.cursor() as cur:
        added = cur.execute(
            "INSERT IGNORE INTO serviceapp (appkey, owner, description) VALUES (%s, %s, %s)",
            (appkey, owner, description),
        )
    return bool(added)


def list_appkeys(cfg: MysqlConfig) -> List[str]:
    with _connect(cfg) as conn, conn.cursor() as cur:
        cur.execute("SELECT appkey FROM serviceapp ORDER BY appkey")
        return [row[0] for row in cur.fetchall()]


def check_appkey(cfg: MysqlConfig, env: str, appkey: str) -> None:
    """Raise AppkeyNotRegistered unless ``appkey`` is in ``serviceapp``; BackendError if MySQL fails."""
    with _connect(cfg) as conn, conn.cursor() as cur:
        cur.execute("SELECT 1 FROM serviceapp WHERE appkey = %s LIMIT 1", (appkey,))
        found = cur.fetchone() is not None
    if not found:
        raise AppkeyNotRegistered("appkey %r is not in table %s of %s (env %s)" % (appkey, TABLE, cfg.describe(), env))
