"""Transports and protocols node by node: a consumer speaks to each node in the wire its znode
advertises (buffered or framed, binary or compact; nothing said: buffered binary), against plain
thriftpy2 servers and Apache Thrift's TNonblockingServer, several wires in one service at once,
a node that restarts speaking another wire, and ``thriftprobe call``."""

from __future__ import annotations

import collections
import json
import logging
import os
from pathlib import Path
from typing import Any, Iterator, Tuple

import pytest
import thriftpy2
from apache_thrift import compile_apache
from conftest import IDL, Handler, wait_until
from wire_servers import WIRES, ApacheNonblocking, WireServer, register

from thriftprobe import NoAvailableNode, build_client
from thriftprobe.consumer.wire import BUFFERED_BINARY

demo = thriftpy2.load(IDL, module_name="demo_thrift")


@pytest.fixture
def servers() -> Iterator[Any]:
    started = []

    def start(tag: str, transport: str = "buffered", protocol: str = "binary", port: int = 0) -> WireServer:
        server = WireServer(demo.Calculator, Handler(tag), transport, protocol, port)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


@pytest.mark.parametrize(("transport", "protocol"), WIRES)
def test_each_wire_against_a_plain_thriftpy2_server(servers, zk, cfg, appkey, transport, protocol):
    server = servers("p", transport, protocol)
    register(zk, appkey, server.port, transport, protocol)
    with build_client(IDL, appkey, "Calculator", config=cfg) as client:
        assert client.ping() == "p"
        assert client.compute(demo.Operation(left=6, right=3, op="/")).value == 2
        with pytest.raises(demo.CalcError):
            client.compute(demo.Operation(left=1, right=0, op="/"))
        assert client.echo("x" * 100_000) == "x" * 100_000  # more than one buffer, one frame
        client.record("oneway")
        assert client.with_timeout(500).ping() == "p"
        conn = client._pool._idle[("127.0.0.1", server.port)][0]
        assert (conn.wire.transport, conn.wire.protocol) == (transport, protocol)
    assert server.accepted == 1  # one pooled connection, kept in step across all of it


def test_nodes_of_different_wires_in_one_service_all_get_calls(servers, zk, cfg, appkey):
    framed = servers("framed-compact", "framed", "compact")
    old = servers("original")  # registered without the keys, as the original design wrote nodes
    binary = servers("framed-binary", "framed", "binary")
    register(zk, appkey, framed.port, "framed", "compact")
    register(zk, appkey, old.port)
    register(zk, appkey, binary.port, "framed", "binary")
    with build_client(IDL, appkey, "Calculator", config=cfg) as client:
        wait_until(lambda: len(client.table.snapshot.available) == 3, what="three nodes")
        served = collections.Counter(client.ping() for _ in range(300))
        answered = collections.Counter(client.compute(demo.Operation(left=1, right=1)).served_by for _ in range(60))
    assert set(served) == set(answered) == {"framed-compact", "original", "framed-binary"}
    assert min(served.values()) > 50


def test_a_node_advertising_a_wire_the_consumer_does_not_speak_gets_no_call_and_one_warning(
    servers, zk, cfg, appkey, caplog
):
    good = servers("good")
    odd = servers("odd")
    register(zk, appkey, good.port)
    path = register(zk, appkey, odd.port, "zlib", "binary")
    caplog.set_level(logging.WARNING, logger="thriftprobe.consumer.table")
    with build_client(IDL, appkey, "Calculator", config=cfg) as client:
        assert {client.ping() for _ in range(100)} == {"good"}
        zk.set(path, json.dumps({"host": "127.0.0.1", "port": odd.port, "weight": 20, "valid": 1,
                                 "transport": "zlib", "protocol": "binary"}).encode())  # same wire, another weight
        wait_until(lambda: any(n.weight == 20 for n in client.table.snapshot.all_nodes), what="the new weight")
        assert {client.ping() for _ in range(100)} == {"good"}
        warned = [r for r in caplog.records if "zlib" in r.getMessage()]
        assert len(warned) == 1 and "%d" % odd.port in warned[0].getMessage()
        zk.set(path, json.dumps({"host": "127.0.0.1", "port": odd.port, "weight": 20, "valid": 1,
                                 "protocol": ["compact"]}).encode())  # not even a name
        wait_until(lambda: any("['compact']" in r.getMessage() for r in caplog.records), what="a second warning")
        zk.delete("/services/test/%s/Calculator_127.0.0.1_%d" % (appkey, good.port))
        wait_until(lambda: len(client.table.snapshot.all_nodes) == 1, what="the good node gone")
        with pytest.raises(NoAvailableNode):
            client.ping()
    assert odd.accepted == 0


def test_a_node_restarting_on_its_port_in_another_wire_keeps_answering(servers, zk, cfg, appkey):
    first = servers("buffered", "buffered", "binary")
    port = first.port
    path = register(zk, appkey, port)
    address = ("127.0.0.1", port)
    with build_client(IDL, appkey, "Calculator", config=cfg) as client:
        assert client.ping() == "buffered"
        old = client._pool._idle[address][0]
        assert old.wire is BUFFERED_BINARY
        first.stop()
        zk.delete(path)
        second = servers("framed", "framed", "compact", port=port)
        register(zk, appkey, port, "framed", "compact")
        wait_until(lambda: str(client.table.snapshot.wires.get(address)) == "framed/compact", what="the new wire")
        assert [client.ping() for _ in range(20)] == ["framed"] * 20
        assert old.tsocket.sock is None  # closed, never lent
        assert [str(c.wire) for c in client._pool._idle[address]] == ["framed/compact"]
        assert second.accepted == 1


