"""Settings of nodes gone for a long time are pruned by age, each audited; live and recent nodes
stay (issue 10 C13). A node's age is the time since its provider last recorded it as running."""

from __future__ import annotations

import json
import time
import uuid

import pytest
from conftest import TEST_ENV, free_port, wait_until

from thriftprobe.admin.governance import Governance
from thriftprobe.node import settings_field
from thriftprobe.stores.settings import NodeSettingsStore

DAY = 86400.0


@pytest.fixture
def store(cfg):
    with NodeSettingsStore(cfg.redis, cfg.env) as store:
        yield store


def test_a_running_provider_records_that_it_runs(providers, store, appkey):
    svc = providers("a", audit_interval=0.2)
    wait_until(lambda: store.last_seen(appkey, "Calculator", "127.0.0.1", svc.port) is not None,
               what="the provider's first record")
    first = store.last_seen(appkey, "Calculator", "127.0.0.1", svc.port)
    assert abs(first - time.time()) < 5


def test_prune_removes_only_nodes_offline_for_longer_than_the_age(cfg, providers, settings, store, appkey, run):
    live = providers("a")
    old, recent = free_port(), free_port()
    for port in (old, recent):
        settings.put(port, weight=3)
    now = time.time()
    store.mark_seen(appkey, "Calculator", "127.0.0.1", old, when=now - 10 * DAY)
    store.mark_seen(appkey, "Calculator", "127.0.0.1", recent, when=now - 60)
    store.mark_seen(appkey, "Calculator", "127.0.0.1", live.port, when=now - 10 * DAY)  # live wins over age

    listed = json.loads(run("node", "prune", "--older-than", "7d", "--appkey", appkey, "--dry-run", "--json"))
    assert [p["port"] for p in listed["pruned"]] == [old]
    assert settings.get(old) is not None  # a dry run changes nothing

    with Governance(cfg) as gov:
        pruned = gov.prune(7 * DAY, appkey, actor="cron")
    assert [(p.port, round(p.offline_for / DAY)) for p in pruned] == [(old, 10)]
    assert settings.get(old) is None and settings.get(recent) is not None and settings.get(live.port) is not None
    assert store.last_seen(appkey, "Calculator", "127.0.0.1", old) is None  # no record left behind
    entry = json.loads(run("history", appkey, "--json"))[0]
    assert (entry["action"], entry["actor"], entry["port"], entry["old_weight"]) == ("prune", "cron", old, 3)


def test_a_node_never_recorded_starts_its_clock_at_the_first_prune(cfg, settings, store, appkey):
    port = free_port()
    settings.put(port, weight=4)  # as an older SDK or a hand-written entry leaves it
    now = time.time()
    with Governance(cfg) as gov:
        assert gov.prune(DAY, appkey, now=now) == []
        assert store.last_seen(appkey, "Calculator", "127.0.0.1", port) == int(now)
        assert gov.prune(DAY, appkey, now=now + DAY / 2) == []
        assert [p.port for p in gov.prune(DAY, appkey, now=now + DAY + 1)] == [port]
    assert settings.get(port) is None


@pytest.mark.parametrize("age", ["0", "-5m", "7w", "soon", "nan", "inf"])
def test_a_bad_age_exits_2(run, age, capsys):
    run("node", "prune", "--older-than=" + age, expect=2)
    assert "duration" in capsys.readouterr().err


def test_ages_go_by_the_redis_clock_not_the_operators(cfg, settings, store, appkey, monkeypatch):
    """A provider stamps itself by the Redis server's clock; an operator whose own clock runs a
    day ahead must not prune a node that ran a moment ago (issue 10 D2)."""
    port = free_port()
    settings.put(port, weight=4, valid=0)
    stamp = store.mark_seen(appkey, "Calculator", "127.0.0.1", port)  # as a provider does
    assert abs(stamp - store.server_time()) < 2
    real_time = time.time
    monkeypatch.setattr(time, "time", lambda: real_time() + DAY)  # this machine's clock is wrong
    with Governance(cfg) as gov:
        assert gov.prune(3600, appkey) == []
    assert settings.get(port) is not None


def test_a_stamp_from_the_future_counts_as_seen_now(cfg, settings, store, appkey):
    port = free_port()
    settings.put(port, weight=4)
    store.mark_seen(appkey, "Calculator", "127.0.0.1", port, when=store.server_time() + DAY)  # a skewed writer
    with Governance(cfg) as gov:
        assert gov.prune(60, appkey) == []
    assert settings.get(port) is not None


