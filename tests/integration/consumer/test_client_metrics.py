"""Consumer metrics against real providers: every call is recorded once, with the node and the
outcome it really had (each outcome produced for real), the gauges follow the pool and the
table, and a weight change shows up as discovery lag. Each test records into a Recorder on its
own registry, so tests never see each other's series."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from typing import Any, Dict, Optional

import pytest
import thriftpy2
from conftest import IDL, ROOT, TEST_ENV, spawn_provider, wait_until
from in_order import InOrder
from prometheus_client import CollectorRegistry
from thriftpy2.rpc import make_client
from thriftpy2.thrift import TApplicationException
from thriftpy2.transport import TTransportException

from thriftprobe import NoAvailableNode, OutlierDetector, Overloaded, Retry, RetryBudget, build_client
from thriftprobe.metrics import Recorder

demo = thriftpy2.load(IDL, module_name="demo_thrift")


class Metrics:
    """A Recorder on its own registry, and ways to read it."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.recorder = Recorder(self.registry)

    def value(self, name: str, **labels: str) -> float:
        found = self.registry.get_sample_value(name, labels)
        return 0.0 if found is None else found

    def calls(self, appkey: str, method: Optional[str] = None, **labels: str) -> Dict[tuple, float]:
        """Call counts by (method, node, outcome)."""
        out = {}
        for metric in self.registry.collect():
            for sample in metric.samples:
                if sample.name != "rpc_client_call_duration_seconds_count" or sample.labels["appkey"] != appkey:
                    continue
                if method is not None and sample.labels["rpc_method"] != method:
                    continue
                if any(sample.labels[k] != v for k, v in labels.items()):
                    continue
                if sample.value:
                    key = (sample.labels["rpc_method"], sample.labels["node"], sample.labels["outcome"])
                    out[key] = sample.value
        return out

    def nodes(self, appkey: str) -> Dict[str, float]:
        return {state: self.value("thriftprobe_client_nodes", appkey=appkey, rpc_service="Calculator", state=state)
                for state in ("valid", "disabled", "ejected", "held")}


@pytest.fixture
def metrics() -> Metrics:
    return Metrics()


def _client(cfg: Any, appkey: str, metrics: Metrics, nodes: int, **kwargs: Any) -> Any:
    client = build_client(IDL, appkey, "Calculator", config=cfg, metrics=metrics.recorder, **kwargs)
    wait_until(lambda: len(client.table.snapshot.available) == nodes, what="%d nodes" % nodes)
    return client


def test_each_outcome_is_recorded_once_with_the_node_and_the_whole_calls_duration(providers, cfg, appkey, metrics):
    svc = providers("a")
    node = "127.0.0.1:%d" % svc.port
    with _client(cfg, appkey, metrics, 1) as client:
        for _ in range(5):
            assert client.ping() == "a"
        with pytest.raises(demo.CalcError):
            client.compute(demo.Operation(left=1, right=0, op="/"))
        with pytest.raises(TApplicationException):  # the handler raises ValueError: INTERNAL_ERROR
            client.compute(demo.Operation(left=1, right=2, op="*"))
        with pytest.raises(TTransportException) as timed_out:
            client.with_timeout(100).sleep_ms(600)
        assert timed_out.value.type == TTransportException.TIMED_OUT
        client.record("x")  # oneway: ok once sent
        began = time.perf_counter()
        client.sleep_ms(50)
        took = time.perf_counter() - began
        assert metrics.calls(appkey) == {
            ("ping", node, "ok"): 5,
            ("compute", node, "declared_exception"): 1,
            ("compute", node, "application_error"): 1,
            ("sleep_ms", node, "timeout"): 1,
            ("sleep_ms", node, "ok"): 1,
            ("record", node, "ok"): 1,
        }
        labels = {"rpc_system": "thrift", "appkey": appkey, "rpc_service": "Calculator", "rpc_method": "sleep_ms",
                  "node": node}
        # The whole call as the caller saw it: recorded durations sum to about what was measured.
        recorded = metrics.value("rpc_client_call_duration_seconds_sum", outcome="ok", **labels)
        assert 0.05 <= recorded <= took
        assert 0.1 <= metrics.value("rpc_client_call_duration_seconds_sum", outcome="timeout", **labels) < 0.5
        # A timed-out connection is never given back: one opened for it, one again after it.
        assert metrics.value("thriftprobe_client_connects_total", appkey=appkey, rpc_service="Calculator",
                             node=node, event="opened") == 2


