"""thriftprobe.aio: the asyncio client against real providers and a real ZooKeeper. Each test
runs its own event loop (asyncio.run): pytest-asyncio is not a dependency."""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import socket
import threading
import time
from collections import Counter
from typing import Any, Iterator, List

import pytest
import thriftpy2
from conftest import IDL, TEST_ENV, Handler, free_port, spawn_provider, wait_until
from in_order import InOrder
from test_overload import Shedding
from thriftpy2.thrift import TApplicationException
from thriftpy2.transport import TTransportException
from wire_servers import WIRES, WireServer, register

from thriftprobe import InvalidArgument, NoAvailableNode, Overloaded, Retry, RetryBudget, ThriftProbeError, aio
from thriftprobe.consumer.balancer import WeightedRandom

demo = thriftpy2.load(IDL, module_name="demo_thrift")

CHI2_DF1_P00001 = 19.511  # chi-square, 1 degree of freedom, p = 0.00001


class SlowEcho(Handler):
    """Echoes; a text starting with "slow" is answered after 0.5 s (a late reply)."""

    def __init__(self, tag: str) -> None:
        super().__init__(tag)
        self.started: List[str] = []

    def echo(self, text: str) -> str:
        with self._lock:
            self.started.append(text)
        if text.startswith("slow"):
            time.sleep(0.5)
        return super().echo(text)


@pytest.fixture
def servers(zk, appkey) -> Iterator[Any]:
    started: List[WireServer] = []

    def start(handler: Handler, transport: str = "buffered", protocol: str = "binary") -> WireServer:
        server = WireServer(demo.Calculator, handler, transport, protocol)
        register(zk, appkey, server.port, transport, protocol)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


async def _client(cfg: Any, appkey: str, nodes: int, **kwargs: Any) -> aio.AioProbeClient:
    client = await aio.build_client(IDL, appkey, "Calculator", config=cfg, **kwargs)
    deadline = time.monotonic() + 10
    while len(client.table.snapshot.available) < nodes:
        assert time.monotonic() < deadline, "the table never showed %d nodes" % nodes
        await asyncio.sleep(0.01)
    return client


def _core(client: aio.AioProbeClient) -> Any:
    return client.__dict__["_aio_core"]


def test_calls_structs_declared_exceptions_and_oneway(providers, cfg, appkey):
    svc = providers("a")

    async def main() -> None:
        async with await _client(cfg, appkey, 1) as client:
            assert await client.ping() == "a"
            answer = await client.compute(demo.Operation(left=7, right=5))
            assert (answer.value, answer.served_by) == (12, "a")
            with pytest.raises(demo.CalcError, match="division by zero"):
                await client.compute(demo.Operation(left=1, right=0, op="/"))
            with pytest.raises(TApplicationException):
                await client.compute(demo.Operation(left=1, right=1, op="?"))
            assert await client.record("hello") is None
            assert await client.echo(text="keyword") == "keyword"  # still in step
            assert _core(client)._pool.open_count == 1  # one connection served every call
            with pytest.raises(InvalidArgument, match=r"argument 'text' of Calculator\.echo"):
                await client.echo(12)
            assert await client.echo("after") == "after"
            nodes = client.explain().to_dict()["nodes"]
            assert [(n["in_flight"], n["pooled"]) for n in nodes] == [(0, 1)]

    asyncio.run(main())
    handler = svc._server._dispatcher.handler
    wait_until(lambda: handler.events == ["hello"], what="the oneway call")


@pytest.mark.parametrize(("transport", "protocol"), WIRES)
def test_each_node_is_spoken_to_in_its_advertised_wire(servers, cfg, appkey, transport, protocol):
    server = servers(Handler("w"), transport, protocol)

    async def main() -> None:
        async with await _client(cfg, appkey, 1) as client:
            for i in range(3):
                answer = await client.compute(demo.Operation(left=i, right=2))
                assert (answer.value, answer.served_by) == (i + 2, "w")
                assert await client.echo("é%d" % i) == "é%d" % i
            with pytest.raises(demo.CalcError):
                await client.compute(demo.Operation(left=1, right=0, op="/"))

    asyncio.run(main())
    assert server.accepted == 1  # one connection, kept in step across the calls


