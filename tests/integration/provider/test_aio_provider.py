"""thriftprobe.aio.start_service: ``async def`` handlers served from an event loop, registered in
the real ZooKeeper and called by plain thriftpy2 clients, thriftprobe's threaded and asyncio
clients and Apache Thrift's generated client.

The server core's own tests (``test_server_core.py``) run here a second time against the asyncio
server: they are imported below, and this module's ``providers`` fixture (which overrides the
conftest's) starts asyncio providers on an event loop running in a thread of the test process.
"""

from __future__ import annotations

import asyncio
import contextvars
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from typing import Any, Callable, Iterator, List

import pytest
import thriftpy2
from conftest import IDL, ROOT, TEST_ENV, Handler, wait_until
from test_server_core import (  # noqa: F401 - collected here again, against the asyncio server
    _call_ignoring_errors,
    call_once,
    client,
    connect,
    echo_call,
    test_a_client_that_half_closes_after_its_request_still_gets_the_reply,
    test_a_client_that_never_reads_its_replies_is_not_answered_ahead,
    test_a_failing_hook_never_breaks_a_call,
    test_a_header_claiming_2_gib_is_refused_without_allocating,
    test_a_pipelined_flood_of_shed_requests_is_answered_in_full_and_the_server_lives_on,
    test_a_request_arriving_while_stopping_is_shed_not_run,
    test_a_request_over_max_message_size_gets_a_protocol_error,
    test_an_old_non_strict_binary_client_is_served,
    test_connections_idle_for_a_moment_are_never_evicted_under_a_consumer,
    test_hooks_see_requests_outcomes_and_connections,
    test_idle_connections_are_closed_after_idle_timeout,
    test_malformed_bytes_close_only_that_connection,
    test_over_max_connections_with_none_idle_the_request_is_shed,
    test_overload_is_answered_at_once_and_not_executed,
    test_pipelined_requests_are_answered_in_order,
    test_slow_and_silent_peers_never_hold_a_worker,
    test_transports_and_protocols_with_a_thriftpy2_client,
    test_what_a_handler_sets_in_a_context_var_never_reaches_the_next_request,
)
from thriftpy2.thrift import TApplicationException
from thriftpy2.transport import TTransportException

from thriftprobe import InvalidArgument, aio, build_client
from thriftprobe.errors import LOADSHEDDING
from thriftprobe.limits import MethodLimit, ServiceLimits

demo = thriftpy2.load(IDL, module_name="demo_thrift")


class AsyncHandler(Handler):
    """The demo Calculator with ``async def`` methods (``record`` stays a plain function: both
    kinds are served). Counts how many of its calls are in flight at once."""

    def __init__(self, tag: str) -> None:
        super().__init__(tag)
        self.in_flight = 0
        self.most_in_flight = 0
        self.release = asyncio.Event()  # bound to the loop that first waits on it (3.10+)
        self.hold = False
        self.cancelled = 0

    async def ping(self) -> str:  # type: ignore[override]
        return super().ping()

    async def compute(self, operation):  # type: ignore[no-untyped-def,override]
        await asyncio.sleep(0)
        return super().compute(operation)

    async def echo(self, text: str) -> str:  # type: ignore[override]
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            if text.startswith("wait"):
                await asyncio.sleep(0.2)
            if self.hold:
                await self.release.wait()
            return super().echo(text)
        finally:
            self.in_flight -= 1

    async def sleep_ms(self, ms: int) -> None:  # type: ignore[override]
        self._count()
        try:
            await asyncio.sleep(ms / 1000.0)
        except asyncio.CancelledError:
            self.cancelled += 1
            raise


class LoopThread:
    """An event loop running in a thread of its own, for tests that drive it from outside."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="test-loop", daemon=True)
        self.thread.start()

    def run(self, coro: Any, timeout: float = 30.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


class SyncView:
    """An AioRunningService seen from the test's thread: what the server-core tests use."""

    def __init__(self, svc: aio.AioRunningService, loop: LoopThread) -> None:
        self.aio = svc
        self._loop = loop
        self.port = svc.port
        self.service_name = svc.service_name
        self.znode_path = svc.znode_path
        self._server = svc._server

    def stop(self, timeout: float = 2.0, drain: float = 0) -> None:
        self._loop.run(self.aio.stop(timeout=timeout, drain=drain), timeout + drain + 10)


