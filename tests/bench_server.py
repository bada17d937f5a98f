"""The provider's server core against thriftpy2's TThreadedServer (issue 11's "Measure").

    bash tests/bench_server.sh [--quick] [--json out.json]

1. throughput and p50/p99 with 1, 16 and 64 client connections: thriftpy2's ``make_server``
   (TThreadedServer, ``client_timeout=None``) and the new core (worker linger 2 ms, and 0), on
   the same handler (``ping`` and ``echo`` of 100 bytes, alternating);
2. 10,000 idle connections: the provider's threads and RSS, a legitimate client's latency with
   them open and without;
3. 1,000 slowloris connections (half send one header byte and then nothing, half one byte a
   second) against a 2 s ``read_timeout``: the legitimate client's latency, and the slow
   connections the read timeout closed;
4. oversized requests (an 8-byte header claiming a ~2 GiB method name; a body over
   ``max_message_size``): what the client sees, and the provider's RSS growth.

Needs no local servers: the providers are built directly (``Dispatcher`` + ``Server``, as
``start_service`` builds them, without ZooKeeper). Every server runs in a process of its own
pinned to one CPU, every client process to the other (when there are two; see tests/bench.py
for why), and part 1 interleaves the contenders round by round so that drift hits them alike.
The same file is the child processes' program (``_provider``, ``_client``).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import queue
import resource
import select
import selectors
import socket
import statistics
import struct
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's thriftprobe, also in the child processes

import thriftpy2  # noqa: E402
from thriftpy2.protocol import TBinaryProtocolFactory  # noqa: E402
from thriftpy2.rpc import make_client, make_server  # noqa: E402
from thriftpy2.thrift import TApplicationException, TMessageType  # noqa: E402
from thriftpy2.transport import TMemoryBuffer  # noqa: E402

IDL = str(ROOT / "idl" / "demo.thrift")
demo = thriftpy2.load(IDL, module_name="demo_thrift")
PAYLOAD = "x" * 100
HUGE_NAME_HEADER = struct.pack("!ii", -2147418111, 0x7FFFFFF0)  # 0x80010001 (strict, CALL), a ~2 GiB name
BIG_MESSAGE = 1024 * 1024  # max_message_size of part 4's provider


def pct(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def summary_s(ages: Sequence[float]) -> Optional[Dict[str, float]]:
    if not ages:
        return None
    return {"n": len(ages), "min": min(ages), "p50": statistics.median(ages), "max": max(ages)}


def listen_overflows() -> int:
    """The kernel's count of connections dropped for a full accept queue (machine-wide)."""
    with open("/proc/net/netstat") as f:
        lines = f.read().splitlines()
    for names, values in zip(lines[::2], lines[1::2]):
        if names.startswith("TcpExt:"):
            return int(dict(zip(names.split(), values.split())).get("ListenOverflows", 0))
    return 0


