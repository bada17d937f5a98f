"""The call path against real ZooKeeper and providers, and against sockets that misbehave the way
fleets do: a node that drops SYNs, one that dies mid-call, one that accepts and never answers."""

from __future__ import annotations

import collections
import contextlib
import errno
import socket
import threading
import time
from pathlib import Path

import pytest
import thriftpy2
from conftest import IDL, wait_until
from thriftpy2.transport import TTransportException

from thriftprobe import InvalidArgument, NoAvailableNode, ThriftProbeError, build_client, start_service
from thriftprobe.consumer.client import _CORE
from thriftprobe.consumer.health import OutlierDetector
from thriftprobe.consumer.retry import Retry
from thriftprobe.node import Node

ODD_IDL = str(Path(__file__).with_name("odd_names.thrift"))
demo = thriftpy2.load(IDL, module_name="demo_thrift")


def register(zk, appkey: str, port: int, service: str = "Calculator", weight: int = 10) -> None:
    """Advertise 127.0.0.1:port as a node of the service, as a provider would."""
    node = Node("127.0.0.1", port, weight=weight)
    zk.create("/services/test/%s/%s" % (appkey, node.znode_name(service)), node.to_json(), ephemeral=True,
              makepath=True)


class SynDropper:
    """A port whose accept queue is full: the kernel drops further SYNs, so connects hang."""

    def __init__(self) -> None:
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(0)
        self.port = self.listener.getsockname()[1]
        self.filler = socket.create_connection(("127.0.0.1", self.port))

    def close(self) -> None:
        self.filler.close()
        self.listener.close()


