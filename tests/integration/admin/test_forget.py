"""Settings of nodes that are gone can be removed, audited; ls can hide offline nodes (issue 10 C13)."""

from __future__ import annotations

import json

import pytest
from conftest import free_port

from thriftprobe.admin import cli


def test_forget_removes_the_settings_of_a_node_that_is_gone_and_audits_it(run, settings, appkey):
    port = free_port()  # e.g. a pod that ran on an IP it will never have again
    run("node", appkey, "Calculator", "127.0.0.1:%d" % port, "--weight", "3")
    assert settings.get(port) is not None
    assert "settings removed" in run("node", "forget", appkey, "Calculator", "127.0.0.1:%d" % port, "--actor", "erin")
    assert settings.get(port) is None
    entry = json.loads(run("history", appkey, "--json"))[0]
    assert (entry["action"], entry["actor"], entry["old_weight"], entry["new_weight"]) == ("forget", "erin", 3, None)
    assert "forget (settings removed)" in run("history", appkey)
    assert "127.0.0.1:%d" % port not in run("ls", appkey)


def test_forget_refuses_a_live_node(run, providers, settings, appkey, capsys):
    svc = providers("a")
    run("node", "forget", appkey, "Calculator", "127.0.0.1:%d" % svc.port, expect=2)
    assert "is live" in capsys.readouterr().err
    assert settings.get(svc.port) is not None


def test_forget_of_a_node_without_settings_says_so(run, appkey):
    assert "nothing to forget" in run("node", "forget", appkey, "Calculator", "127.0.0.1:%d" % free_port(), expect=1)


def test_node_forget_has_help(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["node", "forget", "--help"])
    assert exc.value.code == 0 and "usage: thriftprobe node forget" in capsys.readouterr().out


def test_ls_can_hide_offline_nodes(run, providers, appkey):
    svc = providers("a")
    offline = free_port()
    run("node", appkey, "Calculator", "127.0.0.1:%d" % offline, "--weight", "3")
    text = run("ls", appkey, "--hide-offline")
    assert "127.0.0.1:%d" % svc.port in text and "127.0.0.1:%d" % offline not in text
    assert "127.0.0.1:%d" % offline in run("ls", appkey)
