"""Request limits as operators set them: the Redis record (compare-and-set, on standalone and
Cluster), the push through ZooKeeper, the audit rows, and what happens to bad data."""

from __future__ import annotations

import json
import threading
import uuid

import pytest
from conftest import TEST_ENV

from thriftprobe.admin.governance import Governance
from thriftprobe.errors import AppkeyNotRegistered, BackendError, ConcurrentChange, InvalidArgument, SettingsError
from thriftprobe.limits import MethodLimit, ServiceLimits, limits_field
from thriftprobe.registry.zookeeper import ZooKeeperRegistry, limits_path
from thriftprobe.stores import appkeys
from thriftprobe.stores.limits import LimitsStore, limits_key

SERVICE = "Calculator"


@pytest.fixture
def store(cfg):
    with LimitsStore(cfg.redis, cfg.env) as s:
        yield s


def test_a_service_without_limits_loads_as_rev_0_with_no_methods(store, appkey):
    assert store.load(appkey, SERVICE) == ServiceLimits({}, 0)


def test_update_is_compare_and_set_on_the_revision(store, appkey):
    first = store.update(appkey, SERVICE, "compute", MethodLimit(qps=50), expected_rev=0)
    assert first.rev == 1 and first.get("compute") == MethodLimit(qps=50)
    with pytest.raises(ConcurrentChange, match="rev 1, not 0"):
        store.update(appkey, SERVICE, "ping", MethodLimit(concurrency=3), expected_rev=0)
    assert store.load(appkey, SERVICE) == first  # the losing write changed nothing
    second = store.update(appkey, SERVICE, "*", MethodLimit(concurrency=8), expected_rev=1)
    assert second.rev == 2 and set(second.methods) == {"*", "compute"}
    third = store.update(appkey, SERVICE, "compute", None, expected_rev=2)
    assert third.rev == 3 and set(third.methods) == {"*"}
    assert store.load(appkey, SERVICE) == third


@pytest.mark.parametrize("raw", [b"{not json", b'{"rev": 1, "methods": {"add": {"qps": -1}}}', b"[]",
                                 b'{"rev": 1, "methods": {"a b": {"qps": 1}}}'])
def test_corrupt_limits_raise_settings_error_naming_the_field_and_the_repair(store, rds, gov, appkey, raw):
    field = limits_field(appkey, TEST_ENV, SERVICE)
    rds.hset(limits_key(TEST_ENV), field, raw)
    with pytest.raises(SettingsError, match=r"corrupt limits in field '%s' of hash \{thriftprobe_test\}_limits"
                       % field.replace("|", r"\|")) as err:
        store.load(appkey, SERVICE)
    assert "thriftprobe limit reset %s %s" % (appkey, SERVICE) in str(err.value)
    assert rds.hget(limits_key(TEST_ENV), field) == raw  # reading never repairs
    record = store.read(appkey, SERVICE)
    assert record.corrupt and record.raw == raw and "corrupt" in (record.problem or "")
    views = {(v.appkey, v.service): v for v in gov.limits(appkey)}
    assert views[(appkey, SERVICE)].limits is None and "corrupt" in views[(appkey, SERVICE)].problem


def test_a_repair_replaces_only_the_exact_corrupt_bytes_it_read(store, rds, appkey):
    field = limits_field(appkey, TEST_ENV, SERVICE)
    rds.hset(limits_key(TEST_ENV), field, b'{"rev": 9, "methods": {"add": {"qps": 0}}}')
    seen = store.read(appkey, SERVICE)
    assert seen.corrupt and seen.rev == 9  # a repair writes above the rev it carries
    rds.hset(limits_key(TEST_ENV), field, b'{"rev": 9, "methods": {"add": {"qps": -5}}}')  # another hand edit
    with pytest.raises(ConcurrentChange):
        store.replace(appkey, SERVICE, seen, ServiceLimits({}, 10))
    with pytest.raises(InvalidArgument, match="above the record's 9"):
        store.replace(appkey, SERVICE, store.read(appkey, SERVICE), ServiceLimits({}, 9))
    assert store.replace(appkey, SERVICE, store.read(appkey, SERVICE), ServiceLimits({}, 10)) == ServiceLimits({}, 10)
    assert store.load(appkey, SERVICE) == ServiceLimits({}, 10)


