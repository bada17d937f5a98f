"""Redis loses a node's settings (a failover with asynchronous replication, a restart without
persistence, an eviction): an operator-disabled node must stay disabled, across the loss and
across the provider's next restart, and revisions must go on from where they were (issue 10 D1)."""

from __future__ import annotations

from conftest import TEST_ENV, live, wait_until

from thriftprobe.node import Node, settings_field
from thriftprobe.stores.settings import hash_key


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
    assert triple(again.node) == (10, True, 0)  # forgotten on purpose: the audit trail is not replayed


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
