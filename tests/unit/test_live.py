"""The live figures' pure computation: the text parser, deltas, rates and quantiles."""

from __future__ import annotations

import pytest

from thriftprobe.admin.live import compute, parse_text, quantile, sample_from_text

S = "rpc_server_call_duration_seconds"


def page(calls, le_counts, appkey="a", service="S", node="h:1", method="m", outcome="ok"):
    labels = 'appkey="%s",rpc_service="%s",node="%s",rpc_method="%s",outcome="%s",rpc_system="thrift"' % (
        appkey, service, node, method, outcome)
    lines = ["# HELP %s x" % S, "# TYPE %s histogram" % S]
    for le, n in le_counts:
        lines.append('%s_bucket{%s,le="%s"} %s' % (S, labels, le, n))
    lines.append("%s_count{%s} %s" % (S, labels, calls))
    lines.append("%s_sum{%s} 0.5" % (S, labels))
    return "\n".join(lines) + "\n"


def test_parser_reads_labels_with_escapes_and_skips_junk():
    text = 'x_total{a="q\\"uo\\\\te",b="new\\nline"} 3.0 1700000000\n# comment\ngarbage{\nplain 4\n'
    got = list(parse_text(text))
    assert got == [("x_total", {"a": 'q"uo\\te', "b": "new\nline"}, 3.0), ("plain", {}, 4.0)]


def test_quantile_interpolates_like_histogram_quantile():
    buckets = {0.001: 0, 0.01: 50, 0.1: 100, float("inf"): 100}
    assert quantile(0.5, buckets) == pytest.approx(0.01)
    assert quantile(0.25, buckets) == pytest.approx(0.001 + 0.009 * 0.5)
    assert quantile(0.99, buckets) == pytest.approx(0.01 + 0.09 * 0.98)
    assert quantile(0.5, {0.1: 0, float("inf"): 0}) is None
    assert quantile(0.99, {0.1: 0, float("inf"): 10}) == 0.1  # beyond the last bound


def test_deltas_rates_error_rate_and_tree():
    old = sample_from_text(page(100, [(0.01, 100), ("+Inf", 100)]), "u", at=10.0)
    sample_from_text(page(5, [(0.01, 5), ("+Inf", 5)], outcome="application_error"), "u", old)
    new = sample_from_text(page(300, [(0.01, 250), ("+Inf", 300)]), "u", at=12.0)
    sample_from_text(page(55, [(0.01, 55), ("+Inf", 55)], outcome="application_error"), "u", new)
    figures = compute(old, new)
    (svc,) = figures["services"]
    assert (svc["appkey"], svc["service"]) == ("a", "S")
    assert svc["calls"] == 250 and svc["errors"] == 50
    assert svc["qps"] == 125.0 and svc["error_rate"] == 0.2
    assert svc["outcomes"] == {"application_error": 50, "ok": 200}
    # 200 of 250 below 10 ms: p50 inside the first bucket, p99 beyond the last finite bound
    assert 0 < svc["p50_ms"] <= 10 and svc["p99_ms"] == 10.0
    (node,) = svc["nodes"]
    assert node["node"] == "h:1" and node["calls"] == 250 and node["methods"][0]["method"] == "m"


def test_restart_and_new_series_and_unread_sources():
    old = sample_from_text(page(100, [("+Inf", 100)]), "u", at=0.0)
    new = sample_from_text(page(7, [("+Inf", 7)]), "u", at=1.0)  # the counter went down: restarted
    sample_from_text(page(3, [("+Inf", 3)], method="n"), "u", new)  # a new series of a source read before
    sample_from_text(page(9, [("+Inf", 9)], node="h:2"), "v", new)  # a source not read before: left out
    (svc,) = compute(old, new)["services"]
    assert svc["calls"] == 10
    assert [n["node"] for n in svc["nodes"]] == ["h:1"]
    assert {m["method"]: m["calls"] for m in svc["methods"]} == {"m": 7, "n": 3}


def test_scope_filters_other_services_of_a_shared_endpoint():
    text = page(5, [("+Inf", 5)]) + page(8, [("+Inf", 8)], service="Other")
    old = sample_from_text("", "u", at=0.0)
    new = sample_from_text(text, "u", at=1.0, scope={("a", "S")})
    assert [s["service"] for s in compute(old, new)["services"]] == ["S"]


# -- regressions of the review of the live view (fake endpoints on sockets) -------------------------

import socket  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402

from thriftprobe.admin.live import Sampler  # noqa: E402