def test_set_limit_replaces_a_corrupt_record_with_the_pushed_limits_changed_above_every_revision(
    gov, zk, rds, appkey
):
    gov.set_limit(appkey, SERVICE, "add", qps=5)
    gov.set_limit(appkey, SERVICE, "echo", concurrency=3)  # rev 2, pushed
    field = limits_field(appkey, TEST_ENV, SERVICE)
    rds.hset(limits_key(TEST_ENV), field, b'{"rev": 1, "methods": {"add": {"qps": 0}}}')  # a bad hand edit
    change = gov.set_limit(appkey, SERVICE, "add", qps=7, actor="fixer")
    assert change.replaced_corrupt == '{"rev": 1, "methods": {"add": {"qps": 0}}}'
    assert change.old == MethodLimit(qps=5)  # what the providers were following
    assert change.limits == ServiceLimits({"add": MethodLimit(qps=7), "echo": MethodLimit(concurrency=3)}, 3)
    assert ServiceLimits.from_json(rds.hget(limits_key(TEST_ENV), field)) == change.limits
    assert ServiceLimits.from_json(zk.get(limits_path(TEST_ENV, appkey, SERVICE))[0]) == change.limits
    row = gov.limits_history(appkey)[0]
    assert (row.actor, row.method, row.old, row.new, row.rev, row.pushed) == (
        "fixer", "add", MethodLimit(qps=5), MethodLimit(qps=7), 3, True)
    assert row.corrupt == change.replaced_corrupt and "replaced corrupt record" in row.describe()
    assert gov.limits_history(appkey)[1].corrupt is None  # ordinary changes say nothing of the kind


def test_clear_and_reset_repair_a_corrupt_record_too(gov, rds, appkey):
    field = limits_field(appkey, TEST_ENV, SERVICE)
    rds.hset(limits_key(TEST_ENV), field, b"{not json")
    change = gov.clear_limit(appkey, SERVICE, "add")  # nothing to clear, but a record to repair
    assert change is not None and change.replaced_corrupt == "{not json" and change.limits == ServiceLimits({}, 1)
    assert gov.clear_limit(appkey, SERVICE, "add") is None  # sound now: nothing to do
    gov.set_limit(appkey, SERVICE, "add", qps=5)
    gov.set_limit(appkey, SERVICE, "*", concurrency=9)  # rev 3
    rds.hset(limits_key(TEST_ENV), field, b'{"rev": 8, "methods": []}')
    reset = gov.reset_limits(appkey, SERVICE, actor="fixer")
    assert reset is not None and reset.limits == ServiceLimits({}, 9) and reset.dropped == ["*", "add"]
    rows = gov.limits_history(appkey, limit=2)
    assert sorted((r.method, r.old, r.new, r.rev) for r in rows) == [
        ("*", MethodLimit(concurrency=9), None, 9), ("add", MethodLimit(qps=5), None, 9)]
    assert [r.corrupt is not None for r in rows].count(True) == 1
    assert gov.reset_limits(appkey, SERVICE) is None  # nothing left to reset


def test_the_store_works_on_redis_cluster(cluster_cfg):
    key = "t.%s" % uuid.uuid4().hex[:12]
    with LimitsStore(cluster_cfg.redis, cluster_cfg.env) as cstore:
        stored = cstore.update(key, SERVICE, "add", MethodLimit(qps=5, burst=2), expected_rev=0)
        stored = cstore.update(key, SERVICE, "*", MethodLimit(concurrency=4), expected_rev=stored.rev)
        with pytest.raises(ConcurrentChange):
            cstore.update(key, SERVICE, "add", None, expected_rev=1)
        assert cstore.load(key, SERVICE) == stored and stored.rev == 2
        assert [(k, s, lim) for k, s, lim, _ in cstore.scan(key)] == [(key, SERVICE, stored)]
    appkeys.add_appkey(cluster_cfg.mysql, key)
    with Governance(cluster_cfg) as cgov:
        change = cgov.set_limit(key, SERVICE, "add", qps=7, actor="pytest")
        assert change.limits.rev == 3 and change.pushed


def test_set_limit_is_stored_pushed_and_audited(gov, zk, rds, appkey):
    change = gov.set_limit(appkey, SERVICE, "compute", qps=200, burst=20, actor="alice")
    assert (change.old, change.new, change.limits.rev, change.pushed) == (None, MethodLimit(200, 20), 1, True)
    pushed = json.loads(zk.get(limits_path(TEST_ENV, appkey, SERVICE))[0])
    assert pushed == {"rev": 1, "methods": {"compute": {"qps": 200, "burst": 20}}}
    assert json.loads(rds.hget(limits_key(TEST_ENV), limits_field(appkey, TEST_ENV, SERVICE))) == pushed
    # The znode is not under /services: consumers and serverset discovery never see it.
    assert zk.exists("/services/%s/%s/%s" % (TEST_ENV, appkey, SERVICE)) is None

    gov.set_limit(appkey, SERVICE, "*", concurrency=16, actor="bob")
    cleared = gov.clear_limit(appkey, SERVICE, "compute", actor="carol")
    assert cleared is not None and cleared.old == MethodLimit(200, 20) and cleared.new is None
    assert cleared.limits == ServiceLimits({"*": MethodLimit(concurrency=16)}, 3)
    assert gov.clear_limit(appkey, SERVICE, "compute") is None  # nothing to clear: nothing written

    rows = gov.limits_history(appkey)
    assert [(r.actor, r.method, r.old, r.new, r.rev, r.pushed, r.source) for r in rows] == [
        ("carol", "compute", MethodLimit(200, 20), None, 3, True, "cli"),
        ("bob", "*", None, MethodLimit(concurrency=16), 2, True, "cli"),
        ("alice", "compute", None, MethodLimit(200, 20), 1, True, "cli"),
    ]
    [view] = gov.limits(appkey, SERVICE)
    assert view.limits.rev == 3 and view.pushed_rev == 3 and view.in_step


