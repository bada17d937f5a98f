"""build_client against real ZooKeeper and real providers."""

from __future__ import annotations

import random
import threading
from collections import Counter

import pytest
import thriftpy2
from conftest import IDL, MYSQL_PORT, REDIS_PORT, TEST_ENV, free_port, spawn_provider, wait_until
from thriftpy2.thrift import TApplicationException, TClient
from thriftpy2.transport import TTransportException

from thriftprobe import BackendError, IdlError, InvalidArgument, NoAvailableNode, ThriftProbeError, build_client
from thriftprobe.consumer.balancer import WeightedRandom
from thriftprobe.node import Node

# Upper critical value of chi-square with 2 degrees of freedom at p = 0.0001.
CHI2_DF2_P00001 = 18.421

demo = thriftpy2.load(IDL, module_name="demo_thrift")


@pytest.fixture
def client_for(cfg, appkey):
    made = []

    def make(**kwargs):
        kwargs.setdefault("config", cfg)
        client = build_client(IDL, appkey, "Calculator", **kwargs)
        made.append(client)
        return client

    yield make
    for client in made:
        client.close()


def tags(client, n):
    return Counter(client.ping() for _ in range(n))


def test_client_is_a_tclient_with_the_idl_methods(providers, client_for):
    providers("a")
    client = client_for()
    assert isinstance(client, TClient)
    assert {"ping", "compute", "echo", "sleep_ms", "record"} <= set(dir(client))
    with pytest.raises(AttributeError):
        getattr(client, "no_such_method")  # noqa: B009


def test_structs_exceptions_and_oneway_round_trip(providers, client_for):
    svc = providers("a")
    client = client_for()
    answer = client.compute(demo.Operation(left=7, right=5))
    assert (answer.value, answer.served_by) == (12, "a")
    with pytest.raises(demo.CalcError, match="division by zero"):
        client.compute(demo.Operation(left=1, right=0, op="/"))
    with pytest.raises(TApplicationException, match=r"internal error in Calculator\.compute \(error id "):
        client.compute(demo.Operation(left=1, right=1, op="?"))  # undeclared: no text leaks
    client.record("hello")
    handler = svc._server._dispatcher.handler
    wait_until(lambda: handler.events == ["hello"], what="the oneway call")
    assert client.echo(text="keyword") == "keyword"  # the connection is still in step


def test_calls_spread_by_weight(providers, settings, client_for):
    weights = {"w1": 1, "w3": 3, "w6": 6}
    for tag, weight in weights.items():
        port = free_port()
        settings.put(port, weight=weight)  # as an operator set it before the provider started
        providers(tag, port=port)
    client = client_for(balancer=WeightedRandom(random.Random(2024)))
    assert sorted(n.weight for n in client.table.snapshot.available) == [1, 3, 6]
    n = 3000
    counts = tags(client, n)
    chi2 = sum((counts[t] - n * w / 10) ** 2 / (n * w / 10) for t, w in weights.items())
    assert chi2 < CHI2_DF2_P00001, counts


def test_disabled_node_gets_no_calls(providers, settings, client_for):
    providers("on")
    port = free_port()
    settings.put(port, weight=10, valid=0)
    providers("off", port=port)
    client = client_for()
    assert len(client.table.snapshot.all_nodes) == 2
    assert tags(client, 300) == Counter({"on": 300})


def test_weight_zero_node_gets_no_calls_and_changes_arrive_live(providers, client_for, zk):
    a = providers("a")
    b = providers("b")
    client = client_for()
    zero = Node("127.0.0.1", b.port, weight=0, valid=True).to_json()
    zk.set(b.znode_path, zero)
    assert client.table.wait_for(lambda s: len(s.available) == 1, timeout=5)
    assert tags(client, 200) == Counter({"a": 200})
    zk.set(b.znode_path, Node("127.0.0.1", b.port, weight=10).to_json())
    assert client.table.wait_for(lambda s: len(s.available) == 2, timeout=5)
    zk.set(a.znode_path, Node("127.0.0.1", a.port, weight=10, valid=False).to_json())
    assert client.table.wait_for(lambda s: [n.port for n in s.available] == [b.port], timeout=5)
    assert tags(client, 200) == Counter({"b": 200})


def test_stopped_provider_leaves_the_table_and_gets_no_calls(providers, client_for):
    a = providers("a")
    providers("b")
    client = client_for()
    assert set(tags(client, 200)) == {"a", "b"}
    a.stop()
    assert client.table.wait_for(lambda s: len(s.all_nodes) == 1, timeout=5)
    assert tags(client, 200) == Counter({"b": 200})


def test_provider_joining_later_gets_calls(providers, client_for):
    providers("a")
    client = client_for()
    assert tags(client, 50) == Counter({"a": 50})
    providers("late")
    assert client.table.wait_for(lambda s: len(s.available) == 2, timeout=5)
    assert tags(client, 400)["late"] > 0


def test_sixteen_threads_share_one_client(providers, client_for):
    providers("a")
    providers("b")
    client = client_for()
    errors, results = [], Counter()
    lock = threading.Lock()
    start = threading.Barrier(16)

    def work(i):
        start.wait()
        try:
            for j in range(200):
                text = "%d-%d" % (i, j)
                assert client.echo(text) == text  # a crossed reply would show here
                answer = client.compute(demo.Operation(left=i, right=j))
                assert answer.value == i + j
            with lock:
                results[i] += 1
        except Exception as err:  # collected and asserted below
            errors.append(err)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []
    assert sum(results.values()) == 16


