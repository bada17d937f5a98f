"""Overload is safe to retry: a reply ``TApplicationException(LOADSHEDDING)`` says the provider
did not run the handler, so the consumer sends the call to a node that has not shed it, whatever
the method, through the retry budget; when none may be tried it raises ``Overloaded``. The
shedding node is busy, not broken: its connection is kept and it is never ejected."""

from __future__ import annotations

import collections
import threading
import time
from typing import Any, Dict, Iterator, List

import pytest
import thriftpy2
from conftest import IDL, Handler, wait_until
from in_order import InOrder
from thriftpy2.thrift import TApplicationException
from thriftpy2.transport import TTransportException
from wire_servers import WireServer, register

from thriftprobe import (
    NoAvailableNode,
    OutlierDetector,
    Overloaded,
    Retry,
    RetryBudget,
    build_client,
    start_service,
)
from thriftprobe.errors import LOADSHEDDING

demo = thriftpy2.load(IDL, module_name="demo_thrift")


class Shedding(Handler):
    """Sheds every call (after ``delay`` s), counting each call it saw by its argument."""

    def __init__(self, tag: str, delay: float = 0.0, message: str = "overloaded") -> None:
        super().__init__(tag)
        self.delay = delay
        self.message = message
        self.seen: List[str] = []

    def _shed(self, what: str) -> None:
        with self._lock:
            self.calls += 1
            self.seen.append(what)
        if self.delay:
            time.sleep(self.delay)
        raise TApplicationException(LOADSHEDDING, self.message)

    def ping(self) -> str:
        self._shed("ping")
        return ""

    def echo(self, text: str) -> str:
        self._shed(text)
        return ""


class Recording(Handler):
    """Works, remembering each echo it ran."""

    def __init__(self, tag: str) -> None:
        super().__init__(tag)
        self.seen: List[str] = []

    def echo(self, text: str) -> str:
        with self._lock:
            self.seen.append(text)
        return super().echo(text)



@pytest.fixture
def servers(zk, appkey) -> Iterator[Any]:
    started = []

    def start(handler: Handler, transport: str = "buffered", protocol: str = "binary") -> WireServer:
        server = WireServer(demo.Calculator, handler, transport, protocol)
        register(zk, appkey, server.port, transport, protocol)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


def _client(cfg: Any, appkey: str, nodes: int, **kwargs: Any) -> Any:
    client = build_client(IDL, appkey, "Calculator", config=cfg, **kwargs)
    wait_until(lambda: len(client.table.snapshot.available) == nodes, what="%d nodes" % nodes)
    return client


def test_a_shed_call_that_is_not_idempotent_lands_on_the_working_node_every_time(servers, cfg, appkey):
    busy, fine = Shedding("busy"), Recording("fine")
    shedder, worker = servers(busy, "framed", "compact"), servers(fine)
    # No Retry policy (nothing idempotent); a budget that allows a retry per call.
    with _client(cfg, appkey, 2, retry=Retry(budget=RetryBudget(ratio=1.0))) as client:
        for i in range(200):
            assert client.echo("call-%d" % i) == "call-%d" % i
        assert fine.seen == ["call-%d" % i for i in range(200)]  # every call ran once, on the working node
        assert 40 < busy.calls < 160  # it was picked about half the time...
        assert len(set(busy.seen)) == len(busy.seen)  # ...and never saw one call twice
        assert not client._outliers.excluded()  # busy, not broken: never ejected
        assert client._pool.idle_count(("127.0.0.1", shedder.port)) == 1
    assert shedder.accepted == worker.accepted == 1  # the shedding node's connection was kept in step