def test_concurrent_set_limit_from_two_threads_loses_no_update(cfg, appkey):
    rounds = 8
    errors = []

    def operator(name):
        try:
            with Governance(cfg) as own:
                for i in range(rounds):
                    own.set_limit(appkey, SERVICE, name, qps=i + 1, actor=name)
        except Exception as err:  # reported below
            errors.append(err)

    threads = [threading.Thread(target=operator, args=(name,)) for name in ("add", "echo")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []
    with Governance(cfg) as g:
        [view] = g.limits(appkey, SERVICE)
        rows = g.limits_history(appkey, limit=100)
    assert view.limits == ServiceLimits({"add": MethodLimit(qps=rounds), "echo": MethodLimit(qps=rounds)}, 2 * rounds)
    assert sorted(r.rev for r in rows) == list(range(1, 2 * rounds + 1))  # distinct revisions, none lost
    assert view.pushed_rev == 2 * rounds


def test_a_push_never_replaces_a_newer_revision(cfg, appkey):
    with ZooKeeperRegistry(cfg.zookeeper) as reg:
        newer = ServiceLimits({"add": MethodLimit(qps=9)}, 5)
        assert reg.publish_limits(TEST_ENV, appkey, SERVICE, newer) == newer
        assert reg.publish_limits(TEST_ENV, appkey, SERVICE, ServiceLimits({}, 4)) == newer
        assert reg.live_limits(TEST_ENV, appkey, SERVICE) == newer


def test_a_change_after_redis_lost_the_record_continues_from_the_pushed_revision(gov, rds, appkey):
    gov.set_limit(appkey, SERVICE, "add", qps=5)
    gov.set_limit(appkey, SERVICE, "echo", qps=6)
    rds.hdel(limits_key(TEST_ENV), limits_field(appkey, TEST_ENV, SERVICE))  # a failover lost it
    change = gov.set_limit(appkey, SERVICE, "ping", concurrency=2)
    assert change.limits.rev == 3 and set(change.limits.methods) == {"add", "echo", "ping"}


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({}, "nothing to set"),
        ({"qps": 0}, "qps must be a number above 0"),
        ({"burst": 3}, "burst needs qps"),
        ({"concurrency": 1.5}, "concurrency must be an integer"),
    ],
)
def test_bad_limits_are_refused_before_anything_changes(gov, rds, appkey, kwargs, message):
    with pytest.raises(InvalidArgument, match=message):
        gov.set_limit(appkey, SERVICE, "add", **kwargs)
    assert rds.hget(limits_key(TEST_ENV), limits_field(appkey, TEST_ENV, SERVICE)) is None


def test_bad_names_and_unknown_appkeys_are_refused(gov):
    with pytest.raises(InvalidArgument, match="method 'a-b' is invalid"):
        gov.set_limit("t.whatever", SERVICE, "a-b", qps=1)
    with pytest.raises(InvalidArgument):
        gov.set_limit("t.whatever", "../x", "add", qps=1)
    with pytest.raises(AppkeyNotRegistered):
        gov.set_limit("t.never-%s" % uuid.uuid4().hex[:8], SERVICE, "add", qps=1)


def test_a_failed_push_is_reported_not_passed_off_as_applied(cfg, appkey, rds):
    with Governance(cfg) as g:
        g._registry.close()  # the registry is gone: the push cannot happen
        with pytest.raises(BackendError, match="stored and audited, but was not pushed"):
            g.set_limit(appkey, SERVICE, "add", qps=3)
        [row] = g.limits_history(appkey)
    assert row.rev == 1 and not row.pushed
    assert json.loads(rds.hget(limits_key(TEST_ENV), limits_field(appkey, TEST_ENV, SERVICE)))["rev"] == 1


def test_db_init_creates_the_limits_audit_table(cfg):
    from thriftprobe.stores import mysql

    with mysql.connect(cfg.mysql) as conn, conn.cursor() as cur:
        assert "method" in mysql.columns(cur, cfg.mysql.database, "limits_audit")
    assert "table limits_audit" not in mysql.missing_schema(cfg.mysql)
