"""The console's tests' fixtures: a console on a free port, and Debian's Chromium driven by
Playwright (a module of its own: a second conftest.py would shadow tests/integration/conftest.py,
which tests import by the name ``conftest``)."""

from __future__ import annotations

import os
from typing import Any, Iterator

import pytest

from thriftprobe.admin.console import ConsoleServer
from thriftprobe.config import Config, ConsoleConfig

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic"]
CREDENTIALS = ConsoleConfig(username="ops", password="correct horse battery")


@pytest.fixture(name="console")
def console_server(cfg: Config) -> Iterator[ConsoleServer]:
    with ConsoleServer(cfg, CREDENTIALS, "127.0.0.1", 0) as server:
        yield server


@pytest.fixture(name="browser")
def chromium() -> Iterator[Any]:
    sync_api = pytest.importorskip("playwright.sync_api")
    if not os.path.exists(CHROMIUM):
        pytest.fail("Debian's chromium is not installed (tests/bootstrap.sh installs it)")
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        yield browser
        browser.close()
