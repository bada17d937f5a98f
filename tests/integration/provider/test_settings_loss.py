"""Redis loses a node's settings (a failover with asynchronous replication, a restart without
persistence, an eviction): an operator-disabled node must stay disabled, across the loss and
across the provider's next restart, and revisions must go on from where they were (issue 10 D1)."""

from __future__ import annotations

import pytest
from conftest import TEST_ENV, live, wait_until

from thriftprobe.node import Node, settings_field
from thriftprobe.stores.settings import NodeSettingsStore, hash_key


@pytest.fixture
def store(cfg):
    with NodeSettingsStore(cfg.redis, cfg.env) as store:
        yield store


def lose(settings, port):
    """What the failover does to the node's field."""
    settings.client.hdel(hash_key(TEST_ENV), settings_field(settings.appkey, TEST_ENV, "Calculator", "127.0.0.1", port))


def stored(settings, port):
    raw = settings.get(port)
    return None if raw is None else Node.from_json(raw)


def triple(node):
    return (node.weight, node.valid, node.rev)


def test_the_running_provider_writes_its_settings_back_and_a_restart_keeps_them(providers, gov, settings, zk, appkey):
    svc = providers("a", audit_interval=0.2)
    gov.set_node(appkey, "Calculator", "127.0.0.1", svc.port, weight=7)
    gov.set_node(appkey, "Calculator", "127.0.0.1", svc.port, valid=False)
    lose(settings, svc.port)

    wait_until(lambda: stored(settings, svc.port) is not None, what="the keeper writing the settings back")
    assert triple(stored(settings, svc.port)) == (7, False, 2)
    port = svc.port
    svc.stop(timeout=2.0, drain=0)

    again = providers("b", port=port)
    assert triple(again.node) == (7, False, 2)  # still off: the operator's choice survived
    assert triple(live(zk, again.znode_path)) == (7, False, 2)
    change = gov.set_node(appkey, "Calculator", "127.0.0.1", port, valid=True)
    assert change.new.rev == 3  # the next revision, not a second rev 1


def test_a_provider_starting_without_its_field_takes_the_newest_audited_settings(providers, gov, settings, appkey):
    svc = providers("a")
    port = svc.port
    gov.set_node(appkey, "Calculator", "127.0.0.1", port, weight=3)
    gov.set_node(appkey, "Calculator", "127.0.0.1", port, valid=False)
    svc.stop(timeout=2.0, drain=0)
    lose(settings, port)  # lost while the node was down: no running provider to write it back

    again = providers("b", port=port)
    assert triple(again.node) == (3, False, 2)
    assert triple(stored(settings, port)) == (3, False, 2)


def test_after_forget_a_node_starts_from_the_defaults(providers, gov, settings, appkey):
    svc = providers("a")
    port = svc.port
    gov.set_node(appkey, "Calculator", "127.0.0.1", port, valid=False)
    svc.stop(timeout=2.0, drain=0)
    wait_until(lambda: not gov._registry.entries(TEST_ENV, appkey), what="the node leaving")
    assert gov.forget_node(appkey, "Calculator", "127.0.0.1", port)

    again = providers("b", port=port)
    # Forgotten on purpose: the defaults, not the settings before; at the removed revision, so
    # that revisions never go backwards.
    assert triple(again.node) == (10, True, 1)


def test_an_older_revision_in_redis_is_replaced_by_the_live_one(providers, gov, settings, appkey):
    svc = providers("a", audit_interval=0.2)
    gov.set_node(appkey, "Calculator", "127.0.0.1", svc.port, weight=9)
    gov.set_node(appkey, "Calculator", "127.0.0.1", svc.port, valid=False)
    settings.put(svc.port, weight=10, valid=1)  # a stale replica promoted: revision 0, on

    wait_until(lambda: stored(settings, svc.port).rev == 2, what="the keeper writing the live revision back")
    assert triple(stored(settings, svc.port)) == (9, False, 2)
    assert triple(svc.node) == (9, False, 2)


def test_an_operator_change_racing_the_write_back_is_never_lost(providers, gov, settings, appkey):
    svc = providers("a", audit_interval=0.05)
    gov.set_node(appkey, "Calculator", "127.0.0.1", svc.port, valid=False)
    for weight in range(20, 30):  # each loss races the keeper's write-back and the next change
        lose(settings, svc.port)
        change = gov.set_node(appkey, "Calculator", "127.0.0.1", svc.port, weight=weight)
        assert change.new.valid is False
    wait_until(lambda: triple(svc.node) == (29, False, change.new.rev), what="the last change live")
    assert triple(stored(settings, svc.port)) == (29, False, change.new.rev)
    revs = [e.rev for e in gov.history(appkey)]
    assert len(revs) == len(set(revs)) == 11  # no revision given twice


def test_a_change_while_the_node_is_down_and_its_field_lost_starts_from_the_audit_trail(
    providers, gov, settings, appkey
):
    svc = providers("a")
    port = svc.port
    gov.set_node(appkey, "Calculator", "127.0.0.1", port, weight=7)
    gov.set_node(appkey, "Calculator", "127.0.0.1", port, valid=False)
    svc.stop(timeout=2.0, drain=0)
    lose(settings, port)

    change = gov.set_node(appkey, "Calculator", "127.0.0.1", port, weight=20)

    assert triple(change.new) == (20, False, 3)  # still off; the next revision
    assert triple(change.old) == (7, False, 2)
    assert triple(providers("b", port=port).node) == (20, False, 3)