@pytest.fixture
def loop_thread() -> Iterator[LoopThread]:
    loop = LoopThread()
    yield loop
    loop.close()


@pytest.fixture
def providers(cfg, appkey, loop_thread) -> Iterator[Callable[..., SyncView]]:
    """Start asyncio providers of Calculator on ``loop_thread``; all are stopped after the test.
    ``workers`` (the threaded option) is passed as ``concurrency``."""
    started: List[SyncView] = []

    def start(tag: str = "p", port: int = 0, **kwargs: Any) -> SyncView:
        kwargs.setdefault("config", cfg)
        kwargs.setdefault("bind_host", "127.0.0.1")
        kwargs.setdefault("drain", 0)
        if "workers" in kwargs:
            kwargs["concurrency"] = kwargs.pop("workers")
        handler = kwargs.pop("handler", None) or AsyncHandler(tag)
        svc = loop_thread.run(aio.start_service(IDL, appkey, "Calculator", handler, port, block=False, **kwargs))
        view = SyncView(svc, loop_thread)
        started.append(view)
        return view

    yield start
    for view in started:
        view.stop(timeout=2.0, drain=0)


def _handler(svc: SyncView) -> AsyncHandler:
    return svc._server._dispatcher.handler  # type: ignore[no-any-return]


def test_200_calls_run_at_once_on_one_loop_for_clients_of_every_kind(providers, cfg, appkey):
    """Async handlers overlap: 200 calls that each await 0.2 s are in flight together on the one
    loop (no thread per call), whether they come from 200 plain thriftpy2 clients at once or
    from one thriftprobe asyncio client."""
    svc = providers("a", workers=256)
    handler = _handler(svc)
    answers: List[str] = []

    def plain(i: int) -> None:
        with client(svc, timeout=10000) as c:
            answers.append(c.echo("wait-%d" % i))

    threads = [threading.Thread(target=plain, args=(i,)) for i in range(200)]
    handler.hold = True
    for t in threads:
        t.start()
    wait_until(lambda: handler.in_flight == 200, what="200 calls in flight at once")
    threads_now = threading.active_count()
    svc._loop.loop.call_soon_threadsafe(handler.release.set)
    for t in threads:
        t.join()
    assert sorted(answers) == sorted("wait-%d" % i for i in range(200))
    assert threads_now < 200 + 20  # the test's 200 client threads, and nothing per call in the server
    handler.hold = False

    async def through_thriftprobe() -> List[str]:
        async with await aio.build_client(IDL, appkey, "Calculator", config=cfg) as consumer:
            deadline = time.monotonic() + 10
            while not consumer.table.snapshot.available:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.01)
            return await asyncio.gather(*(consumer.echo("wait-aio-%d" % i) for i in range(200)))

    handler.most_in_flight = 0
    got = asyncio.run(through_thriftprobe())
    assert got == ["wait-aio-%d" % i for i in range(200)]
    assert handler.most_in_flight > 32  # overlapping, as many as the client's connections allow


def test_registered_with_its_settings_and_served_to_a_threaded_consumer(providers, zk, cfg, appkey, gov):
    svc = providers("aio-a", version="1.2.0", group="blue", tags={"zone": "z1"}, warmup=0)
    data = json.loads(zk.get(svc.znode_path)[0])
    assert (data["version"], data["group"], data["tags"], data["weight"]) == ("1.2.0", "blue", {"zone": "z1"}, 10)
    assert data["methods"] == sorted(demo.Calculator.thrift_services)
    consumer = build_client(IDL, appkey, "Calculator", config=cfg, version="1.*", group="blue")
    try:
        wait_until(lambda: consumer.table.snapshot.available, what="the node in the consumer's table")
        assert consumer.ping() == "aio-a"
        assert consumer.compute(demo.Operation(left=2, right=3)).value == 5
        with pytest.raises(demo.CalcError, match="division by zero"):
            consumer.compute(demo.Operation(left=1, right=0, op="/"))
        with pytest.raises(TApplicationException) as err:
            consumer.compute(demo.Operation(left=1, right=0, op="%"))  # undeclared: generic, with an id
        assert err.value.type == TApplicationException.INTERNAL_ERROR and "error id" in err.value.message
        consumer.record("plain function")
        wait_until(lambda: _handler(svc).events == ["plain function"], what="the oneway call")
        # An operator's weight change reaches the running provider's znode.
        assert gov.set_node(appkey, "Calculator", "127.0.0.1", svc.port, weight=3).live
        wait_until(lambda: json.loads(zk.get(svc.znode_path)[0])["weight"] == 3, what="the new weight")
    finally:
        consumer.close()


