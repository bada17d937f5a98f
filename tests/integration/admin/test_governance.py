"""Operators' changes: persisted, applied live, never owning the provider's node, audited."""

from __future__ import annotations

import json
import threading
import time

import pytest
from conftest import IDL, free_port, live, wait_until
from kazoo.client import KazooClient

from thriftprobe import AppkeyNotRegistered, InvalidArgument, build_client, config
from thriftprobe.admin.governance import Governance
from thriftprobe.node import Node
from thriftprobe.registry.zookeeper import apply_settings


def test_change_is_persisted_applied_live_and_reaches_a_running_consumer(providers, gov, settings, zk, cfg, appkey):
    a = providers("a")
    providers("b")
    owner = zk.exists(a.znode_path).ephemeralOwner
    with build_client(IDL, appkey, "Calculator", config=cfg) as client:
        began = time.perf_counter()
        change = gov.set_node(appkey, "Calculator", "127.0.0.1", a.port, valid=False, actor="alice")
        assert client.table.wait_for(lambda s: [n.port for n in s.available] != [] and a.port not in
                                     [n.port for n in s.available], timeout=5)
        elapsed_ms = (time.perf_counter() - began) * 1000
        assert change.live and change.old.valid and not change.new.valid
        assert json.loads(settings.get(a.port))["valid"] == 0
        assert live(zk, a.znode_path).valid is False
        assert zk.exists(a.znode_path).ephemeralOwner == owner  # still the provider's node
        assert {client.ping() for _ in range(100)} == {"b"}
    print("change reached the consumer in %.1f ms" % elapsed_ms)


def test_change_survives_provider_restart(providers, gov, zk, appkey):
    svc = providers("a")
    gov.set_node(appkey, "Calculator", "127.0.0.1", svc.port, weight=42)
    svc.stop()
    again = providers("a2", port=svc.port)
    assert again.node.weight == 42
    assert live(zk, again.znode_path).weight == 42


def test_change_survives_the_admin_exiting(providers, cfg, zk, appkey):
    svc = providers("a")
    owner = zk.exists(svc.znode_path).ephemeralOwner
    other = config.Config(cfg.path, cfg.env, cfg.mysql, cfg.redis,
                          config.ZooKeeperConfig(cfg.zookeeper.hosts, session_timeout=2.5))
    admin = Governance(other)  # its own ZooKeeper session, like a separate admin process
    admin.set_node(appkey, "Calculator", "127.0.0.1", svc.port, weight=7)
    admin.close()
    stat = zk.exists(svc.znode_path)
    assert stat is not None and stat.ephemeralOwner == owner
    assert live(zk, svc.znode_path).weight == 7


def test_change_made_during_session_expiry_is_applied_on_re_registration(cfg, appkey, zk, gov, providers):
    # A provider with its own ZooKeeper session (a different session timeout keys a separate one).
    own = config.Config(cfg.path, cfg.env, cfg.mysql, cfg.redis,
                        config.ZooKeeperConfig(cfg.zookeeper.hosts, session_timeout=2.2))
    svc = providers("a", config=own, audit_interval=60.0)
    path = svc.znode_path
    session = svc._registry.client.client_id
    # Expire the session for real: another client takes it over and closes it.
    thief = KazooClient(hosts=cfg.zookeeper.hosts, client_id=session)
    thief.start(5)
    thief.stop()
    thief.close()
    wait_until(lambda: zk.exists(path) is None or zk.exists(path).ephemeralOwner != session[0],
               what="the expired session's node to go")
    gov.set_node(appkey, "Calculator", "127.0.0.1", svc.port, weight=3, valid=False)
    wait_until(lambda: zk.exists(path) is not None and live(zk, path).rev >= 1, timeout=10,
               what="re-registration with the operator's change")
    node = live(zk, path)
    assert (node.weight, node.valid) == (3, False)
    assert zk.exists(path).ephemeralOwner == svc._registry.client.client_id[0]


