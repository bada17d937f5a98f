"""Scenarios run under gevent, each in its own process that patches everything first (the pytest
process is never patched). Used by test_gevent.py.

usage:
  gevent_main.py provider CONFIG ENV APPKEY TAG
      a provider; prints "READY <port> <kazoo handler class>" once registered, serves until SIGTERM.
  gevent_main.py load CONFIG ENV APPKEY --nodes N [--local TAG...] [--greenlets G] [--calls C]
                 [--expire] [--wait-dead]
      a consumer (and in-process providers, one per --local tag) calling ping from G greenlets
      through one client; prints "LOADING" once calls flow, then one JSON line of results.
  gevent_main.py prefork CONFIG ENV APPKEY --workers N
      a master that forks N workers (after patching, without opening a ZooKeeper session); each
      worker starts a provider and prints "WORKER <pid> <port>"; the master prints one JSON line
      about itself, then waits for SIGTERM and stops its workers.
"""

from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402 - everything after the patching
import json  # noqa: E402
import os  # noqa: E402
import signal  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import gevent  # noqa: E402
from gevent.event import Event  # noqa: E402
from kazoo.client import KazooClient  # noqa: E402
from kazoo.handlers.gevent import SequentialGeventHandler  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))

from conftest import IDL, Handler  # noqa: E402

from thriftprobe import build_client, start_service  # noqa: E402
from thriftprobe.consumer.retry import Retry, RetryBudget  # noqa: E402
from thriftprobe.registry import zookeeper as zk_registry  # noqa: E402


def provider(args: argparse.Namespace) -> None:
    svc = start_service(IDL, args.appkey, "Calculator", Handler(args.tag), 0, config=args.config, env=args.env,
                        bind_host="127.0.0.1", block=False)
    handler = type(svc._registry.client.handler).__name__
    print("READY %d %s" % (svc.port, handler), flush=True)
    sys.stdout.close()
    svc.serve_forever()


def _expire(client: KazooClient) -> None:
    """End ``client``'s session the way ZooKeeper does: another client takes it over and closes."""
    hosts = ",".join("%s:%d" % host for host in client.hosts)
    thief = KazooClient(hosts=hosts, client_id=client.client_id, handler=SequentialGeventHandler())
    thief.start(5)
    thief.stop()
    thief.close()