def test_a_node_changing_its_wire_without_closing_its_connections_gets_none_of_the_old_wire(
    servers, zk, cfg, appkey
):
    """The znode says framed now while the old buffered connection is still open and clean (the
    zero-timeout poll sees nothing wrong with it): it is closed, not lent."""
    server = servers("p", "buffered", "binary")
    path = register(zk, appkey, server.port)
    address = ("127.0.0.1", server.port)
    with build_client(IDL, appkey, "Calculator", config=cfg) as client:
        assert client.ping() == "p"
        old = client._pool._idle[address][0]
        assert not old.is_stale()
        zk.set(path, json.dumps({"host": "127.0.0.1", "port": server.port, "weight": 10, "valid": 1,
                                 "transport": "framed", "protocol": "binary"}).encode())
        wait_until(lambda: str(client.table.snapshot.wires.get(address)) == "framed/binary", what="the new wire")
        conn = client._pool.acquire(address)
        assert conn is not old and str(conn.wire) == "framed/binary" and old.tsocket.sock is None
        client._pool.discard(conn)  # the server still speaks buffered: no call is made on it


@pytest.fixture
def apache_calc(tmp_path: Path) -> Iterator[Tuple[Any, Any]]:
    yield from compile_apache(IDL, tmp_path, "apache_wire_calc")


class _ApacheHandler:
    def __init__(self, ttypes: Any, tag: str) -> None:
        self.ttypes, self.tag = ttypes, tag

    def ping(self) -> str:
        return self.tag

    def compute(self, operation: Any) -> Any:
        if operation.right == 0:
            raise self.ttypes.CalcError(message="division by zero")
        return self.ttypes.Answer(value=operation.left // operation.right, served_by=self.tag)

    def echo(self, text: str) -> str:
        return text

    def sleep_ms(self, ms: int) -> None:
        pass

    def record(self, event: str) -> None:
        pass


@pytest.mark.parametrize("protocol", ["binary", "compact"])
def test_an_apache_thrift_nonblocking_server_through_discovery(zk, cfg, appkey, apache_calc, protocol, run):
    service, ttypes = apache_calc
    server = ApacheNonblocking(service, _ApacheHandler(ttypes, "apache-" + protocol), protocol)
    try:
        register(zk, appkey, server.port, "framed", protocol)
        with build_client(IDL, appkey, "Calculator", config=cfg) as client:
            assert client.ping() == "apache-" + protocol
            answer = client.compute(demo.Operation(left=9, right=3, op="/"))
            assert (answer.value, answer.served_by) == (3, "apache-" + protocol)
            with pytest.raises(demo.CalcError, match="division by zero"):
                client.compute(demo.Operation(left=1, right=0, op="/"))
            assert client.echo("é" * 50_000) == "é" * 50_000
            assert client.with_timeout(1000).ping() == "apache-" + protocol
        # ``thriftprobe call`` goes through the consumer, and so through the node's wire
        assert json.loads(run("call", IDL, appkey, "Calculator", "ping")) == {"result": "apache-" + protocol}
    finally:
        server.stop()


def test_thriftprobe_call_against_a_framed_compact_node(servers, zk, appkey, run):
    server = servers("fc", "framed", "compact")
    register(zk, appkey, server.port, "framed", "compact")
    result = json.loads(run("call", IDL, appkey, "Calculator", "compute", '{"operation": {"left": 2, "right": 40}}'))
    assert result == {"result": {"value": 42, "served_by": "fc"}}


def test_a_thriftprobe_provider_is_spoken_to_as_it_advertises(providers, cfg, appkey):
    """A thriftprobe provider of this tree registers buffered/binary: the keys are read, not assumed."""
    svc = providers("tp")
    with build_client(IDL, appkey, "Calculator", config=cfg) as client:
        node = client.table.snapshot.available[0]
        assert (node.extras["transport"], node.extras["protocol"]) == ("buffered", "binary")
        assert client.ping() == "tp"
        assert client._pool._idle[("127.0.0.1", svc.port)][0].wire is BUFFERED_BINARY


def test_a_forked_child_speaks_each_nodes_wire_and_follows_a_change(servers, zk, cfg, appkey):
    framed = servers("framed", "framed", "compact")
    path = register(zk, appkey, framed.port, "framed", "compact")
    with build_client(IDL, appkey, "Calculator", config=cfg) as client:
        assert client.ping() == "framed"  # the parent holds a pooled framed connection
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:  # child: calls on its own pool, then a restart in another wire; exit without pytest
            code = 1
            try:
                os.close(read)
                answers = [client.ping() for _ in range(5)]
                os.write(write, (",".join(answers) + "\n").encode())
                address = ("127.0.0.1", framed.port)
                wait_until(lambda: str(client.table.snapshot.wires.get(address)) == "buffered/binary",
                           what="the child to see the new wire")
                answers = [client.ping() for _ in range(5)]
                os.write(write, (",".join(answers) + "\n").encode())
                client.close()
                code = 0
            finally:
                os._exit(code)
        os.close(write)
        with os.fdopen(read) as lines:
            assert lines.readline().strip() == ",".join(["framed"] * 5)
            framed.stop()
            zk.delete(path)
            again = servers("buffered", port=framed.port)
            register(zk, appkey, again.port)
            assert lines.readline().strip() == ",".join(["buffered"] * 5)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        wait_until(lambda: str(client.table.snapshot.wires.get(("127.0.0.1", framed.port))) == "buffered/binary",
                   what="the parent to see the new wire")
        assert client.ping() == "buffered"  # the parent's framed connection was not lent
