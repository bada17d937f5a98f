"""Bad input to the operators' tools: exit 2 with a message, and a corrupt znode is shown as
corrupt, never a traceback or invalid JSON (issue 10 C12)."""

from __future__ import annotations

import json

import pytest
from conftest import IDL, TEST_ENV, free_port

from thriftprobe.admin.console import create_app
from thriftprobe.admin.governance import Governance
from thriftprobe.config import ConsoleConfig


def strict_json(text):
    """Parse as JSON proper: NaN and Infinity are not JSON (browsers' JSON.parse refuses them)."""

    def refuse(name):
        raise ValueError("not JSON: %s" % name)

    return json.loads(text, parse_constant=refuse)


@pytest.mark.parametrize(
    "argv, named",
    [
        (["console", "--port", "99999"], "--port"),
        (["console", "--port", "-1"], "--port"),
        (["history", "--limit", "-1"], "--limit"),
        (["history", "--limit", "0"], "--limit"),
        (["watch", "--for", "-1"], "seconds"),
        (["watch", "--for", "nan"], "seconds"),
        (["call", IDL, "a.b", "Calculator", "ping", "--timeout", "0"], "--timeout"),
    ],
    ids=lambda v: " ".join(v) if isinstance(v, list) else v,
)
def test_a_number_out_of_range_on_the_command_line_exits_2_with_a_message(run, capsys, argv, named):
    run(*argv, expect=2)
    err = capsys.readouterr().err
    assert named in err and "Traceback" not in err


@pytest.mark.parametrize(
    "method, args, named",
    [
        ("sleep_ms", "[2147483648]", "ms"),
        ("sleep_ms", '{"ms": -2147483649}', "ms"),
        ("sleep_ms", "[1.5]", "ms"),
        ("compute", '{"operation": {"left": 1, "right": 99999999999}}', "operation.right"),
        ("compute", '{"operation": {"left": 1}}', "right"),
        ("echo", "[NaN]", "NaN"),
        ("echo", "[" * 100_000 + "]" * 100_000, "cannot be read"),  # review: was a RecursionError
        ("sleep_ms", "[" + "9" * 5000 + "]", "cannot be read"),  # review: Python's int digit limit
    ],
)
def test_call_arguments_that_do_not_fit_the_idl_exit_2_naming_the_argument(
    run, providers, appkey, capsys, method, args, named
):
    providers("a")
    run("call", IDL, appkey, "Calculator", method, args, expect=2)
    err = capsys.readouterr().err
    assert named in err, err
    # The service is fine afterwards: nothing half-sent broke anything.
    assert json.loads(run("call", IDL, appkey, "Calculator", "ping")) == {"result": "a"}


@pytest.fixture
def nan_znode(zk, appkey):
    """A znode of this appkey whose data Python's json reads but JSON does not: start_time NaN."""
    port = free_port()
    path = "/services/%s/%s/Calculator_127.0.0.1_%d" % (TEST_ENV, appkey, port)
    data = '{"host": "127.0.0.1", "port": %d, "weight": 10, "valid": 1, "start_time": NaN}' % port
    zk.create(path, data.encode(), makepath=True)
    yield port
    zk.delete(path)


def test_a_deeply_nested_znode_is_shown_as_corrupt_not_a_traceback(run, zk, providers, appkey):
    svc = providers("a")
    port = free_port()
    path = "/services/%s/%s/Calculator_127.0.0.1_%d" % (TEST_ENV, appkey, port)
    zk.create(path, b"[" * 100_000 + b"]" * 100_000, makepath=True)
    try:
        nodes = {n["port"]: n for n in strict_json(run("--json", "ls", appkey))["nodes"]}
        assert nodes[port]["state"] == "corrupt" and nodes[svc.port]["state"] == "live"
    finally:
        zk.delete(path)


@pytest.mark.parametrize("argv", [["ls", ".."], ["ls", "."], ["watch", "..", "--for", "0.1"], ["ls", "a" * 129]])
def test_an_appkey_that_is_a_path_component_or_too_long_exits_2(run, argv, capsys):
    run(*argv, expect=2)
    assert "appkey" in capsys.readouterr().err


def test_ls_shows_a_znode_with_nan_as_corrupt(run, providers, appkey, nan_znode):
    svc = providers("a")
    text = run("ls", appkey)
    assert "127.0.0.1:%d" % nan_znode in text and "CORRUPT" in text
    assert "127.0.0.1:%d" % svc.port in text
    nodes = {n["port"]: n for n in strict_json(run("--json", "ls", appkey))["nodes"]}
    assert nodes[nan_znode]["state"] == "corrupt" and "NaN" in nodes[nan_znode]["problem"]
    assert nodes[svc.port]["state"] == "live" and nodes[svc.port]["uptime"] >= 0


def test_the_console_fleet_is_valid_json_with_a_corrupt_znode(cfg, providers, appkey, nan_znode):
    providers("a")
    console = ConsoleConfig(username="ops", password="pw")
    with Governance(cfg, source="console") as gov:
        client = create_app(gov, console).test_client()
        assert client.post("/login", data={"username": "ops", "password": "pw"}).status_code == 302
        reply = client.get("/api/fleet")
        assert reply.status_code == 200
        nodes = [n for n in strict_json(reply.get_data(as_text=True))["nodes"] if n["appkey"] == appkey]
    assert sorted(n["state"] for n in nodes) == ["corrupt", "live"]


def test_appkey_add_never_stores_a_value_cut_short(run, capsys):
    # Review: INSERT IGNORE stored a 300-character appkey as its first 128 and said "registered".
    run("appkey", "add", "a" * 129, expect=2)
    assert "appkey" in capsys.readouterr().err
    key = "t.long.%d" % free_port()
    run("appkey", "add", key, "--owner", "o" * 129, expect=1)  # wider than its column: refused, not cut
    assert key not in run("appkey", "list")
    assert "registered" in run("appkey", "add", key, "--owner", "team")
    assert "already registered" in run("appkey", "add", key)
    run("appkey", "remove", key)
