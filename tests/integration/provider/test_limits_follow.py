"""A running provider follows the request limits operators set: pushed through ZooKeeper,
re-read from Redis after a lost session, loaded before serving after a restart."""

from __future__ import annotations

import json
import logging
import threading

import pytest
from conftest import TEST_ENV, wait_until
from kazoo.client import KazooClient

from thriftprobe import config
from thriftprobe.errors import SettingsError
from thriftprobe.limits import MethodLimit, limits_field
from thriftprobe.registry.zookeeper import limits_path
from thriftprobe.stores.limits import LimitsStore, limits_key

SERVICE = "Calculator"


def _limits_threads():
    return [t.name for t in threading.enumerate() if t.name.startswith("thriftprobe-limits-")]


def _expire(svc) -> tuple:
    """End the provider's ZooKeeper session for real: another client takes it over and closes it."""
    session = svc._registry.client.client_id
    thief = KazooClient(hosts=svc.config.zookeeper.hosts, client_id=session)
    thief.start(5)
    thief.stop()
    thief.close()
    return session


def _own_session(cfg: config.Config, timeout: float) -> config.Config:
    # A different session timeout keys a separate ZooKeeper session of the process.
    return config.Config(cfg.path, cfg.env, cfg.mysql, cfg.redis, config.ZooKeeperConfig(cfg.zookeeper.hosts, timeout))


def test_a_limit_set_with_the_cli_reaches_a_running_provider_in_seconds(providers, run, appkey):
    svc = providers("a", audit_interval=60.0)  # so only the push can bring it within the wait
    assert svc.limits.rev == 0 and not svc.limits.methods
    out = run("limit", "set", appkey, SERVICE, "compute", "--qps", "50", "--concurrency", "4")
    assert "pushed" in out
    wait_until(lambda: svc.limits.get("compute") == MethodLimit(qps=50, concurrency=4), 5, "the pushed limit")
    run("limit", "clear", appkey, SERVICE, "compute")
    wait_until(lambda: svc.limits.get("compute") is None and svc.limits.rev == 2, 5, "the cleared limit")


def test_a_restarted_provider_comes_back_with_its_limits_before_serving(providers, gov, appkey):
    gov.set_limit(appkey, SERVICE, "*", concurrency=8)
    svc = providers("a")
    assert svc.limits.get("*") == MethodLimit(concurrency=8)  # at once: loaded before the first request
    gov.set_limit(appkey, SERVICE, "echo", qps=100, burst=5)
    wait_until(lambda: svc.limits.rev == 2, 5, "the second change")
    port = svc.port
    svc.stop(timeout=2.0, drain=0)
    again = providers("b", port=port)
    assert again.limits.rev == 2 and again.limits.get("echo") == MethodLimit(qps=100, burst=5)


def test_a_provider_starts_with_the_pushed_limits_when_redis_lost_the_record(providers, gov, rds, appkey, monkeypatch):
    """Redis lost the record (a restart without persistence); the znode still holds what
    operators set. The provider must serve its first request under those limits, not only once
    its follower thread catches up (the follower is kept from starting here, so only the start
    path can put them in force)."""
    from thriftprobe.provider import limits_follower

    gov.set_limit(appkey, SERVICE, "echo", qps=0.001, burst=1)
    rds.hdel(limits_key(TEST_ENV), limits_field(appkey, TEST_ENV, SERVICE))
    monkeypatch.setattr(limits_follower.LimitsFollower, "start", lambda self: None)
    svc = providers("a")
    assert svc.limits.rev == 1 and svc.limits.get("echo") == MethodLimit(qps=0.001, burst=1)
    assert svc._server.limits.get("echo") == MethodLimit(qps=0.001, burst=1)


def test_a_corrupt_record_stops_the_start_naming_the_repair_and_after_it_the_provider_starts(
    providers, gov, rds, zk, appkey
):
    field = limits_field(appkey, TEST_ENV, SERVICE)
    rds.hset(limits_key(TEST_ENV), field, b'{"rev": 2, "methods": {"echo": {"qps": 0}}}')
    with pytest.raises(SettingsError) as err:
        providers("a")
    assert "thriftprobe limit reset %s %s" % (appkey, SERVICE) in str(err.value)  # the fix, named
    nodes = "/services/%s/%s/%s" % (TEST_ENV, appkey, SERVICE)
    assert not zk.exists(nodes) or not zk.get_children(nodes)  # never registered, never served
    gov.set_limit(appkey, SERVICE, "echo", qps=30)
    svc = providers("a")
    assert svc.limits.rev == 3 and svc.limits.get("echo") == MethodLimit(qps=30)