def test_a_node_that_starts_while_prune_decides_keeps_its_settings(cfg, providers, settings, store, appkey):
    """prune read an old stamp; before it removes anything the node starts (and stamps itself):
    its settings stay (issue 10 D3)."""
    port = free_port()
    settings.put(port, weight=2, valid=0)
    store.mark_seen(appkey, "Calculator", "127.0.0.1", port, when=store.server_time() - 10 * DAY)
    started = []
    with Governance(cfg) as gov:
        check_target = gov._check_target

        def start_meanwhile(*args, **kwargs):
            if not started:  # between prune's read and its removal, the node starts
                started.append(providers("late", port=port))
            return check_target(*args, **kwargs)

        gov._check_target = start_meanwhile
        assert gov.prune(DAY, appkey) == []
    assert started and (started[0].node.weight, started[0].node.valid) == (2, False)
    assert settings.get(port) is not None


def test_a_stamp_written_between_read_and_removal_keeps_the_settings(cfg, settings, store, appkey):
    """The compare-and-delete itself: the node was stamped after prune read the stamp, but has
    not registered yet (it is between its stamp and its znode)."""
    port = free_port()
    settings.put(port, weight=2, valid=0)
    old = store.mark_seen(appkey, "Calculator", "127.0.0.1", port, when=store.server_time() - 10 * DAY)
    store.mark_seen(appkey, "Calculator", "127.0.0.1", port)
    removed, what = store.remove(appkey, "Calculator", "127.0.0.1", port, seen=old)
    assert not removed and what.weight == 2
    assert settings.get(port) is not None and store.last_seen(appkey, "Calculator", "127.0.0.1", port) is not None
    removed, _ = store.remove(appkey, "Calculator", "127.0.0.1", port)
    assert removed and store.last_seen(appkey, "Calculator", "127.0.0.1", port) is None


def test_stamps_prune_and_write_back_work_on_redis_cluster(cluster_cfg):
    """The stamp hash shares the settings hash's slot: the two-key compare-and-delete and the
    Redis-clock scripts run on a 3-master cluster."""
    from thriftprobe.node import Node
    from thriftprobe.stores import appkeys

    key = "t.cluster.%s" % uuid.uuid4().hex[:12]
    appkeys.add_appkey(cluster_cfg.mysql, key)
    port = free_port()
    with NodeSettingsStore(cluster_cfg.redis, cluster_cfg.env) as cstore:
        live = Node("127.0.0.1", port, 6, False, rev=4)
        assert cstore.restore(key, "Calculator", live).rev == 4  # missing field: written back
        assert cstore.get(key, "Calculator", "127.0.0.1", port).valid is False
        now = cstore.server_time()
        cstore.mark_seen(key, "Calculator", "127.0.0.1", port, when=now - 10 * DAY)
        with Governance(cluster_cfg) as gov:
            assert [p.port for p in gov.prune(DAY, key, actor="cron")] == [port]
        assert cstore.get(key, "Calculator", "127.0.0.1", port) is None
        assert cstore.last_seen(key, "Calculator", "127.0.0.1", port) is None


@pytest.mark.parametrize("stamp", ["1000.500", "1.0e+03", " 1000"])
def test_a_stamp_written_in_another_number_form_is_still_pruned(cfg, settings, store, appkey, stamp):
    port = free_port()
    settings.put(port, weight=4)
    store._client.hset(store._seen_key, settings_field(appkey, TEST_ENV, "Calculator", "127.0.0.1", port), stamp)
    with Governance(cfg) as gov:
        assert [p.port for p in gov.prune(DAY, appkey)] == [port]
    assert settings.get(port) is None


def test_a_stamp_from_the_future_restarts_the_clock(cfg, settings, store, appkey):
    port = free_port()
    settings.put(port, weight=4)
    now = store.server_time()
    store.mark_seen(appkey, "Calculator", "127.0.0.1", port, when=now + 30 * DAY)  # a clock that jumped
    with Governance(cfg) as gov:
        assert gov.prune(DAY, appkey) == []
        assert store.last_seen(appkey, "Calculator", "127.0.0.1", port) <= store.server_time()
        assert [p.port for p in gov.prune(DAY, appkey, now=now + DAY + 5)] == [port]
