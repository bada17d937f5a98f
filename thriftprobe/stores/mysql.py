"""MySQL: connections and the schema (``serviceapp`` for appkeys, ``settings_audit`` for changes
of node settings, ``limits_audit`` for changes of request limits).

Connections are short-lived, one per operation, and always closed; nothing here is shared, so it
is thread- and fork-safe. The only identifier spliced into SQL is the database name, which config
validation restricts to ``^\\w+$``; every value is a query parameter.
"""

from __future__ import annotations

import logging
import ssl
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Optional, Tuple

import pymysql

from ..config import MysqlConfig
from ..errors import BackendError, InvalidArgument

__all__ = [
    "TABLES", "ColumnInfo", "columns", "connect", "create_schema", "indexes", "missing_indexes", "missing_schema",
    "outdated_columns",
]  # fmt: skip

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
            actor       VARCHAR(255)    NOT NULL,
            source      VARCHAR(16)     NOT NULL,
            action      VARCHAR(16)     NOT NULL DEFAULT 'set',
            env         VARCHAR(64)     NOT NULL,
            appkey      VARCHAR(128)    NOT NULL,
            service     VARCHAR(128)    NOT NULL,
            host        VARCHAR(255)    NOT NULL,
            port        INT UNSIGNED    NOT NULL,
            old_weight  INT NULL,
            old_valid   TINYINT NULL,
            new_weight  INT NULL,
            new_valid   TINYINT NULL,
            rev         BIGINT UNSIGNED NOT NULL,
            live        TINYINT NOT NULL,
            KEY ix_settings_audit_node (env, appkey, service, changed_at),
            KEY ix_settings_audit_host (env, appkey, service, host, port, id)
        ) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4
        """,
    ),
    (
        "limits_audit",
        """
        CREATE TABLE IF NOT EXISTS limits_audit (
            id          BIGINT UNSIGNED NOT NULL AUTO_INCREMENT PRIMARY KEY,
            changed_at  TIMESTAMP(3)    NOT NULL DEFAULT CURRENT_TIMESTAMP(3),
            actor       VARCHAR(255)    NOT NULL,
            source      VARCHAR(16)     NOT NULL,
            env         VARCHAR(64)     NOT NULL,
            appkey      VARCHAR(128)    NOT NULL,
            service     VARCHAR(128)    NOT NULL,
            method      VARCHAR(128)    NOT NULL,
            old_limit   VARCHAR(255)    NULL,
            new_limit   VARCHAR(255)    NULL,
            rev         BIGINT UNSIGNED NOT NULL,
            pushed      TINYINT         NOT NULL,
            KEY ix_limits_audit_service (env, appkey, service, id)
        ) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4
        """,
    ),
)

TABLES = tuple(name for name, _ in _TABLES_DDL)

# Columns added after a table was first created: the original design's serviceapp had the appkey
# alone; settings_audit gained ``action`` (set, forget, prune) in 0.x.
_UPGRADES: Dict[str, Tuple[Tuple[str, str], ...]] = {
    "serviceapp": (
        ("owner", "VARCHAR(128) NOT NULL DEFAULT ''"),
        ("description", "VARCHAR(512) NOT NULL DEFAULT ''"),
        ("created_at", "TIMESTAMP NOT NULL DEFAULT CURRENT_TIMESTAMP"),
    ),
    "settings_audit": (("action", "VARCHAR(16) NOT NULL DEFAULT 'set' AFTER source"),),
}


# Indexes added after a table was first created: a starting provider looks up one node's audit
# rows (stores/audit.py recover_settings), which must not scan every row of its service.
_INDEXES: Dict[str, Tuple[Tuple[str, str], ...]] = {
    "settings_audit": (("ix_settings_audit_host", "(env, appkey, service, host, port, id)"),),
}


@dataclass(frozen=True)
class _Column:
    """What an existing column must at least be: ``width`` characters, NULL allowed or not."""

    definition: str
    width: Optional[int] = None
    nullable: bool = False


# Columns whose first definition was too narrow or too strict, changed in place (MODIFY keeps the
# rows): pod FQDNs run to 253 characters and actors to long SSO names, not 64 and 128; a
# forgotten node's audit row has no new settings.
_CHANGES: Dict[str, Tuple[Tuple[str, _Column], ...]] = {
    "settings_audit": (
        ("actor", _Column("VARCHAR(255) NOT NULL", width=255)),
        ("host", _Column("VARCHAR(255) NOT NULL", width=255)),
        ("new_weight", _Column("INT NULL", nullable=True)),
        ("new_valid", _Column("TINYINT NULL", nullable=True)),
    ),
}


def _ssl_context(cfg: MysqlConfig) -> ssl.SSLContext:
    tls = cfg.tls
    try:
        ctx = ssl.create_default_context(cafile=tls.ca)  # the system's CAs when no ca is given
        if not tls.verify_cert:  # 'required': encrypted, the certificate not checked
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        else:
            ctx.check_hostname = tls.check_hostname
        if tls.cert:
            ctx.load_cert_chain(tls.cert, tls.key, tls.key_password)
    except (OSError, ssl.SSLError) as err:
        raise BackendError("cannot load the TLS files of %s: %s" % (cfg.describe(), err)) from err
    return ctx


@contextmanager
def connect(cfg: MysqlConfig, with_database: bool = True) -> Iterator[pymysql.connections.Connection]:
    """A fresh autocommit connection, closed on exit; MySQL errors become BackendError.

    With ``mysql.<env>.ssl_mode`` other than disabled, the connection is TLS or nothing: PyMySQL
    is given an SSL context (which makes recent versions refuse a server without TLS before
    authenticating), and the session's cipher is checked after connecting, because older
    PyMySQL versions silently go on in plaintext.
    """
    tls: Dict[str, Any] = {"ssl": _ssl_context(cfg)} if cfg.tls.enabled else {"ssl_disabled": True}
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
            **tls,
        )
    except pymysql.MySQLError as err:
        raise BackendError("cannot connect to %s as %r: %s" % (cfg.describe(), cfg.username, err)) from err
    try:
        if cfg.tls.enabled:
            _check_encrypted(cfg, conn)
        yield conn
    except pymysql.MySQLError as err:
        raise BackendError("%s failed: %s" % (cfg.describe(), err)) from err
    finally:
        conn.close()


def _check_encrypted(cfg: MysqlConfig, conn: pymysql.connections.Connection) -> None:
    with conn.cursor() as cur:
        cur.execute("SHOW SESSION STATUS LIKE 'Ssl_cipher'")
        row = cur.fetchone()
    if not row or not row[1]:
        raise BackendError(
            "%s: the connection is not encrypted (the server offers no TLS), and ssl_mode %s forbids plaintext"
            % (cfg.describe(), cfg.tls.mode)
        )


@dataclass(frozen=True)
class ColumnInfo:
    """An existing column: its width in characters (None for numbers) and whether NULL is allowed."""

    width: Optional[int]
    nullable: bool


def columns(cur: pymysql.cursors.Cursor, database: str, table: str) -> Dict[str, ColumnInfo]:
    """The columns of ``table`` as the server has them now (empty if the table does not exist)."""
    cur.execute(
        "SELECT column_name, character_maximum_length, is_nullable FROM information_schema.columns"
        " WHERE table_schema = %s AND table_name = %s",
        (database, table),
    )
    return {
        str(name).lower(): ColumnInfo(None if width is None else int(width), str(nullable).upper() == "YES")
        for name, width, nullable in cur.fetchall()
    }


def indexes(cur: pymysql.cursors.Cursor, database: str, table: str) -> List[str]:
    """The names of ``table``'s indexes (empty if the table does not exist)."""
    cur.execute(
        "SELECT DISTINCT index_name FROM information_schema.statistics WHERE table_schema = %s AND table_name = %s",
        (database, table),
    )
    return [str(row[0]).lower() for row in cur.fetchall()]


