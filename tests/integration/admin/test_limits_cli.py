"""``thriftprobe limit ...``: what operators type and see, exit codes and messages for bad input."""

from __future__ import annotations

import json
import uuid

import pytest
from conftest import TEST_ENV

from thriftprobe.limits import limits_field
from thriftprobe.registry.zookeeper import limits_path
from thriftprobe.stores.limits import limits_key

SERVICE = "Calculator"


@pytest.mark.parametrize(
    "args, named",
    [
        (["compute"], "nothing to set"),
        (["compute", "--qps", "0"], "--qps"),
        (["compute", "--qps", "abc"], "--qps"),
        (["compute", "--qps", "nan"], "--qps"),
        (["compute", "--qps", "5", "--burst", "0"], "--burst"),
        (["compute", "--concurrency", "1.5"], "--concurrency"),
        (["compute", "--burst", "5"], "burst needs qps"),
        (["a-b", "--qps", "5"], "method 'a-b' is invalid"),
        (["compute", "--qps", "5", "--actor", "x\ny"], "actor"),
    ],
    ids=lambda v: " ".join(v) if isinstance(v, list) else v,
)
def test_bad_input_to_limit_set_exits_2_with_a_message_and_changes_nothing(run, capsys, appkey, args, named):
    run("limit", "set", appkey, SERVICE, *args, expect=2)
    assert named in capsys.readouterr().err
    assert json.loads(run("limit", "show", appkey, SERVICE, "--json"))["services"][0]["rev"] == 0


def test_an_unknown_appkey_exits_1_naming_it(run, capsys):
    key = "t.never-%s" % uuid.uuid4().hex[:8]
    run("limit", "set", key, SERVICE, "compute", "--qps", "5", expect=1)
    err = capsys.readouterr().err
    assert "AppkeyNotRegistered" in err and key in err


def test_set_show_clear_and_history(run, appkey):
    out = run("limit", "set", appkey, SERVICE, "compute", "--qps", "200", "--burst", "20", "--actor", "alice")
    assert "%s/%s compute: none -> qps 200 burst 20 (rev 1)" % (appkey, SERVICE) in out
    run("limit", "set", appkey, SERVICE, "*", "--concurrency", "64")
    shown = run("limit", "show", appkey)
    assert "%s/%s  rev 2" % (appkey, SERVICE) in shown
    assert "compute" in shown and "concurrency 64" in shown and "NOT PUSHED" not in shown
    data = json.loads(run("limit", "show", appkey, "--json"))
    methods = {"*": {"concurrency": 64}, "compute": {"burst": 20, "qps": 200}}
    assert data["services"] == [{
        "env": "test", "appkey": appkey, "service": SERVICE, "rev": 2, "pushed_rev": 2, "in_step": True,
        "methods": methods, "pushed_methods": methods, "follows": "record", "recorded": True,
    }]
    out = run("limit", "clear", appkey, SERVICE, "compute")
    assert "qps 200 burst 20 -> none (rev 3)" in out
    run("limit", "clear", appkey, SERVICE, "compute", expect=1)  # nothing to clear
    history = run("limit", "history", appkey, SERVICE).splitlines()
    assert len(history) == 3 and "alice (cli)" in history[-1] and "-> none (rev 3)" in history[0]
    rows = json.loads(run("limit", "history", appkey, "--json", "--limit", "1"))
    assert [(r["method"], r["old"], r["new"], r["rev"], r["pushed"]) for r in rows] == [
        ("compute", {"qps": 200, "burst": 20}, None, 3, True)]


def test_limit_without_a_subcommand_is_a_usage_error(run):
    run("limit", expect=2)
    run("limit", "show", "t.x", "bad/service", expect=2)


def test_a_corrupt_record_is_replaced_by_limit_set_or_reset_and_the_cli_says_so(run, rds, appkey):
    field = limits_field(appkey, TEST_ENV, SERVICE)
    rds.hset(limits_key(TEST_ENV), field, b'{"rev": 3, "methods": {"echo": {"qps": 0}}}')
    shown = run("limit", "show", appkey, SERVICE)
    assert "CORRUPT" in shown and "thriftprobe limit reset %s %s" % (appkey, SERVICE) in shown
    out = run("limit", "set", appkey, SERVICE, "echo", "--qps", "100")
    assert "echo: none -> qps 100 burst 10 (default) (rev 4)" in out
    assert "replaced the CORRUPT limits record" in out and '"qps": 0' in out
    rds.hset(limits_key(TEST_ENV), field, b"garbage")
    data = json.loads(run("--json", "limit", "reset", appkey, SERVICE))
    assert data["replaced_corrupt"] == "garbage" and data["rev"] == 5 and data["limits"]["methods"] == {}
    assert "nothing to reset" in run("limit", "reset", appkey, SERVICE, expect=1)
    history = run("limit", "history", appkey, SERVICE).splitlines()
    assert len(history) == 2 and all("replaced corrupt record" in line for line in history)


