"""The thriftprobe command, run in-process (``cli.main``) and once as the installed script."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from conftest import IDL, MYSQL_PORT, TEST_ENV, ZK_PORT, free_port, wait_until

from thriftprobe.admin import cli

COMMANDS = [[], ["db"], ["db", "init"], ["appkey"], ["appkey", "add"], ["appkey", "list"], ["appkey", "remove"],
            ["ls"], ["node"], ["history"], ["watch"], ["call"], ["doctor"], ["console"]]


@pytest.mark.parametrize("argv", COMMANDS, ids=lambda a: " ".join(a) or "thriftprobe")
def test_every_command_has_help(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main([*argv, "--help"])
    assert exc.value.code == 0
    assert "usage: thriftprobe" in capsys.readouterr().out


def test_installed_script_runs():
    # The script installed beside this interpreter (the project's virtualenv), never one that
    # PATH happens to find elsewhere on the machine.
    script = Path(sys.executable).with_name("thriftprobe")
    done = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0 and "node" in done.stdout and "console" in done.stdout


def test_db_init_is_idempotent(run):
    assert "up to date" in run("db", "init")
    assert json.loads(run("--json", "db", "init"))["changes"] == []


def test_appkey_add_list_remove(run):
    key = "cli.app.%d" % free_port()
    assert "registered" in run("appkey", "add", key, "--owner", "team-a", "--description", "demo")
    assert "already registered" in run("appkey", "add", key)
    listed = {k["appkey"]: k for k in json.loads(run("appkey", "list", "--json"))}
    assert listed[key]["owner"] == "team-a"
    assert "removed" in run("appkey", "remove", key)
    assert "not registered" in run("appkey", "remove", key, expect=1)


def test_ls_shows_tree_with_live_and_offline(run, providers, appkey):
    svc = providers("a")
    offline = free_port()
    run("node", appkey, "Calculator", "127.0.0.1:%d" % offline, "--weight", "3")
    text = run("ls", appkey)
    assert "env test" in text and appkey in text and "Calculator" in text
    assert "127.0.0.1:%d" % svc.port in text and "live" in text and "offline" in text
    nodes = {n["port"]: n for n in json.loads(run("ls", appkey, "Calculator", "--json"))["nodes"]}
    assert nodes[svc.port]["state"] == "live" and nodes[offline]["state"] == "offline"


def test_node_weight_disable_enable(run, providers, appkey, zk):
    svc = providers("a")
    out = run("node", appkey, "Calculator", "127.0.0.1:%d" % svc.port, "--weight", "25")
    assert "weight 10 on -> weight 25 on" in out and "live node" in out
    out = json.loads(run("--json", "node", appkey, "Calculator", "127.0.0.1:%d" % svc.port, "--disable"))
    assert out["new"] == {"weight": 25, "valid": 0} and out["live"] is True
    assert json.loads(zk.get(svc.znode_path)[0])["valid"] == 0
    run("node", appkey, "Calculator", "127.0.0.1:%d" % svc.port, "--enable")
    assert json.loads(zk.get(svc.znode_path)[0])["valid"] == 1


def test_node_not_registered_says_so(run, appkey):
    out = run("node", appkey, "Calculator", "127.0.0.1:%d" % free_port(), "--disable")
    assert "not registered now" in out


@pytest.mark.parametrize("args", [["--weight", "1001"], ["--weight", "-1"], ["--weight", "x"],
                                  ["--weight", "5", "--disable"], []])
def test_node_bad_usage_exits_2(run, appkey, args, capsys):
    argv = ["node", appkey, "Calculator", "127.0.0.1:9", *args]
    try:
        run(*argv, expect=2)
    except SystemExit as exc:  # argparse's own usage errors
        assert exc.code == 2
    assert "weight" in capsys.readouterr().err or not args


def test_node_unknown_appkey_exits_1(run, capsys):
    run("node", "no.such.app", "Calculator", "127.0.0.1:9", "--weight", "5", expect=1)
    assert "AppkeyNotRegistered" in capsys.readouterr().err


def test_history_lists_changes(run, providers, appkey):
    svc = providers("a")
    run("node", appkey, "Calculator", "127.0.0.1:%d" % svc.port, "--weight", "11", "--actor", "dave")
    text = run("history", appkey)
    assert "dave (cli)" in text and "weight 10 on -> weight 11 on" in text
    entries = json.loads(run("history", appkey, "Calculator", "--json"))
    assert entries[0]["actor"] == "dave" and entries[0]["new_weight"] == 11


def test_watch_streams_events(config_path, providers, appkey, run):
    out = io.StringIO()
    watcher = threading.Thread(
        target=cli.main,
        args=(["--config", config_path, "--env", TEST_ENV, "--json", "watch", appkey, "--for", "20"],),
        kwargs={"stream": out},
        daemon=True,
    )
    watcher.start()
    wait_until(watcher.is_alive, what="watch to start")
    svc = providers("a")
    wait_until(lambda: '"join"' in out.getvalue(), what="the join event")
    run("node", appkey, "Calculator", "127.0.0.1:%d" % svc.port, "--weight", "12")
    wait_until(lambda: '"change"' in out.getvalue(), what="the change event")
    svc.stop()
    wait_until(lambda: '"leave"' in out.getvalue(), what="the leave event")
    events = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [e["event"] for e in events] == ["join", "change", "leave"]
    assert events[1]["weight"] == 12 and events[1]["old"]["weight"] == 10


def test_call_prints_structs_and_declared_exceptions_as_json(run, providers, appkey):
    providers("a")
    result = json.loads(run("call", IDL, appkey, "Calculator", "compute", '{"operation": {"left": 2, "right": 40}}'))
    assert result == {"result": {"value": 42, "served_by": "a"}}
    assert json.loads(run("call", IDL, appkey, "Calculator", "echo", '["hi"]')) == {"result": "hi"}
    assert json.loads(run("call", IDL, appkey, "Calculator", "ping")) == {"result": "a"}
    raised = json.loads(run("call", IDL, appkey, "Calculator", "compute",
                            '{"operation": {"left": 1, "right": 0, "op": "/"}}', expect=3))
    assert raised == {"exception": "CalcError", "fields": {"message": "division by zero"}}


@pytest.mark.parametrize("method, args", [("nope", "{}"), ("echo", "{bad json"), ("echo", '{"wrong": 1}')])
def test_call_bad_input_exits_2(run, providers, appkey, method, args):
    providers("a")
    run("call", IDL, appkey, "Calculator", method, args, expect=2)


def test_call_without_providers_exits_1(run, appkey, capsys):
    run("call", IDL, appkey, "Calculator", "ping", expect=1)
    assert "NoAvailableNode" in capsys.readouterr().err


def test_doctor_passes_on_a_healthy_setup(run):
    text = run("doctor")
    assert "all checks passed" in text
    assert [c["check"] for c in json.loads(run("doctor", "--json"))] == ["config", "zookeeper", "redis", "mysql"]


def test_doctor_fails_with_a_line_per_problem(tmp_path):
    path = tmp_path / "c.yml"
    path.write_text(
        f"""
mysql: {{test: {{host: 127.0.0.1, port: {MYSQL_PORT}, username: root, database: thriftprobe_nothing_here}}}}
redis: {{test: {{host: 127.0.0.1, port: 1, socket_timeout: 300}}}}
zkserver: {{test: {{host: 127.0.0.1, port: {ZK_PORT}}}}}
"""
    )
    out = io.StringIO()
    assert cli.main(["--config", str(path), "--env", "test", "doctor"], stream=out) == 1
    text = out.getvalue()
    assert "ok   zookeeper" in text
    assert "FAIL redis" in text and "FAIL mysql" in text and "db init" in text
    assert cli.main(["--config", str(tmp_path / "missing.yml"), "doctor"], stream=out) == 1
    assert "FAIL config" in out.getvalue()


def test_console_refuses_to_start_without_credentials(run, capsys):
    run("console", "--port", "0", expect=1)
    assert "console" in capsys.readouterr().err
