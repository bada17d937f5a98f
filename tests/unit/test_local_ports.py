"""The README's two commands share one machine: the demo's providers must not want a port the
services script gives its servers by default (Prometheus once took 19090, the demo's first)."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_demo_ports_are_not_the_services_default_ports():
    script = (ROOT / "tests" / "services.sh").read_text()
    services = {int(p) for p in re.findall(r'\$\{THRIFTPROBE_\w+_PORT:-(\d+)\}', script)}
    assert {2181, 6379, 3306} <= services  # the parse found the defaults
    demo = (ROOT / "tests" / "demo.py").read_text()
    base = int(re.search(r"^BASE_PORT = (\d+)$", demo, re.M).group(1))
    weights = re.search(r"^WEIGHTS = \{(.*?)\}", demo, re.M | re.S)
    count = weights.group(1).count(":") if weights else 3
    assert not services & set(range(base, base + count)), (services, base, count)