class Silent:
    """Accepts connections and reads requests, never answers (a hung provider). Counts the
    requests waiting on it at once: a connection that sent bytes and is not closed yet."""

    def __init__(self, die_after_first_request: bool = False) -> None:
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(64)
        self.port = self.listener.getsockname()[1]
        self.die = die_after_first_request
        self.requests = 0
        self.waiting = 0
        self.max_waiting = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._conns: list = []
        self._threads = [threading.Thread(target=self._accept, daemon=True)]
        self._threads[0].start()

    def _accept(self) -> None:
        self.listener.settimeout(0.05)
        while not self._stop.is_set():
            try:
                conn, _ = self.listener.accept()
            except OSError:
                continue
            self._conns.append(conn)
            thread = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            self._threads.append(thread)
            thread.start()

    def _serve(self, conn: socket.socket) -> None:
        conn.settimeout(0.05)
        got = False
        while not self._stop.is_set():
            try:
                data = conn.recv(65536)
            except socket.timeout:
                continue
            except OSError:
                data = b""
            if data and not got:
                got = True
                with self._lock:
                    self.requests += 1
                    self.waiting += 1
                    self.max_waiting = max(self.max_waiting, self.waiting)
                if self.die:  # the provider dies mid-call: the connection ends, the port closes
                    self.listener.shutdown(socket.SHUT_RDWR)  # stops listening at once, even mid-poll
                    self.listener.close()
                    conn.close()
                    data = b""
            if not data:
                break
        if got:
            with self._lock:
                self.waiting -= 1

    def reset_max(self) -> None:
        with self._lock:
            self.max_waiting = self.waiting

    def close(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(5)
        for conn in self._conns:
            conn.close()
        self.listener.close()


@pytest.fixture
def client_for(cfg, appkey):
    made = []

    def make(idl=IDL, service="Calculator", **kwargs):
        kwargs.setdefault("config", cfg)
        client = build_client(idl, appkey, service, **kwargs)
        made.append(client)
        return client

    yield make
    for client in made:
        client.close()


# -- B2: a caller's bad argument ------------------------------------------------------------------


def test_a_wrong_typed_argument_is_the_callers_error_and_blames_no_node(providers, client_for):
    svc = providers("a")
    client = client_for(retry=Retry(idempotent={"echo", "compute"}))
    address = ("127.0.0.1", svc.port)
    assert client.echo("warm") == "warm"
    pooled = client._pool._idle[address][0]
    for _ in range(5):  # 3 used to eject the node (counted as failures after sending, and retried)
        with pytest.raises(InvalidArgument, match=r"argument 'text' of Calculator\.echo must be STRING, got a int"):
            client.echo(123)
    secret = "password=hunter2 " * 10_000
    with pytest.raises(InvalidArgument) as raised:  # the value never reaches the message (or a log)
        client.compute(demo.Operation(left=secret, right=1))
    assert "hunter2" not in str(raised.value) and len(str(raised.value)) < 300
    with pytest.raises(InvalidArgument, match=r"argument 'operation' of Calculator\.compute .*'left\(1\)'"):
        client.compute(demo.Operation(left="x", right=1))
    handler = svc._server._dispatcher.handler
    assert handler.calls == 1  # nothing of the bad calls reached the provider
    assert client._outliers.excluded() == frozenset() and not client._outliers._records
    assert list(client._pool._idle[address]) == [pooled]  # the unused connection was kept, clean
    assert client.echo("after") == "after"


def test_an_argument_error_after_part_of_the_request_was_written_drops_only_that_connection(
    cfg, appkey, client_for
):
    svc = start_service(ODD_IDL, appkey, "Odd", OddHandler(), 0, config=cfg, bind_host="127.0.0.1", block=False,
                        drain=0)
    try:
        client = client_for(ODD_IDL, "Odd")
        core = vars(client)[_CORE]  # the IDL has a method named _pool
        assert client.put("warm", 1) == 5
        pooled = core._pool._idle[("127.0.0.1", svc.port)][0]
        with pytest.raises(InvalidArgument, match=r"argument 'n' of Odd\.put must be I32.*nothing ran"):
            client.put("x" * 10_000, "not a number")  # the blob overflows the write buffer first
        assert pooled.tsocket.sock is None  # it carried half a request: closed, not pooled
        assert client.put("y" * 20, 2) == 22  # a new connection, in step
        assert not core._outliers._records
    finally:
        svc.stop(timeout=2.0, drain=0)


# -- B6: IDL method names that are the client's own attribute names --------------------------------


class OddHandler:
    def table(self):
        return "table"

    def env(self):
        return "env"

    def appkey(self):
        return "appkey"

    def service_name(self):
        return "service_name"

    def close(self):
        return "close"

    def with_timeout(self, ms):
        return "with_timeout %d" % ms

    def _pool(self):
        return "_pool"

    def _call(self):
        return "_call"

    def put(self, blob, n):
        return len(blob) + n


def test_idl_methods_named_like_the_clients_attributes_are_called_and_break_nothing(cfg, appkey, client_for):
    svc = start_service(ODD_IDL, appkey, "Odd", OddHandler(), 0, config=cfg, bind_host="127.0.0.1", block=False,
                        drain=0)
    try:
        client = client_for(ODD_IDL, "Odd")
        for name in ("table", "env", "appkey", "service_name", "_pool", "_call"):
            assert getattr(client, name)() == name
        assert client.tclose() == "close"  # thriftpy2's name for an IDL method called close
        assert client.twith_timeout(7) == "with_timeout 7"
        view = client.with_timeout(2000)
        assert view.close() == "close" and view.with_timeout(3) == "with_timeout 3" and view.table() == "table"
        assert client.put("abc", 1) == 4  # the client's own state is intact
        assert "Odd" in repr(client) and {"table", "close", "with_timeout"} <= set(dir(client))
        client.close()
        with pytest.raises(ThriftProbeError, match="closed"):
            client.table()
    finally:
        svc.stop(timeout=2.0, drain=0)


# -- B7: with_timeout bounds connects ---------------------------------------------------------------


def test_with_timeout_bounds_the_whole_call_connects_to_every_node_included(zk, appkey, client_for):
    droppers = [SynDropper(), SynDropper()]
    try:
        for d in droppers:
            register(zk, appkey, d.port)
        client = client_for(socket_timeout=3000)  # connects may take 3 s each
        wait_until(lambda: len(client.table.snapshot.available) == 2, what="both nodes")
        began = time.monotonic()
        with pytest.raises(NoAvailableNode, match="within the call's timeout of 200 ms"):
            client.with_timeout(200).ping()
        assert time.monotonic() - began < 0.8  # was 2 x 3 s
        assert client._outliers.excluded() == frozenset()  # the call's budget, not the nodes, ran out
    finally:
        for d in droppers:
            d.close()


# -- B8: NoAvailableNode is never raised after sending ----------------------------------------------


def test_a_sent_call_whose_retry_finds_no_node_raises_the_transport_error(zk, appkey, client_for):
    dying = Silent(die_after_first_request=True)
    try:
        register(zk, appkey, dying.port)
        client = client_for(retry=Retry(idempotent={"ping"}))
        wait_until(lambda: len(client.table.snapshot.available) == 1, what="the node")
        with pytest.raises(TTransportException, match="sending it again found no node") as caught:
            client.ping()
        assert dying.requests == 1
        assert isinstance(caught.value.__context__, NoAvailableNode)  # the retry's failure
        assert isinstance(caught.value.__cause__, TTransportException)  # the original failure
    finally:
        dying.close()


# -- B11: one probe when an ejection ends -----------------------------------------------------------


def test_when_an_ejection_ends_exactly_one_call_probes_the_node(providers, zk, appkey, client_for):
    providers("a")
    hung = Silent()
    try:
        register(zk, appkey, hung.port)
        detector = OutlierDetector(consecutive_failures=1, base_ejection=1.0, max_ejection=1.0, max_ejected_share=0.5)
        client = client_for(socket_timeout=300, outlier_detection=detector)
        wait_until(lambda: len(client.table.snapshot.available) == 2, what="both nodes")
        stop = threading.Event()

        def work():
            while not stop.is_set():
                with contextlib.suppress(TTransportException):  # the calls that hit the hung node time out
                    client.ping()

        threads = [threading.Thread(target=work) for _ in range(8)]
        for t in threads:
            t.start()
        try:
            wait_until(lambda: ("127.0.0.1", hung.port) in detector.excluded(), 5, "the hung node's ejection")
            wait_until(lambda: hung.waiting == 0, 5, "the calls sent before the ejection to time out")
            hung.reset_max()
            probes_before = hung.requests
            wait_until(lambda: hung.requests >= probes_before + 2, 8, "two ejections to end")
        finally:
            stop.set()
            for t in threads:
                t.join(5)
        assert hung.max_waiting == 1, "calls sent at once into the hung node after its ejection ended"
    finally:
        hung.close()


def test_a_probe_that_could_not_open_a_socket_goes_back_for_a_later_call(providers, appkey, client_for):
    # Review of B11: the process runs out of file descriptors just as a call claims the probe
    # of a node whose ejection ended. That call fails (nothing was sent); the node must still
    # get its probe from a later call, not stay shut out for the client's life.
    providers("a")
    b = providers("b")
    detector = OutlierDetector(consecutive_failures=1, base_ejection=0.2, max_ejection=0.2, max_ejected_share=0.5)
    client = client_for(outlier_detection=detector)
    wait_until(lambda: len(client.table.snapshot.available) == 2, what="both nodes")
    hurt = ("127.0.0.1", b.port)
    detector.failure(hurt, 2)
    assert hurt in detector.excluded()
    pool = client._pool
    real_acquire = pool.acquire

    def no_fds(address, deadline=None):
        if address == hurt:
            raise OSError(errno.EMFILE, "Too many open files")
        return real_acquire(address, deadline)

    pool.acquire = no_fds
    try:
        wait_until(lambda: detector.claim_probe(lambda a: False) is None and hurt in detector._probe_ready,
                   5, "the ejection to end")
        with pytest.raises(TTransportException, match="nothing was sent") as raised:
            while True:  # the first call that claims the probe meets EMFILE
                client.ping()
        assert raised.value.type == TTransportException.NOT_OPEN
    finally:
        del pool.acquire
    answered = collections.Counter()
    wait_until(lambda: answered.update([client.ping()]) or answered["b"] > 0, 5, "a call to reach the node again")
    assert hurt not in detector.excluded()
