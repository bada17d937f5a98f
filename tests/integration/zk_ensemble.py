"""A 3-member ZooKeeper ensemble on loopback, for fault-injection tests (kill a member, stop all).

Uses the same Debian ZooKeeper jars as tests/services.sh. kazoo.testing's cluster runner needs
SSL keystores and log4j, which this ZooKeeper does not use, so this is a small one of our own.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Iterator, List, Optional

import pytest

CLASSPATH = "/etc/zookeeper/conf:/usr/share/java/zookeeper.jar:/usr/share/java/slf4j-simple.jar"


def _free_ports(n: int) -> List[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def mode(port: int) -> Optional[str]:
    """The member's 'Mode:' from the srvr command (leader/follower/standalone), or None."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
            s.sendall(b"srvr")
            data = b""
            while chunk := s.recv(4096):
                data += chunk
    except OSError:
        return None
    for line in data.decode(errors="replace").splitlines():
        if line.startswith("Mode:"):
            return line.split(":", 1)[1].strip()
    return None


class ZkEnsemble:
    def __init__(self, base: Path, size: int = 3) -> None:
        self.base = base
        self.size = size
        ports = _free_ports(3 * size)
        self.client_ports = ports[:size]
        self._peer_ports = ports[size:]
        self._procs: List[Optional[subprocess.Popen]] = [None] * size
        servers = "\n".join(
            "server.%d=127.0.0.1:%d:%d" % (i + 1, self._peer_ports[2 * i], self._peer_ports[2 * i + 1])
            for i in range(size)
        )
        for i in range(size):
            d = base / ("zk%d" % (i + 1))
            (d / "data").mkdir(parents=True, exist_ok=True)
            (d / "data" / "myid").write_text(str(i + 1))
            (d / "zoo.cfg").write_text(
                "tickTime=500\ninitLimit=10\nsyncLimit=5\ndataDir=%s\nclientPort=%d\nclientPortAddress=127.0.0.1\n"
                "4lw.commands.whitelist=*\nadmin.enableServer=false\nminSessionTimeout=1000\nmaxSessionTimeout=60000\n"
                "%s\n" % (d / "data", self.client_ports[i], servers)
            )

    @property
    def hosts(self) -> str:
        return ",".join("127.0.0.1:%d" % p for p in self.client_ports)

    def start(self, i: Optional[int] = None) -> None:
        for k in range(self.size) if i is None else [i]:
            if self._procs[k] is None or self._procs[k].poll() is not None:
                d = self.base / ("zk%d" % (k + 1))
                with open(d / "zk.log", "ab") as log:  # the child keeps its own copy of the fd
                    self._procs[k] = subprocess.Popen(
                        ["java", "-Xmx128m", "-Xms16m", "-XX:+UseSerialGC", "-cp", CLASSPATH,
                         "org.apache.zookeeper.server.quorum.QuorumPeerMain", str(d / "zoo.cfg")],
                        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                    )

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Until every running member serves as leader or follower."""
        deadline = time.monotonic() + timeout
        while True:
            running = [k for k, p in enumerate(self._procs) if p is not None and p.poll() is None]
            modes = [mode(self.client_ports[k]) for k in running]
            if running and all(m in ("leader", "follower") for m in modes):
                return
            if time.monotonic() > deadline:
                raise AssertionError("ensemble not ready after %.0f s: %s" % (timeout, modes))
            time.sleep(0.1)

    def kill(self, i: Optional[int] = None) -> None:
        for k in range(self.size) if i is None else [i]:
            proc = self._procs[k]
            if proc is not None and proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()

    def leader(self) -> int:
        for k, port in enumerate(self.client_ports):
            if mode(port) == "leader":
                return k
        raise AssertionError("no leader")

    def close(self) -> None:
        self.kill()


@pytest.fixture(name="ensemble")
def zk_ensemble(tmp_path: Path) -> Iterator[ZkEnsemble]:
    """A running 3-member ensemble of the test's own, closed after it."""
    if not shutil.which("java"):
        pytest.fail("java is needed for the ZooKeeper ensemble")
    ens = ZkEnsemble(tmp_path / "ensemble")
    ens.start()
    ens.wait_ready()
    yield ens
    ens.close()
