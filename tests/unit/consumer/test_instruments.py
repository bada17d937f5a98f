"""Consumer metrics without servers: how a failure is classified, the gauges read at scrape time,
the discovery lag the table reports, and the hooks of the pool and the outlier detector."""

from __future__ import annotations

import socket
import time
from typing import Any, List, Tuple

import pytest
from local_listener import listening_socket  # noqa: F401 - the fixture "listener"
from prometheus_client import CollectorRegistry
from thriftpy2.thrift import TApplicationException, TException
from thriftpy2.transport import TTransportException

from thriftprobe.consumer.health import OutlierDetector
from thriftprobe.consumer.instruments import ClientInstruments, node_label, outcome_of
from thriftprobe.consumer.pool import ConnectionPool
from thriftprobe.consumer.table import NodeTable
from thriftprobe.errors import InvalidArgument, NoAvailableNode, Overloaded, ThriftProbeError
from thriftprobe.metrics import Recorder, add_gauge_source
from thriftprobe.node import Node


class Declared(TException):
    """Stands for an IDL exception (thriftpy2 makes them TException subclasses)."""


@pytest.mark.parametrize(
    "error, seconds, timeout_ms, expected",
    [
        (TTransportException(TTransportException.TIMED_OUT, "t"), 0.1, None, ("timeout", True)),
        (TTransportException(TTransportException.END_OF_FILE, "eof"), 0.1, None, ("transport_error", True)),
        (TTransportException(TTransportException.NOT_OPEN, "emfile"), 0.0, None, ("transport_error", True)),
        (TApplicationException(TApplicationException.INTERNAL_ERROR), 0.1, None, ("application_error", True)),
        (Overloaded("shed"), 0.1, None, ("overloaded", True)),
        (NoAvailableNode("none"), 0.0, None, ("no_node", False)),
        (NoAvailableNode("none in time"), 0.2, 200, ("timeout", True)),
        (NoAvailableNode("none"), 0.1, 200, ("no_node", False)),
        (InvalidArgument("bad"), 0.0, None, ("application_error", False)),
        (Declared(), 0.1, None, ("declared_exception", True)),
        (ThriftProbeError("client is closed"), 0.0, None, ("no_node", False)),
        (KeyboardInterrupt(), 0.1, None, ("transport_error", True)),
    ],
)
def test_outcome_of_a_failed_call(error: BaseException, seconds: float, timeout_ms: Any, expected: Tuple[str, bool]):
    assert outcome_of(error, seconds, timeout_ms) == expected


def test_node_labels():
    assert node_label(("10.0.0.1", 9090)) == "10.0.0.1:9090"
    assert node_label(("::1", 9090)) == "[::1]:9090"
    assert node_label(None) == ""


def test_gauge_sources_are_summed_at_scrape_time_and_their_series_goes_with_the_last():
    registry = CollectorRegistry()
    rec = Recorder(registry)
    labels = ("app", "Svc", "valid")
    values = [3, 4]
    remove_a = add_gauge_source(rec, rec.client_nodes, labels, lambda: values[0])
    remove_b = add_gauge_source(rec, rec.client_nodes, labels, lambda: values[1])

    def read() -> Any:
        return registry.get_sample_value("thriftprobe_client_nodes",
                                         {"appkey": "app", "rpc_service": "Svc", "state": "valid"})

    assert read() == 7
    values[0] = 10
    assert read() == 14
    remove_a()
    remove_a()  # idempotent
    assert read() == 4
    remove_b()
    assert read() is None
    add_gauge_source(rec, rec.client_nodes, labels, lambda: 1)
    assert read() == 1


def test_the_table_reports_discovery_lag_clamped_at_zero():
    table = NodeTable()
    seen: List[float] = []
    table.upsert_at("a", Node("h", 1), time.time() - 0.25)  # no observer: nothing happens
    table.set_lag_observer(seen.append)
    table.upsert_at("a", Node("h", 1, weight=5), time.time() - 0.25)
    table.upsert_at("a", Node("h", 1, weight=6), time.time() + 5.0)  # the registry's clock runs ahead
    table.upsert("a", Node("h", 1, weight=7))  # a plain upsert (the first fill) is no propagation
    assert len(seen) == 2
    assert 0.25 <= seen[0] < 1.0
    assert seen[1] == 0.0
    assert table.snapshot.all_nodes[0].weight == 7
    child = table.copy_for_child()
    child.upsert_at("b", Node("h", 2), time.time() - 0.5)
    assert len(seen) == 3 and seen[2] >= 0.5


