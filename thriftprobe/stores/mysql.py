"""MySQL: connections and the schema (``serviceapp`` for appkeys, ``settings_audit`` for changes).

Connections are short-lived, one per operation, and always closed; nothing here is shared, so it
is thread- and fork-safe. The only identifier spliced into SQL is the database name, which config
validation restricts to ``^\\w+$``; every value is a query parameter.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from typing import Iterator, List, Tuple

import pymysql

from ..config import MysqlConfig
from ..errors import BackendError

__all__ = ["TABLES", "connect", "create_schema", "missing_schema"]

log = logging.getLogger(__name__)

_TABLES_DDL: Tuple[Tuple[str, str], ...] = (
    (
        "serviceapp",
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
    ),
    (
        "settings_audit",
        """
        CREATE TABLE IF NOT EXISTS settings_audit (
            id          BIGINT UNSIGNED NOT NULL AUTO_INCREMENT PRIMARY KEY,
            changed_at  TIMESTAMP(3)    NOT NULL DEFAULT CURRENT_TIMESTAMP(3),
            actor       VARCHAR(128)    NOT NULL,
            source      VARCHAR(16)     NOT NULL,
            env         VARCHAR(64)     NOT NULL,
            appkey      VARCHAR(128)    NOT NULL,
            service     VARCHAR(128)    NOT NULL,
            host        VARCHAR(64)     NOT NULL,
            port        INT UNSIGNED    NOT NULL,
            old_weight  INT NULL,
            old_valid   TINYINT NULL,
            new_weight  INT NOT NULL,
            new_valid   TINYINT NOT NULL,
            rev         BIGINT UNSIGNED NOT NULL,
            live        TINYINT NOT NULL,
            KEY ix_settings_audit_node (env, appkey, service, changed_at)
        ) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4
        """,
    ),
)

TABLES = tuple(name for name, _ in _TABLES_DDL)

# Columns added after the original design's serviceapp (which had the appkey alone).
_UPGRADES = {
    "serviceapp": (
        ("owner", "VARCHAR(128) NOT NULL DEFAULT ''"),
        ("description", "VARCHAR(512) NOT NULL DEFAULT ''"),
        ("created_at", "TIMESTAMP NOT NULL DEFAULT CURRENT_TIMESTAMP"),
    ),
}


@contextmanager
def connect(cfg: MysqlConfig, with_database: bool = True) -> Iterator[pymysql.connections.Connection]:
    """A fresh autocommit connection, closed on exit; MySQL errors become BackendError."""
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


def _columns(cur: pymysql.cursors.Cursor, database: str, table: str) -> List[str]:
    cur.execute(
        "SELECT column_name FROM information_schema.columns WHERE table_schema = %s AND table_name = %s",
        (database, table),
    )
    return [row[0].lower() for row in cur.fetchall()]


def create_schema(cfg: MysqlConfig) -> List[str]:
    """Create the database and tables, and add columns an older ``serviceapp`` lacks. Idempotent.

    Returns what it did, one line per change (empty when the schema was already current).
    """
    done: List[str] = []
    with connect(cfg, with_database=False) as conn, conn.cursor() as cur:
        if cur.execute("CREATE DATABASE IF NOT EXISTS `%s` DEFAULT CHARACTER SET utf8mb4" % cfg.database):
            done.append("created database %s" % cfg.database)
        cur.execute("USE `%s`" % cfg.database)
        for table, ddl in _TABLES_DDL:
            present = _columns(cur, cfg.database, table)
            if not present:
                cur.execute(ddl)
                done.append("created table %s" % table)
                continue
            for column, definition in _UPGRADES.get(table, ()):
                if column not in present:
                    cur.execute("ALTER TABLE `%s` ADD COLUMN `%s` %s" % (table, column, definition))
                    done.append("added column %s.%s" % (table, column))
    for line in done:
        log.info("%s: %s", cfg.describe(), line)
    return done


def missing_schema(cfg: MysqlConfig) -> List[str]:
    """What ``create_schema`` would still have to do: missing tables and columns (empty if none)."""
    missing: List[str] = []
    with connect(cfg, with_database=False) as conn, conn.cursor() as cur:
        for table, _ in _TABLES_DDL:
            present = _columns(cur, cfg.database, table)
            if not present:
                missing.append("table %s" % table)
                continue
            missing.extend(
                "column %s.%s" % (table, column) for column, _ in _UPGRADES.get(table, ()) if column not in present
            )
    return missing