def test_two_operators_at_once_lose_no_update(providers, cfg, appkey, settings):
    svc = providers("a")
    errors = []

    def operator(kind):
        with Governance(cfg) as g:
            for i in range(10):
                try:
                    if kind == "weight":
                        g.set_node(appkey, "Calculator", "127.0.0.1", svc.port, weight=20 + i, actor="w")
                    else:
                        g.set_node(appkey, "Calculator", "127.0.0.1", svc.port, valid=bool(i % 2), actor="v")
                except Exception as err:  # collected, asserted below
                    errors.append(err)

    threads = [threading.Thread(target=operator, args=(k,)) for k in ("weight", "valid", "weight", "valid")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert errors == []
    stored = Node.from_json(settings.get(svc.port))
    assert stored.rev == 40  # every one of the 40 updates landed on top of the previous one
    assert stored.weight == 29 and stored.valid is True
    with Governance(cfg) as g:
        assert len(g.history(appkey, limit=100)) == 40


def test_stale_settings_never_overwrite_newer_ones(providers, zk):
    svc = providers("a")
    newer = svc.node.with_settings(50, True, 5)
    assert apply_settings(zk, svc.znode_path, newer).weight == 50
    older = svc.node.with_settings(1, False, 4)
    assert apply_settings(zk, svc.znode_path, older).weight == 50
    assert live(zk, svc.znode_path).weight == 50


def test_audit_records_who_when_node_old_and_new(providers, gov, appkey):
    svc = providers("a")
    gov.set_node(appkey, "Calculator", "127.0.0.1", svc.port, weight=15, actor="bob")
    gov.set_node(appkey, "Calculator", "127.0.0.1", svc.port, valid=False, actor="carol")
    newest, older = gov.history(appkey)[:2]
    assert (newest.actor, newest.old_weight, newest.old_valid, newest.new_weight, newest.new_valid) == (
        "carol", 15, True, 15, False)
    assert (older.actor, older.old_weight, older.new_weight, older.port, older.live) == ("bob", 10, 15, svc.port, True)
    assert newest.changed_at >= older.changed_at


def test_changing_an_unregistered_node_is_stored_and_applies_when_it_starts(providers, gov, appkey):
    port = free_port()
    change = gov.set_node(appkey, "Calculator", "127.0.0.1", port, valid=False)
    assert change.live is False and change.old is None
    assert gov.history(appkey)[0].live is False
    svc = providers("late", port=port)
    assert svc.node.valid is False


@pytest.mark.parametrize("weight", [-1, 1001, True, "5", 2.5])
def test_bad_weight_is_a_clear_error(gov, appkey, weight):
    with pytest.raises(InvalidArgument, match=r"weight must be an integer 0\.\.1000"):
        gov.set_node(appkey, "Calculator", "127.0.0.1", 1234, weight=weight)


def test_unknown_appkey_cannot_be_changed(gov):
    with pytest.raises(AppkeyNotRegistered):
        gov.set_node("never.registered", "Calculator", "127.0.0.1", 1234, weight=5)


def test_fleet_shows_live_and_offline_nodes(providers, gov, appkey):
    svc = providers("a")
    offline_port = free_port()
    gov.set_node(appkey, "Calculator", "127.0.0.1", offline_port, weight=1)
    views = {v.port: v for v in gov.fleet(appkey)}
    assert views[svc.port].live and views[svc.port].uptime is not None
    assert not views[offline_port].live and views[offline_port].weight == 1
    assert gov.fleet(appkey, "Other") == []


def test_watch_reports_joins_changes_and_leaves(providers, gov, appkey):
    events = []
    seen = threading.Condition()

    def on_event(e):
        with seen:
            events.append((e.kind, e.node.port, e.node.weight))
            seen.notify_all()

    stop = gov.watch(on_event, appkey)
    try:
        svc = providers("a")
        gov.set_node(appkey, "Calculator", "127.0.0.1", svc.port, weight=77)
        svc.stop()
        with seen:
            assert seen.wait_for(lambda: ("leave", svc.port, 77) in events, timeout=5), events
        assert events == [("join", svc.port, 10), ("change", svc.port, 77), ("leave", svc.port, 77)]
    finally:
        stop()