class _Endpoint:
    """A raw HTTP/1.0 endpoint answering each request with ``handler(conn)``."""

    def __init__(self, handler):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.handler = handler
        self.closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while not self.closed:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn):
        try:
            conn.recv(4096)
            conn.sendall(b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\n")
            self.handler(conn)
        except OSError:
            pass
        finally:
            conn.close()

    def close(self):
        self.closed = True
        self.sock.close()


class _Gov:
    def __init__(self, *endpoints):
        self.endpoints = list(endpoints)

    def metrics_endpoints(self, appkey=None, service=None):
        return list(self.endpoints)


def _drip(conn):
    while True:
        conn.sendall(b"#")
        time.sleep(0.2)


def test_a_dripping_endpoint_cannot_hold_a_sample_past_its_deadline():
    slow = _Endpoint(_drip)
    good = _Endpoint(lambda c: c.sendall(page(5, [("+Inf", 5)]).encode()))
    gov = _Gov(("a", "S", ("h", 1, ("127.0.0.1", good.port))), ("a", "T", ("h", 2, ("127.0.0.1", slow.port))))
    sampler = Sampler(gov, timeout=0.5)
    try:
        for _ in range(3):  # the slow one is unreachable each time, fetches of it do not pile up
            began = time.monotonic()
            sample = sampler.sample()
            assert time.monotonic() - began < 1.5
            assert list(sample.errors) == ["http://127.0.0.1:%d/metrics" % slow.port]
            assert sample.calls[("a", "S", "h:1", "m")] == {"ok": 5.0}
        assert len(sampler._busy) <= 1
    finally:
        sampler.close()
        slow.close()
        good.close()


def test_an_endless_body_is_an_error_not_a_memory_hog():
    def endless(conn):
        chunk = b"# " + b"x" * (1 << 20) + b"\n"
        for _ in range(64):
            conn.sendall(chunk)

    huge = _Endpoint(endless)
    sampler = Sampler(_Gov(("a", "S", ("h", 1, ("127.0.0.1", huge.port)))), timeout=5.0)
    try:
        sample = sampler.sample()
        assert list(sample.errors) == ["http://127.0.0.1:%d/metrics" % huge.port]
    finally:
        sampler.close()
        huge.close()


@pytest.mark.parametrize("bad", ["NaN", "+Inf", "-Inf", "-5"])
def test_non_finite_or_negative_counts_are_dropped(bad):
    import json

    old = sample_from_text(page(1, [("+Inf", 1)]) + page(1, [("+Inf", 1)], service="Good"), "u", at=0.0)
    new = sample_from_text(page(bad, [("+Inf", bad)]) + page(4, [("+Inf", 4)], service="Good"), "u", at=1.0)
    figures = compute(old, new)
    json.dumps(figures, allow_nan=False)  # strict JSON for the browser
    assert {s["service"]: s["calls"] for s in figures["services"]} == {"Good": 3}


def test_a_series_back_in_scope_does_not_count_its_whole_total():
    text = page(10, [("+Inf", 10)]) + page(1000000, [("+Inf", 1000000)], service="B", node="h:2")
    s1 = sample_from_text(text, "u", at=0.0, scope={("a", "S"), ("a", "B")})
    s2 = sample_from_text(text, "u", at=1.0, scope={("a", "S")})  # B's node left ZooKeeper for a while
    s3 = sample_from_text(text, "u", at=2.0, scope={("a", "S"), ("a", "B")})
    assert [(s["service"], s["calls"]) for s in compute(s2, s3)["services"]] == [("S", 0)]
    assert sorted((s["service"], s["calls"]) for s in compute(s1, s3)["services"]) == [("B", 0), ("S", 0)]
    # a method's first calls (its series is new, its service was in scope) still count
    s4 = sample_from_text(text + page(3, [("+Inf", 3)], method="n"), "u", at=3.0, scope={("a", "S"), ("a", "B")})
    assert {m["method"]: m["calls"] for m in compute(s3, s4)["services"][1]["methods"]} == {"m": 0, "n": 3}


class _FakeSampler:
    timeout = 0.5

    def __init__(self):
        self.n = 0

    def sample(self):
        self.n += 1
        return sample_from_text(page(10 * self.n, [("+Inf", 10 * self.n)]), "u", at=float(self.n))

    def close(self):
        pass


def test_history_computes_once_per_tick_outside_its_lock(monkeypatch):
    from thriftprobe.admin import live

    history = live.History(_FakeSampler(), interval=1.0, window=2.0)
    calls = []

    def spy(old, new):
        assert not history._lock.locked()
        calls.append((old.at, new.at))
        return compute(old, new)

    monkeypatch.setattr(live, "compute", spy)
    for _ in range(4):
        history.tick()
    assert len(calls) == 6  # per tick: the chart point and the window, from the second tick on
    for _ in range(3):
        snap = history.snapshot()
    assert len(calls) == 6  # snapshot() computes nothing
    assert (snap["figures"]["from"], snap["figures"]["to"]) == (2.0, 4.0)
    assert snap["figures"]["services"][0]["calls"] == 20


def test_compute_is_linear_in_the_series():
    from thriftprobe.admin.live import Sample

    def mk(at, n_nodes, c):
        s = Sample(at)
        s.sources.add("u")
        for nd in range(n_nodes):
            for m in range(10):
                s.add(S + "_count", {"appkey": "a", "rpc_service": "S%d" % (nd % 20), "node": "n%d:1" % nd,
                                     "rpc_method": "m%d" % m}, c, "u")
        return s

    began = time.perf_counter()
    figures = compute(mk(0, 2000, 0), mk(1, 2000, 5))
    assert time.perf_counter() - began < 3.0  # it was quadratic in the nodes
    assert sum(s["calls"] for s in figures["services"]) == 2000 * 10 * 5


def test_history_keeps_ticking_past_a_dripping_endpoint_flags_stale_figures_and_stops_promptly():
    from thriftprobe.admin.live import History

    slow = _Endpoint(_drip)
    good = _Endpoint(lambda c: c.sendall(page(5, [("+Inf", 5)]).encode()))
    gov = _Gov(("a", "S", ("h", 1, ("127.0.0.1", good.port))), ("a", "T", ("h", 2, ("127.0.0.1", slow.port))))
    history = History(Sampler(gov, timeout=0.5), interval=0.2, window=1.0).start()
    try:
        time.sleep(2.5)
        snap = history.snapshot()
        assert snap["figures"] is not None and snap["age"] < history.stale_after() and not snap["stale"]
        assert snap["unreachable"] == ["http://127.0.0.1:%d/metrics" % slow.port]
        with history._lock:  # figures of long ago are flagged
            history._samples[-1].at -= 10
        assert history.snapshot()["stale"]
    finally:
        began = time.monotonic()
        history.stop()
        assert time.monotonic() - began < 2.0 and not history._thread.is_alive()
        slow.close()
        good.close()