def test_revisions_go_on_after_forget_so_a_stale_keeper_cannot_overwrite_a_newer_change(
    providers, gov, settings, store, appkey
):
    """A provider cut off from ZooKeeper (its znode gone with its session) but not from Redis
    holds rev 2; meanwhile an operator forgets the node and sets it anew. When the provider's
    keeper comes back, the operator's change must win."""
    svc = providers("a")
    port = svc.port
    gov.set_node(appkey, "Calculator", "127.0.0.1", port, weight=7)
    gov.set_node(appkey, "Calculator", "127.0.0.1", port, valid=False)
    stale = svc.node
    svc.stop(timeout=2.0, drain=0)
    wait_until(lambda: not gov._registry.entries(TEST_ENV, appkey), what="the node leaving")
    assert gov.forget_node(appkey, "Calculator", "127.0.0.1", port)

    change = gov.set_node(appkey, "Calculator", "127.0.0.1", port, weight=50)
    assert triple(change.new) == (50, True, 3)  # defaults after forget, at the removed revision, + 1

    assert triple(store.restore(appkey, "Calculator", stale)) == (50, True, 3)  # what the keeper would do
    assert triple(stored(settings, port)) == (50, True, 3)


def test_recovery_takes_the_highest_revision_not_the_newest_row(cfg, providers, gov, settings, appkey):
    """Two operators at once: the one with the lower revision wrote its audit row last."""
    from thriftprobe.stores import mysql

    port = providers("a").port
    providers.started[0].stop(timeout=2.0, drain=0)
    rows = [("opB", 4, 99, 0), ("opA", 3, 6, 0)]  # rev 4 recorded first, rev 3 after it
    with mysql.connect(cfg.mysql) as conn, conn.cursor() as cur:
        for actor, rev, weight, valid in rows:
            cur.execute(
                "INSERT INTO settings_audit (actor, source, action, env, appkey, service, host, port, new_weight,"
                " new_valid, rev, live)"
                " VALUES (%s, 'cli', 'set', %s, %s, 'Calculator', '127.0.0.1', %s, %s, %s, %s, 0)",
                (actor, TEST_ENV, appkey, port, weight, valid, rev),
            )
    lose(settings, port)
    assert triple(providers("b", port=port).node) == (99, False, 4)


def test_a_field_behind_the_audit_trail_is_replaced_at_start(providers, gov, settings, appkey):
    """A failover promoted a replica that missed the last change while the node was down."""
    svc = providers("a")
    port = svc.port
    gov.set_node(appkey, "Calculator", "127.0.0.1", port, valid=False)
    gov.set_node(appkey, "Calculator", "127.0.0.1", port, weight=4)
    svc.stop(timeout=2.0, drain=0)
    settings.client.hset(
        hash_key(TEST_ENV),
        settings_field(appkey, TEST_ENV, "Calculator", "127.0.0.1", port),
        Node("127.0.0.1", port, 10, False, rev=1).to_json(),
    )
    assert triple(providers("b", port=port).node) == (4, False, 2)


def test_an_audit_table_this_version_cannot_use_never_blocks_a_start(cfg, appkey, caplog):
    """Providers upgraded before 'thriftprobe db init': no action column, no index. The lookup
    says so and finds nothing, without scanning the table or failing the start."""
    import dataclasses

    from thriftprobe.stores import audit, mysql

    old = dataclasses.replace(cfg.mysql, database="tp_old_audit_schema")
    with mysql.connect(old, with_database=False) as conn, conn.cursor() as cur:
        cur.execute("DROP DATABASE IF EXISTS tp_old_audit_schema")
        cur.execute("CREATE DATABASE tp_old_audit_schema")
        cur.execute(
            "CREATE TABLE tp_old_audit_schema.settings_audit (id BIGINT PRIMARY KEY AUTO_INCREMENT,"
            " changed_at TIMESTAMP(3) DEFAULT CURRENT_TIMESTAMP(3), actor VARCHAR(64), source VARCHAR(16),"
            " env VARCHAR(64), appkey VARCHAR(128), service VARCHAR(128), host VARCHAR(64), port INT,"
            " old_weight INT, old_valid TINYINT, new_weight INT, new_valid TINYINT, rev BIGINT, live TINYINT)"
        )
    try:
        assert audit.recover_settings(old, TEST_ENV, appkey, "Calculator", "127.0.0.1", 1) is None
        assert "db init" in caplog.text
        assert "index settings_audit.ix_settings_audit_host" in mysql.missing_schema(old)
        mysql.create_schema(old)
        assert mysql.missing_schema(old) == []
        assert audit.recover_settings(old, TEST_ENV, appkey, "Calculator", "127.0.0.1", 1) is None  # no rows
    finally:
        with mysql.connect(old, with_database=False) as conn, conn.cursor() as cur:
            cur.execute("DROP DATABASE IF EXISTS tp_old_audit_schema")