def test_every_node_shedding_raises_overloaded_naming_them(servers, cfg, appkey):
    first, second = Shedding("a", message="queue full"), Shedding("b", message="over max_connections")
    a, b = servers(first), servers(second, "framed", "binary")
    with _client(cfg, appkey, 2) as client:
        for i in range(20):
            with pytest.raises(Overloaded) as raised:
                client.echo("c%d" % i)
            assert isinstance(raised.value, NoAvailableNode)
            message = str(raised.value)
            assert "127.0.0.1:%d ('queue full')" % a.port in message
            assert "127.0.0.1:%d ('over max_connections')" % b.port in message
            assert "no other node is left" in message
        # One send per node per call: no node saw a call twice.
        assert sorted(first.seen) == sorted(second.seen) == sorted("c%d" % i for i in range(20))
        assert not client._outliers.excluded()
        # Catchable as NoAvailableNode, as callers of the original design catch "no node took it".
        with pytest.raises(NoAvailableNode):
            client.ping()


def test_a_spent_retry_budget_raises_overloaded_without_trying_further(servers, cfg, appkey):
    busy, fine = Shedding("busy"), Recording("fine")
    shedder, worker = servers(busy), servers(fine)
    spent = RetryBudget(ratio=0.0, min_per_second=2.0)  # holds at most 2 tokens, refilled at 2/s
    while spent.withdraw():
        pass
    with _client(cfg, appkey, 2, balancer=InOrder(shedder.port, worker.port), retry=Retry(budget=spent)) as client:
        with pytest.raises(Overloaded, match="retry budget") as raised:
            client.echo("once")
        assert "127.0.0.1:%d ('overloaded')" % shedder.port in str(raised.value)
        assert busy.seen == ["once"] and fine.seen == []
        # The budget is the one a Retry policy's retries after failures draw from: refilled, the
        # same call goes on to the working node.
        time.sleep(0.6)
        assert client.echo("twice") == "twice"
        assert busy.seen == ["once", "twice"] and fine.seen == ["twice"]


def test_the_default_budget_limits_a_storm_of_shed_calls(servers, cfg, appkey):
    """Without a Retry policy the client still has a budget (20 % of calls + 10/s): when every
    call meets a shedding node first, most of a burst raises Overloaded instead of doubling the
    load on the rest of the fleet."""
    busy, fine = Shedding("busy"), Recording("fine")
    shedder, worker = servers(busy), servers(fine)
    with _client(cfg, appkey, 2, balancer=InOrder(shedder.port, worker.port)) as client:
        outcomes = collections.Counter()
        for i in range(300):
            try:
                client.echo("c%d" % i)
                outcomes["ran"] += 1
            except Overloaded:
                outcomes["overloaded"] += 1
    assert busy.calls == 300
    assert outcomes["ran"] == len(fine.seen)
    assert 30 <= outcomes["ran"] < 150, outcomes  # the burst's 30 tokens, +0.2 a call, +10/s
    assert outcomes["overloaded"] > 150


def test_the_shedding_node_is_never_ejected_even_by_an_eager_detector(servers, cfg, appkey):
    busy, fine = Shedding("busy"), Recording("fine")
    shedder, worker = servers(busy), servers(fine)
    detector = OutlierDetector(consecutive_failures=1)
    with _client(cfg, appkey, 2, outlier_detection=detector, balancer=InOrder(shedder.port, worker.port),
                 retry=Retry(budget=RetryBudget(ratio=1.0))) as client:
        for i in range(50):
            assert client.echo("c%d" % i) == "c%d" % i
        assert not detector.excluded() and not detector._records
        assert busy.calls == 50 and len(fine.seen) == 50
    assert shedder.accepted == 1


def test_a_shed_call_then_unreachable_nodes_raises_overloaded(servers, cfg, appkey, zk):
    busy = Shedding("busy")
    shedder = servers(busy)
    register(zk, appkey, 1)  # nothing listens on port 1
    with _client(cfg, appkey, 2, balancer=InOrder(shedder.port, 1)) as client:
        with pytest.raises(Overloaded, match="accepted a connection") as raised:
            client.echo("x")
        assert "127.0.0.1:%d" % shedder.port in str(raised.value)
        assert busy.seen == ["x"]