def test_calls_spread_by_weight_across_two_providers(providers, settings, cfg, appkey):
    weights = {"w1": 1, "w3": 3}
    for tag, weight in weights.items():
        port = free_port()
        settings.put(port, weight=weight)
        providers(tag, port=port)
    n = 2000

    async def main() -> Counter:
        async with await _client(cfg, appkey, 2, balancer=WeightedRandom(random.Random(2024))) as client:
            return Counter(await asyncio.gather(*(client.ping() for _ in range(n))))

    counts = asyncio.run(main())
    chi2 = sum((counts[t] - n * w / 4) ** 2 / (n * w / 4) for t, w in weights.items())
    assert chi2 < CHI2_DF1_P00001, counts


@pytest.mark.slow
def test_idempotent_calls_in_flight_on_a_killed_provider_are_retried_on_the_other(config_path, cfg, appkey):
    procs = [spawn_provider(config_path, TEST_ENV, appkey, tag) for tag in ("a", "b")]
    victim = procs[0]
    try:

        async def main() -> List[Any]:
            retry = Retry(idempotent={"sleep_ms"}, budget=RetryBudget(ratio=1.0))
            in_order = InOrder(victim.port, procs[1].port)  # every call to the victim first
            async with await _client(cfg, appkey, 2, retry=retry, balancer=in_order) as client:
                pool = _core(client)._pool
                calls = [asyncio.ensure_future(client.sleep_ms(1500)) for _ in range(4)]
                # A connection is counted, then its request written in the same step of its task.
                await _until(lambda: pool.open_count == 4, "4 calls sent to the victim")
                victim.send_signal(signal.SIGKILL)
                return await asyncio.gather(*calls, return_exceptions=True)

        results = asyncio.run(main())
        assert results == [None] * 4, results  # every call failed on the victim, then ran on "b"
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()


def test_a_shed_call_goes_to_another_node_and_all_shedding_raises_overloaded(servers, cfg, appkey):
    busy, fine = Shedding("busy", message="queue full"), Handler("fine")
    shedder = servers(busy, "framed", "compact")
    worker = servers(fine, "framed", "binary")

    async def main() -> None:
        async with await _client(cfg, appkey, 2, balancer=InOrder(shedder.port, worker.port)) as client:
            for i in range(10):  # not idempotent: shed calls go on all the same (nothing ran)
                assert await client.echo("c%d" % i) == "c%d" % i
            assert busy.seen == ["c%d" % i for i in range(10)]
            assert not _core(client)._outliers.excluded()  # busy, not broken
        worker.stop()

    asyncio.run(main())
    assert shedder.accepted == 1  # the shedding node's connection was kept in step

    async def all_shedding() -> None:
        async with await _client(cfg, appkey, 1) as client:
            with pytest.raises(Overloaded, match=r"127\.0\.0\.1:%d \('queue full'\)" % shedder.port) as raised:
                await client.echo("x")
            assert isinstance(raised.value, NoAvailableNode)

    asyncio.run(all_shedding())


def test_a_cancelled_call_discards_its_connection_and_the_next_call_gets_its_own_answer(servers, cfg, appkey):
    handler = SlowEcho("slow")
    server = servers(handler)

    async def main() -> None:
        async with await _client(cfg, appkey, 1, max_idle_per_node=1) as client:
            assert await client.echo("warm") == "warm"
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(client.echo("slow-1"), 0.1)
            assert _core(client)._pool.open_count == 0  # discarded, not pooled
            assert await client.echo("fast-1") == "fast-1"
            task = asyncio.ensure_future(client.echo("slow-2"))
            await _until(lambda: "slow-2" in handler.started, "the provider to run slow-2")
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            # Past the late replies' time: none of them is read as these calls' answers.
            for i in range(5):
                assert await client.echo("fast-%d" % (i + 2)) == "fast-%d" % (i + 2)
                await asyncio.sleep(0.15)  # time passing, not a condition: the late replies arrive

    asyncio.run(main())
    assert server.accepted == 3  # a new connection after each cancelled call


