"""Issue 12, the provider's side: what it records per call (outcomes, shed requests, unknown
methods), its in-flight, queue, rejection and connection figures, hooks chained with a user's,
the /metrics endpoint (metrics_port) and the serverset fields of its znode."""

from __future__ import annotations

import socket
import threading
import urllib.request
from typing import Dict, Optional

import pytest
import thriftpy2
from conftest import CONFIG_TEXT, IDL, TEST_ENV, Handler, free_port, wait_until
from prometheus_client import CollectorRegistry
from thriftpy2.rpc import make_client
from thriftpy2.thrift import TApplicationException

from thriftprobe import build_client, config, start_service
from thriftprobe.errors import ConfigError, InvalidArgument, ThriftProbeError
from thriftprobe.metrics import Recorder
from thriftprobe.node import Node
from thriftprobe.provider import ServerHooks

calc = thriftpy2.load(IDL, module_name="demo_thrift")


@pytest.fixture
def rec() -> Recorder:
    return Recorder(CollectorRegistry())


def client(svc, timeout=5000):
    return make_client(calc.Calculator, "127.0.0.1", svc.port, timeout=timeout)


def value(rec: Recorder, name: str, **labels: str) -> float:
    found = rec.registry.get_sample_value(name, labels)
    return 0.0 if found is None else found


def calls(rec: Recorder, svc, method: str, outcome: str) -> float:
    return value(
        rec, "rpc_server_call_duration_seconds_count", rpc_system="thrift", appkey=svc.appkey,
        rpc_service="Calculator", rpc_method=method, node="127.0.0.1:%d" % svc.port, outcome=outcome,
    )


def node_value(rec: Recorder, name: str, svc, **labels: str) -> float:
    return value(rec, name, appkey=svc.appkey, rpc_service="Calculator", node="127.0.0.1:%d" % svc.port, **labels)


def test_every_outcome_is_recorded_with_the_nodes_labels(providers, rec):
    svc = providers("a", metrics=rec)
    c = client(svc)
    try:
        for _ in range(3):
            c.ping()
        with pytest.raises(calc.CalcError):
            c.compute(calc.Operation(left=1, right=0, op="/"))
        with pytest.raises(TApplicationException):
            c.compute(calc.Operation(left=1, right=0, op="%"))
        c.sleep_ms(30)
    finally:
        c.close()
    wait_until(lambda: node_value(rec, "thriftprobe_server_connections", svc) == 0, what="the connection closed")
    assert calls(rec, svc, "ping", "ok") == 3
    assert calls(rec, svc, "compute", "declared_exception") == 1
    assert calls(rec, svc, "compute", "application_error") == 1
    node = "127.0.0.1:%d" % svc.port
    slept = rec.registry.get_sample_value(
        "rpc_server_call_duration_seconds_sum",
        {"rpc_system": "thrift", "appkey": svc.appkey, "rpc_service": "Calculator", "rpc_method": "sleep_ms",
         "node": node, "outcome": "ok"},
    )
    assert 0.03 <= slept < 1.0
    events = "thriftprobe_server_connection_events_total"
    assert node_value(rec, events, svc, event="opened") == 1
    assert node_value(rec, events, svc, event="peer_closed") == 1
    assert node_value(rec, "thriftprobe_server_calls_in_flight", svc) == 0


def test_shed_requests_count_as_overloaded_calls_and_rejections(providers, rec):
    svc = providers("a", metrics=rec, workers=1, queue_size=0)
    busy = threading.Thread(target=lambda: client(svc).sleep_ms(600))
    busy.start()
    try:
        wait_until(lambda: node_value(rec, "thriftprobe_server_calls_in_flight", svc) == 1, what="one call in flight")
        c = client(svc)
        try:
            with pytest.raises(TApplicationException):
                c.ping()
        finally:
            c.close()
    finally:
        busy.join()
    assert calls(rec, svc, "ping", "overloaded") == 1  # recorded before the answer is sent
    wait_until(lambda: calls(rec, svc, "sleep_ms", "ok") == 1, what="the call recorded")
    rejected = node_value(rec, "thriftprobe_server_rejections_total", svc, rpc_method="ping", reason="overloaded")
    assert rejected == 1
    assert node_value(rec, "thriftprobe_server_calls_in_flight", svc) == 0