def test_the_calls_timeout_bounds_the_tries_on_slow_shedding_nodes(servers, cfg, appkey):
    handlers = [Shedding("s%d" % i, delay=0.12) for i in range(4)]
    for handler in handlers:
        servers(handler)
    with _client(cfg, appkey, 4, retry=Retry(budget=RetryBudget(ratio=1.0))) as client:
        started = time.monotonic()
        with pytest.raises((Overloaded, TTransportException)) as raised:
            client.with_timeout(300).echo("slow")
        elapsed = time.monotonic() - started
        assert elapsed < 0.45, elapsed
        if isinstance(raised.value, TTransportException):  # the third send was cut by the timeout
            assert raised.value.type == TTransportException.TIMED_OUT
        assert sum(h.calls for h in handlers) <= 3
        # Without a timeout, each node is tried once and the call ends Overloaded.
        with pytest.raises(Overloaded, match="no other node is left"):
            client.echo("patient")
        assert [h.seen.count("patient") for h in handlers] == [1, 1, 1, 1]


def test_a_thriftprobe_provider_whose_handler_sheds_is_skipped(cfg, appkey):
    """The thriftprobe provider forwards a TApplicationException a handler raises as it is."""
    busy, fine = Shedding("busy"), Recording("fine")
    started = [start_service(IDL, appkey, "Calculator", h, 0, config=cfg, block=False, drain=0, bind_host="127.0.0.1")
               for h in (busy, fine)]
    try:
        with _client(cfg, appkey, 2, retry=Retry(budget=RetryBudget(ratio=1.0))) as client:
            for i in range(60):
                assert client.echo("c%d" % i) == "c%d" % i
            assert busy.calls > 5 and len(fine.seen) == 60 and len(set(busy.seen)) == busy.calls
    finally:
        for svc in started:
            svc.stop(timeout=2.0, drain=0)


def test_shed_calls_from_many_threads_all_land(servers, cfg, appkey):
    busy, fine = Shedding("busy"), Recording("fine")
    servers(busy)
    servers(fine, "framed", "compact")
    errors: List[BaseException] = []
    results: Dict[str, str] = {}

    with _client(cfg, appkey, 2, retry=Retry(budget=RetryBudget(ratio=1.0, min_per_second=1000.0))) as client:
        def work(n: int) -> None:
            try:
                for i in range(50):
                    key = "t%d-%d" % (n, i)
                    results[key] = client.echo(key)
            except BaseException as err:  # reported below
                errors.append(err)

        threads = [threading.Thread(target=work, args=(n,)) for n in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
    assert not errors, errors[:3]
    assert len(results) == 400 and all(k == v for k, v in results.items())
    assert sorted(fine.seen) == sorted(results)
    assert len(set(busy.seen)) == len(busy.seen)



def test_a_provider_with_every_worker_busy_sheds_and_the_call_lands_elsewhere(providers, cfg, appkey):
    """The whole path with the real server core: a provider with one worker, busy, and no queue
    answers LOADSHEDDING; a consumer's non-idempotent call goes to the other provider, and the
    busy one never runs it."""
    from thriftpy2.rpc import make_client

    busy = providers("busy", workers=1, queue_size=0)
    free = providers("free")
    busy_handler, free_handler = busy._server._dispatcher.handler, free._server._dispatcher.handler

    def occupy() -> None:
        c = make_client(demo.Calculator, "127.0.0.1", busy.port, timeout=10000)
        try:
            c.sleep_ms(1500)
        finally:
            c.close()

    with build_client(IDL, appkey, "Calculator", config=cfg) as client:
        wait_until(lambda: len(client.table.snapshot.all_nodes) == 2, what="both nodes in the table")
        blocker = threading.Thread(target=occupy)
        blocker.start()
        try:
            wait_until(lambda: busy_handler.calls == 1, what="the busy provider's worker taken")
            for _ in range(20):
                client.sleep_ms(1)  # not idempotent: only a "not executed" reply may move it
        finally:
            blocker.join()
    assert busy_handler.calls == 1 and free_handler.calls == 20
