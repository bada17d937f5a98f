"""The console's live view in a real headless Chromium: per service, node and method figures
read from real providers' metrics endpoints, and a chart that shows a weight change moving the
traffic within seconds."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

from conftest import IDL, ROOT, wait_until
from console_fixtures import CREDENTIALS, chromium, console_server  # noqa: F401 - the fixtures "browser", "console"
from prometheus_client import CollectorRegistry

from thriftprobe import build_client
from thriftprobe.metrics import Recorder


def series(page, appkey: str, port: int):
    found = page.locator('.card[data-service="%s/Calculator"] .qps-chart polyline[data-series="127.0.0.1:%d"]'
                         % (appkey, port))
    if found.count() == 0:
        return []
    return [float(v) if v else None for v in (found.get_attribute("data-values") or "").split(",")]


def test_live_chart_shows_a_weight_change_moving_traffic(console, browser, providers, cfg, appkey, gov):
    rec = Recorder(CollectorRegistry())
    a = providers("a", metrics=rec, metrics_port=0)
    b = providers("b", metrics=rec, metrics_port=0)
    stop = threading.Event()
    errors = []

    with build_client(IDL, appkey, "Calculator", config=cfg, metrics=False) as client:

        def load():
            while not stop.is_set():
                try:
                    client.ping()
                    client.echo("x")
                except Exception as err:  # recorded, asserted below
                    errors.append(err)
                time.sleep(0.002)

        caller = threading.Thread(target=load, daemon=True)
        caller.start()
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 900})
            page.goto(console.url + "live")
            page.fill("#username", "ops")
            page.fill("#password", "correct horse battery")
            page.click("#login")
            page.goto(console.url + "live")

            # Both nodes take traffic, on the chart and in the table.
            def both_busy():
                sa, sb = series(page, appkey, a.port), series(page, appkey, b.port)
                return len(sb) >= 3 and all(v and v > 5 for v in sa[-3:] + sb[-3:])

            wait_until(both_busy, timeout=20, what="both nodes busy on the chart")
            node_b = page.locator('tr.node[data-row="%s/Calculator/127.0.0.1:%d"]' % (appkey, b.port))
            assert float(node_b.locator("td.qps").inner_text()) > 5
            assert node_b.locator("td.err").inner_text() == "0.0%"
            method = page.locator('tr.method[data-row="%s/Calculator#echo"]' % appkey)
            assert float(method.locator("td.qps").inner_text()) > 5
            assert page.locator('tr.svc[data-row="%s/Calculator"] td.p99' % appkey).inner_text() != "-"

            # The operator sets node b's weight to 0: within seconds its line drops to 0, a's carries all.
            changed = time.monotonic()
            gov.set_node(appkey, "Calculator", "127.0.0.1", b.port, weight=0, actor="pytest")

            def moved():
                sa, sb = series(page, appkey, a.port), series(page, appkey, b.port)
                return sb[-2:] == [0.0, 0.0] and all(v and v > 5 for v in sa[-2:])

            wait_until(moved, timeout=10, what="node b's line at 0 on the chart")
            seen_after = time.monotonic() - changed
            print("weight change seen on the chart after %.1f s" % seen_after)
            assert seen_after < 6, seen_after
            sb = series(page, appkey, b.port)
            assert any(v and v > 5 for v in sb[:-3])  # the chart still shows b's traffic before the change
            time.sleep(3)  # a few points of the new state on the chart, for the screenshot
            wait_until(lambda: float(node_b.locator("td.qps").inner_text()) == 0, what="b's QPS at 0 in the table")
            shot = os.environ.get("THRIFTPROBE_SCREENSHOT")
            path = shot or str(Path(ROOT, ".pytest-console-live.png"))
            page.screenshot(path=path, full_page=True)
            if not shot:
                Path(path).unlink()
        finally:
            stop.set()
            caller.join(5)
    assert errors == []