def missing_indexes(cur: pymysql.cursors.Cursor, database: str, table: str) -> List[Tuple[str, str]]:
    """The (name, columns) of the indexes an existing ``table`` lacks."""
    have = indexes(cur, database, table)
    return [(name, cols) for name, cols in _INDEXES.get(table, ()) if name not in have]


def outdated_columns(table: str, present: Dict[str, ColumnInfo]) -> Dict[str, _Column]:
    """The columns of ``table`` that exist but are narrower or stricter than they must be."""
    found = {}
    for column, want in _CHANGES.get(table, ()):
        have = present.get(column)
        if have is None:
            continue
        if (want.width is not None and (have.width or 0) < want.width) or (want.nullable and not have.nullable):
            found[column] = want
    return found


def check_insertable(
    cfg: MysqlConfig, table: str, insert: str, needed: Tuple[str, ...], texts: Dict[str, str], row: Tuple[Any, ...]
) -> None:
    """Raise unless ``row`` could be inserted into ``table`` now (an audit table, checked before
    the change it records is made): the table has every ``needed`` column (else BackendError:
    run ``thriftprobe db init``); each of ``texts`` (column name -> value) fits its column (else
    InvalidArgument naming it, its length and the column's); and this MySQL user may INSERT
    there: a trial ``insert`` of ``row``, rolled back (else BackendError)."""
    with connect(cfg) as conn:
        with conn.cursor() as cur:
            present = columns(cur, cfg.database, table)
        missing = [c for c in needed if c not in present]
        if missing:
            raise BackendError(
                "table %s of %s %s: run 'thriftprobe db init'"
                % (table, cfg.describe(), "is missing" if not present else "lacks column " + ", ".join(missing))
            )
        narrow = set(outdated_columns(table, present))
        for name, value in texts.items():
            width = present[name].width
            if width is not None and len(value) > width:
                raise InvalidArgument(
                    "%s %r is %d characters long; column %s.%s of %s holds %d%s"
                    % (name, value if len(value) <= 80 else value[:77] + "...", len(value), table, name,
                       cfg.describe(), width, " ('thriftprobe db init' widens it)" if name in narrow else "")
                )
        try:
            conn.begin()
            try:
                with conn.cursor() as cur:
                    cur.execute(insert, row)
            finally:
                conn.rollback()
        except pymysql.MySQLError as err:
            raise BackendError(
                "cannot write the audit table %s of %s as %r, so nothing was changed: %s"
                % (table, cfg.describe(), cfg.username, err)
            ) from err


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
            present = columns(cur, cfg.database, table)
            if not present:
                cur.execute(ddl)
                done.append("created table %s" % table)
                continue
            for column, definition in _UPGRADES.get(table, ()):
                if column not in present:
                    cur.execute("ALTER TABLE `%s` ADD COLUMN `%s` %s" % (table, column, definition))
                    done.append("added column %s.%s" % (table, column))
            for column, want in outdated_columns(table, present).items():
                cur.execute("ALTER TABLE `%s` MODIFY COLUMN `%s` %s" % (table, column, want.definition))
                done.append("changed column %s.%s to %s" % (table, column, want.definition))
            for name, cols in missing_indexes(cur, cfg.database, table):
                cur.execute("ALTER TABLE `%s` ADD INDEX `%s` %s" % (table, name, cols))
                done.append("added index %s.%s" % (table, name))
    for line in done:
        log.info("%s: %s", cfg.describe(), line)
    return done


def missing_schema(cfg: MysqlConfig) -> List[str]:
    """What ``create_schema`` would still have to do: missing tables and columns, and columns to
    widen (empty if none)."""
    missing: List[str] = []
    with connect(cfg, with_database=False) as conn, conn.cursor() as cur:
        for table, _ in _TABLES_DDL:
            present = columns(cur, cfg.database, table)
            if not present:
                missing.append("table %s" % table)
                continue
            missing.extend(
                "column %s.%s" % (table, column) for column, _ in _UPGRADES.get(table, ()) if column not in present
            )
            missing.extend(
                "column %s.%s as %s" % (table, column, want.definition)
                for column, want in outdated_columns(table, present).items()
            )
            missing.extend("index %s.%s" % (table, name) for name, _ in missing_indexes(cur, cfg.database, table))
    return missing