def test_the_queue_gauge_reads_the_requests_waiting_for_a_worker(providers, rec):
    svc = providers("a", metrics=rec, workers=1, queue_size=4)
    threads = [threading.Thread(target=lambda: client(svc, 10000).sleep_ms(400)) for _ in range(3)]
    for t in threads:
        t.start()
    try:
        wait_until(
            lambda: node_value(rec, "thriftprobe_server_queued_requests", svc) == 2, what="two requests queued"
        )
    finally:
        for t in threads:
            t.join()
    assert node_value(rec, "thriftprobe_server_queued_requests", svc) == 0
    svc.stop(timeout=2, drain=0)
    assert node_value(rec, "thriftprobe_server_queued_requests", svc) == 0  # let go of the server


def test_a_method_the_idl_does_not_declare_is_recorded_as_other(providers, rec):
    svc = providers("a", metrics=rec)
    for name in ("made_up_1", "made_up_2"):
        raw = name.encode()
        with socket.create_connection(("127.0.0.1", svc.port), timeout=5) as sock:
            sock.sendall(b"\x80\x01\x00\x01" + len(raw).to_bytes(4, "big") + raw + b"\x00\x00\x00\x01\x00")
            assert sock.recv(4096)  # the "unknown method" answer
    # A reply is sent before request_finished runs: wait for the hook.
    wait_until(lambda: calls(rec, svc, "_OTHER", "application_error") == 2, what="two calls recorded")
    assert rec.registry.get_sample_value(  # no label set was made for the names sent
        "rpc_server_call_duration_seconds_count",
        {"rpc_system": "thrift", "appkey": svc.appkey, "rpc_service": "Calculator", "rpc_method": "made_up_1",
         "node": "127.0.0.1:%d" % svc.port, "outcome": "application_error"},
    ) is None


class Counting(ServerHooks):
    def __init__(self) -> None:
        self.finished: Dict[str, int] = {}

    def request_finished(self, method, peer, start, outcome, duration):
        self.finished[method] = self.finished.get(method, 0) + 1


def test_a_users_hooks_are_still_called_beside_the_metrics(providers, rec):
    hooks = Counting()
    svc = providers("a", metrics=rec, hooks=hooks)
    c = client(svc)
    try:
        c.ping()
        c.ping()
    finally:
        c.close()
    wait_until(lambda: hooks.finished == {"ping": 2} and calls(rec, svc, "ping", "ok") == 2, what="both recorded")


def test_a_hook_that_raises_does_not_stop_the_metrics(providers, rec, caplog):
    class Broken(ServerHooks):
        def request_finished(self, *args):
            raise RuntimeError("hook bug")

    svc = providers("a", metrics=rec, hooks=Broken())
    c = client(svc)
    try:
        assert c.ping() == "a"
    finally:
        c.close()
    wait_until(lambda: calls(rec, svc, "ping", "ok") == 1 and "hook bug" in caplog.text, what="the call recorded")


def test_bad_metrics_arguments_are_refused(providers):
    with pytest.raises(InvalidArgument):
        providers("a", metrics="yes")
    for port in (-1, 65536, True, "9100"):
        with pytest.raises(InvalidArgument):
            providers("a", metrics_port=port)


def get_metrics(port: int) -> Optional[str]:
    try:
        with urllib.request.urlopen("http://127.0.0.1:%d/metrics" % port, timeout=5) as answer:
            return answer.read().decode()
    except OSError:
        return None