def raise_nofile() -> int:
    """Raise this process's open-file limit to its hard limit; return it."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def send(obj: Dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def encode_call(name: str, args: Any, seqid: int = 1) -> bytes:
    buf = TMemoryBuffer()
    proto = TBinaryProtocolFactory().get_protocol(buf)
    proto.write_message_begin(name, TMessageType.CALL, seqid)
    args.write(proto)
    proto.write_message_end()
    return buf.getvalue()  # type: ignore[no-any-return]


# -- the provider process ------------------------------------------------------------------------------


class Handler:
    def ping(self) -> str:
        return "pong"

    def compute(self, operation: Any) -> Any:
        return demo.Answer(value=operation.left + operation.right, served_by="bench")

    def echo(self, text: str) -> str:
        return text

    def sleep_ms(self, ms: int) -> None:
        time.sleep(ms / 1000.0)

    def record(self, event: str) -> None:
        pass


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def provider_main(kind: str, options: Dict[str, Any]) -> None:
    """Serve the demo Calculator; answer ``stats``, ``reset_peak`` and ``quit`` on stdin."""
    nofile = raise_nofile()  # before the Server reads the limit for its default max_connections
    from thriftprobe.idl import load_service
    from thriftprobe.provider import server as server_mod
    from thriftprobe.provider.dispatch import Dispatcher
    from thriftprobe.provider.hooks import ServerHooks
    from thriftprobe.provider.service import _bind

    service = load_service(IDL, "Calculator")
    closed: Counter = Counter()
    rejected: Counter = Counter()
    opened_at: Dict[Any, float] = {}
    timeout_ages: List[float] = []  # seconds from accept to a read_timeout close, by the server's clock
    gc_pauses: List[float] = []  # full (generation 2) collections, seconds each
    gc_began = [0.0]

    def on_gc(phase: str, info: Dict[str, Any]) -> None:
        if info["generation"] == 2:
            if phase == "start":
                gc_began[0] = time.perf_counter()
            else:
                gc_pauses.append(time.perf_counter() - gc_began[0])

    gc.callbacks.append(on_gc)
    core: Any = None
    if kind == "threaded":
        probe = socket.socket()
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
        probe.close()  # make_server refuses port 0; the window to lose this port is tiny
        threaded = make_server(service, Handler(), "127.0.0.1", port, client_timeout=None)
        threading.Thread(target=threaded.serve, daemon=True, name="accept").start()
        for _ in range(500):
            try:
                socket.create_connection(("127.0.0.1", port), 1).close()
                break
            except OSError:
                time.sleep(0.01)
    else:
        if "linger" in options:
            server_mod._LINGER = float(options.pop("linger"))

        class Counting(ServerHooks):  # called on the I/O thread only
            def connection_opened(self, peer: Any) -> None:
                opened_at[peer] = time.monotonic()

            def connection_closed(self, peer: Any, reason: str) -> None:
                closed[reason] += 1
                began = opened_at.pop(peer, None)
                if reason == "read_timeout" and began is not None:
                    timeout_ages.append(time.monotonic() - began)

            def request_rejected(self, method: Any, peer: Any, reason: str) -> None:
                rejected[reason] += 1

        hooks = Counting() if options.pop("hooks", False) else None
        listener = _bind("127.0.0.1", 0)
        port = listener.getsockname()[1]
        label = "Calculator-%d" % port
        dispatcher = Dispatcher(service, Handler(), server_mod.protocol_factory("binary"), label=label)
        core = server_mod.Server(dispatcher, listener, label, server_mod.ServerOptions(**options).check(), hooks)
        core.start()
    send({"port": port, "pid": os.getpid(), "nofile": nofile,
          "linger_s": getattr(server_mod, "_LINGER", None) if kind == "core" else None,
          "max_connections": core._max_conns if core is not None else None})
    for line in sys.stdin:
        cmd = line.strip()
        if cmd == "stats":
            send({
                "threads": len(os.listdir("/proc/self/task")),
                "rss_kib": _status_kib("VmRSS"),
                "hwm_kib": _status_kib("VmHWM"),
                "server": core.stats() if core is not None else None,
                "closed": dict(closed),
                "read_timeout_ages": summary_s(timeout_ages),
                "gc_full": {"count": len(gc_pauses), "max_ms": max(gc_pauses, default=0.0) * 1000},
                "rejected": dict(rejected),
            })
        elif cmd == "reset_peak":
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # VmHWM := VmRSS
            send({"ok": True})
        elif cmd == "quit":
            break
    if core is not None:
        core.stop(1.0)
    os._exit(0)


# -- the client process ----------------------------------------------------------------------------------


def _client(port: int) -> Any:
    return make_client(demo.Calculator, "127.0.0.1", port, timeout=30000)


def _call(client: Any, i: int) -> None:
    if i & 1:
        client.echo(PAYLOAD)
    else:
        client.ping()


def load_run(port: int, threads: int, next_cmd: Any) -> Dict[str, Any]:
    """Open ``threads`` connections, warm them, report ready, then at ``go`` call back to back
    on every connection until its deadline; return the calls and their latencies (us)."""
    clients = [_client(port) for _ in range(threads)]
    for c in clients:
        for i in range(20):
            _call(c, i)
    go = threading.Event()
    deadline = [0.0]
    results: List[Tuple[int, List[int], float]] = [(0, [], 0.0)] * threads

    def work(k: int) -> None:
        client = clients[k]
        lat: List[int] = []
        add = lat.append
        clock = time.perf_counter
        go.wait()
        began = clock()
        end = deadline[0]
        i = 0
        while True:
            t0 = clock()
            if i & 1:
                client.echo(PAYLOAD)
            else:
                client.ping()
            t1 = clock()
            add(int((t1 - t0) * 1e7))  # 0.1 us
            i += 1
            if t1 >= end:
                break
        results[k] = (i, lat, clock() - began)

    workers = [threading.Thread(target=work, args=(k,)) for k in range(threads)]
    for w in workers:
        w.start()
    send({"ready": True})
    cmd = next_cmd()
    began = time.perf_counter()
    deadline[0] = began + float(cmd["seconds"])
    go.set()
    for w in workers:
        w.join()
    elapsed = time.perf_counter() - began
    for c in clients:
        c.close()
    lat = [x for r in results for x in r[1]]
    return {"calls": sum(r[0] for r in results), "elapsed": elapsed, "lat": lat}


def legit_run(port: int, seconds: float, burst: int, pause: float) -> Dict[str, Any]:
    """One connection: ``burst`` calls back to back, a ``pause`` (longer than the linger, so the
    next call goes through the server's I/O thread), again, for ``seconds``. Latencies in us,
    of the first call after each pause ("cold") and the others ("warm")."""
    client = _client(port)
    for i in range(20):
        _call(client, i)
    cold: List[float] = []
    warm: List[float] = []
    clock = time.perf_counter
    end = clock() + seconds
    i = 0
    while clock() < end:
        for k in range(burst):
            t0 = clock()
            _call(client, i)
            (warm if k else cold).append((clock() - t0) * 1e6)
            i += 1
        time.sleep(pause)
    client.close()
    return {"cold": cold, "warm": warm}


class IdleHolder:
    def __init__(self) -> None:
        self.socks: List[socket.socket] = []

    def open(self, port: int, count: int) -> Dict[str, Any]:
        errors: Counter = Counter()
        began = time.perf_counter()
        while len(self.socks) < count:
            try:
                self.socks.append(socket.create_connection(("127.0.0.1", port), 10))
            except OSError as err:
                errors[type(err).__name__] += 1
                if sum(errors.values()) > 100:
                    break
                time.sleep(0.05)
        return {"opened": len(self.socks), "seconds": time.perf_counter() - began, "errors": dict(errors)}

    def check(self) -> Dict[str, Any]:
        """How many of the held connections the server closed (readable with EOF, or reset)."""
        closed = 0
        poller = select.poll()
        for s in self.socks:
            poller.register(s.fileno(), select.POLLIN)
        ready = {fd for fd, _ in poller.poll(0)}
        for s in self.socks:
            if s.fileno() in ready:
                try:
                    if s.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b"":
                        closed += 1
                except OSError:
                    closed += 1
        return {"held": len(self.socks), "closed_by_server": closed}

    def close(self) -> Dict[str, Any]:
        for s in self.socks:
            s.close()
        n = len(self.socks)
        self.socks = []
        return {"closed": n}


class Slowloris:
    """``count`` slow connections kept open: half send one header byte and then nothing, half a
    byte a second of an ``echo`` request too long to ever finish. A connection the server closes
    is counted (with its age since its first byte) and replaced."""

    def __init__(self, port: int, count: int) -> None:
        self.port = port
        self.count = count
        self.request = encode_call("echo", demo.Calculator.echo_args(text="y" * 100000))
        self.sel = selectors.DefaultSelector()
        self.stop_flag = threading.Event()
        self.opened = 0
        self.connect_errors: Counter = Counter()
        self.closed: Dict[str, List[float]] = {"silent": [], "trickle": []}
        self.sent_bytes = 0
        self.full = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True)
        # Replacements are opened by a thread of their own (a connect can wait a second for a SYN
        # retransmission when the server's accept queue is full) and registered by the loop.
        self.to_open: "queue.SimpleQueue[Optional[str]]" = queue.SimpleQueue()
        self.new: "queue.SimpleQueue[Tuple[socket.socket, List[Any]]]" = queue.SimpleQueue()
        self.openers = [threading.Thread(target=self._opener, daemon=True) for _ in range(8)]
        self.lock = threading.Lock()

    def _open(self, kind: str) -> Optional[Tuple[socket.socket, List[Any]]]:
        try:
            s = socket.create_connection(("127.0.0.1", self.port), 10)
            s.send(self.request[:1])
        except OSError as err:
            with self.lock:
                self.connect_errors[type(err).__name__] += 1
            time.sleep(0.01)
            return None
        s.setblocking(False)
        with self.lock:
            self.opened += 1
            self.sent_bytes += 1
        return s, [kind, time.monotonic(), 1]  # kind, first byte at, bytes sent

    def _opener(self) -> None:
        while True:
            kind = self.to_open.get()
            if kind is None or self.stop_flag.is_set():
                return
            opened = self._open(kind)
            if opened is not None:
                self.new.put(opened)

    def _loop(self) -> None:
        kinds = ["silent", "trickle"] * (self.count // 2) + ["silent"] * (self.count % 2)
        for kind in kinds:
            opened = self._open(kind)
            if opened is not None:
                self.sel.register(opened[0], selectors.EVENT_READ, opened[1])
        self.full.set()
        for t in self.openers:
            t.start()
        next_tick = time.monotonic() + 1.0
        while not self.stop_flag.is_set():
            while not self.new.empty():
                sock, state = self.new.get()
                self.sel.register(sock, selectors.EVENT_READ, state)
            for key, _ in self.sel.select(min(0.2, max(0.0, next_tick - time.monotonic()))):
                kind, first, _ = key.data
                try:
                    data = key.fileobj.recv(4096)  # type: ignore[union-attr]
                except OSError:
                    data = b""
                if data:
                    continue  # an answer would mean the server took it as a request: not expected
                self.closed[kind].append(time.monotonic() - first)
                self.sel.unregister(key.fileobj)
                key.fileobj.close()  # type: ignore[union-attr]
                self.to_open.put(kind)
            if time.monotonic() >= next_tick:
                next_tick += 1.0
                for key in list(self.sel.get_map().values()):
                    state = key.data
                    if state[0] == "trickle" and state[2] < len(self.request):
                        try:
                            key.fileobj.send(self.request[state[2]:state[2] + 1])  # type: ignore[union-attr]
                            state[2] += 1
                            with self.lock:
                                self.sent_bytes += 1
                        except OSError:
                            pass  # closed: the select above sees it

    def start(self) -> Dict[str, Any]:
        began = time.perf_counter()
        self.thread.start()
        self.full.wait()
        return {"opened": self.opened, "seconds": time.perf_counter() - began}

    def stop(self) -> Dict[str, Any]:
        self.stop_flag.set()
        self.thread.join()
        for _ in self.openers:
            self.to_open.put(None)
        for t in self.openers:
            t.join()
        while not self.new.empty():
            self.new.get()[0].close()
        still = len(self.sel.get_map())
        for key in list(self.sel.get_map().values()):
            key.fileobj.close()  # type: ignore[union-attr]
        ages = self.closed["silent"] + self.closed["trickle"]
        return {
            "opened": self.opened,
            "closed_by_server": {k: len(v) for k, v in self.closed.items()},
            "closed_after_s": {"min": min(ages), "p50": statistics.median(ages), "max": max(ages)} if ages else None,
            "open_at_stop": still,
            "connect_errors": dict(self.connect_errors),
            "bytes_sent": self.sent_bytes,
        }


def oversized(port: int, count: int, threads: int) -> Dict[str, Any]:
    """``count`` oversized headers and ``count`` oversized bodies, on ``threads`` threads; what
    the client saw, by kind; and whether a normal call still works after."""
    seen: Dict[str, Counter] = {"header": Counter(), "body": Counter()}
    lock = threading.Lock()
    body_text = "z" * (BIG_MESSAGE + 1024)

    def header_once() -> str:
        with socket.create_connection(("127.0.0.1", port), 10) as s:
            s.settimeout(10)
            s.sendall(HUGE_NAME_HEADER)
            try:
                data = s.recv(65536)
            except ConnectionResetError:
                return "connection reset"
            except socket.timeout:
                return "no answer in 10 s"
            return "closed without a reply" if not data else "reply of %d bytes" % len(data)

    def body_once() -> str:
        client = _client(port)
        try:
            client.echo(body_text)
            return "accepted (echoed)"
        except TApplicationException as err:
            return "TApplicationException type %d (%s)" % (err.type, str(err.message)[:80])
        except Exception as err:  # what the client saw is the result
            return "%s: %s" % (type(err).__name__, str(err)[:80])
        finally:
            client.close()

    def work(k: int) -> None:
        for _ in range(k, count, threads):
            h = header_once()
            b = body_once()
            with lock:
                seen["header"][h] += 1
                seen["body"][b] += 1

    ts = [threading.Thread(target=work, args=(k,)) for k in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    c = _client(port)
    after = c.ping()
    c.close()
    return {"header": dict(seen["header"]), "body": dict(seen["body"]), "ping_after": after}


def client_main() -> None:
    """Serve the orchestrator's commands (one JSON object a line)."""
    raise_nofile()
    holder = IdleHolder()
    slow: Optional[Slowloris] = None
    lines = iter(sys.stdin)

    def next_cmd() -> Dict[str, Any]:
        return json.loads(next(lines))  # type: ignore[no-any-return]

    while True:
        try:
            cmd = next_cmd()
        except StopIteration:
            return
        op = cmd["op"]
        if op == "load":
            send(load_run(cmd["port"], cmd["threads"], next_cmd))
        elif op == "legit":
            send(legit_run(cmd["port"], cmd["seconds"], cmd["burst"], cmd["pause"]))
        elif op == "idle_open":
            send(holder.open(cmd["port"], cmd["count"]))
        elif op == "idle_check":
            send(holder.check())
        elif op == "idle_close":
            send(holder.close())
        elif op == "slow_start":
            slow = Slowloris(cmd["port"], cmd["count"])
            send(slow.start())
        elif op == "slow_stop":
            assert slow is not None
            send(slow.stop())
            slow = None
        elif op == "oversized":
            send(oversized(cmd["port"], cmd["count"], cmd["threads"]))
        elif op == "quit":
            return


# -- orchestration ------------------------------------------------------------------------------------------


class Child:
    """A child process of this script, spoken to by JSON lines."""

    def __init__(self, args: List[str], cpu: Optional[int]) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), *args],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1,
        )
        if cpu is not None:
            os.sched_setaffinity(self.proc.pid, {cpu})

    def send(self, obj: Any) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write((obj if isinstance(obj, str) else json.dumps(obj)) + "\n")
        self.proc.stdin.flush()

    def recv(self) -> Dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise SystemExit("child %s ended (exit %s)" % (self.proc.args[2:], self.proc.wait()))
        return json.loads(line)  # type: ignore[no-any-return]

    def ask(self, obj: Any) -> Dict[str, Any]:
        self.send(obj)
        return self.recv()

    def cpu_seconds(self) -> float:
        with open("/proc/%d/stat" % self.proc.pid) as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.send("quit" if self.proc.args[2] == "_provider" else {"op": "quit"})
                self.proc.wait(5)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()


