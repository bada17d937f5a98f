"""No change without its audit row: names that do not fit, a MySQL user that may not write the
audit table, and an audit table from an older version (issue 10 C8)."""

from __future__ import annotations

import dataclasses
import json
import secrets
import uuid

import pytest
from conftest import free_port

from thriftprobe import BackendError, InvalidArgument
from thriftprobe.admin.governance import Governance
from thriftprobe.node import Node
from thriftprobe.stores import mysql

# 253 characters, DNS's limit, the shape of a Kubernetes pod's FQDN.
POD_FQDN = ".".join(
    ["calc-7f9c6d8b5-x2x9q", "a" * 63, "b" * 63, "c" * 50, "d" * 27, "calc-ns", "svc", "cluster", "local"]
)


def test_an_actor_longer_than_the_audit_column_changes_nothing(gov, providers, settings, zk, appkey):
    svc = providers("a")
    before = zk.get(svc.znode_path)[0]
    with pytest.raises(InvalidArgument, match=r"actor .* characters long; column settings_audit\.actor"):
        gov.set_node(appkey, "Calculator", "127.0.0.1", svc.port, weight=5, actor="sso:" + "x" * 300)
    assert Node.from_json(settings.get(svc.port)).weight == 10 and Node.from_json(settings.get(svc.port)).rev == 0
    assert zk.get(svc.znode_path)[0] == before
    assert gov.history(appkey) == []


def test_a_pod_fqdn_as_host_is_changed_and_audited(gov, settings, appkey):
    assert len(POD_FQDN) == 253
    change = gov.set_node(appkey, "Calculator", POD_FQDN, 8080, weight=3, actor="alice")
    assert not change.live and change.new.weight == 3
    assert json.loads(settings.get(8080, host=POD_FQDN))["weight"] == 3
    [entry] = gov.history(appkey)
    assert entry.host == POD_FQDN and entry.actor == "alice" and entry.new_weight == 3


def test_a_host_that_is_no_host_name_changes_nothing(gov, settings, appkey):
    with pytest.raises(InvalidArgument, match="host"):
        gov.set_node(appkey, "Calculator", "10.0.0.1\n", 8080, weight=3)
    with pytest.raises(InvalidArgument, match="actor"):
        gov.set_node(appkey, "Calculator", "10.0.0.1", 8080, weight=3, actor="bob\n2024-01-01 alice (cli)")
    assert settings.get(8080, host="10.0.0.1") is None and gov.history(appkey) == []


@pytest.fixture
def reader(cfg):
    """A MySQL user that may read the thriftprobe tables but not write them."""
    name = "tp_ro_%s" % uuid.uuid4().hex[:8]
    password = secrets.token_urlsafe(12)
    hosts = ("127.0.0.1", "localhost", "%")
    with mysql.connect(cfg.mysql) as conn, conn.cursor() as cur:
        for host in hosts:
            cur.execute("CREATE USER %s@%s IDENTIFIED BY %s", (name, host, password))
            cur.execute("GRANT SELECT ON `%s`.* TO %%s@%%s" % cfg.mysql.database, (name, host))
    try:
        yield dataclasses.replace(cfg, mysql=dataclasses.replace(cfg.mysql, username=name, password=password))
    finally:
        with mysql.connect(cfg.mysql) as conn, conn.cursor() as cur:
            for host in hosts:
                cur.execute("DROP USER IF EXISTS %s@%s", (name, host))


def test_a_mysql_user_who_may_not_write_the_audit_changes_nothing(reader, settings, appkey):
    port = free_port()
    with Governance(reader) as gov, pytest.raises(BackendError, match="cannot write the audit table"):
        gov.set_node(appkey, "Calculator", "127.0.0.1", port, valid=False, actor="carol")
    assert settings.get(port) is None


OLD_AUDIT_TABLE = """
CREATE TABLE settings_audit (
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
"""


@pytest.fixture
def old_database(cfg):
    """A database holding the audit table as the first release created it, with one row."""
    own = dataclasses.replace(cfg.mysql, database="thriftprobe_old_%s" % uuid.uuid4().hex[:8])
    with mysql.connect(cfg.mysql) as conn, conn.cursor() as cur:
        cur.execute("CREATE DATABASE `%s`" % own.database)
    try:
        with mysql.connect(own) as conn, conn.cursor() as cur:
            cur.execute(OLD_AUDIT_TABLE)
            cur.execute(
                "INSERT INTO settings_audit (actor, source, env, appkey, service, host, port, new_weight, new_valid,"
                " rev, live) VALUES ('old', 'cli', 'test', 'a.b', 'S', '10.0.0.1', 1, 5, 1, 1, 1)"
            )
        yield own
    finally:
        with mysql.connect(cfg.mysql) as conn, conn.cursor() as cur:
            cur.execute("DROP DATABASE IF EXISTS `%s`" % own.database)


def test_db_init_widens_an_old_audit_table_for_real_names_and_keeps_its_rows(old_database):
    missing = mysql.missing_schema(old_database)
    assert "column settings_audit.host as VARCHAR(255) NOT NULL" in missing
    assert "column settings_audit.action" in missing
    done = mysql.create_schema(old_database)
    assert "added column settings_audit.action" in done
    assert "changed column settings_audit.host to VARCHAR(255) NOT NULL" in done
    assert mysql.missing_schema(old_database) == [] and mysql.create_schema(old_database) == []
    with mysql.connect(old_database) as conn, conn.cursor() as cur:
        cur.execute("SELECT actor, action, new_weight FROM settings_audit")
        assert cur.fetchall() == (("old", "set", 5),)
