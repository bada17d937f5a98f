"""Issue 12: a real Prometheus (started by tests/services.sh) finds the providers of the test env
in ZooKeeper through serverset_sd_configs, scrapes their /metrics endpoints, and answers with
per-node call counts and latency quantiles that match the calls this test made."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional

import pytest
import thriftpy2
from conftest import CONFIG_TEXT, IDL, ROOT, TEST_ENV, ZK_PORT, free_port, spawn_provider, wait_until
from thriftpy2.rpc import make_client

from thriftprobe.metrics import BUCKETS
from thriftprobe.node import Node

PROMETHEUS = "http://127.0.0.1:%d" % int(os.environ.get("THRIFTPROBE_PROMETHEUS_PORT", "19990"))
SLEEP_MS = 30  # what the handler sleeps: every duration falls in the bucket (0.025, 0.05]

demo_thrift = thriftpy2.load(IDL, module_name="demo_thrift")


def _get(path: str, **params: str) -> Any:
    url = PROMETHEUS + path + ("?" + urllib.parse.urlencode(params) if params else "")
    with urllib.request.urlopen(url, timeout=5) as answer:
        body = json.loads(answer.read())
    assert body["status"] == "success", body
    return body["data"]


def _ready() -> bool:
    try:
        with urllib.request.urlopen(PROMETHEUS + "/-/ready", timeout=2) as answer:
            return answer.status == 200
    except OSError:
        return False


@pytest.fixture(scope="module")
def prometheus(services: None) -> str:
    """The Prometheus of tests/services.sh (the session's `services` start brings it up; when
    the servers were started beforehand without it, start it here)."""
    if not _ready():
        subprocess.run(["bash", str(ROOT / "tests" / "services.sh"), "start", "prometheus"], check=True)
    wait_until(_ready, 30, "Prometheus /-/ready")
    return PROMETHEUS


@pytest.fixture
def metrics_config(tmp_path: Path) -> str:
    """The test config, with every provider of the env serving metrics (the config file's key)."""
    path = tmp_path / "config.yml"
    path.write_text(CONFIG_TEXT + "provider:\n  %s: {metrics_port: 0}\n" % TEST_ENV)
    return str(path)


@pytest.fixture
def spawned() -> Iterator[List[subprocess.Popen]]:
    procs: List[subprocess.Popen] = []
    yield procs
    for proc in procs:
        proc.send_signal(signal.SIGTERM)
    for proc in procs:
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _call(port: int, times: int) -> List[float]:
    """Call sleep_ms ``times`` times; return each call's duration as this client saw it (the
    provider's own measure of a call is never longer)."""
    client = make_client(demo_thrift.Calculator, "127.0.0.1", port, timeout=5000)
    took = []
    try:
        for _ in range(times):
            started = time.perf_counter()
            client.sleep_ms(SLEEP_MS)
            took.append(time.perf_counter() - started)
    finally:
        client.close()
    return took


def _bucket_bound(seconds: float) -> float:
    """The upper bound of the histogram bucket ``seconds`` falls in."""
    return next((b for b in BUCKETS if seconds <= b), float("inf"))


def _node(zk: Any, appkey: str, port: int) -> Node:
    data, _ = zk.get("/services/%s/%s/Calculator_127.0.0.1_%d" % (TEST_ENV, appkey, port))
    return Node.from_json(data)


def _query(expr: str) -> List[Dict[str, Any]]:
    data = _get("/api/v1/query", query=expr)
    assert data["resultType"] == "vector", data
    return data["result"]


def _counts(appkey: str) -> Dict[str, float]:
    expr = 'sum by (node) (rpc_server_call_duration_seconds_count{appkey="%s"})' % appkey
    return {r["metric"]["node"]: float(r["value"][1]) for r in _query(expr)}


def _targets_up(addresses: List[str]) -> Optional[Dict[str, str]]:
    found = {t["labels"]["instance"]: t["health"] for t in _get("/api/v1/targets", state="active")["activeTargets"]}
    health = {a: found.get(a, "absent") for a in addresses}
    return health if all(h == "up" for h in health.values()) else None


def test_prometheus_discovers_the_providers_and_counts_their_calls(
    prometheus, providers, spawned, metrics_config, zk, appkey
):
    # Two providers in this process (they share one endpoint, one target) and one in a process
    # of its own, which takes metrics_port from the config file.
    a = providers("a", metrics_port=0)
    b = providers("b", metrics_port=0)
    c = spawn_provider(metrics_config, TEST_ENV, appkey, "c")
    spawned.append(c)
    assert a.metrics_port == b.metrics_port
    nodes = {svc.port: _node(zk, appkey, svc.port) for svc in (a, b)}
    nodes[c.port] = _node(zk, appkey, c.port)
    for port, node in nodes.items():
        assert node.extras["serviceEndpoint"] == {"host": "127.0.0.1", "port": port}
        assert node.extras["status"] == "ALIVE"
    endpoints = {
        "%(host)s:%(port)d" % node.extras["additionalEndpoints"]["metrics"] for node in nodes.values()
    }
    assert len(endpoints) == 2, endpoints  # a and b share theirs
    assert nodes[c.port].extras["additionalEndpoints"]["metrics"]["port"] != a.metrics_port

    wait_until(lambda: _targets_up(sorted(endpoints)), 30, "Prometheus to find and scrape %s" % sorted(endpoints))

    calls = {a.port: 7, b.port: 11, c.port: 5}
    took: List[float] = []
    for port, times in calls.items():
        took += _call(port, times)
    expected = {"127.0.0.1:%d" % port: float(times) for port, times in calls.items()}
    wait_until(lambda: _counts(appkey) == expected, 30, "Prometheus to count %s" % expected)

    # Every call slept SLEEP_MS, so no quantile is below that bucket's lower bound; and none is
    # above the bucket of the same quantile of what the client measured (the provider's time is
    # part of the client's). On a quiet machine both are the (0.025, 0.05] bucket.
    took.sort()
    for q in (0.5, 0.99):
        expr = 'histogram_quantile(%s, sum by (le) (rpc_server_call_duration_seconds_bucket{appkey="%s"}))' % (
            q, appkey,
        )
        (result,) = _query(expr)
        value = float(result["value"][1])
        client_side = took[min(len(took) - 1, int(q * len(took)))]
        assert 0.025 <= value <= _bucket_bound(client_side), (q, value, client_side)
    by_method = _query(
        'sum by (rpc_method, outcome, rpc_system) (rpc_server_call_duration_seconds_count{appkey="%s"}) > 0' % appkey
    )  # every declared method has an "ok" series from the start, at 0
    assert [(r["metric"], float(r["value"][1])) for r in by_method] == [
        ({"rpc_method": "sleep_ms", "outcome": "ok", "rpc_system": "thrift"}, 23.0)
    ]


def test_the_service_script_starts_prometheus_once_and_stops_it(services, tmp_path):
    """A port from the environment reaches the generated config; a second start only probes;
    stop ends the server this script started, from its own state folder."""
    port = free_port()
    env = {**os.environ, "THRIFTPROBE_STATE_DIR": str(tmp_path / "state"), "THRIFTPROBE_PROMETHEUS_PORT": str(port)}

    def script(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["bash", str(ROOT / "tests" / "services.sh"), *args], env=env, capture_output=True,
                              text=True, timeout=120, check=False)

    try:
        done = script("start", "prometheus")
        assert done.returncode == 0, done.stderr
        generated = (tmp_path / "state" / "prometheus" / "prometheus.yml").read_text()
        assert "serverset_sd_configs" in generated and '"127.0.0.1:%s"' % ZK_PORT in generated
        with urllib.request.urlopen("http://127.0.0.1:%d/-/ready" % port, timeout=5) as answer:
            assert answer.status == 200
        again = script("start", "prometheus")
        assert again.returncode == 0 and "already running" in again.stderr
        status = script("status", "prometheus")
        assert status.returncode == 0 and "started by services.sh" in status.stdout
    finally:
        stopped = script("stop", "prometheus")
    assert stopped.returncode == 0, stopped.stderr
    assert script("status", "prometheus").returncode == 3