class Provider(Child):
    def __init__(self, kind: str, options: Dict[str, Any], cpu: Optional[int]) -> None:
        super().__init__(["_provider", kind, json.dumps(options)], cpu)
        info = self.recv()
        self.port: int = info["port"]
        self.info = info

    def stats(self) -> Dict[str, Any]:
        return self.ask("stats")

    def wait_for(self, predicate: Any, timeout: float) -> Dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            s = self.stats()
            if predicate(s) or time.monotonic() > deadline:
                return s
            time.sleep(0.1)


def summary_us(samples: Sequence[float]) -> Dict[str, float]:
    return {"n": len(samples), "p50_ms": statistics.median(samples) / 1000, "p99_ms": pct(samples, 0.99) / 1000}


CONTENDERS = {
    "TThreadedServer": ("threaded", {}),
    "core, linger 2 ms": ("core", {"linger": 0.002}),
    "core, linger 0": ("core", {"linger": 0.0}),
}
BASELINE = "TThreadedServer"
GOALS = {1: 0.95, 16: 1.0, 64: 1.0}
LEGIT_BURST, LEGIT_PAUSE = 5, 0.005  # the legitimate client's calls back to back, then a pause > the linger


def part1(clients: List[Child], server_cpu: Optional[int], rounds: int, seconds: float) -> Dict[str, Any]:
    providers = {name: Provider(kind, dict(opts), server_cpu) for name, (kind, opts) in CONTENDERS.items()}
    layout = {1: [1], 16: [4] * 4, 64: [16] * 4}  # threads per client process
    acc: Dict[Tuple[str, int], Dict[str, Any]] = {
        (n, c): {"rates": [], "lat": [], "cpu": 0.0, "calls": 0} for n in providers for c in layout}
    try:
        names = list(providers)
        for r in range(rounds):
            order = names[r % len(names):] + names[: r % len(names)]  # each contender leads in turn
            for conns, per_proc in layout.items():
                for name in order:
                    prov = providers[name]
                    used = clients[: len(per_proc)]
                    for c, t in zip(used, per_proc):
                        c.send({"op": "load", "port": prov.port, "threads": t})
                    for c in used:
                        c.recv()
                    cpu0 = prov.cpu_seconds()
                    for c in used:
                        c.send({"op": "go", "seconds": seconds})
                    outs = [c.recv() for c in used]
                    cpu = prov.cpu_seconds() - cpu0
                    a = acc[(name, conns)]
                    a["rates"].append(sum(o["calls"] / o["elapsed"] for o in outs))
                    a["calls"] += sum(o["calls"] for o in outs)
                    a["cpu"] += cpu
                    for o in outs:
                        a["lat"].extend(o["lat"])
        threads = {name: p.stats()["threads"] for name, p in providers.items()}
    finally:
        for p in providers.values():
            p.close()
    rows: Dict[str, Any] = {}
    for (name, conns), a in acc.items():
        lat = a["lat"]
        rows.setdefault(str(conns), {})[name] = {
            "calls_per_s": statistics.mean(a["rates"]),
            "calls_per_s_min": min(a["rates"]),
            "calls_per_s_max": max(a["rates"]),
            "p50_ms": pct(lat, 0.5) / 1e4,
            "p99_ms": pct(lat, 0.99) / 1e4,
            "server_cpu_us_per_call": a["cpu"] / a["calls"] * 1e6,
            "calls": a["calls"],
        }
    for conns, row in rows.items():
        base = row[BASELINE]
        for name, v in row.items():
            v["throughput_x_threaded"] = v["calls_per_s"] / base["calls_per_s"]
            v["p50_x_threaded"] = v["p50_ms"] / base["p50_ms"]
            v["p99_x_threaded"] = v["p99_ms"] / base["p99_ms"]
            if name != BASELINE:
                v["goal_throughput_x"] = GOALS[int(conns)]
                v["goal_met"] = v["throughput_x_threaded"] >= GOALS[int(conns)]
    return {"rounds": rounds, "seconds_per_burst": seconds, "layout": {str(k): v for k, v in layout.items()},
            "rows": rows, "provider_threads_at_end": threads}