def test_a_call_over_the_socket_timeout_fails_and_the_next_gets_its_own_answer(servers, cfg, appkey):
    servers(SlowEcho("slow"))

    async def main() -> None:
        async with await _client(cfg, appkey, 1, socket_timeout=150) as client:
            with pytest.raises(TTransportException, match="timed out") as raised:
                await client.echo("slow")
            assert raised.value.type == TTransportException.TIMED_OUT
            assert await client.echo("fast") == "fast"
            with pytest.raises(TTransportException, match="timed out"):  # a per-call timeout, too
                await client.with_timeout(100).echo("slow-again")
            await asyncio.sleep(0.5)  # time passing, not a condition: the late reply arrives
            assert await client.echo("fast-2") == "fast-2"

    asyncio.run(main())


def test_64_concurrent_calls_on_one_loop_each_get_their_own_answer(providers, cfg, appkey):
    providers("a")
    providers("b")

    async def main() -> None:
        async with await _client(cfg, appkey, 2) as client:
            texts = ["call-%d" % i for i in range(64)]
            for _ in range(3):
                assert await asyncio.gather(*(client.echo(t) for t in texts)) == texts
            pool = _core(client)._pool
            assert 2 <= pool.open_count <= 64

    asyncio.run(main())


def test_close_leaves_no_connections_and_no_threads(config_path, cfg, appkey):
    provider = spawn_provider(config_path, TEST_ENV, appkey, "a")  # its threads are not in this process
    before = {t.ident for t in threading.enumerate()}
    fds_before = _sockets()
    pools: List[Any] = []

    async def main() -> None:
        client = await _client(cfg, appkey, 1)
        assert await asyncio.gather(*(client.echo("x") for _ in range(16))) == ["x"] * 16
        pools.append(_core(client)._pool)
        assert pools[0].open_count > 1
        await client.close()
        await client.close()  # idempotent
        assert pools[0].open_count == 0
        with pytest.raises(Exception, match="closed"):
            await client.ping()

    try:
        asyncio.run(main())
        wait_until(lambda: {t.ident for t in threading.enumerate()} <= before, what="the client's threads to end")
        wait_until(lambda: _sockets() <= fds_before, what="the client's sockets to close")
    finally:
        provider.kill()
        provider.wait()


