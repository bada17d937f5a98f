"""Settings of nodes gone for a long time are pruned by age, each audited; live and recent nodes
stay (issue 10 C13). A node's age is the time since its provider last recorded it as running."""

from __future__ import annotations

import json
import time

import pytest
from conftest import free_port, wait_until

from thriftprobe.admin.governance import Governance
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