def test_an_apache_thrift_generated_client_is_served(providers, tmp_path):
    from apache_thrift import compile_apache
    from thrift.protocol import TBinaryProtocol
    from thrift.transport import TSocket, TTransport

    svc = providers("apache")
    for service, ttypes in compile_apache(IDL, tmp_path, "apache_demo_aio"):
        sock = TSocket.TSocket("127.0.0.1", svc.port)
        transport = TTransport.TBufferedTransport(sock)
        c = service.Client(TBinaryProtocol.TBinaryProtocol(transport))
        transport.open()
        try:
            assert c.ping() == "apache"
            assert c.compute(ttypes.Operation(left=4, right=2, op="/")).value == 2
            with pytest.raises(ttypes.CalcError):
                c.compute(ttypes.Operation(left=4, right=0, op="/"))
        finally:
            transport.close()


def test_request_limits_refuse_over_the_limit_and_keep_the_connection(providers):
    svc = providers("a", workers=64)
    handler = _handler(svc)
    svc.aio.set_limits(ServiceLimits({"echo": MethodLimit(concurrency=2)}, rev=1))
    handler.hold = True
    holders = [threading.Thread(target=call_once, args=(svc, "echo", "held-%d" % i)) for i in range(2)]
    for t in holders:
        t.start()
    try:
        wait_until(lambda: handler.in_flight == 2, what="two echo calls in flight")
        with client(svc) as c:
            with pytest.raises(TApplicationException) as err:
                c.echo("third")
            assert err.value.type == LOADSHEDDING and "concurrency" in err.value.message
            assert c.ping() == "a"  # same connection, other method: served
    finally:
        svc._loop.loop.call_soon_threadsafe(handler.release.set)
        for t in holders:
            t.join()
    assert svc.aio.limits.rev == 1


def test_stop_finishes_calls_in_flight_and_cancels_handlers_stuck_past_the_deadline(providers, zk):
    svc = providers("a")
    handler = _handler(svc)
    results: List[Any] = []

    def call(ms: int) -> None:
        try:
            with client(svc, timeout=10000) as c:
                c.sleep_ms(ms)
                results.append(("ok", ms))
        except (TTransportException, TApplicationException, OSError) as err:
            results.append((type(err).__name__, ms))

    calls = [threading.Thread(target=call, args=(ms,)) for ms in (300, 60000)]
    for t in calls:
        t.start()
    wait_until(lambda: handler.calls == 2, what="both handlers running")
    started = time.monotonic()
    svc.stop(timeout=1.0, drain=0)
    assert time.monotonic() - started < 4
    for t in calls:
        t.join(10)
    assert sorted(results, key=lambda r: r[1]) == [("ok", 300), ("TTransportException", 60000)]
    assert handler.cancelled == 1  # the stuck one, cancelled at the deadline
    assert not zk.exists(svc.znode_path)
    wait_until(lambda: svc.aio.stopped, what="the stop's last steps")
    with pytest.raises(OSError):
        connect(svc)  # the port is closed