def load(args: argparse.Namespace) -> None:
    services = [
        start_service(IDL, args.appkey, "Calculator", Handler(tag), 0, config=args.config, env=args.env,
                      bind_host="127.0.0.1", block=False, drain=0)
        for tag in args.local
    ]
    result: dict = {"failures": [], "tags": {}}
    # The default budget's burst (30 retries) is for a few threads: 200 greenlets have ~70 calls in
    # flight on a node that dies, so the burst is sized to the concurrency (0.2 * 1000 + 10 = 210).
    retry = Retry(idempotent={"ping"}, attempts=3, budget=RetryBudget(window_calls=args.budget_window))
    with build_client(IDL, args.appkey, "Calculator", config=args.config, env=args.env, retry=retry) as c:
        zk = c._registry.client
        result["handler"] = type(zk.handler).__name__
        deadline = time.monotonic() + 10
        while len(c.table.snapshot.available) < args.nodes:
            if time.monotonic() > deadline:
                raise SystemExit("only %d of %d nodes" % (len(c.table.snapshot.available), args.nodes))
            gevent.sleep(0.01)
        latencies: list = []
        stop = Event()
        hub_lag = [0.0]

        failed = [0]

        def calls() -> int:
            return len(latencies) + failed[0]

        def caller() -> None:
            while not stop.is_set():
                started = time.perf_counter()
                try:
                    tag = c.ping()
                except Exception as err:  # counted: the test asserts there are none
                    failed[0] += 1
                    if len(result["failures"]) < 20:
                        result["failures"].append("%s: %s" % (type(err).__name__, err))
                    gevent.sleep(0.01)  # a call that fails at once must not starve the hub
                else:
                    latencies.append(time.perf_counter() - started)
                    result["tags"][tag] = result["tags"].get(tag, 0) + 1

        def watch_hub() -> None:  # the longest the hub went without coming back to this greenlet
            while not stop.is_set():
                before = time.perf_counter()
                gevent.sleep(0.005)
                hub_lag[0] = max(hub_lag[0], time.perf_counter() - before - 0.005)

        def wait_calls(n: int, what: str) -> None:
            deadline = time.monotonic() + 60
            while calls() < n:
                if time.monotonic() > deadline:
                    raise SystemExit("timed out waiting for %s" % what)
                gevent.sleep(0.005)

        watcher = gevent.spawn(watch_hub)
        started = time.perf_counter()
        greenlets = [gevent.spawn(caller) for _ in range(args.greenlets)]
        wait_calls(200, "the first calls")
        print("LOADING", flush=True)
        if args.expire:
            session = zk.client_id
            expired = time.monotonic()
            _expire(zk)
            while zk.client_id == session or not zk.connected:  # a new session, connected
                if time.monotonic() - expired > 15:
                    raise SystemExit("no new session")
                gevent.sleep(0.01)
            result["new_session_after_s"] = round(time.monotonic() - expired, 3)
            result["expired_session"] = session[0]
            result["session"] = zk.client_id[0]
            while services and not all(zk.exists(svc.znode_path) for svc in services):
                if time.monotonic() - expired > 15:
                    raise SystemExit("the providers did not register again")
                gevent.sleep(0.01)
            result["re_registered_after_s"] = round(time.monotonic() - expired, 3)
            wait_calls(calls() + 2000, "calls after the expiry")
        if args.wait_dead:
            sys.stdin.readline()  # the test killed one provider
            killed = time.monotonic()
            while len(c.table.snapshot.all_nodes) > args.nodes - 1:
                if time.monotonic() - killed > 15:
                    raise SystemExit("the dead node stays in the table")
                gevent.sleep(0.01)
            result["dead_node_left_after_s"] = round(time.monotonic() - killed, 3)
            wait_calls(calls() + 2000, "calls after the dead node left")
        wait_calls(args.calls, "%d calls" % args.calls)
        stop.set()
        gevent.joinall(greenlets, timeout=30)
        elapsed = time.perf_counter() - started
        watcher.join()
        latencies.sort()
        result.update(
            calls=calls(),
            failed=failed[0],
            greenlets=args.greenlets,
            seconds=round(elapsed, 3),
            calls_per_s=round(len(latencies) / elapsed),
            p50_ms=round(latencies[len(latencies) // 2] * 1000, 2),
            p99_ms=round(latencies[int(len(latencies) * 0.99)] * 1000, 2),
            max_hub_lag_ms=round(hub_lag[0] * 1000, 2),
            unfinished=sum(not g.dead for g in greenlets),
            nodes=len(c.table.snapshot.all_nodes),
        )
        if services:
            result["local_registered"] = [bool(zk.exists(svc.znode_path)) for svc in services]
            result["local_handler"] = type(services[0]._registry.client.handler).__name__
    for svc in services:
        svc.stop(timeout=2.0, drain=0)
    print(json.dumps(result), flush=True)


def prefork(args: argparse.Namespace) -> None:
    children = []
    for i in range(args.workers):
        pid = os.fork()
        if pid == 0:  # a worker: its own provider, its own session
            try:
                svc = start_service(IDL, args.appkey, "Calculator", Handler("w%d" % i), 0, config=args.config,
                                    env=args.env, bind_host="127.0.0.1", block=False)
                print("WORKER %d %d" % (os.getpid(), svc.port), flush=True)
                svc.serve_forever()
            finally:
                os._exit(0)
        children.append(pid)
    # The master: it imported thriftprobe but never asked for a session.
    print(json.dumps({"master": os.getpid(), "workers": children, "sessions": len(zk_registry._sessions)}), flush=True)
    stop = Event()
    gevent.signal_handler(signal.SIGTERM, stop.set)
    while not stop.is_set():  # the signal watcher does not keep the hub alive: poll
        gevent.sleep(0.05)
    for pid in children:
        os.kill(pid, signal.SIGTERM)
    for pid in children:
        os.waitpid(pid, 0)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["provider", "load", "prefork"])
    parser.add_argument("config")
    parser.add_argument("env")
    parser.add_argument("appkey")
    parser.add_argument("tag", nargs="?", default="p")
    parser.add_argument("--nodes", type=int, default=1)
    parser.add_argument("--local", nargs="*", default=[])
    parser.add_argument("--greenlets", type=int, default=200)
    parser.add_argument("--calls", type=int, default=20000)
    parser.add_argument("--expire", action="store_true")
    parser.add_argument("--wait-dead", action="store_true")
    parser.add_argument("--workers", type=int, default=3)
    parser.add_argument("--budget-window", type=int, default=1000)
    args = parser.parse_args()
    {"provider": provider, "load": load, "prefork": prefork}[args.mode](args)


if __name__ == "__main__":
    main()