def legit(client: Child, port: int, seconds: float) -> Dict[str, Any]:
    """The legitimate client's run (see ``legit_run``)."""
    return client.ask({"op": "legit", "port": port, "seconds": seconds, "burst": LEGIT_BURST, "pause": LEGIT_PAUSE})


def compare(without: Dict[str, List[float]], with_: Dict[str, List[float]]) -> Dict[str, Any]:
    out = {}
    for kind in ("warm", "cold"):
        b, w = summary_us(without[kind]), summary_us(with_[kind])
        out[kind] = {"without": b, "with": w, "p99_x": w["p99_ms"] / b["p99_ms"], "goal_x": 1.5,
                     "goal_met": w["p99_ms"] / b["p99_ms"] <= 1.5}
    return out


def pooled(runs: List[Dict[str, Any]]) -> Dict[str, List[float]]:
    return {kind: [x for r in runs for x in r[kind]] for kind in ("warm", "cold")}


def part2(legit_client: Child, holder: Child, server_cpu: Optional[int], count: int, slices: int,
          slice_s: float) -> Dict[str, Any]:
    """Two identical providers, one holding ``count`` idle connections; the legitimate client
    alternates between them slice by slice, so that drift hits both alike."""
    workers = 64
    options = {"workers": workers, "max_connections": count + 1000, "idle_timeout": 3600.0, "hooks": True}
    prov = Provider("core", dict(options), server_cpu)
    clean = Provider("core", dict(options), server_cpu)
    try:
        for p in (prov, clean):
            legit(legit_client, p.port, 0.5)  # warm-up, not counted
        before = prov.stats()
        overflows = listen_overflows()
        opened = holder.ask({"op": "idle_open", "port": prov.port, "count": count})
        held = prov.wait_for(lambda s: s["server"]["connections"] >= count, 60)
        overflows = listen_overflows() - overflows
        without: List[Dict[str, Any]] = []
        with_: List[Dict[str, Any]] = []
        for k in range(slices):
            for p in ((prov, clean) if k % 2 else (clean, prov)):
                (with_ if p is prov else without).append(legit(legit_client, p.port, slice_s))
        during = prov.stats()
        check = holder.ask({"op": "idle_check"})
        holder.ask({"op": "idle_close"})
        after = prov.wait_for(lambda s: s["server"]["connections"] == 0, 60)
    finally:
        prov.close()
        clean.close()
    return {
        "idle_connections": count,
        "opened": opened,
        "server_connections_held": held["server"]["connections"],
        "still_open_at_check": check["held"] - check["closed_by_server"],
        "workers_option": workers,
        "worker_threads": during["server"]["workers"],
        "provider_threads": during["threads"],
        "provider_threads_before": before["threads"],
        "threads_over_workers": during["threads"] - during["server"]["workers"],
        "rss_kib_before": before["rss_kib"],
        "rss_kib_with_idle": held["rss_kib"],
        "rss_kib_after_close": after["rss_kib"],
        "rss_kib_per_idle_connection": (held["rss_kib"] - before["rss_kib"]) / count,
        "listen_overflows_while_opening": overflows,
        "gc_full_collections": {"before": before["gc_full"], "with_idle": during["gc_full"]},
        "closed_reasons": after["closed"],
        "legit_slices": {"count": slices, "seconds": slice_s},
        "legit": compare(pooled(without), pooled(with_)),
    }