def test_a_handler_that_stops_its_own_service_still_gets_its_reply_out(providers, zk):
    class StopsItself(AsyncHandler):
        service: Any = None

        async def ping(self) -> str:  # type: ignore[override]
            await self.service.stop(timeout=2.0, drain=0)
            return "stopping"

    handler = StopsItself("s")
    svc = providers("s", handler=handler)
    handler.service = svc.aio
    with client(svc) as c:
        assert c.ping() == "stopping"
    wait_until(lambda: svc.aio.stopped, what="the stop to finish")
    assert not zk.exists(svc.znode_path)


def test_a_start_cancelled_midway_is_undone_when_it_finishes(cfg, appkey, zk, loop_thread):
    """The task awaiting start_service is cancelled while the start works in its thread: the
    start goes on (a thread cannot be stopped midway), registers, and is then stopped at once:
    no znode, no port, no thread is left."""
    parent = "/services/%s/%s" % (TEST_ENV, appkey)
    zk.ensure_path(parent)
    seen: List[str] = []
    zk.ChildrenWatch(parent, lambda children: seen.extend(children) or True)
    before = {t.ident for t in threading.enumerate()}

    async def main() -> None:
        task = asyncio.ensure_future(aio.start_service(IDL, appkey, "Calculator", AsyncHandler("c"), 0, config=cfg,
                                                       bind_host="127.0.0.1", block=False, drain=0))
        await asyncio.sleep(0)  # the start has begun in the executor
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    loop_thread.run(main())
    wait_until(lambda: seen, what="the abandoned start to register")
    wait_until(lambda: not zk.get_children(parent), what="the abandoned start's znode to go")
    port = int(seen[0].rsplit("_", 1)[1])
    wait_until(lambda: not [t for t in threading.enumerate() if t.ident not in before and "thriftprobe" in t.name],
               what="the abandoned start's threads to end")
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=1).close()


def test_bad_arguments_are_refused_before_anything_starts(cfg, appkey, zk, loop_thread):
    for kwargs in ({"concurrency": 0}, {"transport": "http"}, {"read_timeout": 0}, {"hooks": object()}):
        with pytest.raises(InvalidArgument):
            loop_thread.run(aio.start_service(IDL, appkey, "Calculator", AsyncHandler("x"), 0, config=cfg,
                                              block=False, **kwargs))
    with pytest.raises(InvalidArgument, match="does not implement"):
        loop_thread.run(aio.start_service(IDL, appkey, "Calculator", object(), 0, config=cfg, block=False))
    parent = "/services/%s/%s" % (TEST_ENV, appkey)
    assert not zk.exists(parent) or not zk.get_children(parent)


ASYNC_PROVIDER = textwrap.dedent(
    """
    import asyncio, logging, sys
    logging.basicConfig(level=logging.INFO)
    sys.path.insert(0, {tests!r})
    from conftest import IDL, Handler
    from thriftprobe import aio

    class Async(Handler):
        async def ping(self):
            return "sigterm"

    async def main():
        print("STARTING", flush=True)
        svc = await aio.start_service(IDL, sys.argv[2], "Calculator", Async("t"), 0, config=sys.argv[1],
                                      env={env!r}, bind_host="127.0.0.1", drain=0, stop_timeout=2)
        print("STOPPED", svc.stopped, flush=True)

    asyncio.run(main())
    """
)


