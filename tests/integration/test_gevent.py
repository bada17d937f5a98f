"""Providers and consumers in processes that ran gevent.monkey.patch_all() first (gevent_main.py):
kazoo's gevent handler, 200 greenlets through one client, a session expiry and a kill -9 under
that load, and a pre-fork master whose workers register while it holds no ZooKeeper session."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, TEST_ENV, ZK_PORT, wait_until

from thriftprobe.cooperative import gevent_patched

pytest.importorskip("gevent")

MAIN = str(Path(__file__).with_name("gevent_main.py"))


def _gevent(*argv: str, stdin: bool = False) -> subprocess.Popen:
    # This checkout's thriftprobe, whichever copy the venv installed (the script's folder comes first).
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    return subprocess.Popen([sys.executable, MAIN, *argv], stdout=subprocess.PIPE, text=True, cwd=str(ROOT), env=env,
                            stdin=subprocess.PIPE if stdin else subprocess.DEVNULL)


def _result(proc: subprocess.Popen, timeout: float = 120) -> dict:
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        raise AssertionError("the gevent scenario did not end within %.0f s: %s" % (timeout, out)) from None
    assert proc.returncode == 0, out
    result = json.loads(out.strip().splitlines()[-1])
    print("gevent load:", json.dumps(result))
    return result


def _provider(config_path: str, appkey: str, tag: str) -> subprocess.Popen:
    proc = _gevent("provider", config_path, TEST_ENV, appkey, tag)
    assert proc.stdout is not None
    line = proc.stdout.readline().split()
    proc.stdout.close()
    assert line[:1] == ["READY"], line
    assert line[2] == "SequentialGeventHandler"
    return proc


def test_nothing_is_cooperative_without_gevent_patching():
    # This process may have imported gevent (importorskip) but never patched: threads as always.
    assert not gevent_patched()


def test_200_greenlets_call_through_one_client_under_gevent(config_path, appkey):
    result = _result(_gevent("load", config_path, TEST_ENV, appkey, "--local", "a", "b", "--nodes", "2",
                             "--calls", "20000"))
    assert result["handler"] == result["local_handler"] == "SequentialGeventHandler"
    assert result["failures"] == []
    assert result["calls"] >= 20000 and result["unfinished"] == 0
    assert set(result["tags"]) == {"a", "b"}
    assert result["local_registered"] == [True, True]
    print("gevent: %(greenlets)d greenlets, %(calls)d calls: %(calls_per_s)d calls/s, p50 %(p50_ms).2f ms, "
          "p99 %(p99_ms).2f ms, longest hub lag %(max_hub_lag_ms).1f ms" % result)


@pytest.mark.slow
def test_session_expiry_under_gevent_load_fails_no_call(config_path, appkey):
    result = _result(_gevent("load", config_path, TEST_ENV, appkey, "--local", "a", "b", "--nodes", "2",
                             "--calls", "20000", "--expire"))
    assert result["session"] != result["expired_session"]
    assert result["failures"] == []
    assert result["local_registered"] == [True, True]
    assert result["nodes"] == 2
    print("gevent session expiry: new session after %(new_session_after_s).2f s, providers registered again "
          "after %(re_registered_after_s).2f s, %(calls)d calls, none failed" % result)


@pytest.mark.slow
def test_provider_kill_9_under_gevent_load_loses_no_idempotent_call(config_path, appkey, procs):
    procs.extend(_provider(config_path, appkey, "p%d" % i) for i in range(3))
    consumer = _gevent("load", config_path, TEST_ENV, appkey, "--nodes", "3", "--calls", "20000", "--wait-dead",
                       stdin=True)
    procs.append(consumer)
    assert consumer.stdout is not None
    assert consumer.stdout.readline().strip() == "LOADING"
    procs[0].send_signal(signal.SIGKILL)
    procs[0].wait()
    assert consumer.stdin is not None
    consumer.stdin.write("killed\n")
    consumer.stdin.flush()
    consumer.stdin.close()
    consumer.stdin = None  # communicate() must not flush a closed pipe
    result = _result(consumer)
    assert result["failures"] == []
    assert set(result["tags"]) == {"p0", "p1", "p2"}
    assert result["nodes"] == 2
    print("gevent kill -9: node left the table %(dead_node_left_after_s).2f s later (session timeout 2 s); "
          "%(calls)d calls, none failed, %(calls_per_s)d calls/s, p99 %(p99_ms).2f ms" % result)


@pytest.mark.slow
def test_prefork_workers_register_and_the_master_holds_no_session(config_path, appkey, zk, procs):
    master = _gevent("prefork", config_path, TEST_ENV, appkey, "--workers", "3")
    procs.append(master)
    assert master.stdout is not None
    lines = [master.stdout.readline().strip() for _ in range(4)]
    about = json.loads(next(line for line in lines if line.startswith("{")))
    procs.extend(_Pid(pid) for pid in about["workers"])  # killed after the test if still there
    workers = sorted(line.split()[1:] for line in lines if line.startswith("WORKER"))
    assert sorted(str(pid) for pid in about["workers"]) == [pid for pid, _ in workers]
    folder = "/services/%s/%s" % (TEST_ENV, appkey)
    wait_until(lambda: zk.exists(folder) and len(zk.get_children(folder)) == 3, 10, "three workers' znodes")
    owners = {zk.exists("%s/%s" % (folder, child)).ephemeralOwner for child in zk.get_children(folder)}
    assert len(owners) == 3  # one session per worker
    assert about["sessions"] == 0
    # The master never connected to ZooKeeper: no socket of its is connected to the ensemble's port.
    assert _connected_to(about["master"], ZK_PORT) == 0
    assert all(_connected_to(int(pid), ZK_PORT) == 1 for pid, _ in workers)
    master.send_signal(signal.SIGTERM)
    master.wait(20)
    wait_until(lambda: zk.get_children(folder) == [], 10, "the workers deregistered")


class _Pid:
    """A forked worker, for the procs fixture: killed if it outlived its master."""

    def __init__(self, pid: int) -> None:
        self.pid = pid

    def poll(self) -> object:
        return None if os.path.exists("/proc/%d" % self.pid) else 0

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGKILL)

    def wait(self) -> None:
        wait_until(lambda: self.poll() is not None, 10, "worker %d to end" % self.pid)


def _connected_to(pid: int, port: int) -> int:
    """How many of ``pid``'s sockets are TCP connections to ``port`` on 127.0.0.1."""
    inodes = set()
    for fd in os.listdir("/proc/%d/fd" % pid):
        target = os.readlink("/proc/%d/fd/%s" % (pid, fd))
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    count = 0
    for table in ("tcp", "tcp6"):
        with open("/proc/%d/net/%s" % (pid, table)) as f:
            for line in f.readlines()[1:]:
                fields = line.split()
                if int(fields[2].split(":")[1], 16) == port and fields[3] == "01" and fields[9] in inodes:
                    count += 1
    return count