async def _until(predicate: Any, what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out waiting for %s" % what
        await asyncio.sleep(0.01)


def _sockets() -> int:
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            count += os.readlink("/proc/self/fd/%s" % fd).startswith("socket:")
        except OSError:
            continue
    return count


def test_a_build_cancelled_while_it_waits_for_zookeeper_leaves_no_client_behind(cfg, appkey):
    before = {t.ident for t in threading.enumerate()}

    async def main() -> None:
        with pytest.raises(asyncio.TimeoutError):  # ZooKeeper takes longer than 1 ms to answer
            await asyncio.wait_for(aio.build_client(IDL, appkey, "Calculator", config=cfg), 0.001)
        await _until(lambda: {t.ident for t in threading.enumerate()} - before <= _executor_threads(),
                     "the abandoned client to be closed")

    asyncio.run(main())
    wait_until(lambda: {t.ident for t in threading.enumerate()} <= before, what="the client's threads to end")


def _executor_threads() -> set:
    return {t.ident for t in threading.enumerate() if t.name.startswith("asyncio_")}


def test_10000_tasks_on_one_node_open_at_most_max_connections_per_node(servers, cfg, appkey):
    """A burst of 10,000 calls on one loop does not open 10,000 sockets to the node: past
    ``max_connections_per_node`` they wait for a connection to be given back, in order."""
    server = servers(SlowEcho("n"))

    async def main() -> None:
        async with await _client(cfg, appkey, 1, max_connections_per_node=8) as client:
            pool = _core(client)._pool
            most = [0]

            async def call(i: int) -> str:
                answer = await client.echo("c%d" % i)
                most[0] = max(most[0], pool.open_count)
                return answer

            texts = ["c%d" % i for i in range(10000)]
            assert await asyncio.gather(*(call(i) for i in range(10000))) == texts
            assert 1 <= most[0] <= 8
            assert pool.open_count <= 8

    asyncio.run(main())
    assert server.accepted <= 8


def test_a_call_that_finds_every_connection_busy_past_its_timeout_is_not_sent(servers, cfg, appkey):
    """With the node's one allowed connection held by a slow call, a call with a 200 ms timeout
    fails with PoolExhausted (a NoAvailableNode: nothing sent) and the node is not blamed."""
    handler = SlowEcho("busy")
    servers(handler)

    async def main() -> None:
        async with await _client(cfg, appkey, 1, max_connections_per_node=1) as client:
            slow = asyncio.ensure_future(client.echo("slow-hold"))
            await _until(lambda: "slow-hold" in handler.started, "the slow call to run")
            with pytest.raises(aio.PoolExhausted, match="stayed busy"):
                await client.with_timeout(200).echo("waits")
            assert isinstance(aio.PoolExhausted("x"), NoAvailableNode)
            assert await slow == "slow-hold"
            assert "waits" not in handler.started
            assert not _core(client)._outliers.excluded()
            assert await client.echo("after") == "after"  # the connection was given back in step

    asyncio.run(main())


def test_a_retry_whose_time_ran_out_is_not_sent(servers, cfg, appkey):
    """An idempotent call fails on one node after sending, past its timeout: the retry policy
    would allow a second send, but the call's time is spent, so none goes out."""
    handler = SlowEcho("late")
    servers(handler)
    retry = Retry(idempotent=["echo"], attempts=3, budget=RetryBudget(window_calls=1000))

    async def main() -> None:
        async with await _client(cfg, appkey, 1, retry=retry) as client:
            assert await client.echo("warm") == "warm"
            with pytest.raises(TTransportException, match=r"timed out|ran out"):
                await client.with_timeout(150).echo("slow-once")
            await asyncio.sleep(0.6)  # time passing, not a condition: the slow handler finishes
            assert handler.started.count("slow-once") == 1

    asyncio.run(main())


def test_a_client_is_refused_on_another_event_loop(providers, cfg, appkey):
    providers("a")
    built: List[Any] = []

    async def build() -> None:
        built.append(await _client(cfg, appkey, 1))
        assert await built[0].ping() == "a"

    async def elsewhere() -> None:
        with pytest.raises(ThriftProbeError, match="event loop it was built on"):
            await built[0].ping()
        await built[0].close()  # closing from another loop still releases the discovery

    asyncio.run(build())
    sockets = _sockets()
    asyncio.run(elsewhere())
    assert _core(built[0])._core._closed  # the discovery
    assert _sockets() < sockets  # the pooled connection, closed without its loop


def test_a_cancelled_close_still_closes_the_discovery(config_path, cfg, appkey):
    provider = spawn_provider(config_path, TEST_ENV, appkey, "a")  # its threads are not in this process
    before = {t.ident for t in threading.enumerate()}

    async def main() -> None:
        client = await _client(cfg, appkey, 1)
        assert await client.ping() == "a"
        closing = asyncio.ensure_future(client.close())
        await asyncio.sleep(0)  # the close has begun
        closing.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await closing

    try:
        asyncio.run(main())
        wait_until(lambda: {t.ident for t in threading.enumerate()} <= before, what="the client's threads to end")
    finally:
        provider.kill()
        provider.wait()


def test_calls_in_flight_when_the_client_closes_fail_without_blaming_the_node(servers, cfg, appkey):
    handler = SlowEcho("n")
    servers(handler)

    async def main() -> None:
        client = await _client(cfg, appkey, 1)
        core = _core(client)
        flying = asyncio.ensure_future(client.echo("slow-flying"))
        await _until(lambda: "slow-flying" in handler.started, "the call to run")
        await client.close()
        with pytest.raises(ThriftProbeError, match="closed during the call"):
            await flying
        assert not core._outliers.excluded()

    asyncio.run(main())


class CountingBudget(RetryBudget):
    """A retry budget that counts how often a retry was asked of it."""

    def __init__(self) -> None:
        super().__init__(window_calls=1000)
        self.asked = 0

    def withdraw(self) -> bool:
        self.asked += 1
        return super().withdraw()


def test_a_call_whose_own_timeout_ran_out_asks_the_budget_for_no_retry(servers, cfg, appkey):
    """Cut by its own timeout, a call is not sent again, so it takes no token from the retry
    budget (that would starve the retries real failures need) and counts no retry."""
    handler = SlowEcho("late")
    servers(handler)
    budget = CountingBudget()
    retry = Retry(idempotent=["echo"], attempts=3, budget=budget)

    async def main() -> None:
        async with await _client(cfg, appkey, 1, retry=retry) as client:
            for i in range(3):
                with pytest.raises(TTransportException):
                    await client.with_timeout(150).echo("slow-%d" % i)
            assert budget.asked == 0

    asyncio.run(main())


def test_the_threaded_client_asks_the_budget_for_no_retry_past_the_call_timeout(servers, cfg, appkey):
    from thriftprobe import build_client

    handler = SlowEcho("late")
    servers(handler)
    budget = CountingBudget()
    with build_client(IDL, appkey, "Calculator", config=cfg, retry=Retry(idempotent=["echo"], attempts=3,
                                                                         budget=budget)) as client:
        wait_until(lambda: client.table.snapshot.available, what="the node")
        for i in range(3):
            with pytest.raises(TTransportException):
                client.with_timeout(150).echo("slow-%d" % i)
    assert budget.asked == 0


def test_calls_waiting_for_a_node_that_leaves_go_to_another(servers, zk, cfg, appkey):
    """A call queued for the one connection of node A; A leaves the table and B joins: the call
    is sent to B at once, not to the departed A, nor left to time out."""
    slow = SlowEcho("a")
    a = WireServer(demo.Calculator, slow)
    a_path = register(zk, appkey, a.port)
    b = WireServer(demo.Calculator, Handler("b"))
    try:
        async def main() -> None:
            async with await _client(cfg, appkey, 1, max_connections_per_node=1,
                                     balancer=InOrder(a.port, b.port)) as client:
                holder = asyncio.ensure_future(client.with_timeout(5000).sleep_ms(2000))
                await _until(lambda: slow.calls == 1, "the slow call on A")
                waiting = asyncio.ensure_future(client.with_timeout(4000).ping())
                await asyncio.sleep(0.05)  # time passing, not a condition: the ping queues behind A's connection
                register(zk, appkey, b.port)
                # (B in the table first: a removal that would empty it is held for a grace period)
                await _until(lambda: len(client.table.snapshot.available) == 2, "B in the table")
                zk.delete(a_path)
                started = time.monotonic()
                assert await waiting == "b"
                assert time.monotonic() - started < 1.0
                assert await holder is None

        asyncio.run(main())
    finally:
        a.stop()
        b.stop()


def test_queueing_for_a_connection_is_not_blamed_on_the_node(servers, cfg, appkey, caplog):
    """More calls than the one allowed connection can serve within their timeout: those that
    spent their time waiting in the client fail, but the node, which answered every request it
    got in time, is never ejected."""

    class Steady(Handler):
        def sleep_ms(self, ms: int) -> None:
            time.sleep(ms / 1000.0)

    servers(Steady("n"))

    async def main() -> List[str]:
        async with await _client(cfg, appkey, 1, max_connections_per_node=1) as client:
            async def one(i: int) -> str:
                await asyncio.sleep(i * 0.06)
                try:
                    await client.with_timeout(150).sleep_ms(100)
                    return "ok"
                except (TTransportException, NoAvailableNode) as err:
                    return type(err).__name__
            outcomes = await asyncio.gather(*(one(i) for i in range(20)))
            assert not _core(client)._outliers.excluded()
            return outcomes

    outcomes = asyncio.run(main())
    assert "ok" in outcomes
    assert "ejected" not in caplog.text


def test_the_first_call_in_line_gets_the_freed_connection(servers, cfg, appkey):
    """With the node's one connection discarded over and over by another task's short
    timeouts, the call first in line for it is served, not overtaken by later calls."""
    handler = SlowEcho("n")
    servers(handler)

    async def main() -> None:
        async with await _client(cfg, appkey, 1, max_connections_per_node=1) as client:
            stop = asyncio.Event()

            async def churn() -> None:
                while not stop.is_set():
                    with contextlib.suppress(TTransportException, NoAvailableNode):
                        await client.with_timeout(100).echo("slow-churn")

            churner = asyncio.ensure_future(churn())
            await _until(lambda: "slow-churn" in handler.started, "the churn running")
            try:
                assert await client.with_timeout(2000).ping() == "n"
            finally:
                stop.set()
                await churner

    asyncio.run(main())


def test_close_cuts_waiting_and_running_calls_without_blaming_any_node(servers, cfg, appkey, caplog):
    handler = SlowEcho("n")
    servers(handler)
    servers(SlowEcho("m"))

    async def main() -> None:
        client = await _client(cfg, appkey, 2, max_connections_per_node=1)
        core = _core(client)
        calls = [asyncio.ensure_future(client.echo("slow-%d" % i)) for i in range(6)]
        await _until(lambda: len(handler.started) >= 1, "a call running")
        await asyncio.sleep(0.05)  # time passing, not a condition: the others queue
        await client.close()
        outcomes = await asyncio.gather(*calls, return_exceptions=True)
        assert all(type(o) is ThriftProbeError and "closed during the call" in str(o) for o in outcomes), outcomes
        assert not core._outliers.excluded()

    asyncio.run(main())
    assert "ejected" not in caplog.text


def test_idle_connections_past_max_idle_age_are_closed_while_calls_go_on(servers, cfg, appkey):
    server = servers(Handler("n"))

    async def main() -> None:
        async with await _client(cfg, appkey, 1, max_idle_age=0.3) as client:
            await asyncio.gather(*(client.echo("burst") for _ in range(16)))
            pool = _core(client)._pool
            assert pool.open_count > 1
            deadline = time.monotonic() + 5
            while pool.open_count > 1:  # steady calls, one at a time, reuse the warmest only
                assert time.monotonic() < deadline, pool.open_count
                assert await client.echo("steady") == "steady"
                await asyncio.sleep(0.02)

    asyncio.run(main())
    assert server.accepted > 1


class SilentNode:
    """A node that accepts connections and never reads a byte (a provider stuck for good)."""

    def __init__(self) -> None:
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(64)
        self.port: int = self.listener.getsockname()[1]
        self.conns: List[socket.socket] = []
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            self.conns.append(conn)

    def stop(self) -> None:
        self.listener.close()
        for conn in self.conns:
            conn.close()


def test_calls_to_a_node_that_stopped_reading_leave_no_socket_behind(zk, cfg, appkey):
    """Large requests to a node that reads nothing: each call times out, and its connection is
    closed at once, with its unsent bytes (closing it gracefully would keep the socket open for
    as long as the node does not read, outside the per-node cap); close() returns."""
    node = SilentNode()
    register(zk, appkey, node.port)
    try:
        async def main() -> None:
            client = await _client(cfg, appkey, 1, max_connections_per_node=2, socket_timeout=500)
            baseline = _sockets()
            big = "x" * (8 * 1024 * 1024)
            for _ in range(10):
                with pytest.raises((TTransportException, NoAvailableNode)):
                    await client.with_timeout(200).echo(big)
            # (the node's own ends of the connections are in this process too, kept open)
            await _until(lambda: _sockets() - len(node.conns) <= baseline, "the timed-out calls' sockets closed")
            blocked = asyncio.ensure_future(client.echo(big))  # stuck sending when close() comes
            await asyncio.sleep(0.1)  # time passing, not a condition: the send fills the buffers
            await asyncio.wait_for(client.close(), 5)
            with pytest.raises(ThriftProbeError):
                await blocked

        before = _sockets()
        asyncio.run(main())
        wait_until(lambda: _sockets() - len(node.conns) <= before, what="every socket closed")
    finally:
        node.stop()


def test_close_from_another_thread_while_the_clients_loop_stops_still_closes(providers, cfg, appkey):
    providers("a")
    loop = asyncio.new_event_loop()
    runner = threading.Thread(target=loop.run_forever, daemon=True)
    runner.start()
    try:
        client = asyncio.run_coroutine_threadsafe(_client(cfg, appkey, 1), loop).result(30)
        assert asyncio.run_coroutine_threadsafe(client.ping(), loop).result(10) == "a"
        pool = _core(client)._pool
        loop.call_soon_threadsafe(time.sleep, 0.3)  # busy: the stop below comes before the close
        loop.call_soon_threadsafe(loop.stop)
        asyncio.run(asyncio.wait_for(client.close(), 5))
        runner.join(5)
        assert pool.open_count == 0
        assert _core(client)._core._closed
    finally:
        if not loop.is_running():
            loop.close()


def test_close_from_a_new_loop_while_the_old_one_is_idle_disconnects_the_node(servers, cfg, appkey):
    server = servers(Handler("n"))
    old = asyncio.new_event_loop()
    try:
        client = old.run_until_complete(_client(cfg, appkey, 1))

        async def calls() -> None:
            await asyncio.gather(*(client.echo("x") for _ in range(8)))

        old.run_until_complete(calls())
        assert server.accepted >= 1
        asyncio.run(client.close())  # the old loop is open, not running
        wait_until(lambda: all(c.fileno() == -1 for c in server._conns), what="the node to see every connection end")
    finally:
        old.close()


def test_calls_wait_for_the_busy_node_the_balancer_chose_rather_than_go_to_a_backup_tier(zk, cfg, appkey):
    """A primary whose one allowed connection is busy is not a reason to use the backup tier
    (nor to break weights or hash affinity): the calls wait for the primary's connection."""
    slow = SlowEcho("primary")
    primary = WireServer(demo.Calculator, slow)
    backup_handler = Handler("backup")
    backup = WireServer(demo.Calculator, backup_handler)
    register(zk, appkey, primary.port, priority=0)
    register(zk, appkey, backup.port, priority=1)
    try:
        async def main() -> None:
            async with await _client(cfg, appkey, 2, max_connections_per_node=1) as client:
                holder = asyncio.ensure_future(client.with_timeout(5000).sleep_ms(600))
                await _until(lambda: slow.calls == 1, "the slow call on the primary")
                pings = await asyncio.gather(*(client.with_timeout(3000).ping() for _ in range(3)))
                assert pings == ["primary"] * 3
                assert await holder is None

        asyncio.run(main())
        assert backup_handler.calls == 0
    finally:
        primary.stop()
        backup.stop()


def test_oneway_calls_still_being_sent_when_the_client_closes_all_arrive(servers, cfg, appkey):
    """A burst of oneway events to a node that reads them slowly, then close(): the bytes still
    on their way out are sent before the connection closes, not dropped."""

    class SlowRecorder(Handler):
        def record(self, event: str) -> None:
            time.sleep(0.005)
            super().record(event)

    handler = SlowRecorder("n")
    servers(handler)
    event = "e" * 65000

    async def main() -> int:
        client = await _client(cfg, appkey, 1)
        sent = 0
        pool = _core(client)._pool
        for _ in range(400):  # until the last one returns with bytes of it still in the buffer
            await client.record(event)
            sent += 1
            if any(c._sock.writer.transport.get_write_buffer_size() for c in pool._open):
                break
        await client.close()
        return sent

    sent = asyncio.run(main())
    wait_until(lambda: len(handler.events) == sent, what="every oneway event at the node")
