"""`thriftprobe top`: live figures read from real providers' metrics endpoints match the calls made."""

from __future__ import annotations

import json
import threading
import time

import pytest
import thriftpy2
from conftest import IDL, wait_until
from prometheus_client import CollectorRegistry
from test_prometheus import _get, prometheus  # noqa: F401 - the fixture
from thriftpy2.thrift import TApplicationException

from thriftprobe import build_client
from thriftprobe.admin.live import Sampler, compute
from thriftprobe.metrics import Recorder

calc = thriftpy2.load(IDL, module_name="demo_thrift")


@pytest.fixture
def rec() -> Recorder:
    return Recorder(CollectorRegistry())


def recorded(rec: Recorder, appkey: str) -> float:
    total = 0.0
    for metric in rec.registry.collect():
        for s in metric.samples:
            if s.name == "rpc_server_call_duration_seconds_count" and s.labels.get("appkey") == appkey:
                total += s.value
    return total


def test_top_once_json_counts_the_calls_made_in_its_window(providers, rec, run, cfg, appkey):
    a = providers("a", metrics=rec, metrics_port=0)
    b = providers("b", metrics=rec, metrics_port=0)
    result = {}

    def top():
        result["out"] = run("--json", "top", appkey, "Calculator", "--once", "--window", "3")

    with build_client(IDL, appkey, "Calculator", config=cfg, metrics=False) as client:
        client.ping()  # connected before the window opens
        wait_until(lambda: recorded(rec, appkey) == 1, what="the first call recorded")
        thread = threading.Thread(target=top)
        thread.start()
        time.sleep(1.0)  # the first sample is taken at once
        tags = {"a": 0, "b": 0}
        for _ in range(120):
            tags[client.ping()] += 1
        for _ in range(30):
            with pytest.raises(TApplicationException):
                client.compute(calc.Operation(left=1, right=2, op="%"))  # ValueError: application_error
        for _ in range(10):
            with pytest.raises(calc.CalcError):
                client.compute(calc.Operation(left=1, right=0, op="/"))  # declared: not an error
        wait_until(lambda: recorded(rec, appkey) == 161, what="the calls recorded")
        thread.join(10)
    data = json.loads(result["out"])
    (svc,) = data["services"]
    assert (svc["appkey"], svc["service"]) == (appkey, "Calculator")
    assert svc["calls"] == 160
    assert svc["errors"] == 30 and svc["error_rate"] == pytest.approx(30 / 160, abs=1e-4)
    assert svc["outcomes"] == {"ok": 120, "application_error": 30, "declared_exception": 10}
    assert svc["qps"] == pytest.approx(160 / data["seconds"], rel=1e-2)
    assert 2.9 < data["seconds"] < 4
    methods = {m["method"]: m for m in svc["methods"]}
    assert methods["ping"]["calls"] == 120 and methods["ping"]["error_rate"] == 0
    assert methods["compute"]["calls"] == 40 and methods["compute"]["error_rate"] == 0.75
    nodes = {n["node"]: n for n in svc["nodes"]}
    assert set(nodes) == {"127.0.0.1:%d" % a.port, "127.0.0.1:%d" % b.port}
    # every declared method has a row, at 0 when not called
    assert {m["method"]: m["calls"] for m in svc["methods"]} == {
        "ping": 120, "compute": 40, "echo": 0, "sleep_ms": 0, "record": 0}
    pings = {addr: {m["method"]: m["calls"] for m in n["methods"]}["ping"] for addr, n in nodes.items()}
    assert pings == {"127.0.0.1:%d" % a.port: tags["a"], "127.0.0.1:%d" % b.port: tags["b"]}
    assert sum(n["calls"] for n in nodes.values()) == 160
    assert 0 < svc["p50_ms"] < 25 and svc["p50_ms"] <= svc["p99_ms"]
    assert data["unreachable"] == []


def test_latency_quantiles_follow_a_slow_method(providers, rec, gov, cfg, appkey):
    providers("a", metrics=rec, metrics_port=0)
    sampler = Sampler(gov, appkey, "Calculator")
    try:
        with build_client(IDL, appkey, "Calculator", config=cfg, metrics=False) as client:
            client.ping()
            wait_until(lambda: recorded(rec, appkey) == 1, what="the first call recorded")
            first = sampler.sample()
            for _ in range(20):
                client.sleep_ms(30)  # 25..50 ms bucket
            wait_until(lambda: recorded(rec, appkey) == 21, what="the calls recorded")
            last = sampler.sample()
    finally:
        sampler.close()
    (svc,) = compute(first, last)["services"]
    method = {m["method"]: m for m in svc["methods"]}["sleep_ms"]
    assert method["calls"] == 20 and svc["calls"] == 20
    assert 25 <= method["p50_ms"] <= 50 and 25 <= method["p99_ms"] <= 50


def test_top_text_and_a_provider_without_endpoint(providers, run, appkey):
    providers("plain")  # no metrics_port: nothing to scrape, no error
    out = run("top", appkey, "--once", "--window", "0.2")
    assert "SERVICE / NODE / #METHOD" in out and "no calls recorded" in out


def prom_calls(appkey: str) -> float:
    data = _get("/api/v1/query", query='sum(rpc_server_call_duration_seconds_count{appkey="%s"})' % appkey)
    return float(data["result"][0]["value"][1]) if data["result"] else -1.0


def test_top_reads_a_real_prometheus(prometheus, providers, rec, run, cfg, appkey):  # noqa: F811
    svc = providers("a", metrics=rec, metrics_port=0)
    with build_client(IDL, appkey, "Calculator", config=cfg, metrics=False) as client:
        client.ping()
        wait_until(lambda: prom_calls(appkey) == 1, timeout=30, what="Prometheus to scrape the first call")
        result = {}

        def top():
            result["out"] = run("--json", "top", appkey, "--once", "--window", "4", "--prometheus", prometheus)

        thread = threading.Thread(target=top)
        thread.start()
        time.sleep(0.5)
        for _ in range(50):
            client.ping()
        for _ in range(5):
            with pytest.raises(TApplicationException):
                client.compute(calc.Operation(left=1, right=2, op="%"))
        wait_until(lambda: prom_calls(appkey) == 56, timeout=10, what="Prometheus to scrape the calls")
        thread.join(10)
    data = json.loads(result["out"])
    (found,) = data["services"]
    assert found["calls"] == 55 and found["errors"] == 5
    (node,) = found["nodes"]
    assert node["node"] == "127.0.0.1:%d" % svc.port
    assert {m["method"]: m["calls"] for m in node["methods"]}["ping"] == 50


def test_top_refreshes_until_for_runs_out(providers, rec, run, cfg, appkey):
    providers("a", metrics=rec, metrics_port=0)
    stop = threading.Event()
    with build_client(IDL, appkey, "Calculator", config=cfg, metrics=False) as client:

        def load():
            while not stop.is_set():
                client.ping()
                time.sleep(0.005)

        caller = threading.Thread(target=load)
        caller.start()
        try:
            began = time.monotonic()
            out = run("--json", "top", appkey, "--interval", "0.5", "--window", "1", "--for", "2.2")
            took = time.monotonic() - began
        finally:
            stop.set()
            caller.join(5)
    frames = [json.loads(line) for line in out.splitlines()]
    assert 3 <= len(frames) <= 5 and took < 4
    last = frames[-1]
    assert 0.9 < last["seconds"] < 1.5  # the window, not the whole run
    assert last["services"][0]["qps"] > 20
    text = run("top", appkey, "--interval", "0.3", "--for", "0.7")
    assert text.count("SERVICE / NODE / #METHOD") == 2