def _push(zk, appkey: str, limits: dict) -> None:
    """Write the pushed limits by hand (as a stray tool or a restore might)."""
    zk.set(limits_path(TEST_ENV, appkey, SERVICE), json.dumps(limits).encode())


def test_limit_show_says_the_providers_follow_a_higher_pushed_revision_with_other_limits(run, zk, appkey):
    run("limit", "set", appkey, SERVICE, "echo", "--qps", "100")
    _push(zk, appkey, {"rev": 50, "methods": {"echo": {"concurrency": 1}, "*": {"qps": 1}}})
    shown = run("limit", "show", appkey, SERVICE)
    assert "DIFFER; the providers follow the PUSHED limits (higher rev 50)" in shown
    assert "pushed (ZooKeeper) rev 50  <- in force:" in shown and "concurrency 1" in shown
    assert "record (Redis) rev 1:" in shown and "qps 100" in shown
    [view] = json.loads(run("--json", "limit", "show", appkey))["services"]
    assert (view["rev"], view["pushed_rev"], view["in_step"], view["follows"]) == (1, 50, False, "pushed")
    assert view["pushed_methods"] == {"*": {"qps": 1}, "echo": {"concurrency": 1}}
    # Same revision, other limits: neither is known to be in force everywhere.
    _push(zk, appkey, {"rev": 1, "methods": {"echo": {"qps": 7}}})
    assert json.loads(run("--json", "limit", "show", appkey))["services"][0]["follows"] == "either"
    assert "DIFFERENT limits at the same rev 1" in run("limit", "show", appkey, SERVICE)
    _push(zk, appkey, {"rev": 1, "methods": {"echo": {"qps": 100}}})  # the same again: in step
    assert "DIFFER" not in run("limit", "show", appkey, SERVICE)


def test_limit_show_lists_limits_that_exist_only_in_zookeeper(run, zk, rds, appkey):
    run("limit", "set", appkey, SERVICE, "echo", "--concurrency", "2")
    rds.hdel(limits_key(TEST_ENV), limits_field(appkey, TEST_ENV, SERVICE))  # Redis lost the record
    for argv in ((appkey,), (appkey, SERVICE), ()):
        shown = run("limit", "show", *argv)
        assert "%s/%s  RECORD LOST" % (appkey, SERVICE) in shown and "concurrency 2" in shown, argv
        assert "no limits set" not in shown
    [view] = [v for v in json.loads(run("--json", "limit", "show"))["services"] if v["appkey"] == appkey]
    assert (view["recorded"], view["methods"], view["follows"], view["pushed_rev"]) == (False, None, "pushed", 1)
    assert view["pushed_methods"] == {"echo": {"concurrency": 2}}


def test_limit_set_warns_when_no_provider_runs_or_the_providers_lack_the_method(run, providers, appkey):
    out = run("limit", "set", appkey, "Calculater", "echo", "--qps", "5")  # a typo in the service
    assert "WARNING: no live provider of %s/Calculater" % appkey in out
    providers("a")
    out = run("limit", "set", appkey, SERVICE, "Echo", "--qps", "5")  # a typo in the method: exit 0
    assert "WARNING: the live providers of %s/%s have no method 'Echo' (they have: compute, echo, ping, " \
           "record, sleep_ms)" % (appkey, SERVICE) in out
    data = json.loads(run("--json", "limit", "set", appkey, SERVICE, "Echo", "--qps", "6"))
    assert len(data["warnings"]) == 1 and "no method 'Echo'" in data["warnings"][0]
    for method in ("echo", "*"):  # a method they have, and the service as a whole: nothing to warn of
        assert "WARNING" not in run("limit", "set", appkey, SERVICE, method, "--qps", "7")
        assert json.loads(run("--json", "limit", "set", appkey, SERVICE, method, "--qps", "8"))["warnings"] == []


def test_limits_are_written_plainly_never_in_exponent_form(run, appkey):
    out = run("limit", "set", appkey, SERVICE, "echo", "--qps", "1000000", "--burst", "3")
    assert "none -> qps 1000000 burst 3 (rev 1)" in out
    out = run("limit", "set", appkey, SERVICE, "ping", "--qps", "0.0000001")
    assert "none -> qps 0.0000001 burst 1 (default) (rev 2)" in out
    shown = run("limit", "show", appkey, SERVICE)
    assert "qps 1000000 burst 3" in shown and "qps 0.0000001" in shown and "e+" not in shown and "e-" not in shown