def test_a_limit_for_a_method_the_service_lacks_is_logged_once_per_revision(providers, gov, zk, appkey, caplog):
    svc = providers("a")
    node = json.loads(zk.get("/services/%s/%s/%s_127.0.0.1_%d" % (TEST_ENV, appkey, SERVICE, svc.port))[0])
    assert node["methods"] == ["compute", "echo", "ping", "record", "sleep_ms"]  # advertised, sorted
    caplog.set_level(logging.WARNING, logger="thriftprobe")

    def typo_warnings():  # type: ignore[no-untyped-def]
        return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "Echo" in r.getMessage()]

    gov.set_limit(appkey, SERVICE, "Echo", qps=5)
    wait_until(lambda: svc.limits.rev == 1, 5, "the pushed limit")
    wait_until(lambda: len(typo_warnings()) == 1, 5, "the warning")
    assert "(its methods: compute, echo, ping, record, sleep_ms)" in typo_warnings()[0]
    svc.set_limits(svc.limits)  # the same revision again (a re-read of Redis): no second warning
    gov.set_limit(appkey, SERVICE, "*", concurrency=50)  # rev 2 still holds the typo: once more
    wait_until(lambda: svc.limits.rev == 2, 5, "the second change")
    assert len(typo_warnings()) == 2
    gov.set_limit(appkey, SERVICE, "echo", qps=5)
    gov.clear_limit(appkey, SERVICE, "Echo")  # rev 4: no unknown method left
    wait_until(lambda: svc.limits.rev == 4, 5, "the fourth change")
    assert len(typo_warnings()) == 3  # rev 3 still had it; rev 4 does not


@pytest.mark.slow
def test_changes_made_while_the_providers_session_expired_arrive(providers, gov, zk, cfg, appkey):
    svc = providers("a", config=_own_session(cfg, 2.2), audit_interval=60.0)
    session = _expire(svc)
    wait_until(lambda: zk.exists(svc.znode_path) is None or zk.exists(svc.znode_path).ephemeralOwner != session[0],
               10, "the expired session's node to go")
    gov.set_limit(appkey, SERVICE, "add", qps=11)  # pushed while the provider has no session
    wait_until(lambda: svc.limits.get("add") == MethodLimit(qps=11), 10, "the change after the new session")
    assert svc._registry.client.client_id[0] != session[0]

    # A change that only reached the record (its push failed) arrives with the next new session.
    session = _expire(svc)
    with LimitsStore(cfg.redis, cfg.env) as store:
        rev = store.load(appkey, SERVICE).rev
        store.update(appkey, SERVICE, "echo", MethodLimit(concurrency=2), expected_rev=rev)
    wait_until(lambda: svc.limits.get("echo") == MethodLimit(concurrency=2), 10, "the record re-read after expiry")
    assert zk.get(limits_path(cfg.env, appkey, SERVICE))[0].count(b"echo") == 0  # it never was pushed


def test_a_stopped_provider_leaves_no_limits_thread_or_watcher(providers, gov, appkey):
    before = _limits_threads()
    svc = providers("a")
    label = "thriftprobe-limits-%s-%d" % (SERVICE, svc.port)
    assert label in _limits_threads()
    watch = svc._follower._watch
    client = svc._registry.client
    path = limits_path(svc.env, appkey, SERVICE)
    svc.stop(timeout=2.0, drain=0)
    assert _limits_threads() == before

    def watchers():
        return [w for w in client._data_watchers.get(path, set()) if getattr(w, "__self__", None) is watch]

    wait_until(lambda: watchers() == [], 5, "the watch's watchers to go")
    gov.set_limit(appkey, SERVICE, "add", qps=1)  # a change after the stop reaches nothing
    assert svc.limits.rev == 0
