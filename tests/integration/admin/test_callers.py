"""Who calls whom, from the operator's side: ``thriftprobe callers`` and the console's dependency
view, over the entries that running clients register."""

from __future__ import annotations

import json
import os
import socket
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest
from conftest import IDL, ROOT, TEST_ENV, wait_until
from console_fixtures import CREDENTIALS, chromium, console_server  # noqa: F401 - the fixtures "browser", "console"

from thriftprobe import build_client
from thriftprobe.stores import appkeys

HOST = socket.gethostname()


@pytest.fixture
def other_appkey(cfg):
    key = "t.%s" % uuid.uuid4().hex[:12]
    appkeys.add_appkey(cfg.mysql, key, owner="pytest")
    return key




def test_callers_lists_each_services_callers_and_what_each_caller_calls(run, cfg, appkey, other_appkey, zk):
    with build_client(IDL, appkey, "Calculator", config=cfg, caller="t-web"), \
            build_client(IDL, appkey, "Calculator", config=cfg, caller="t-web"), \
            build_client(IDL, appkey, "Calculator", config=cfg, caller="t-batch"), \
            build_client(IDL, other_appkey, "Calculator", config=cfg, caller="t-batch"):
        text = run("callers", appkey)
        lines = text.splitlines()
        assert lines[0] == "env %s" % TEST_ENV
        assert "  %s/Calculator" % appkey in lines
        assert [line.split() for line in lines if line.startswith("    t-")] == [
            ["t-batch", "1", "client(s)", "on", HOST],
            ["t-web", "2", "client(s)", "on", HOST],
        ]
        data = json.loads(run("callers", appkey, "Calculator", "--json"))
        assert data["env"] == TEST_ENV
        assert data["services"] == [{"appkey": appkey, "service": "Calculator", "callers": [
            {"caller": "t-batch", "hosts": [HOST], "count": 1},
            {"caller": "t-web", "hosts": [HOST], "count": 2},
        ]}]
        assert len(data["consumers"]) == 3
        assert {c["pid"] for c in data["consumers"]} == {os.getpid()}
        assert all(c["sdk"].startswith("thriftprobe/") and c["uptime"] >= 0 for c in data["consumers"])
        # The whole environment: what each caller calls, across appkeys.
        everything = json.loads(run("callers", "--json"))
        calls = {c["caller"]: c["calls"] for c in everything["callers"]}
        assert calls["t-batch"] == [
            {"appkey": a, "service": "Calculator", "hosts": [HOST], "count": 1} for a in sorted([appkey, other_appkey])
        ]
        assert [(c["appkey"], c["count"]) for c in calls["t-web"]] == [(appkey, 2)]
        text = run("callers")
        assert "what each caller calls:" in text and "    %s/Calculator" % other_appkey in text
    # Gone with the clients.
    assert json.loads(run("callers", appkey, "--json"))["consumers"] == []
    assert "(no consumers registered)" in run("callers", appkey)


def test_callers_shows_a_corrupt_entry_and_refuses_bad_names(run, appkey, zk):
    path = "/consumers/%s/%s/Calculator/junk" % (TEST_ENV, appkey)
    zk.create(path, b"{not json", ephemeral=True, makepath=True)
    try:
        data = json.loads(run("callers", appkey, "--json"))
        [entry] = data["consumers"]
        assert entry["caller"] == "?" and entry["name"] == "junk" and "not JSON" in entry["problem"]
        assert "CORRUPT consumer entry %s/Calculator/junk" % appkey in run("callers", appkey)
    finally:
        zk.delete(path)
    run("callers", "..", expect=2)
    run("callers", appkey, "no-such/service", expect=2)


def test_callers_api_needs_login(console):
    with pytest.raises(urllib.error.HTTPError) as exc:
        urllib.request.urlopen(console.url + "api/callers", timeout=5)
    assert exc.value.code == 401
    page = urllib.request.urlopen(console.url + "dependencies", timeout=5)
    assert page.geturl().endswith("/login")


def test_dependency_view_in_the_browser(console, browser, cfg, appkey, other_appkey, providers):
    providers("a")
    web = build_client(IDL, appkey, "Calculator", config=cfg, caller="t-web")
    web2 = build_client(IDL, appkey, "Calculator", config=cfg, caller="t-web")
    batch = build_client(IDL, other_appkey, "Calculator", config=cfg, caller="t-batch")
    try:
        page = browser.new_page(viewport={"width": 1200, "height": 520})
        page.goto(console.url)
        page.fill("#username", "ops")
        page.fill("#password", "correct horse battery")
        page.click("#login")
        page.click("#nav-dependencies")
        assert page.url.endswith("/dependencies")

        by_service = page.locator('#callers-by-service tr[data-service="%s/Calculator"][data-caller="t-web"]' % appkey)
        by_service.locator("td.count").filter(has_text="2").wait_for(timeout=10000)
        assert by_service.locator("td.hosts").inner_text() == HOST
        by_caller = page.locator('#calls-by-caller tr[data-caller="t-batch"][data-service="%s/Calculator"]'
                                 % other_appkey)
        assert by_caller.locator("td.count").inner_text() == "1"

        # Live: a client that closes leaves the view within a refresh or two.
        web2.close()
        by_service.locator("td.count").filter(has_text="1").wait_for(timeout=10000)
        batch.close()
        by_caller.wait_for(state="detached", timeout=10000)

        shot = os.environ.get("THRIFTPROBE_SCREENSHOT_CALLERS")
        page.screenshot(path=shot or str(Path(ROOT, ".pytest-callers.png")), full_page=True)
        if not shot:
            Path(ROOT, ".pytest-callers.png").unlink()
        page.click("#nav-fleet")
        wait_until(lambda: page.url == console.url, what="the fleet page")
    finally:
        web.close()
        web2.close()
        batch.close()