def test_block_true_serves_until_sigterm_then_deregisters_and_exits(config_path, appkey, zk):
    """``asyncio.run(main())`` with ``await aio.start_service(...)``: the process serves until
    SIGTERM, then deregisters and returns cleanly."""
    proc = subprocess.Popen(
        [sys.executable, "-c", ASYNC_PROVIDER.format(tests=str(ROOT / "tests" / "integration"), env=TEST_ENV),
         config_path, appkey],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    parent = "/services/%s/%s" % (TEST_ENV, appkey)
    try:
        assert proc.stdout.readline().startswith("STARTING")

        def registered() -> bool:
            assert proc.poll() is None, proc.communicate()
            return bool(zk.exists(parent) and zk.get_children(parent))

        wait_until(registered, what="the provider registered")
        port = int(zk.get_children(parent)[0].rsplit("_", 1)[1])
        with client(type("S", (), {"port": port})()) as c:
            assert c.ping() == "sigterm"
        os.kill(proc.pid, signal.SIGTERM)
        out, err = proc.communicate(timeout=20)
        assert proc.returncode == 0, err
        assert "STOPPED True" in out, (out, err)
        assert not zk.get_children(parent)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_pipelined_and_trickled_requests_on_one_connection_in_order(providers):
    svc = providers("a")
    s = connect(svc)
    s.settimeout(5)
    try:
        message = echo_call("first", 1) + echo_call("wait-second", 2) + echo_call("third", 3)
        for i in range(0, len(message), 7):
            s.sendall(message[i : i + 7])
        got = b""
        while got.count(b"echo") < 3:
            got += s.recv(4096)
        assert got.index(b"first") < got.index(b"wait-second") < got.index(b"third")
    finally:
        s.close()


def test_a_burst_of_connections_at_max_connections_stays_within_it(providers, monkeypatch):
    """300 connections arriving at once on a provider at max_connections=20, all of its
    connections idle: each newcomer closes a different idle one (the count never includes
    connections already closed), and those over the cap are answered, then closed."""
    from thriftprobe.provider import server as core  # the room-making both cores share

    monkeypatch.setattr(core, "_MIN_EVICT_IDLE", 0.0)
    svc = providers("a", max_connections=20)
    idle = [connect(svc) for _ in range(20)]
    wait_until(lambda: svc._server.stats()["connections"] == 20, what="20 idle connections")
    burst = [socket.create_connection(("127.0.0.1", svc.port), timeout=5) for _ in range(300)]
    most = 0
    deadline = time.monotonic() + 1.0
    while time.monotonic() < deadline:  # sampled for a second: the count must never overshoot
        most = max(most, svc._server.stats()["connections"])
        time.sleep(0.005)
    assert most <= 20 + core._MAX_REJECTING, most
    for s in idle + burst:
        s.close()
    wait_until(lambda: svc._server.stats()["connections"] == 0, what="every connection gone")
    with client(svc) as c:
        assert c.ping() == "a"


AIO_PROVIDER_WITH_FEW_FDS = textwrap.dedent(
    """
    import asyncio, os, resource, sys
    sys.path.insert(0, {tests!r})
    sys.path.insert(0, {tests!r} + "/provider")
    from conftest import IDL
    from test_aio_provider import AsyncHandler
    from thriftprobe import aio

    async def main():
        svc = await aio.start_service(IDL, sys.argv[2], "Calculator", AsyncHandler("low"), 0, config=sys.argv[1],
                                      env={env!r}, bind_host="127.0.0.1", block=False, max_connections=10000)
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
        print("READY", svc.port, flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
        await svc.stop(timeout=2.0, drain=0)

    asyncio.run(main())
    """
)


def test_out_of_file_descriptors_the_provider_makes_room_and_logs_once(config_path, appkey):
    """A provider whose open files run out: it lowers max_connections to what it holds, closes
    idle connections to make room, logs the trouble once per burst (not once per accept
    attempt), and serves a new client."""
    from test_server_core import Provider

    provider = Provider(AIO_PROVIDER_WITH_FEW_FDS, config_path, appkey, subprocess.PIPE)
    lines: List[str] = []
    reader = threading.Thread(target=lambda: lines.extend(provider.proc.stderr), daemon=True)
    reader.start()
    try:
        port = provider.ready()
        flood = []
        for _ in range(300):  # more than its 256 files; the rest wait in the backlog
            try:
                flood.append(socket.create_connection(("127.0.0.1", port), timeout=2))
            except OSError:
                break
        wait_until(lambda: any("max_connections lowered" in x for x in lines), what="the provider meeting EMFILE")
        time.sleep(1.1)  # time passing, not a condition: the idle connections become old enough to evict

        def served() -> bool:
            try:
                with client(provider, timeout=1000) as c:
                    return c.ping() == "low"
            except (TTransportException, OSError):
                return False

        wait_until(served, timeout=10, what="a new client served")
        for s in flood:
            s.close()
    finally:
        provider.stop()
        reader.join(5)
    err = "".join(lines)
    assert err.count("cannot accept connections") <= 3, err[-3000:]
    assert "out of system resource" not in err  # asyncio's own accept loop is not used


def test_cancelling_a_blocking_start_service_stops_the_service(cfg, appkey, zk, loop_thread):
    """``await start_service(block=True)`` in a task that is cancelled later (a supervisor, a
    TaskGroup sibling failing, wait_for): the service stops; no znode or port is left."""
    parent = "/services/%s/%s" % (TEST_ENV, appkey)

    async def main() -> int:
        task = asyncio.ensure_future(aio.start_service(IDL, appkey, "Calculator", AsyncHandler("b"), 0, config=cfg,
                                                       bind_host="127.0.0.1", drain=0))
        while not (zk.exists(parent) and zk.get_children(parent)):
            await asyncio.sleep(0.02)
        port = int(zk.get_children(parent)[0].rsplit("_", 1)[1])
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return port

    port = loop_thread.run(main())
    # Cancelled once started, it stops before the task ends; cancelled while the start was still
    # finishing (registered, not yet returned), it stops as soon as the start returns.
    wait_until(lambda: not zk.get_children(parent), what="the znode gone")
    wait_until(lambda: _refused(port), what="the port closed")


def _refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except OSError:
        return True
    return False


def test_a_large_reply_in_flight_at_stop_arrives_whole(providers):
    svc = providers("a")
    text = "wait" + "x" * (8 * 1024 * 1024)
    got: List[Any] = []

    def call() -> None:
        try:
            with client(svc, timeout=20000) as c:
                got.append(len(c.echo(text)))
        except Exception as err:
            got.append(repr(err))

    caller = threading.Thread(target=call)
    caller.start()
    wait_until(lambda: _handler(svc).in_flight == 1, what="the call running")
    svc.stop(timeout=5.0, drain=0)
    caller.join(20)
    assert got == [len(text)]


def test_a_handler_raising_a_base_exception_ends_its_connection_not_the_server(providers, caplog):
    class Fatal(BaseException):
        pass

    class Raises(AsyncHandler):
        async def echo(self, text: str) -> str:  # type: ignore[override]
            if text == "fatal":
                raise Fatal("not an Exception")
            return text

    svc = providers("a", handler=Raises("a"))
    svc.aio.set_limits(ServiceLimits({"echo": MethodLimit(concurrency=1)}, rev=1))
    with client(svc, timeout=5000) as c:
        started = time.monotonic()
        with pytest.raises((TTransportException, OSError)):
            c.echo("fatal")
        assert time.monotonic() - started < 2  # closed at once, not left to the client's timeout
    for i in range(3):  # its place under the concurrency limit was given back
        with client(svc) as c:
            assert c.echo("after-%d" % i) == "after-%d" % i
    assert "Fatal" in caplog.text


def test_a_handler_may_stop_its_service_from_a_task_of_its_own(providers, zk):
    class StopsInATask(AsyncHandler):
        service: Any = None

        async def ping(self) -> str:  # type: ignore[override]
            await asyncio.wait_for(self.service.stop(timeout=2.0, drain=0), 30)
            return "stopping"

    handler = StopsInATask("s")
    svc = providers("s", handler=handler)
    handler.service = svc.aio
    with client(svc) as c:
        started = time.monotonic()
        assert c.ping() == "stopping"
        assert time.monotonic() - started < 2
    wait_until(lambda: svc.aio.stopped, what="the stop to finish")
    assert not zk.exists(svc.znode_path)


TWO_ASYNC_PROVIDERS = textwrap.dedent(
    """
    import asyncio, signal, sys
    sys.path.insert(0, {tests!r})
    from conftest import IDL, Handler
    from thriftprobe import aio

    class Async(Handler):
        async def ping(self):
            return "two"

    async def main():
        loop = asyncio.get_running_loop()
        if sys.argv[3] == "app-handler":  # the application handles SIGINT itself
            loop.add_signal_handler(signal.SIGINT, lambda: print("APP SIGINT", flush=True))
        common = dict(config=sys.argv[1], env={env!r}, bind_host="127.0.0.1", drain=0, stop_timeout=2)
        print("STARTING", flush=True)
        done = await asyncio.gather(aio.start_service(IDL, sys.argv[2], "Calculator", Async("1"), 0, **common),
                                    aio.start_service(IDL, sys.argv[2], "Calculator", Async("2"), 0, **common))
        print("STOPPED", [svc.stopped for svc in done], flush=True)
        if sys.argv[3] == "app-handler":
            print("APP HANDLER KEPT", signal.getsignal(signal.SIGINT) is not signal.default_int_handler, flush=True)

    asyncio.run(main())
    """
)


@pytest.mark.parametrize("mode", ["plain", "app-handler"])
def test_sigterm_stops_every_blocking_service_of_the_process(config_path, appkey, zk, mode):
    proc = subprocess.Popen(
        [sys.executable, "-c", TWO_ASYNC_PROVIDERS.format(tests=str(ROOT / "tests" / "integration"), env=TEST_ENV),
         config_path, appkey, mode],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    parent = "/services/%s/%s" % (TEST_ENV, appkey)
    try:
        assert proc.stdout.readline().startswith("STARTING")
        wait_until(lambda: zk.exists(parent) and len(zk.get_children(parent)) == 2, what="both registered")
        if mode == "app-handler":
            os.kill(proc.pid, signal.SIGINT)  # the application's: no service stops
            assert proc.stdout.readline().startswith("APP SIGINT")
            assert len(zk.get_children(parent)) == 2
        os.kill(proc.pid, signal.SIGTERM)
        out, err = proc.communicate(timeout=20)
        assert proc.returncode == 0, err
        assert "STOPPED [True, True]" in out, (out, err)
        if mode == "app-handler":
            assert "APP HANDLER KEPT True" in out, out
        assert not zk.get_children(parent)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


LATE_APP_HANDLER = textwrap.dedent(
    """
    import asyncio, os, signal, sys
    sys.path.insert(0, {tests!r})
    from conftest import IDL, Handler
    from thriftprobe import aio

    async def main():
        loop = asyncio.get_running_loop()
        svc = await aio.start_service(IDL, sys.argv[2], "Calculator", Handler("late"), 0, config=sys.argv[1],
                                      env={env!r}, bind_host="127.0.0.1", block=False, drain=0, stop_timeout=2)
        serving = asyncio.ensure_future(svc.serve_forever())
        await asyncio.sleep(0.1)
        heard = asyncio.Event()
        loop.add_signal_handler(signal.SIGTERM, heard.set)  # a component the application starts later
        await svc.stop()
        await serving
        os.kill(os.getpid(), signal.SIGTERM)
        await asyncio.wait_for(heard.wait(), 5)
        print("APP HANDLER RAN", flush=True)

    asyncio.run(main())
    """
)


def test_a_handler_the_application_set_after_the_service_started_survives_its_stop(config_path, appkey):
    done = subprocess.run(
        [sys.executable, "-c", LATE_APP_HANDLER.format(tests=str(ROOT / "tests" / "integration"), env=TEST_ENV),
         config_path, appkey],
        capture_output=True, text=True, timeout=60, check=False,
    )
    assert done.returncode == 0 and "APP HANDLER RAN" in done.stdout, (done.stdout, done.stderr[-2000:])


_TENANT: "contextvars.ContextVar[str]" = contextvars.ContextVar("tenant", default="<unset>")


def test_handlers_see_what_the_application_set_in_its_context_before_the_start(cfg, appkey, loop_thread):
    class Tenant(AsyncHandler):
        async def ping(self) -> str:  # type: ignore[override]
            return _TENANT.get()

    async def main() -> Any:
        _TENANT.set("acme")  # e.g. a service tag its logging reads
        return await aio.start_service(IDL, appkey, "Calculator", Tenant("t"), 0, config=cfg,
                                       bind_host="127.0.0.1", block=False, drain=0)

    svc = loop_thread.run(main())
    try:
        with client(SyncView(svc, loop_thread)) as c:
            assert c.ping() == "acme"
    finally:
        loop_thread.run(svc.stop(timeout=2.0, drain=0))