def test_a_killed_provider_is_a_transport_error_and_no_node_left_is_no_node(config_path, cfg, appkey, metrics):
    proc = spawn_provider(config_path, TEST_ENV, appkey, "killed")
    node = "127.0.0.1:%d" % proc.port
    try:
        with _client(cfg, appkey, metrics, 1, empty_grace=0) as client:
            assert client.ping() == "killed"
            failure: Dict[str, BaseException] = {}

            def slow() -> None:
                try:
                    client.sleep_ms(3000)
                except BaseException as err:
                    failure["error"] = err

            caller = threading.Thread(target=slow)
            caller.start()
            wait_until(lambda: metrics.value("thriftprobe_client_connections", appkey=appkey,
                                             rpc_service="Calculator", node=node, state="in_use") == 1,
                       what="the slow call to be out")
            time.sleep(0.2)  # in the handler by now
            os.kill(proc.pid, signal.SIGKILL)
            caller.join(10)
            assert isinstance(failure.get("error"), TTransportException)
            assert failure["error"].type != TTransportException.TIMED_OUT
            wait_until(lambda: not client.table.snapshot.all_nodes, what="the node to leave", timeout=15)
            with pytest.raises(NoAvailableNode):
                client.ping()
            assert metrics.calls(appkey) == {
                ("ping", node, "ok"): 1,
                ("sleep_ms", node, "transport_error"): 1,
                ("ping", "", "no_node"): 1,
            }
            assert metrics.value("thriftprobe_client_connections", appkey=appkey, rpc_service="Calculator",
                                 node=node, state="in_use") == 0
    finally:
        proc.kill()
        proc.wait()


def test_a_shedding_provider_is_overloaded(providers, cfg, appkey, metrics):
    svc = providers("busy", workers=1, queue_size=0)
    node = "127.0.0.1:%d" % svc.port
    with _client(cfg, appkey, metrics, 1) as client:
        worker = threading.Thread(target=client.sleep_ms, args=(800,))
        worker.start()
        wait_until(lambda: metrics.value("thriftprobe_client_connections", appkey=appkey, rpc_service="Calculator",
                                         node=node, state="in_use") == 1, what="the busy call")
        time.sleep(0.1)
        with pytest.raises(Overloaded):
            client.ping()
        worker.join()
        assert metrics.calls(appkey) == {("sleep_ms", node, "ok"): 1, ("ping", node, "overloaded"): 1}
        # The shed reply came back in step: its connection went back to the pool.
        assert metrics.value("thriftprobe_client_connections", appkey=appkey, rpc_service="Calculator",
                             node=node, state="idle") == 2



@pytest.mark.parametrize("budget", ["generous", "empty"])
def test_shed_resends_and_budget_refusals_are_counted(providers, cfg, appkey, metrics, budget):
    busy = providers("busy", workers=1, queue_size=0)
    fine = providers("fine")
    busy_node, fine_node = "127.0.0.1:%d" % busy.port, "127.0.0.1:%d" % fine.port
    retry_budget = RetryBudget(ratio=1.0) if budget == "generous" else RetryBudget(ratio=0.0, min_per_second=0.0)
    with _client(cfg, appkey, metrics, 2, balancer=InOrder(busy.port, fine.port),
                 retry=Retry(budget=retry_budget)) as client:
        raw = make_client(demo.Calculator, "127.0.0.1", busy.port, timeout=5000)
        blocker = threading.Thread(target=raw.sleep_ms, args=(1500,))  # the busy node's one worker
        blocker.start()
        time.sleep(0.2)
        outcomes = []
        for _ in range(10):
            try:
                outcomes.append(client.ping())
            except Overloaded:
                outcomes.append("overloaded")
        blocker.join()
        raw.close()
    retries = metrics.value("thriftprobe_client_retries_total", appkey=appkey, rpc_service="Calculator",
                            rpc_method="ping", reason="overloaded")
    refusals = metrics.value("thriftprobe_client_retry_budget_refusals_total", appkey=appkey,
                             rpc_service="Calculator")
    if budget == "generous":  # each call shed by the busy node went on to the fine one
        assert outcomes == ["fine"] * 10
        assert (retries, refusals) == (10, 0)
        assert metrics.calls(appkey) == {("ping", fine_node, "ok"): 10}
    else:  # no budget: each call raised Overloaded, naming the node that shed it
        assert outcomes == ["overloaded"] * 10
        assert (retries, refusals) == (0, 10)
        assert metrics.calls(appkey) == {("ping", busy_node, "overloaded"): 10}


