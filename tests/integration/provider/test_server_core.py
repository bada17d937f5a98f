"""The provider's server core under what a fleet does to it (issue 11): thousands of idle pooled
connections, slow and silent peers, oversized and malformed requests, more work than workers,
running out of file descriptors, stopping with stuck handlers; and framed + compact peers."""

from __future__ import annotations

import contextlib
import contextvars
import resource
import socket
import struct
import subprocess
import sys
import textwrap
import threading
import time

import pytest
import thriftpy2
from conftest import IDL, ROOT, TEST_ENV, Handler, wait_until
from thriftpy2.protocol import TBinaryProtocolFactory, TCompactProtocolFactory
from thriftpy2.rpc import make_client
from thriftpy2.thrift import TApplicationException
from thriftpy2.transport import TBufferedTransportFactory, TFramedTransportFactory, TTransportException

from thriftprobe.errors import LOADSHEDDING
from thriftprobe.provider import ServerHooks

calc = thriftpy2.load(IDL, module_name="demo_thrift")


class Plain:
    """A plain thriftpy2 client (what a user without thriftprobe runs), closable with ``with``."""

    def __init__(self, svc, framed, compact, timeout):
        self._c = make_client(
            calc.Calculator, "127.0.0.1", svc.port, timeout=timeout,
            trans_factory=TFramedTransportFactory() if framed else TBufferedTransportFactory(),
            proto_factory=TCompactProtocolFactory() if compact else TBinaryProtocolFactory(),
        )

    def __getattr__(self, name):
        return getattr(self._c, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._c.close()


def client(svc, framed=False, compact=False, timeout=5000):
    return Plain(svc, framed, compact, timeout)


def call_once(svc, method, *args):
    with client(svc, timeout=10000) as c:
        return getattr(c, method)(*args)


def threads_of(svc):
    label = "%s-%d" % (svc.service_name, svc.port)
    return [t for t in threading.enumerate() if t.name.endswith(label) or ("-%s-" % label) in t.name]


def connect(svc):
    sock = socket.create_connection(("127.0.0.1", svc.port), timeout=5)
    return sock


def strict_call(name, seqid=1, body=b"\x00"):
    """A binary-protocol CALL of ``name`` with the given struct body bytes."""
    raw = name.encode()
    return struct.pack("!ii", -2147418111, len(raw)) + raw + struct.pack("!i", seqid) + body


def echo_call(text, seqid=1):
    data = text.encode()
    return strict_call("echo", seqid, b"\x0b\x00\x01" + struct.pack("!i", len(data)) + data + b"\x00")


@pytest.fixture
def more_fds():
    """Room for a few thousand sockets in this process (both ends of every connection)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = min(hard, 8192) if hard != resource.RLIM_INFINITY else 8192
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, want), hard))
    yield max(soft, want)
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_a_thousand_idle_connections_cost_no_thread(providers, more_fds):
    svc = providers("a", workers=8)
    conns = [connect(svc) for _ in range(1000)]
    try:
        wait_until(lambda: svc._server.stats()["connections"] == 1000, what="1000 connections accepted")
        with client(svc) as c:
            assert c.ping() == "a"
        assert len(threads_of(svc)) <= 8 + 2  # the I/O thread, the workers, the keeper
        assert svc._server.stats()["workers"] <= 8
    finally:
        for s in conns:
            s.close()
    wait_until(lambda: svc._server.stats()["connections"] == 0, what="the closed connections gone")


def test_slow_and_silent_peers_never_hold_a_worker(providers):
    svc = providers("a", workers=1, read_timeout=0.5)
    slow = []
    for _ in range(50):  # a header byte, then silence
        s = connect(svc)
        s.sendall(b"\x80")
        slow.append(s)
    trickle = connect(svc)
    message = echo_call("trickled")
    try:
        with client(svc) as c:
            for i in range(5):
                assert c.echo("legit %d" % i) == "legit %d" % i  # the one worker is never taken
        # A request trickled a byte at a time is served once it is whole.
        for byte in message:
            trickle.sendall(bytes([byte]))
        trickle.settimeout(5)
        assert b"trickled" in trickle.recv(4096)
        # The silent ones are closed by the read timeout.
        for s in slow:
            s.settimeout(5)
            assert s.recv(10) == b""
    finally:
        for s in [*slow, trickle]:
            s.close()


def test_a_header_claiming_2_gib_is_refused_without_allocating(providers):
    svc = providers("a", max_message_size=1 << 20)
    rss_before = _rss_kib()
    socks = []
    for _ in range(20):
        s = connect(svc)
        s.sendall(struct.pack("!ii", -2147418111, 2**31 - 2))  # strict CALL, a ~2 GiB method name
        socks.append(s)
    for s in socks:
        assert s.recv(10) == b""  # closed at once
        s.close()
    assert _rss_kib() - rss_before < 10 * 1024
    with client(svc) as c:
        assert c.ping() == "a"


@pytest.mark.parametrize("framed", [False, True])
def test_a_request_over_max_message_size_gets_a_protocol_error(providers, framed):
    svc = providers("a", max_message_size=4096, transport="framed" if framed else "buffered")
    with client(svc, framed=framed) as c:
        with pytest.raises(TApplicationException) as err:
            c.echo("x" * 24 * 1024)
        assert err.value.type == TApplicationException.PROTOCOL_ERROR and "max_message_size" in err.value.message
    with client(svc, framed=framed) as c:  # the provider goes on serving
        assert c.echo("small") == "small"


def test_malformed_bytes_close_only_that_connection(providers):
    svc = providers("a")
    with client(svc) as good:
        assert good.ping() == "a"
        bad = connect(svc)
        bad.sendall(b"\x80\x02\x00\x01garbage-garbage")  # binary version 2
        assert bad.recv(10) == b""
        bad.close()
        assert good.ping() == "a"


def test_an_old_non_strict_binary_client_is_served(providers):
    svc = providers("a")
    with client(svc) as c:
        c._c._oprot = TBinaryProtocolFactory(strict_write=False).get_protocol(c._c._oprot.trans)
        assert c.echo("old") == "old"


def test_pipelined_requests_are_answered_in_order(providers):
    svc = providers("a")
    s = connect(svc)
    try:
        s.sendall(echo_call("one", 1) + echo_call("two", 2) + echo_call("three", 3))
        got = b""
        deadline = time.monotonic() + 5
        while got.count(b"echo") < 3 and time.monotonic() < deadline:
            got += s.recv(4096)
        assert got.index(b"one") < got.index(b"two") < got.index(b"three")
    finally:
        s.close()


def test_overload_is_answered_at_once_and_not_executed(providers):
    svc = providers("a", workers=1, queue_size=0)
    handler = svc._server._dispatcher.handler
    busy = threading.Thread(target=call_once, args=(svc, "sleep_ms", 1000))
    busy.start()
    try:
        wait_until(lambda: handler.calls == 1, what="the worker busy")
        with client(svc) as c:
            started = time.monotonic()
            with pytest.raises(TApplicationException) as err:
                c.sleep_ms(1)
            assert time.monotonic() - started < 0.5
        assert err.value.type == LOADSHEDDING and "not executed" in err.value.message
        assert handler.calls == 1  # the shed request never ran
    finally:
        busy.join()
    with client(svc) as c:  # served again once the worker is free
        c.sleep_ms(1)
    assert handler.calls == 2


def test_at_max_connections_the_longest_idle_connection_makes_room(providers, monkeypatch):
    from thriftprobe.provider import server

    monkeypatch.setattr(server, "_MIN_EVICT_IDLE", 0.0)  # the age rule has its own test
    svc = providers("a", max_connections=3)
    idle = [connect(svc) for _ in range(3)]
    wait_until(lambda: svc._server.stats()["connections"] == 3, what="3 connections")
    with client(svc) as c:
        assert c.ping() == "a"
    idle[0].settimeout(5)
    assert idle[0].recv(10) == b""  # the oldest idle one was closed
    for s in idle:
        s.close()


def test_over_max_connections_with_none_idle_the_request_is_shed(providers):
    svc = providers("a", max_connections=2, workers=4)
    busy = [threading.Thread(target=call_once, args=(svc, "sleep_ms", 800)) for _ in range(2)]
    for t in busy:
        t.start()
    try:
        wait_until(lambda: svc._server.stats()["workers"] == 2, what="both connections busy")
        with client(svc) as c, pytest.raises(TApplicationException) as err:
            c.ping()
        assert err.value.type == LOADSHEDDING and "too many connections" in err.value.message
    finally:
        for t in busy:
            t.join()


def test_idle_connections_are_closed_after_idle_timeout(providers):
    svc = providers("a", idle_timeout=0.3)
    s = connect(svc)
    s.settimeout(5)
    started = time.monotonic()
    assert s.recv(10) == b""
    assert 0.2 < time.monotonic() - started < 3
    s.close()


@pytest.mark.parametrize("transport", ["buffered", "framed"])
@pytest.mark.parametrize("protocol", ["binary", "compact"])
def test_transports_and_protocols_with_a_thriftpy2_client(providers, zk, transport, protocol):
    svc = providers("a", transport=transport, protocol=protocol)
    import json

    data = json.loads(zk.get(svc.znode_path)[0])
    assert (data["transport"], data["protocol"]) == (transport, protocol)
    with client(svc, framed=transport == "framed", compact=protocol == "compact") as c:
        assert c.echo("hé" * 1000) == "hé" * 1000
        with pytest.raises(calc.CalcError):
            c.compute(calc.Operation(left=1, right=0, op="/"))
        c.record("oneway")
        assert c.ping() == "a"


def test_stop_waits_for_stuck_handlers_together_not_one_after_another(providers):
    svc = providers("a", workers=16)
    calls = [threading.Thread(target=_call_ignoring_errors, args=(svc, 5000)) for _ in range(8)]
    for t in calls:
        t.start()
    wait_until(lambda: svc._server.stats()["workers"] == 8, what="8 handlers running")
    started = time.monotonic()
    svc.stop(timeout=1.0, drain=0)
    took = time.monotonic() - started
    assert took < 2.5, took
    for t in calls:
        t.join()
    wait_until(lambda: not threads_of(svc), timeout=10, what="every server thread gone once the handlers return")


def test_a_request_arriving_while_stopping_is_shed_not_run(providers):
    svc = providers("a", workers=4)
    slow = threading.Thread(target=_call_ignoring_errors, args=(svc, 700))
    slow.start()
    wait_until(lambda: svc._server.stats()["workers"] >= 1, what="a handler running")
    c = client(svc)
    assert c.ping() == "a"  # an open, idle pooled connection
    stopper = threading.Thread(target=svc.stop, kwargs={"timeout": 2.0, "drain": 0})
    stopper.start()
    wait_until(lambda: svc._server._stopping, what="the stop begun")
    with pytest.raises((TTransportException, TApplicationException, OSError)) as err:
        c.ping()  # idle connections are closed at stop; a request on one is never run
    if isinstance(err.value, TApplicationException):
        assert err.value.type == LOADSHEDDING
    stopper.join()
    slow.join()
    c.close()


class Recorder(ServerHooks):
    def __init__(self):
        self.events = []
        self.lock = threading.Lock()

    def _add(self, *event):
        with self.lock:
            self.events.append(event)

    def connection_opened(self, peer):
        self._add("open")

    def connection_closed(self, peer, reason):
        self._add("close", reason)

    def request_started(self, method, peer):
        self._add("start", method)

    def request_finished(self, method, peer, start, outcome, duration):
        assert abs(start - time.time()) < 5 and 0 <= duration < 5
        self._add("done", method, outcome)

    def request_rejected(self, method, peer, reason):
        self._add("rejected", method, reason)


def test_hooks_see_requests_outcomes_and_connections(providers):
    hooks = Recorder()
    svc = providers("a", hooks=hooks, workers=1, queue_size=0)
    with client(svc) as c:
        c.ping()
        with pytest.raises(calc.CalcError):
            c.compute(calc.Operation(left=1, right=0, op="/"))
        with pytest.raises(TApplicationException):
            c.compute(calc.Operation(left=1, right=0, op="%"))
    busy = threading.Thread(target=call_once, args=(svc, "sleep_ms", 500))
    busy.start()
    wait_until(lambda: ("start", "sleep_ms") in hooks.events, what="the worker busy")
    with client(svc) as c, pytest.raises(TApplicationException):
        c.ping()
    busy.join()
    wait_until(lambda: sum(e[0] == "close" for e in hooks.events) == 3, what="three connections closed")
    events = hooks.events
    assert ("done", "ping", "ok") in events
    assert ("done", "compute", "declared_exception") in events
    assert ("done", "compute", "application_error") in events
    assert ("rejected", "ping", "overloaded") in events
    assert events.count(("open",)) == 3 and ("close", "peer_closed") in events


def test_a_failing_hook_never_breaks_a_call(providers, caplog):
    class Broken(ServerHooks):
        def request_finished(self, *args):
            raise RuntimeError("hook bug")

    svc = providers("a", hooks=Broken())
    with client(svc) as c:
        assert c.ping() == "a" and c.ping() == "a"
    assert "hook bug" in caplog.text


def test_bad_options_are_refused_before_anything_starts(providers, cfg, appkey, zk):
    from conftest import Handler

    from thriftprobe import InvalidArgument, start_service

    for kwargs in ({"workers": 0}, {"transport": "http"}, {"protocol": "json"}, {"read_timeout": 0},
                   {"max_message_size": -1}, {"idle_timeout": float("inf")}, {"hooks": object()}):
        with pytest.raises(InvalidArgument):
            start_service(IDL, appkey, "Calculator", Handler("x"), 0, config=cfg, block=False, **kwargs)
    assert not zk.exists("/services/%s/%s" % (TEST_ENV, appkey)) or not zk.get_children(
        "/services/%s/%s" % (TEST_ENV, appkey)
    )


PROVIDER_WITH_FEW_FDS = textwrap.dedent(
    """
    import os, resource, sys
    sys.path.insert(0, {tests!r})
    from conftest import IDL, Handler
    from thriftprobe import start_service
    # Push every fd of the server past 1024 (select() could not watch them), then cap the
    # open files just above: accept() soon meets EMFILE.
    resource.setrlimit(resource.RLIMIT_NOFILE, (1100, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
    held = [os.open(os.devnull, os.O_RDONLY) for _ in range(1030)]
    svc = start_service(IDL, sys.argv[2], "Calculator", Handler("low"), 0, config=sys.argv[1], env={env!r},
                        bind_host="127.0.0.1", block=False, max_connections=10000)
    print("READY", svc.port, flush=True)
    sys.stdin.read()
    svc.stop(timeout=2.0, drain=0)
    """
)


class Provider:
    """A provider in a process of its own (one of the scripts above): ``proc``, its ``port``
    (``client()`` takes it), stopped by closing its stdin."""

    def __init__(self, script, config_path, appkey, stderr):
        self.proc = subprocess.Popen(
            [sys.executable, "-c", script.format(tests=str(ROOT / "tests" / "integration"), env=TEST_ENV),
             config_path, appkey],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr, text=True,
        )

    def ready(self):
        line = self.proc.stdout.readline()
        assert line.startswith("READY"), line
        self.port = int(line.split()[1])
        return self.port

    def stop(self):
        self.proc.stdin.close()
        self.proc.wait(10)


def test_the_accept_loop_survives_emfile_with_fds_over_1024(config_path, appkey):
    provider = Provider(PROVIDER_WITH_FEW_FDS, config_path, appkey, subprocess.PIPE)
    lines = []
    reader = threading.Thread(target=lambda: lines.extend(provider.proc.stderr), daemon=True)
    reader.start()
    try:
        port = provider.ready()
        flood = []
        for _ in range(120):  # more than the provider has fds left; the rest wait in the backlog
            try:
                flood.append(socket.create_connection(("127.0.0.1", port), timeout=2))
            except OSError:
                break
        wait_until(lambda: any("cannot accept connections" in x for x in lines), what="the provider meeting EMFILE")
        for s in flood:
            s.close()

        def served():
            try:
                with client(provider, timeout=1000) as c:
                    return c.ping() == "low"
            except (TTransportException, OSError):
                return False

        wait_until(served, timeout=10, what="the provider accepting again")
    finally:
        provider.stop()
        reader.join(5)
    err = "".join(lines)
    assert 1 <= err.count("cannot accept connections") <= 3, err  # once per burst, not ten times a second
    assert "accepting connections again" in err


def _call_ignoring_errors(svc, ms):
    try:
        with client(svc, timeout=10000) as c:
            c.sleep_ms(ms)
    except (TTransportException, TApplicationException, OSError):
        pass


def _rss_kib():
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def test_connections_idle_for_a_moment_are_never_evicted_under_a_consumer(providers, cfg, appkey):
    """At max_connections with new connections arriving all the time, the consumer's pooled
    connection (idle between its calls for well under a second) is never closed under it: a
    non-idempotent call never fails."""
    from thriftprobe import build_client

    svc = providers("a", max_connections=4, workers=8)
    stop = threading.Event()

    def churn():
        while not stop.is_set():
            with contextlib.suppress(OSError):
                socket.create_connection(("127.0.0.1", svc.port), timeout=1).close()

    churners = [threading.Thread(target=churn) for _ in range(2)]
    with build_client(IDL, appkey, "Calculator", config=cfg) as c:
        assert c.ping() == "a"  # its pooled connection exists before the churn starts
        for t in churners:
            t.start()
        try:
            for i in range(300):
                assert c.compute(calc.Operation(left=i, right=1, op="+")).value == i + 1
        finally:
            stop.set()
            for t in churners:
                t.join()


def test_one_connection_calling_in_turn_is_never_shed_by_a_lingering_worker(providers):
    svc = providers("a", workers=1, queue_size=0)
    with client(svc) as c:
        for _ in range(2000):
            assert c.echo("x") == "x"


def test_requests_still_queued_at_the_stop_deadline_never_run(providers):
    svc = providers("a", workers=1, queue_size=8)
    handler = svc._server._dispatcher.handler
    results = []

    def call(ms):
        try:
            with client(svc, timeout=10000) as c:
                c.sleep_ms(ms)
            results.append("ran")
        except TApplicationException as err:
            results.append("shed" if err.type == LOADSHEDDING else repr(err))
        except (TTransportException, OSError) as err:
            results.append("transport: %r" % err)

    long_call = threading.Thread(target=call, args=(1500,))
    long_call.start()
    wait_until(lambda: handler.calls == 1, what="the one worker busy")
    queued = [threading.Thread(target=call, args=(300,)) for _ in range(3)]
    for t in queued:
        t.start()
    wait_until(lambda: svc._server.stats()["queued"] == 3, what="three requests queued")
    svc.stop(timeout=0.5, drain=0)
    for t in [long_call, *queued]:
        t.join()
    assert handler.calls == 1  # the queued ones never ran, before or after stop() returned
    assert sorted(results).count("shed") == 3, results


def test_server_stop_from_a_handler_returns_and_the_reply_is_sent(cfg, appkey):
    from conftest import Handler

    from thriftprobe import start_service

    class Stopping(Handler):
        server = None

        def ping(self):
            self.server.stop(1.0)  # the server core's own stop, from its worker
            return "stopping"

    handler = Stopping("s")
    svc = start_service(IDL, appkey, "Calculator", handler, 0, config=cfg, block=False, bind_host="127.0.0.1")
    try:
        handler.server = svc._server
        with client(svc) as c:
            started = time.monotonic()
            assert c.ping() == "stopping"
            assert time.monotonic() - started < 0.5
    finally:
        svc.stop(timeout=2.0, drain=0)


def test_a_request_the_decoder_refuses_still_finishes_in_the_hooks(providers):
    hooks = Recorder()
    svc = providers("a", hooks=hooks, protocol="compact")
    s = connect(svc)
    # A compact call of ping whose argument struct holds a UUID field (type 13): whole to the
    # scanner, refused by thriftpy2's decoder.
    s.sendall(b"\x82\x21\x01\x04ping" + b"\x1d" + bytes(16) + b"\x00")
    s.settimeout(5)
    assert s.recv(10) == b""
    s.close()
    wait_until(lambda: ("close", "protocol_error") in hooks.events, what="the connection closed")
    assert ("start", "ping") in hooks.events and ("done", "ping", "protocol_error") in hooks.events


EMFILE_WITH_IDLE = textwrap.dedent(
    """
    import os, resource, sys
    sys.path.insert(0, {tests!r})
    from conftest import IDL, Handler
    from thriftprobe import start_service
    resource.setrlimit(resource.RLIMIT_NOFILE, (256, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
    svc = start_service(IDL, sys.argv[2], "Calculator", Handler("low"), 0, config=sys.argv[1], env={env!r},
                        bind_host="127.0.0.1", block=False)
    held = [os.open(os.devnull, os.O_RDONLY) for _ in range(60)]  # the application's own files
    print("READY", svc.port, flush=True)
    sys.stdin.read()
    svc.stop(timeout=2.0, drain=0)
    """
)


def test_out_of_fds_below_max_connections_the_longest_idle_connection_makes_room(config_path, appkey):
    provider = Provider(EMFILE_WITH_IDLE, config_path, appkey, subprocess.DEVNULL)
    idle = []
    try:
        port = provider.ready()
        idle.extend(socket.create_connection(("127.0.0.1", port), timeout=2) for _ in range(250))
        with client(provider, timeout=5000) as c:
            assert c.ping() == "low"  # served: an idle connection made room, not a timeout
    finally:
        for s in idle:
            s.close()
        provider.stop()


@pytest.mark.parametrize("transport,protocol", [("framed", "compact"), ("framed", "binary"), ("buffered", "compact")])
def test_thriftprobe_peers_speak_each_nodes_transport_and_protocol(providers, cfg, appkey, transport, protocol):
    from thriftprobe import build_client

    odd = providers("odd", transport=transport, protocol=protocol)
    plain = providers("plain")
    seen = set()
    with build_client(IDL, appkey, "Calculator", config=cfg) as c:
        wait_until(lambda: len(c.table.snapshot.all_nodes) == 2, what="both nodes in the table")
        for _ in range(200):
            seen.add(c.echo("é" * 50 + "x") and c.ping())
            with pytest.raises(calc.CalcError):
                c.compute(calc.Operation(left=1, right=0, op="/"))
    assert seen == {"odd", "plain"}
    assert odd._server._dispatcher.handler.calls > 0 and plain._server._dispatcher.handler.calls > 0


_ECHO_ANSWERS = (b"\x80\x01\x00\x02\x00\x00\x00\x04echo", b"\x80\x01\x00\x03\x00\x00\x00\x04echo")


def _read_replies(sock, count, timeout=20.0):
    """Read binary-protocol answers to echo (replies or exceptions) off ``sock`` until ``count``
    came or the peer closed: (how many, the bytes)."""
    sock.settimeout(timeout)
    data = b""
    seen = 0
    while seen < count:
        chunk = sock.recv(1 << 20)
        if not chunk:
            break
        data += chunk
        seen = sum(data.count(header) for header in _ECHO_ANSWERS)
    return seen, data


def test_a_pipelined_flood_of_shed_requests_is_answered_in_full_and_the_server_lives_on(providers):
    """5,000 requests in one write, every one over a QPS limit: each gets its "not executed"
    answer, in order, and the provider still serves (the answers were once given by recursion,
    which ran out of stack after ~330 and killed the I/O thread)."""
    from thriftprobe.limits import MethodLimit, ServiceLimits

    svc = providers("a")
    svc._server.set_limits(ServiceLimits({"echo": MethodLimit(qps=0.001, burst=1)}, rev=1))
    s = connect(svc)
    try:
        s.sendall(b"".join(echo_call("f%d" % i, i + 1) for i in range(5000)))
        seen, data = _read_replies(s, 5000)
        assert seen == 5000
        assert data.count(b"not executed") == 4999  # the burst of 1 ran
    finally:
        s.close()
    with client(svc) as c:
        assert c.ping() == "a"


def test_a_client_that_never_reads_its_replies_is_not_answered_ahead(providers):
    """Replies the client does not take are not piled up in the provider: it reads the next
    request only once the previous reply has left (else its memory grows without bound)."""
    svc = providers("a", read_timeout=5)
    s = connect(svc)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.setblocking(False)
    request = echo_call("x" * (256 * 1024))
    sent = 0
    deadline = time.monotonic() + 3
    try:
        while time.monotonic() < deadline:
            try:
                sent += s.send(request)
            except BlockingIOError:
                time.sleep(0.01)
            except OSError:  # closed by the provider (its write timeout): bounded too
                break
        # Kernel buffers on both sides and a message or two in the provider, not hundreds of MB.
        assert sent < 64 * 1024 * 1024, sent
    finally:
        s.close()
    with client(svc) as c:
        assert c.ping() == "a"


def test_a_client_that_half_closes_after_its_request_still_gets_the_reply(providers):
    svc = providers("a")
    s = connect(svc)
    try:
        s.sendall(echo_call("half-closed"))
        s.shutdown(socket.SHUT_WR)
        seen, data = _read_replies(s, 1, timeout=5)
        assert seen == 1 and b"half-closed" in data
    finally:
        s.close()


_USER = contextvars.ContextVar("user", default=None)


class RemembersUser(Handler):
    """Sets a ContextVar in each call, as auth or tracing middleware does, and says what it found."""

    def echo(self, text):
        seen = _USER.get()
        _USER.set(text)
        return "%s saw %r" % (text, seen)


def test_what_a_handler_sets_in_a_context_var_never_reaches_the_next_request(providers):
    svc = providers("a", handler=RemembersUser("a"), workers=1)
    s = connect(svc)
    try:
        s.sendall(echo_call("carol", 1) + echo_call("dave", 2))  # the second waits behind the first
        seen, data = _read_replies(s, 2, timeout=5)
        assert seen == 2
        assert b"carol saw None" in data and b"dave saw None" in data, data
    finally:
        s.close()
    with client(svc) as c:  # another client, later: a clean context too
        assert c.echo("erin") == "erin saw None"
