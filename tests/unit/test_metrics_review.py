"""Review of issue 12: a forked child serves its own /metrics endpoint (it inherits the parent's
table, not its HTTP thread); explain()'s in-flight counts stay exact with readers racing; a
departed node's series go after a grace period."""

from __future__ import annotations

import os
import sys
import threading
import urllib.request

import pytest

from thriftprobe import metrics
from thriftprobe.consumer.presence import InFlight


def test_a_forked_child_gets_an_endpoint_of_its_own():
    parent = metrics.acquire_endpoint(0, "127.0.0.1")
    try:
        read_fd, write_fd = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: its endpoint must be one it serves itself
            try:
                mine = metrics.acquire_endpoint(0, "127.0.0.1")
                body = urllib.request.urlopen("http://127.0.0.1:%d/metrics" % mine.port, timeout=5).read()
                os.write(write_fd, b"%d %d" % (mine.port, len(body) > 0))
                mine.release()
            finally:
                os._exit(0)
        os.close(write_fd)
        child_port, served = map(int, os.read(read_fd, 100).split())
        os.close(read_fd)
        os.waitpid(pid, 0)
        assert child_port != parent.port and served == 1
    finally:
        parent.release()


def test_in_flight_counts_stay_exact_with_two_readers():
    flights = InFlight()
    address = ("127.0.0.1", 1)
    done = flights.start(address)  # one call in flight throughout
    seen = set()
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # interleave the readers as much as possible
    try:
        def read():
            for _ in range(20000):
                seen.add(flights.count(address))

        readers = [threading.Thread(target=read) for _ in range(2)]
        for t in readers:
            t.start()
        for t in readers:
            t.join()
    finally:
        sys.setswitchinterval(old)
    next(done)
    assert seen == {1}
    assert flights.count(address) == 0


@pytest.mark.skipif(not metrics.available(), reason="needs prometheus_client")
def test_endpoint_shared_within_one_process():
    a = metrics.acquire_endpoint(0, "127.0.0.1")
    b = metrics.acquire_endpoint(0, "127.0.0.1")
    try:
        assert a.port == b.port
    finally:
        a.release()
        b.release()


@pytest.mark.skipif(not metrics.available(), reason="needs prometheus_client")
def test_a_departed_nodes_series_go_after_the_grace_period(monkeypatch):
    """A long-lived consumer of a fleet redeployed on new addresses must not keep every old
    node's series (review of issue 12)."""
    import prometheus_client

    from thriftprobe.consumer import instruments as inst

    registry = prometheus_client.CollectorRegistry()
    rec = metrics.Recorder(registry)
    client = inst.ClientInstruments(rec, "app", "Svc")
    a, b = ("10.0.0.1", 1), ("10.0.0.2", 1)

    def nodes():
        return {
            s.labels["node"]
            for m in registry.collect() if m.name == "rpc_client_call_duration_seconds"
            for s in m.samples if s.labels.get("node")
        }

    for address in (a, b):
        client.call("ping", address, "ok", 0.001)
        client.ok_observer("ping", address)(0.001)
        client.opened(address)
    client.nodes_changed({a, b})
    client.nodes_changed({b})  # a left: its series stay through the grace period
    assert nodes() == {"10.0.0.1:1", "10.0.0.2:1"}
    monkeypatch.setattr(inst, "DEPARTED_GRACE", 0.0)
    client.nodes_changed({b})
    assert nodes() == {"10.0.0.2:1"}
    assert all(k[1] != a for k in client._calls) and all(k[1] != a for k in client.ok) and a not in client._live
    client.call("ping", a, "ok", 0.001)  # back again: recorded afresh
    assert "10.0.0.1:1" in nodes()