def test_a_retry_after_a_timeout_and_an_ejection_are_counted(config_path, providers, cfg, appkey, metrics):
    fine = providers("fine")
    proc = spawn_provider(config_path, TEST_ENV, appkey, "stopped")
    stopped, fine_node = "127.0.0.1:%d" % proc.port, "127.0.0.1:%d" % fine.port
    try:
        detector = OutlierDetector(consecutive_failures=1, base_ejection=30.0, max_ejection=30.0)
        with _client(cfg, appkey, metrics, 2, socket_timeout=300, balancer=InOrder(proc.port, fine.port),
                     retry=Retry(idempotent={"ping"}), outlier_detection=detector) as client:
            # SIGSTOP: the node stays registered (until its session expires, 2 s) and its kernel
            # accepts connections, but it never answers: the call times out and is retried on
            # the fine node, and the stopped node is ejected.
            os.kill(proc.pid, signal.SIGSTOP)
            assert client.ping() == "fine"
            assert metrics.nodes(appkey) == {"valid": 1, "disabled": 0, "ejected": 1, "held": 0}
            assert metrics.value("thriftprobe_client_ejections_total", appkey=appkey, rpc_service="Calculator",
                                 node=stopped) == 1
            assert metrics.value("thriftprobe_client_retries_total", appkey=appkey, rpc_service="Calculator",
                                 rpc_method="ping", reason="transport_error") == 1
            # One call, recorded once: the node that answered, its whole duration (the timeout too).
            assert metrics.calls(appkey) == {("ping", fine_node, "ok"): 1}
            labels = {"rpc_system": "thrift", "appkey": appkey, "rpc_service": "Calculator", "rpc_method": "ping",
                      "node": fine_node, "outcome": "ok"}
            assert metrics.value("rpc_client_call_duration_seconds_sum", **labels) >= 0.3
            assert metrics.value("thriftprobe_client_connects_total", appkey=appkey, rpc_service="Calculator",
                                 node=stopped, event="opened") == 1
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()


def test_gauges_follow_the_table_and_the_pool(providers, cfg, appkey, metrics, gov):
    a, b = providers("a"), providers("b")
    with _client(cfg, appkey, metrics, 2, empty_grace=30.0,
                 outlier_detection=OutlierDetector(consecutive_failures=2, base_ejection=30.0)) as client:
        assert metrics.nodes(appkey) == {"valid": 2, "disabled": 0, "ejected": 0, "held": 0}
        for _ in range(20):
            client.ping()
        idle = {svc.port: metrics.value("thriftprobe_client_connections", appkey=appkey, rpc_service="Calculator",
                                        node="127.0.0.1:%d" % svc.port, state="idle") for svc in (a, b)}
        assert idle == {a.port: 1, b.port: 1}
        gov.set_node(appkey, "Calculator", "127.0.0.1", b.port, valid=False)
        wait_until(lambda: metrics.nodes(appkey)["disabled"] == 1, what="b disabled")
        assert metrics.nodes(appkey) == {"valid": 1, "disabled": 1, "ejected": 0, "held": 0}
        gov.set_node(appkey, "Calculator", "127.0.0.1", b.port, valid=True)
        wait_until(lambda: metrics.nodes(appkey)["valid"] == 2, what="b back")
        # b leaves: its idle-connections gauge goes with it.
        b_node = "127.0.0.1:%d" % b.port
        b.stop(timeout=2.0, drain=0)
        wait_until(lambda: len(client.table.snapshot.all_nodes) == 1, what="b to leave")
        assert metrics.value("thriftprobe_client_connections", appkey=appkey, rpc_service="Calculator",
                             node=b_node, state="idle") == 0  # its gauge went with it
        # a goes too: the table holds it (empty-list protection), and calls fail to connect.
        a_node = "127.0.0.1:%d" % a.port
        a.stop(timeout=2.0, drain=0)
        wait_until(lambda: metrics.nodes(appkey)["held"] == 1, what="a held")
        assert metrics.nodes(appkey) == {"valid": 0, "disabled": 0, "ejected": 0, "held": 1}
        for _ in range(3):
            with pytest.raises(NoAvailableNode):
                client.ping()
        assert metrics.value("thriftprobe_client_connects_total", appkey=appkey, rpc_service="Calculator",
                             node=a_node, event="failed") == 3
        assert metrics.value("thriftprobe_client_ejections_total", appkey=appkey, rpc_service="Calculator",
                             node=a_node) == 0  # the cap: never eject the last node
    # Closed: its gauges are withdrawn.
    assert metrics.value("thriftprobe_client_nodes", appkey=appkey, rpc_service="Calculator", state="held") == 0