def test_no_valid_node_is_a_typed_error_naming_env_appkey_service(client_for, appkey):
    client = client_for()
    with pytest.raises(NoAvailableNode, match=r"'Calculator' in env test, appkey %s" % appkey.replace(".", r"\.")):
        client.ping()


def test_connect_failure_is_retried_on_another_node(providers, client_for, zk, appkey):
    providers("alive")
    dead_port = free_port()  # nobody listens there
    dead = Node("127.0.0.1", dead_port, weight=1000)
    zk.create(
        "/services/test/%s/%s" % (appkey, dead.znode_name("Calculator")), dead.to_json(), ephemeral=True, makepath=True
    )
    client = client_for()
    wait_until(lambda: len(client.table.snapshot.available) == 2, what="both nodes")
    assert tags(client, 100) == Counter({"alive": 100})


def test_all_nodes_refusing_is_no_available_node(client_for, zk, appkey):
    dead_port = free_port()
    dead = Node("127.0.0.1", dead_port)
    zk.create(
        "/services/test/%s/%s" % (appkey, dead.znode_name("Calculator")), dead.to_json(), ephemeral=True, makepath=True
    )
    client = client_for()
    with pytest.raises(NoAvailableNode, match="accepted a connection"):
        client.ping()


def test_restarted_provider_costs_no_failed_call(providers, client_for):
    svc = providers("first")
    client = client_for()
    assert client.ping() == "first"
    assert client._pool.idle_count(("127.0.0.1", svc.port)) == 1
    svc.stop()
    providers("second", port=svc.port)
    assert client.table.wait_for(lambda s: len(s.available) == 1, timeout=5)
    assert client.ping() == "second"  # the pooled connection was closed by the old process


def test_killed_provider_costs_no_failed_call_to_its_pooled_connection(config_path, appkey, providers, client_for):
    providers("stays")
    proc = spawn_provider(config_path, TEST_ENV, appkey, "killed")
    client = client_for()
    wait_until(lambda: len(client.table.snapshot.available) == 2, what="both nodes")
    seen = tags(client, 200)
    assert seen["killed"] > 0
    proc.kill()
    proc.wait()
    # Its znode lives on until the session expires, so calls keep picking it: each pick finds the
    # pooled connection closed, cannot reconnect, and moves to the other node.
    assert tags(client, 200) == Counter({"stays": 200})
    assert client.table.wait_for(lambda s: len(s.all_nodes) == 1, timeout=8)


def test_timeout_discards_the_connection_and_next_call_is_clean(providers, client_for):
    providers("a")
    client = client_for(socket_timeout=200)
    with pytest.raises(TTransportException, match="timed out"):
        client.sleep_ms(600)
    assert client.echo("after") == "after"  # not the late reply of sleep_ms


def test_corrupt_znode_is_skipped(providers, client_for, zk, appkey):
    providers("good")
    zk.create("/services/test/%s/Calculator_127.0.0.1_1" % appkey, b"{broken", ephemeral=True, makepath=True)
    client = client_for()
    assert len(client.table.snapshot.all_nodes) == 1
    assert tags(client, 20) == Counter({"good": 20})


def test_other_services_of_the_appkey_are_ignored(providers, client_for, zk, appkey):
    providers("mine")
    other = Node("127.0.0.1", 1)
    zk.create(
        "/services/test/%s/%s" % (appkey, other.znode_name("Calculator_v2")),
        other.to_json(),
        ephemeral=True,
        makepath=True,
    )
    client = client_for()
    assert [n.port for n in client.table.snapshot.all_nodes] != [1]
    assert len(client.table.snapshot.all_nodes) == 1


def test_close_releases_sockets_threads_and_session(providers, cfg, appkey):
    providers("a")
    baseline = {t.name for t in threading.enumerate()}
    client = build_client(IDL, appkey, "Calculator", config=cfg)
    with client:
        assert client.ping() == "a"
    client.close()  # idempotent
    with pytest.raises(ThriftProbeError, match="closed"):
        client.ping()
    assert client._pool.idle_count(("127.0.0.1", 1)) == 0
    # The provider's workers (started by these calls) live as long as the provider: not the client's.
    wait_until(
        lambda: {t.name for t in threading.enumerate() if not t.name.startswith("thriftprobe-worker-")} <= baseline,
        what="client threads to end",
    )


def test_one_zookeeper_session_per_process(providers, client_for):
    providers("a")
    one, two = client_for(), client_for()
    assert one._registry.client is two._registry.client


def test_bad_arguments_are_typed_errors(cfg, appkey):
    with pytest.raises(InvalidArgument):
        build_client(IDL, appkey, "bad name", config=cfg)
    with pytest.raises(InvalidArgument):
        build_client(IDL, appkey, "Calculator", socket_timeout=0, config=cfg)
    with pytest.raises(IdlError):
        build_client(IDL + ".missing", appkey, "Calculator", config=cfg)


def test_unreachable_zookeeper_is_a_backend_error(tmp_path, appkey):
    path = tmp_path / "c.yml"
    path.write_text(
        f"""
mysql: {{test: {{host: 127.0.0.1, port: {MYSQL_PORT}, username: root, database: thriftprobe_test}}}}
redis: {{test: {{host: 127.0.0.1, port: {REDIS_PORT}}}}}
zkserver: {{test: {{host: 127.0.0.1, port: 1, connect_timeout: 300}}}}
"""
    )
    before = threading.active_count()
    with pytest.raises(BackendError, match=r"zookeeper 127\.0\.0\.1:1"):
        build_client(IDL, appkey, "Calculator", config=str(path), env="test")
    wait_until(lambda: threading.active_count() <= before, what="kazoo threads to end")