def test_held_nodes_are_marked_in_the_snapshot():
    table = NodeTable(empty_grace=30.0)
    table.upsert("a", Node("h", 1))
    table.upsert("b", Node("h", 2))
    assert table.snapshot.held == frozenset()
    table.remove_many(["a", "b"])
    assert table.snapshot.held == {("h", 1), ("h", 2)}
    table.upsert("a", Node("h", 1))  # back: no longer held
    assert table.snapshot.held == {("h", 2)}
    table.close()


def test_the_detector_tells_its_listeners_of_each_ejection():
    now = [0.0]
    detector = OutlierDetector(consecutive_failures=2, base_ejection=1.0, clock=lambda: now[0])
    ejected: List[Any] = []
    detector.add_ejection_listener(ejected.append)
    for address in (("h", 1), ("h", 1), ("h", 2)):
        detector.failure(address, 4)
    assert ejected == [("h", 1)]
    now[0] = 1.5
    assert detector.claim_probe(lambda a: True) == ("h", 1)
    detector.failure(("h", 1), 4)  # the probe failed: ejected again
    assert ejected == [("h", 1), ("h", 1)]
    detector.remove_ejection_listener(ejected.append)
    detector.failure(("h", 2), 4)
    assert len(ejected) == 2


class Events:
    def __init__(self) -> None:
        self.seen: List[Tuple[str, Any]] = []

    def opened(self, address: Any) -> None:
        self.seen.append(("opened", address))

    def failed(self, address: Any) -> None:
        self.seen.append(("failed", address))

    def closed(self, address: Any) -> None:
        self.seen.append(("closed", address))




def test_the_pool_tells_its_watcher_what_it_opens_fails_to_open_and_closes_never_what_it_lends(listener):
    events = Events()
    pool = ConnectionPool(connect_timeout_ms=1000, socket_timeout_ms=1000, watcher=events)
    first = pool.acquire(listener)
    pool.release(first)
    again = pool.acquire(listener)
    assert again is first
    assert events.seen == [("opened", listener)]
    pool.discard(again)
    again.close()  # told once per connection
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        refused = closed.getsockname()
    with pytest.raises(TTransportException):
        pool.acquire(refused)
    third = pool.acquire(listener)
    pool.release(third)
    child = pool.abandon_after_fork()  # the parent's connections are forgotten here: closed for this process
    assert child._watcher is events
    assert events.seen == [
        ("opened", listener), ("closed", listener), ("failed", refused), ("opened", listener), ("closed", listener),
    ]
    pool.close()


def test_client_instruments_count_connections_by_node(listener):
    registry = CollectorRegistry()
    inst = ClientInstruments(Recorder(registry), "app", "Svc")
    pool = ConnectionPool(connect_timeout_ms=1000, socket_timeout_ms=1000, watcher=inst)
    node = "%s:%d" % listener

    def value(name: str, **labels: str) -> Any:
        return registry.get_sample_value(name, dict(appkey="app", rpc_service="Svc", node=node, **labels))

    inst.watch_pool(pool.idle_count)
    assert value("thriftprobe_client_connections", state="idle") is None  # no series before a first connection
    a, b = pool.acquire(listener), pool.acquire(listener)
    assert value("thriftprobe_client_connections", state="in_use") == 2
    assert value("thriftprobe_client_connects_total", event="opened") == 2
    pool.release(a)
    assert value("thriftprobe_client_connections", state="in_use") == 1
    assert value("thriftprobe_client_connections", state="idle") == 1
    pool.discard(b)
    assert value("thriftprobe_client_connections", state="in_use") == 0
    assert value("thriftprobe_client_connections", state="idle") == 1
    inst.nodes_changed({listener})
    assert value("thriftprobe_client_connections", state="idle") == 1
    inst.nodes_changed(set())  # the node left: its gauges go
    assert value("thriftprobe_client_connections", state="idle") is None
    assert value("thriftprobe_client_connections", state="in_use") is None
    inst.call("ping", listener, "ok", 0.002)
    inst.call("ping", listener, "ok", 0.003)
    inst.call_failed("ping", listener, NoAvailableNode("none"), 0.001, None)
    labels = {"rpc_system": "thrift", "rpc_method": "ping"}
    assert value("rpc_client_call_duration_seconds_count", outcome="ok", **labels) == 2
    assert registry.get_sample_value("rpc_client_call_duration_seconds_count", dict(
        appkey="app", rpc_service="Svc", node="", outcome="no_node", **labels)) == 1
    inst.close()
    pool.close()