def test_a_weight_change_is_observed_as_discovery_lag(providers, cfg, appkey, metrics, gov):
    svc = providers("a")
    labels = {"appkey": appkey, "rpc_service": "Calculator"}
    with _client(cfg, appkey, metrics, 1) as client:
        # The first fill is no propagation: nothing observed.
        assert metrics.value("thriftprobe_discovery_lag_seconds_count", **labels) == 0
        began = time.time()
        for weight in (3, 4, 5):  # one at a time: two changes read by one watch are one change seen
            gov.set_node(appkey, "Calculator", "127.0.0.1", svc.port, weight=weight)
            wait_until(lambda weight=weight: client.table.snapshot.all_nodes[0].weight == weight, what="the weight")
        wait_until(lambda: metrics.value("thriftprobe_discovery_lag_seconds_count", **labels) == 3,
                   what="three changes observed")
        total = metrics.value("thriftprobe_discovery_lag_seconds_sum", **labels)
        assert 0 <= total <= 3 * (time.time() - began)
        assert metrics.value("thriftprobe_discovery_lag_seconds_bucket", le="1.0", **labels) == 3
        # A joining node is a change too (its znode's creation time).
        providers("b")
        wait_until(lambda: metrics.value("thriftprobe_discovery_lag_seconds_count", **labels) == 4,
                   what="the join observed")


def test_metrics_off_records_nothing(providers, cfg, appkey, metrics):
    providers("a")
    with build_client(IDL, appkey, "Calculator", config=cfg, metrics=False) as client:
        assert client._instruments is None
        assert client.ping() == "a"
    with pytest.raises(Exception, match="metrics must be"):
        build_client(IDL, appkey, "Calculator", config=cfg, metrics="yes")


def test_the_default_recorder_is_used_when_prometheus_client_is_installed(providers, cfg, appkey):
    from thriftprobe.metrics import default_recorder

    providers("a")
    rec = default_recorder()
    assert rec is not None
    with build_client(IDL, appkey, "Calculator", config=cfg) as client:
        assert client._instruments.recorder is rec
        client.ping()
    assert rec.registry.get_sample_value(
        "rpc_client_call_duration_seconds_count",
        {"rpc_system": "thrift", "appkey": appkey, "rpc_service": "Calculator", "rpc_method": "ping",
         "node": "127.0.0.1:%d" % providers.started[0].port, "outcome": "ok"},
    ) == 1


BLOCKER = textwrap.dedent("""
    import sys

    class Blocker:
        def find_spec(self, name, path=None, target=None):
            if name == "prometheus_client" or name.startswith("prometheus_client."):
                raise ImportError("prometheus_client is blocked in this test")
            return None

    sys.meta_path.insert(0, Blocker())
""")


def test_without_prometheus_client_the_client_works_and_records_nothing(providers, config_path, appkey, tmp_path):
    providers("a")
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(BLOCKER)
    code = textwrap.dedent("""
        import sys
        import thriftprobe
        from thriftprobe import build_client, metrics
        assert not metrics.available()
        assert metrics.default_recorder() is None
        client = build_client(%r, %r, "Calculator", config=%r, env=%r)
        assert client._instruments is None
        assert client.ping() == "a"
        client.close()
        assert "prometheus_client" not in sys.modules
        print("OK", thriftprobe.__file__)
    """ % (IDL, appkey, config_path, TEST_ENV))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(site), str(ROOT)]))
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60,
                          check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.startswith("OK " + str(ROOT))


def test_a_call_on_a_closed_client_and_a_bad_argument_name_no_node(providers, cfg, appkey, metrics):
    from thriftprobe import InvalidArgument

    providers("a")
    client = _client(cfg, appkey, metrics, 1)
    with pytest.raises(InvalidArgument):
        client.echo(12)
    client.close()
    with pytest.raises(Exception, match="closed"):
        client.ping()
    assert metrics.calls(appkey) == {("echo", "", "application_error"): 1, ("ping", "", "no_node"): 1}


def test_a_client_for_an_unknown_appkey_counts_no_node(cfg, metrics):
    appkey = "t.none%s" % uuid.uuid4().hex[:8]
    with build_client(IDL, appkey, "Calculator", config=cfg, metrics=metrics.recorder) as client:
        with pytest.raises(NoAvailableNode):
            client.ping()
        assert metrics.calls(appkey) == {("ping", "", "no_node"): 1}
        assert metrics.nodes(appkey) == {"valid": 0, "disabled": 0, "ejected": 0, "held": 0}