def part3(legit_client: Child, attacker: Child, server_cpu: Optional[int], count: int, cycles: int,
          slice_s: float, read_timeout: float) -> Dict[str, Any]:
    """Cycles of: the legitimate client alone; the attack started and left to reach its steady
    churn (past one read timeout); the legitimate client under it; the attack stopped."""
    prov = Provider("core", {"read_timeout": read_timeout, "hooks": True}, server_cpu)
    attacks: List[Dict[str, Any]] = []
    without: List[Dict[str, Any]] = []
    with_: List[Dict[str, Any]] = []
    overflows = 0
    in_attack: List[int] = []  # the server's connections when each 'with' slice began and ended
    began = time.monotonic()
    try:
        legit(legit_client, prov.port, 0.5)  # warm-up, not counted
        before = prov.stats()
        for _ in range(cycles):
            without.append(legit(legit_client, prov.port, slice_s))
            mark = listen_overflows()
            started = attacker.ask({"op": "slow_start", "port": prov.port, "count": count})
            time.sleep(read_timeout + 0.5)
            peak = prov.stats()
            with_.append(legit(legit_client, prov.port, slice_s))
            during = prov.stats()
            in_attack += [peak["server"]["connections"], during["server"]["connections"]]
            attacks.append(attacker.ask({"op": "slow_stop"}))
            overflows += listen_overflows() - mark
            settled = prov.wait_for(lambda s: s["server"]["connections"] == 0, 30)
        after = prov.stats()
    finally:
        prov.close()
    ages = [a["closed_after_s"] for a in attacks if a["closed_after_s"]]
    return {
        "slow_connections": count,
        "read_timeout_s": read_timeout,
        "cycles": cycles,
        "slice_s": slice_s,
        "attack_seconds": round(time.monotonic() - began, 1),
        "opened": started,
        "attack": {
            "opened": sum(a["opened"] for a in attacks),
            "closed_by_server": dict(sum((Counter(a["closed_by_server"]) for a in attacks), Counter())),
            "closed_after_s": {"min": min(a["min"] for a in ages), "p50": statistics.median(a["p50"] for a in ages),
                               "max": max(a["max"] for a in ages)} if ages else None,
            "connect_errors": dict(sum((Counter(a["connect_errors"]) for a in attacks), Counter())),
        },
        "server_connections_in_attack": {"min": min(in_attack), "max": max(in_attack)},
        "provider_threads_during": during["threads"],
        "worker_threads_during": during["server"]["workers"],
        "closed_by_read_timeout": after["closed"].get("read_timeout", 0),
        "server_read_timeout_ages_s": after["read_timeout_ages"],
        "listen_overflows_during_attack": overflows,
        "closed_reasons": after["closed"],
        "connections_left_after_stop": settled["server"]["connections"],
        "rss_kib_before": before["rss_kib"],
        "rss_kib_during": during["rss_kib"],
        "legit": compare(pooled(without), pooled(with_)),
    }


