"""Issue 10 C1: an operator's change reaches the live node, or says it did not, even when Redis
lost the node's settings or holds older ones; revisions never go backwards."""

from __future__ import annotations

import pytest
from conftest import TEST_ENV, live

from thriftprobe import BackendError
from thriftprobe.node import Node, settings_field
from thriftprobe.stores.settings import hash_key


def stored(settings, port):
    return Node.from_json(settings.get(port))


def test_change_reaches_the_live_node_after_redis_lost_the_nodes_settings(providers, gov, settings, zk, appkey):
    svc = providers("a")
    for weight in (20, 30, 42):
        gov.set_node(appkey, "Calculator", "127.0.0.1", svc.port, weight=weight)
    assert live(zk, svc.znode_path).rev == 3
    # The field is lost: a failover with asynchronous replication, a restart without persistence...
    settings.client.hdel(hash_key(TEST_ENV), settings_field(appkey, TEST_ENV, "Calculator", "127.0.0.1", svc.port))

    change = gov.set_node(appkey, "Calculator", "127.0.0.1", svc.port, valid=False)

    node = live(zk, svc.znode_path)
    assert change.live
    assert (node.valid, node.weight, node.rev) == (False, 42, 4)  # applied; the weight kept, not reset to 10
    assert (stored(settings, svc.port).weight, stored(settings, svc.port).rev) == (42, 4)  # never backwards
    assert (change.old.weight, change.old.valid, change.old.rev) == (42, True, 3)  # old = what was live
    assert gov.history(appkey)[0].live is True


def test_change_reaches_the_live_node_when_redis_holds_an_older_revision(providers, gov, settings, zk, appkey):
    svc = providers("a")
    gov.set_node(appkey, "Calculator", "127.0.0.1", svc.port, weight=50)
    gov.set_node(appkey, "Calculator", "127.0.0.1", svc.port, weight=60)
    settings.put(svc.port, weight=5)  # reset by hand: revision 0

    change = gov.set_node(appkey, "Calculator", "127.0.0.1", svc.port, weight=7)

    assert change.live and change.new.rev == 3
    node = live(zk, svc.znode_path)
    assert (node.weight, node.rev) == (7, 3)
    assert stored(settings, svc.port).rev == 3


def test_a_change_the_live_node_did_not_take_says_so_and_is_audited_as_not_live(providers, gov, zk, appkey):
    svc = providers("a")
    registry = gov._registry
    original_update = registry.update

    def update_after_a_foreign_write(env, appkey_, service, new_settings):
        # Between the read and the write, something writes a newer revision straight into the
        # znode, not through Redis (an older admin tool, a hand edit).
        data, _ = zk.get(svc.znode_path)
        zk.set(svc.znode_path, Node.from_json(data).with_settings(99, True, 50).to_json())
        return original_update(env, appkey_, service, new_settings)

    registry.update = update_after_a_foreign_write
    try:
        with pytest.raises(BackendError, match=r"live node was not updated .*rev 50"):
            gov.set_node(appkey, "Calculator", "127.0.0.1", svc.port, valid=False)
    finally:
        registry.update = original_update
    assert live(zk, svc.znode_path).valid is True  # indeed not applied
    assert gov.history(appkey)[0].live is False
    # Made again, it starts from the live revision and lands.
    change = gov.set_node(appkey, "Calculator", "127.0.0.1", svc.port, valid=False)
    assert change.live and change.new.rev == 51 and live(zk, svc.znode_path).valid is False
