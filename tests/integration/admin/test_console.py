"""The web console end to end: a real headless Chromium logs in, sees a live node, disables it,
and a running consumer stops sending it calls."""

from __future__ import annotations

import json
import os
import threading
import urllib.error
import urllib.request
from collections import Counter
from pathlib import Path

import pytest
from conftest import IDL, ROOT, wait_until
from console_fixtures import CREDENTIALS, chromium, console_server  # noqa: F401 - the fixtures "browser", "console"

from thriftprobe import build_client


def test_api_needs_login_and_csrf(console, providers):
    with pytest.raises(urllib.error.HTTPError) as exc:
        urllib.request.urlopen(console.url + "api/fleet", timeout=5)
    assert exc.value.code == 401
    body = json.dumps({"appkey": "a", "service": "S", "host": "h", "port": 1, "weight": 1}).encode()
    request = urllib.request.Request(console.url + "api/node", data=body, headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as exc:
        urllib.request.urlopen(request, timeout=5)
    assert exc.value.code == 401
    page = urllib.request.urlopen(console.url, timeout=5)
    assert page.geturl().endswith("/login")


def test_wrong_non_ascii_login_is_refused_not_a_server_error(console):
    body = "username=ops&password=%C3%A9t%C3%A9".encode()
    request = urllib.request.Request(console.url + "login", data=body,
                                     headers={"Content-Type": "application/x-www-form-urlencoded"})
    with pytest.raises(urllib.error.HTTPError) as exc:
        urllib.request.urlopen(request, timeout=5)
    assert exc.value.code == 401


def test_operator_disables_a_live_node_in_the_browser(console, browser, providers, cfg, appkey):
    keep = providers("keep")
    target = providers("target")
    counts: Counter = Counter()
    stop = threading.Event()
    errors = []

    with build_client(IDL, appkey, "Calculator", config=cfg) as client:

        def load():
            while not stop.is_set():
                try:
                    counts[client.ping()] += 1
                except Exception as err:  # recorded, asserted below
                    errors.append(err)

        caller = threading.Thread(target=load, daemon=True)
        caller.start()
        wait_until(lambda: counts["target"] > 0, what="calls to reach the target")

        page = browser.new_page(viewport={"width": 1200, "height": 560})
        page.goto(console.url)
        assert page.url.endswith("/login")
        page.fill("#username", "ops")
        page.fill("#password", "wrong")
        page.click("#login")
        assert "Wrong user name or password" in page.inner_text("#login-error")
        page.fill("#username", "ops")
        page.fill("#password", "correct horse battery")
        page.click("#login")

        row = page.locator('tr[data-node="%s/Calculator/127.0.0.1:%d"]' % (appkey, target.port))
        row.locator("td.state").filter(has_text="live").wait_for(timeout=10000)
        assert row.locator("td.switch").inner_text() == "on"

        dialogs = []
        page.on("dialog", lambda d: (dialogs.append(d.message), d.accept()))
        row.locator("button.toggle").click()
        row.locator("td.switch").filter(has_text="off").wait_for(timeout=10000)
        assert dialogs and "Disable 127.0.0.1:%d" % target.port in dialogs[0]
        page.locator("#history tbody tr").filter(has_text="console:ops").first.wait_for(timeout=10000)

        # The change is live: the running consumer stops sending the target calls.
        assert client.table.wait_for(lambda s: target.port not in [n.port for n in s.available], timeout=5)
        before = counts["target"]
        keep_before = counts["keep"]
        wait_until(lambda: counts["keep"] >= keep_before + 300, what="more calls")
        assert counts["target"] == before
        stop.set()
        caller.join(5)
        assert errors == []
        assert keep.node.port != target.port

        shot = os.environ.get("THRIFTPROBE_SCREENSHOT")
        page.screenshot(path=shot or str(Path(ROOT, ".pytest-console.png")), full_page=True)
        if not shot:
            Path(ROOT, ".pytest-console.png").unlink()