def part4(client: Child, server_cpu: Optional[int], count: int) -> Dict[str, Any]:
    prov = Provider("core", {"max_message_size": BIG_MESSAGE, "hooks": True}, server_cpu)
    try:
        warm = client.ask({"op": "oversized", "port": prov.port, "count": 8, "threads": 4})  # warm the paths
        time.sleep(1.5)  # the warm-up's lingering closes end
        prov.ask("reset_peak")
        before = prov.stats()
        seen = client.ask({"op": "oversized", "port": prov.port, "count": count, "threads": 8})
        done = prov.wait_for(lambda s: s["server"]["connections"] == 0, 10)
    finally:
        prov.close()
    growth = max(done["rss_kib"], done["hwm_kib"]) - before["rss_kib"]
    return {
        "count_each": count,
        "max_message_size": BIG_MESSAGE,
        "header_bytes": HUGE_NAME_HEADER.hex(),
        "client_saw": {"header": seen["header"], "body": seen["body"]},
        "warmup_client_saw": warm,
        "ping_after": seen["ping_after"],
        "rss_kib_before": before["rss_kib"],
        "rss_kib_after": done["rss_kib"],
        "rss_kib_peak": done["hwm_kib"],
        "rss_growth_mb": growth / 1024,
        "goal_growth_mb": 10,
        "goal_met": growth / 1024 < 10,
        "closed_reasons": done["closed"],
        "rejected_reasons": done["rejected"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a smoke run in < 60 s (not for figures)")
    parser.add_argument("--json", default=None, help="also write the results to this file")
    parser.add_argument("--parts", default="1,2,3,4", help="which parts to run (default: all, 1,2,3,4)")
    parser.add_argument("--rounds", type=int, default=None, help="part 1's rounds (default 6, 1 with --quick)")
    args = parser.parse_args()
    parts = {int(p) for p in args.parts.split(",")}
    quick = args.quick
    began = time.monotonic()

    hard = raise_nofile()
    cpus = sorted(os.sched_getaffinity(0))
    client_cpu, server_cpu = (cpus[0], cpus[1]) if len(cpus) > 1 else (None, None)
    if client_cpu is not None:
        os.sched_setaffinity(0, {client_cpu})
    idle = 1000 if quick else 10000
    if idle + 2000 > hard:
        idle = max(100, hard - 2000)
    results: Dict[str, Any] = {
        "machine": {
            "python": platform.python_version(),
            "thriftpy2": thriftpy2.__version__,
            "cpus": len(cpus),
            "placement": ("providers pinned to CPU %s, client processes to CPU %s" % (server_cpu, client_cpu))
            if client_cpu is not None else "one CPU: no pinning",
            "nofile_hard": hard,
        },
        "quick": quick,
    }
    clients = [Child(["_client"], client_cpu) for _ in range(4)]
    # Opens and holds the idle and slow connections: on the clients' CPU, but only when nothing
    # else wants it, so that it never delays the legitimate client whose latency is measured.
    attacker = Child(["_client"], client_cpu)
    os.sched_setscheduler(attacker.proc.pid, os.SCHED_IDLE, os.sched_param(0))
    clients.append(attacker)
    try:
        if 1 in parts:
            rounds = args.rounds or (1 if quick else 6)
            results["throughput"] = part1(clients, server_cpu, rounds, 0.5 if quick else 2.0)
        if 2 in parts:
            results["idle"] = part2(clients[0], attacker, server_cpu, idle, 2 if quick else 10, 0.5 if quick else 1.5)
        if 3 in parts:
            results["slowloris"] = part3(clients[0], attacker, server_cpu, 200 if quick else 1000,
                                         1 if quick else 5, 1.0 if quick else 3.0, 2.0)
        if 4 in parts:
            results["oversized"] = part4(clients[0], server_cpu, 50 if quick else 500)
    finally:
        for c in clients:
            c.close()
    results["seconds"] = round(time.monotonic() - began, 1)
    report(results)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2, sort_keys=True))