def test_metrics_port_serves_metrics_and_the_znode_advertises_it(providers, rec, zk, appkey):
    svc = providers("a", metrics=rec, metrics_port=0)
    assert svc.metrics_port
    c = client(svc)
    try:
        c.ping()
    finally:
        c.close()
    wait_until(lambda: calls(rec, svc, "ping", "ok") == 1, what="the call recorded")
    text = get_metrics(svc.metrics_port)
    assert text is not None
    assert 'rpc_server_call_duration_seconds_count{appkey="%s"' % appkey in text
    data, _ = zk.get(svc.znode_path)
    node = Node.from_json(data)
    assert node.extras["serviceEndpoint"] == {"host": "127.0.0.1", "port": svc.port}
    assert node.extras["status"] == "ALIVE"
    assert node.extras["additionalEndpoints"] == {"metrics": {"host": "127.0.0.1", "port": svc.metrics_port}}
    assert Node.from_json(node.to_json()).extras == node.extras  # the fields round-trip
    svc.stop(timeout=2, drain=0)
    assert get_metrics(svc.metrics_port) is None  # closed by stop()


def test_without_metrics_port_there_is_no_endpoint_but_the_serverset_fields(providers, zk):
    svc = providers("a")
    assert svc.metrics_port is None
    node = Node.from_json(zk.get(svc.znode_path)[0])
    assert node.extras["serviceEndpoint"] == {"host": "127.0.0.1", "port": svc.port}
    assert node.extras["status"] == "ALIVE" and "additionalEndpoints" not in node.extras


def test_providers_of_one_process_share_one_endpoint_until_the_last_stops(providers, rec):
    a = providers("a", metrics=rec, metrics_port=0)
    b = providers("b", metrics=rec, metrics_port=0)
    assert a.metrics_port == b.metrics_port
    a.stop(timeout=2, drain=0)
    assert get_metrics(b.metrics_port) is not None
    b.stop(timeout=2, drain=0)
    assert get_metrics(b.metrics_port) is None


def test_a_taken_metrics_port_fails_the_start_and_leaves_nothing_behind(providers, rec, zk, appkey):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = free_port()
        before = {t.name for t in threading.enumerate()}
        with pytest.raises(ThriftProbeError, match="cannot serve metrics"):
            providers("a", port, metrics=rec, metrics_port=taken.getsockname()[1])
    assert not zk.exists("/services/%s/%s/Calculator_127.0.0.1_%d" % (TEST_ENV, appkey, port))
    with socket.socket() as again:  # the service port was let go
        again.bind(("127.0.0.1", port))
    wait_until(lambda: {t.name for t in threading.enumerate()} <= before, what="no thread left")


def test_metrics_port_from_the_config_file(cfg, appkey, tmp_path, rec):
    path = tmp_path / "config.yml"
    path.write_text(CONFIG_TEXT + "provider:\n  %s: {metrics_port: 0, workers: 4}\n" % TEST_ENV)
    svc = start_service(IDL, appkey, "Calculator", Handler("a"), 0, config=str(path), env=TEST_ENV,
                        bind_host="127.0.0.1", block=False, drain=0, metrics=rec)
    try:
        assert svc.metrics_port and get_metrics(svc.metrics_port) is not None
    finally:
        svc.stop(timeout=2, drain=0)
    path.write_text(CONFIG_TEXT + "provider:\n  %s: {metrics_port: 70000}\n" % TEST_ENV)
    with pytest.raises(ConfigError, match="metrics_port"):
        config.load(str(path), TEST_ENV)


def test_consumers_ignore_the_serverset_fields(providers, cfg, appkey, rec):
    providers("a", metrics=rec, metrics_port=0)
    c = build_client(IDL, appkey, "Calculator", config=cfg)
    try:
        wait_until(lambda: _pings(c), what="a call through the consumer")
    finally:
        c.close()


def _pings(c) -> bool:
    try:
        return c.ping() == "a"
    except Exception:
        return False
