"""Request limits enforced by a real provider (issue 13): a request over a QPS or concurrency limit
is answered LOADSHEDDING ("not executed") without running, on a connection that stays open; a
thriftprobe consumer sends it to another node, or raises Overloaded when every node is over; the
QPS limit holds within 10% over 10 s; limits change live; every admitted request is released
exactly once; rejections are counted by reason and method."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from typing import List

import pytest
import thriftpy2
from conftest import IDL, Handler, wait_until
from in_order import InOrder
from prometheus_client import CollectorRegistry
from thriftpy2.protocol import TBinaryProtocol
from thriftpy2.rpc import make_client
from thriftpy2.thrift import TApplicationException, TMessageType
from thriftpy2.transport import TMemoryBuffer, TTransportException

from thriftprobe import Overloaded, Retry, RetryBudget, build_client, start_service
from thriftprobe.errors import LOADSHEDDING
from thriftprobe.limits import MethodLimit, ServiceLimits
from thriftprobe.metrics import Recorder
from thriftprobe.provider import ServerHooks

calc = thriftpy2.load(IDL, module_name="demo_thrift")

NEVER_AGAIN = 0.001
"""A QPS whose bucket refills one token in 1000 s: after its burst, nothing passes in a test."""


class Gate(Handler):
    """``echo("wait")`` blocks until ``go`` is set; ``inside`` counts the calls that got in."""

    def __init__(self, tag: str) -> None:
        super().__init__(tag)
        self.go = threading.Event()
        self.inside = 0

    def echo(self, text: str) -> str:
        if text == "wait":
            with self._lock:
                self.inside += 1
            self.go.wait(20)
        return super().echo(text)


@pytest.fixture
def gated(cfg, appkey):  # type: ignore[no-untyped-def]
    """Start in-process providers of Calculator serving a ``Gate``; all are stopped after the test."""
    started: list = []

    def start(tag: str = "p", **kwargs: object):  # type: ignore[no-untyped-def]
        svc = start_service(
            IDL, appkey, "Calculator", Gate(tag), 0, block=False, config=cfg, bind_host="127.0.0.1", drain=0, **kwargs
        )
        started.append(svc)
        return svc

    yield start
    for svc in started:
        svc._server._dispatcher.handler.go.set()
        svc.stop(timeout=2.0, drain=0)



def client(svc, timeout: int = 10000):  # type: ignore[no-untyped-def]
    return make_client(calc.Calculator, "127.0.0.1", svc.port, timeout=timeout)


def limits(rev: int = 1, **methods: MethodLimit) -> ServiceLimits:
    return ServiceLimits({"*" if name == "ALL" else name: limit for name, limit in methods.items()}, rev)


def shed(call, *args):  # type: ignore[no-untyped-def]
    """Call, expecting the "not executed" answer of a limit; return its message."""
    with pytest.raises(TApplicationException) as err:
        call(*args)
    assert err.value.type == LOADSHEDDING, err.value
    return err.value.message


def counts(svc) -> dict:  # type: ignore[no-untyped-def]
    return svc._server._limiter.stats()


def test_the_call_over_a_concurrency_limit_is_shed_at_once_and_passes_after_a_release(gated):
    svc = gated("a", workers=8)
    handler = svc._server._dispatcher.handler
    svc._server.set_limits(limits(echo=MethodLimit(concurrency=2)))
    blocked = [client(svc) for _ in range(2)]
    threads = [threading.Thread(target=c.echo, args=("wait",)) for c in blocked]
    for t in threads:
        t.start()
    third = client(svc)
    try:
        wait_until(lambda: handler.inside == 2, what="two calls inside the handler")
        started = time.monotonic()
        message = shed(third.echo, "third")
        assert time.monotonic() - started < 0.5  # answered at once, not queued
        expected = "Calculator-%d is over its concurrency limit for echo (2 at once per node); not executed"
        assert message == expected % svc.port
        assert third.ping() == "a"  # the connection stays open; another method has no limit
        assert handler.inside == 2 and handler.calls == 1  # the shed call never ran
    finally:
        handler.go.set()
        for t in threads:
            t.join()
    assert third.echo("after") == "after"  # places are free again, on the same connection
    assert [third.echo("x%d" % i) for i in range(5)] == ["x%d" % i for i in range(5)]
    for c in [*blocked, third]:
        c.close()
    wait_until(lambda: counts(svc)["in_flight"] == 0, what="every admitted call released")


def test_a_limit_set_live_applies_to_the_next_request_and_clearing_it_lifts_it(gated):
    svc = gated("a")
    c = client(svc)
    try:
        assert [c.ping() for _ in range(5)] == ["a"] * 5
        svc._server.set_limits(limits(ping=MethodLimit(qps=NEVER_AGAIN, burst=2)))
        assert svc._server.limits == limits(ping=MethodLimit(qps=NEVER_AGAIN, burst=2))
        assert c.ping() == "a"  # a new bucket starts full: 2 tokens
        assert c.ping() == "a"
        message = shed(c.ping)
        assert "over its qps limit for ping (0.001 per second per node)" in message
        assert c.echo("other") == "other"  # echo has no limit
        svc._server.set_limits(limits(2, ALL=MethodLimit(qps=NEVER_AGAIN, burst=1)))
        assert c.ping() == "a"  # ping's own limit is gone; the service's bucket starts full
        assert shed(c.echo, "x") == (
            "Calculator-%d is over its qps limit for every method together (*) (0.001 per second per node); "
            "echo not executed" % svc.port
        )
        svc._server.set_limits(ServiceLimits(rev=3))
        assert [c.ping() for _ in range(20)] == ["a"] * 20
    finally:
        c.close()


def test_a_connection_calling_in_turn_is_limited_too_though_a_worker_reads_its_requests(gated):
    """One connection calling back to back is served by a lingering worker that reads the next
    request itself (not through the I/O thread): that path admits too."""
    svc = gated("a")
    handler = svc._server._dispatcher.handler
    svc._server.set_limits(limits(ping=MethodLimit(qps=NEVER_AGAIN, burst=3)))
    c = client(svc)
    try:
        results = []
        for _ in range(30):
            try:
                results.append(c.ping())
            except TApplicationException as err:
                assert err.type == LOADSHEDDING
                results.append("shed")
        assert results == ["a"] * 3 + ["shed"] * 27
        assert handler.calls == 3
    finally:
        c.close()
    stats = counts(svc)
    assert stats["admitted"] == stats["released"] == 3


class SlowFinish(ServerHooks):
    """A ``request_finished`` hook that takes a while (a logging or metrics hook on a busy host):
    it runs after the reply was sent, so a client already has its reply while the hook runs."""

    def request_finished(self, method: str, peer: object, start: float, outcome: str, duration: float) -> None:
        time.sleep(0.03)


def test_concurrency_one_admits_strictly_sequential_calls_on_alternating_connections(gated):
    """A client that waits for each reply before the next call never has two calls at once: with
    ``concurrency=1`` none is refused, though the next call comes on another connection (served by
    another worker) while the worker that sent the previous reply is still busy after it."""
    svc = gated("a", workers=8, hooks=SlowFinish())
    svc._server.set_limits(limits(echo=MethodLimit(concurrency=1)))
    conns = [client(svc) for _ in range(4)]
    try:
        refused = []
        for i in range(40):
            try:
                conns[i % 4].echo("x%d" % i)
            except TApplicationException as err:
                refused.append((i, err.message))
        assert refused == []
    finally:
        for c in conns:
            c.close()
    wait_until(lambda: counts(svc)["in_flight"] == 0, what="every admitted call released")
    stats = counts(svc)
    assert stats["admitted"] == stats["released"] == 40


def test_a_refused_oneway_call_gets_no_reply_and_the_stream_stays_in_step(gated):
    svc = gated("a")
    handler = svc._server._dispatcher.handler
    svc._server.set_limits(limits(record=MethodLimit(qps=NEVER_AGAIN, burst=1)))
    c = client(svc)
    try:
        for event in ("first", "second", "third"):
            c.record(event)
        assert c.ping() == "a"  # no stray reply to a refused oneway call is read here
        assert handler.events == ["first"]
    finally:
        c.close()
    wait_until(lambda: counts(svc)["released"] == 2, what="the oneway call and the ping released")


def test_a_thriftprobe_consumer_sends_shed_calls_to_the_other_node_then_raises_overloaded(gated, cfg, appkey):
    limited, other = gated("limited"), gated("other")
    limited._server.set_limits(limits(ALL=MethodLimit(qps=NEVER_AGAIN, burst=1)))
    consumer = build_client(
        IDL, appkey, "Calculator", config=cfg, balancer=InOrder(limited.port, other.port),
        retry=Retry(budget=RetryBudget(ratio=1.0)),
    )
    try:
        wait_until(lambda: len(consumer.table.snapshot.available) == 2, what="both nodes")
        served = [consumer.ping() for _ in range(20)]
        assert served == ["limited"] + ["other"] * 19  # the limited node took its one, then shed
        assert limited._server._dispatcher.handler.calls == 1
        other._server.set_limits(limits(ping=MethodLimit(qps=NEVER_AGAIN, burst=1)))
        assert consumer.ping() == "other"  # the other node's one
        for _ in range(5):
            with pytest.raises(Overloaded) as raised:
                consumer.ping()
            assert "over its qps limit" in str(raised.value)
        assert consumer.echo("not limited on other") == "not limited on other"
    finally:
        consumer.close()


def test_every_admitted_request_is_released_exactly_once_whatever_becomes_of_it(gated):
    svc = gated("a", workers=2, queue_size=4)
    handler = svc._server._dispatcher.handler
    svc._server.set_limits(limits(ALL=MethodLimit(concurrency=100)))
    c = client(svc)
    try:
        assert c.ping() == "a"
        with pytest.raises(calc.CalcError):  # a declared exception
            c.compute(calc.Operation(left=1, right=0, op="/"))
        with pytest.raises(TApplicationException):  # the handler raised something undeclared
            c.compute(calc.Operation(left=1, right=0, op="%"))
        c.record("oneway")
    finally:
        c.close()
    wait_until(lambda: counts(svc)["released"] == 4, what="four requests released")
    # A connection that dies while its handler runs: the reply cannot be sent, the place is freed.
    sock = socket.create_connection(("127.0.0.1", svc.port))
    sock.sendall(raw_call("echo", calc.Calculator.echo_args(text="wait")))
    wait_until(lambda: handler.inside == 1, what="the handler running")
    sock.close()
    # Requests the server will never run: both workers blocked, three requests queued, then a stop.
    callers: List[threading.Thread] = []

    def call_in_background(text: str) -> None:
        t = threading.Thread(target=_swallow, args=(client(svc, 20000).echo, text))
        t.start()
        callers.append(t)

    call_in_background("wait")
    wait_until(lambda: handler.inside == 2, what="both workers in the handler")
    for text in ("queued", "wait", "queued"):
        call_in_background(text)
    wait_until(lambda: svc._server.stats()["queued"] == 3, what="three requests queued")
    ran = handler.calls
    svc.stop(timeout=0.5, drain=0)
    wait_until(lambda: svc._server._io_done, what="the stop deadline passed: queued requests answered unrun")
    handler.go.set()
    for t in callers:
        t.join()
    wait_until(lambda: counts(svc)["in_flight"] == 0, what="every admitted request released")
    assert handler.calls == ran + 2  # the two blocked handlers returned; nothing queued ever ran
    stats = counts(svc)
    assert stats["admitted"] == stats["released"] == 4 + 1 + 4
    assert all(v == 0 for k, v in stats.items() if k.startswith("in_flight"))


def raw_call(method: str, args: object, seqid: int = 1) -> bytes:
    """The bytes of a binary-protocol CALL, for a socket the test can close under it."""
    buf = TMemoryBuffer()
    proto = TBinaryProtocol(buf)
    proto.write_message_begin(method, TMessageType.CALL, seqid)
    args.write(proto)  # type: ignore[attr-defined]
    proto.write_message_end()
    return buf.getvalue()


def _swallow(call, *args):  # type: ignore[no-untyped-def]
    """Call, ignoring what a call cut off by a stop ends with."""
    with contextlib.suppress(TApplicationException, TTransportException, OSError):
        call(*args)


def test_rejections_are_counted_by_reason_and_method(gated):
    rec = Recorder(CollectorRegistry())
    svc = gated("a", metrics=rec)
    handler = svc._server._dispatcher.handler
    svc._server.set_limits(limits(ping=MethodLimit(qps=NEVER_AGAIN, burst=1), echo=MethodLimit(concurrency=1)))
    c, blocked = client(svc), client(svc)
    waiter = threading.Thread(target=blocked.echo, args=("wait",))
    waiter.start()
    try:
        wait_until(lambda: handler.inside == 1, what="echo's one place taken")
        c.ping()
        for _ in range(3):
            shed(c.ping)
        for _ in range(2):
            shed(c.echo, "x")
    finally:
        handler.go.set()
        waiter.join()
        c.close()
        blocked.close()

    def sample(name: str, **labels: str) -> float:
        labels.update(appkey=svc.appkey, rpc_service="Calculator", node="127.0.0.1:%d" % svc.port)
        return rec.registry.get_sample_value(name, labels) or 0.0

    rejections = "thriftprobe_server_rejections_total"
    assert sample(rejections, rpc_method="ping", reason="qps") == 3
    assert sample(rejections, rpc_method="echo", reason="concurrency") == 2
    assert sample(rejections, rpc_method="echo", reason="qps") == 0
    duration = "rpc_server_call_duration_seconds_count"
    assert sample(duration, rpc_system="thrift", rpc_method="ping", outcome="overloaded") == 3
    assert sample(duration, rpc_system="thrift", rpc_method="echo", outcome="overloaded") == 2


@pytest.mark.slow
def test_a_qps_limit_holds_within_ten_percent_over_ten_seconds(gated):
    svc = gated("a", workers=16)
    qps, burst = 50, 5
    svc._server.set_limits(limits(ping=MethodLimit(qps=qps, burst=burst)))
    admitted, refused = [0] * 6, [0] * 6
    errors: list = []
    window = 10.0
    begin = threading.Barrier(7)
    marks: List[float] = []

    def drive(i: int) -> None:
        c = client(svc)
        try:
            begin.wait()
            end = marks[0] + window
            while time.monotonic() < end:
                try:
                    c.ping()
                    admitted[i] += 1
                except TApplicationException as err:
                    if err.type != LOADSHEDDING:
                        raise
                    refused[i] += 1
        except Exception as exc:
            errors.append(exc)
        finally:
            c.close()

    threads = [threading.Thread(target=drive, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    marks.append(time.monotonic())
    begin.wait()
    for t in threads:
        t.join(window + 10)
    assert not errors
    expected = qps * window + burst
    assert sum(refused) > sum(admitted)  # driven well past the limit
    print("qps limit %d, burst %d, %.0f s: %d admitted (expected %d), %d refused"
          % (qps, burst, window, sum(admitted), expected, sum(refused)))
    assert abs(sum(admitted) - expected) <= 0.1 * expected, (sum(admitted), expected, sum(refused))