def _goal(met: bool) -> str:
    return "met" if met else "NOT met"


def report(r: Dict[str, Any]) -> None:
    m = r["machine"]
    print("thriftprobe server benchmark - Python %s, thriftpy2 %s, %d CPUs, %s%s"
          % (m["python"], m["thriftpy2"], m["cpus"], m["placement"], " (--quick)" if r["quick"] else ""))

    def legit_rows(legit: Dict[str, Any], what: str) -> None:
        print("   legitimate client, one connection, %d calls back to back then a %.0f ms pause:"
              % (LEGIT_BURST, LEGIT_PAUSE * 1000))
        print("     %-38s %9s %9s %9s %9s %8s  %s" % ("", "p50 w/o", "p99 w/o", "p50 with", "p99 with",
                                                      "p99 x", "goal <= 1.5x"))
        for kind, label in (("warm", "back-to-back calls"), ("cold", "first call after a pause")):
            v = legit[kind]
            print("     %-38s %9.3f %9.3f %9.3f %9.3f %8.2f  %s"
                  % ("%s (n=%d/%d)" % (label, v["without"]["n"], v["with"]["n"]), v["without"]["p50_ms"],
                     v["without"]["p99_ms"], v["with"]["p50_ms"], v["with"]["p99_ms"], v["p99_x"],
                     _goal(v["goal_met"])))
        print("     (ms; %s)" % what)

    if "throughput" in r:
        t = r["throughput"]
        print("\n1. throughput and latency: ping and echo(100 B) alternating, back to back on every connection;")
        print("   %d interleaved rounds of %.1f s; connections spread over client processes as %s threads"
              % (t["rounds"], t["seconds_per_burst"], t["layout"]))
        print("   %5s %-18s %9s %15s %7s %7s %9s | %8s %6s %6s  %s"
              % ("conns", "server", "calls/s", "(rounds min-max)", "p50 ms", "p99 ms", "srv us/c",
                 "x calls", "x p50", "x p99", "goal (calls/s vs TThreadedServer)"))
        for conns, row in t["rows"].items():
            for name, v in row.items():
                goal = ("" if name == BASELINE else ">= %.2fx: %s" % (v["goal_throughput_x"], _goal(v["goal_met"])))
                print("   %5s %-18s %9.0f %7.0f-%-7.0f %7.3f %7.3f %9.1f | %8.2f %6.2f %6.2f  %s"
                      % (conns, name, v["calls_per_s"], v["calls_per_s_min"], v["calls_per_s_max"], v["p50_ms"],
                         v["p99_ms"], v["server_cpu_us_per_call"], v["throughput_x_threaded"], v["p50_x_threaded"],
                         v["p99_x_threaded"], goal))
        print("   srv us/c: the provider process's CPU time per call. x: over TThreadedServer in the same run.")
        one = t["rows"]["1"]
        print("   worker linger at 1 connection: 2 ms %.0f calls/s, 0 ms %.0f calls/s (0/2 ms = %.2f)"
              % (one["core, linger 2 ms"]["calls_per_s"], one["core, linger 0"]["calls_per_s"],
                 one["core, linger 0"]["calls_per_s"] / one["core, linger 2 ms"]["calls_per_s"]))

    if "idle" in r:
        i = r["idle"]
        print("\n2. %d idle connections held open (provider: workers=%d, max_connections raised above them)"
              % (i["idle_connections"], i["workers_option"]))
        print("   opened in %.1f s (accept queue overflows meanwhile, machine-wide: %d); held by the server: %d;"
              " still open when checked: %d"
              % (i["opened"]["seconds"], i["listen_overflows_while_opening"], i["server_connections_held"],
                 i["still_open_at_check"]))
        print("   provider threads %d = %d workers + %d (before: %d)   goal <= workers + a small constant: %s"
              % (i["provider_threads"], i["worker_threads"], i["threads_over_workers"], i["provider_threads_before"],
                 _goal(i["threads_over_workers"] <= 4 and i["worker_threads"] <= i["workers_option"])))
        print("   provider RSS %.1f MB before, %.1f MB with them open (%.2f KiB a connection), %.1f MB after close"
              % (i["rss_kib_before"] / 1024, i["rss_kib_with_idle"] / 1024, i["rss_kib_per_idle_connection"],
                 i["rss_kib_after_close"] / 1024))
        g = i["gc_full_collections"]
        print("   provider full GCs: %d before (longest %.1f ms), %d by the end of the run with them (longest %.1f ms)"
              % (g["before"]["count"], g["before"]["max_ms"], g["with_idle"]["count"], g["with_idle"]["max_ms"]))
        legit_rows(i["legit"], "%d slices of %.1f s on each of two identical providers, alternating: 'with' holds"
                   " the idle connections" % (i["legit_slices"]["count"], i["legit_slices"]["seconds"]))

    if "slowloris" in r:
        s = r["slowloris"]
        a = s["attack"]
        print("\n3. %d slowloris connections (half 1 header byte then silence, half 1 byte a second),"
              " read_timeout %.0f s"
              % (s["slow_connections"], s["read_timeout_s"]))
        print("   %.0f s in all: %d slow connections opened (closed ones replaced);"
              " the client saw %d closed by the server (%s)"
              % (s["attack_seconds"], a["opened"], sum(a["closed_by_server"].values()),
                 ", ".join("%s %d" % kv for kv in a["closed_by_server"].items())))
        ages = s["server_read_timeout_ages_s"]
        if ages:
            print("   the server closed %d by read_timeout, %.2f s (p50) after accepting them, %.2f-%.2f s"
                  % (s["closed_by_read_timeout"], ages["p50"], ages["min"], ages["max"]))
        if a["closed_after_s"]:
            print("   the attacker saw the close %.2f s (p50) after its first byte, %.2f-%.2f s"
                  " (accept queue overflows meanwhile, machine-wide: %d)"
                  % (a["closed_after_s"]["p50"], a["closed_after_s"]["min"], a["closed_after_s"]["max"],
                     s["listen_overflows_during_attack"]))
        print("   slow connections on the server during the 'with' slices: %d-%d"
              % (s["server_connections_in_attack"]["min"], s["server_connections_in_attack"]["max"]))
        print("   provider threads during the attack %d (%d workers); RSS %.1f MB before, %.1f MB during"
              % (s["provider_threads_during"], s["worker_threads_during"], s["rss_kib_before"] / 1024,
                 s["rss_kib_during"] / 1024))
        legit_rows(s["legit"], "%d cycles: %.1f s alone, attack started, %.1f s later %.1f s under it, attack stopped"
                   % (s["cycles"], s["slice_s"], s["read_timeout_s"] + 0.5, s["slice_s"]))

    if "oversized" in r:
        o = r["oversized"]
        print("\n4. oversized requests, %d of each, 8 client threads (max_message_size %d)" % (
            o["count_each"], o["max_message_size"]))
        print("   header %s (a ~2 GiB method name): %s" % (o["header_bytes"], o["client_saw"]["header"]))
        print("   body over max_message_size (echo of %d bytes): %s" % (BIG_MESSAGE + 1024, o["client_saw"]["body"]))
        print("   a ping after them: %r; server closes %s; rejections %s" % (o["ping_after"], o["closed_reasons"],
                                                                           o["rejected_reasons"]))
        print("   provider RSS %.1f MB before, %.1f MB after, peak %.1f MB: growth %.1f MB   goal < 10 MB: %s"
              % (o["rss_kib_before"] / 1024, o["rss_kib_after"] / 1024, o["rss_kib_peak"] / 1024, o["rss_growth_mb"],
                 _goal(o["goal_met"])))
    print("\nwhole run: %.0f s" % r["seconds"])


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_provider":
        provider_main(sys.argv[2], json.loads(sys.argv[3]))
    elif len(sys.argv) > 1 and sys.argv[1] == "_client":
        client_main()
    else:
        main()
