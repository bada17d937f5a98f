"""Real ZooKeeper, Redis (standalone and Cluster) and MariaDB, started once by tests/services.sh.

Every test gets its own appkey, so tests never see each other's nodes or settings.
"""

from __future__ import annotations

import io
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Callable, Iterator, List

import pytest
import redis
import redis.cluster
from kazoo.client import KazooClient
from kazoo.exceptions import NotEmptyError

from thriftprobe import config, start_service
from thriftprobe.admin import cli
from thriftprobe.admin.governance import Governance
from thriftprobe.node import Node, settings_field
from thriftprobe.stores import appkeys, mysql
from thriftprobe.stores.limits import limits_key
from thriftprobe.stores.settings import hash_key

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))  # local_servers: the ports tests/services.sh uses

from local_servers import CLUSTER_PORT, MYSQL_PORT, REDIS_PORT, ZK, ZK_PORT  # noqa: E402

IDL = str(ROOT / "idl" / "demo.thrift")
TEST_ENV = "test"
CLUSTER_ENV = "testcluster"

CONFIG_TEXT = f"""
mysql:
  {TEST_ENV}: &mysql {{host: 127.0.0.1, port: {MYSQL_PORT}, username: root, password: "", database: thriftprobe_test}}
  {CLUSTER_ENV}: *mysql
redis:
  {TEST_ENV}: {{host: 127.0.0.1, port: {REDIS_PORT}, cluster: 0}}
  {CLUSTER_ENV}: {{host: 127.0.0.1, port: {CLUSTER_PORT}, cluster: 1}}
zkserver:
  {TEST_ENV}: &zk {{host: 127.0.0.1, port: {ZK_PORT}, session_timeout: 2000}}
  {CLUSTER_ENV}: *zk
"""


def wait_until(predicate: Callable[[], object], timeout: float = 10.0, what: str = "condition") -> None:
    """Poll ``predicate`` until it is truthy; fail the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("timed out after %.1f s waiting for %s" % (timeout, what))
        time.sleep(0.01)


@pytest.fixture(scope="session")
def services() -> None:
    if not os.environ.get("THRIFTPROBE_SERVICES_READY"):
        subprocess.run(["bash", str(ROOT / "tests" / "services.sh"), "start"], check=True)


@pytest.fixture(scope="session")
def config_path(services: None, tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("config") / "config.yml"
    path.write_text(CONFIG_TEXT)
    cfg = config.load(path, TEST_ENV)
    mysql.create_schema(cfg.mysql)
    _wipe_test_envs(cfg)
    return str(path)


def _wipe_test_envs(cfg: config.Config) -> None:
    """The test environments belong to the tests: start each session from nothing."""
    zk = KazooClient(hosts=ZK)
    zk.start(10)
    try:
        for env in (TEST_ENV, CLUSTER_ENV):
            for tree in ("/services/%s" % env, "/consumers/%s" % env, "/limits/%s" % env):
                for _ in range(20):  # a process still registering adds children meanwhile
                    try:
                        if zk.exists(tree):
                            zk.delete(tree, recursive=True)
                        break
                    except NotEmptyError:
                        time.sleep(0.1)
    finally:
        zk.stop()
        zk.close()
    with redis.Redis(host="127.0.0.1", port=REDIS_PORT) as r:
        r.delete(hash_key(TEST_ENV), limits_key(TEST_ENV))
    with redis.cluster.RedisCluster(host="127.0.0.1", port=CLUSTER_PORT) as rc:
        rc.delete(hash_key(CLUSTER_ENV))
        rc.delete(limits_key(CLUSTER_ENV))
    with mysql.connect(cfg.mysql) as conn, conn.cursor() as cur:
        cur.execute("DELETE FROM settings_audit")
        cur.execute("DELETE FROM limits_audit")
        cur.execute("DELETE FROM serviceapp")


@pytest.fixture(scope="session")
def cfg(config_path: str) -> config.Config:
    return config.load(config_path, TEST_ENV)


@pytest.fixture(scope="session")
def cluster_cfg(config_path: str) -> config.Config:
    return config.load(config_path, CLUSTER_ENV)


@pytest.fixture
def appkey(cfg: config.Config) -> str:
    key = "t.%s" % uuid.uuid4().hex[:12]
    appkeys.add_appkey(cfg.mysql, key, owner="pytest")
    return key


@pytest.fixture(scope="session")
def zk(services: None) -> Iterator[KazooClient]:
    client = KazooClient(hosts=ZK)
    client.start(10)
    yield client
    client.stop()
    client.close()


@pytest.fixture(scope="session")
def rds(services: None) -> Iterator[redis.Redis]:
    client = redis.Redis(host="127.0.0.1", port=REDIS_PORT)
    yield client
    client.close()


class Settings:
    """Reads and writes node settings in Redis as an operator would."""

    def __init__(self, client: redis.Redis, env: str, appkey: str) -> None:
        self.client, self.env, self.appkey = client, env, appkey

    def put(self, port: int, weight: int, valid: int = 1, host: str = "127.0.0.1", service: str = "Calculator") -> None:
        value = '{"host": "%s", "port": %d, "weight": %d, "valid": %d}' % (host, port, weight, valid)
        self.client.hset(hash_key(self.env), settings_field(self.appkey, self.env, service, host, port), value)

    def get(self, port: int, host: str = "127.0.0.1", service: str = "Calculator") -> bytes:
        return self.client.hget(hash_key(self.env), settings_field(self.appkey, self.env, service, host, port))


@pytest.fixture
def settings(rds: redis.Redis, appkey: str) -> Settings:
    return Settings(rds, TEST_ENV, appkey)


class Handler:
    """The demo Calculator; ``tag`` tells which provider answered."""

    def __init__(self, tag: str) -> None:
        self.tag = tag
        self.calls = 0
        self.events: List[str] = []
        self._lock = threading.Lock()

    def _count(self) -> None:
        with self._lock:
            self.calls += 1

    def ping(self) -> str:
        self._count()
        return self.tag

    def compute(self, operation):  # type: ignore[no-untyped-def]
        self._count()
        import demo_thrift

        if operation.op == "/":
            if operation.right == 0:
                raise demo_thrift.CalcError(message="division by zero")
            value = operation.left // operation.right
        elif operation.op == "+":
            value = operation.left + operation.right
        else:
            raise ValueError("unsupported operator %r" % operation.op)
        return demo_thrift.Answer(value=value, served_by=self.tag)

    def echo(self, text: str) -> str:
        self._count()
        return text

    def sleep_ms(self, ms: int) -> None:
        self._count()
        time.sleep(ms / 1000.0)

    def record(self, event: str) -> None:
        self._count()
        with self._lock:
            self.events.append(event)


@pytest.fixture
def providers(cfg: config.Config, appkey: str) -> Iterator[Callable[..., object]]:
    """Start in-process providers of Calculator for this test's appkey; all are stopped after it."""
    started: list = []

    def start(tag: str = "p", port: int = 0, **kwargs: object):  # type: ignore[no-untyped-def]
        kwargs.setdefault("config", cfg)
        kwargs.setdefault("bind_host", "127.0.0.1")
        kwargs.setdefault("drain", 0)  # tests that need a drain period ask for one
        handler = kwargs.pop("handler", None) or Handler(tag)
        svc = start_service(IDL, appkey, "Calculator", handler, port, block=False, **kwargs)
        started.append(svc)
        return svc

    start.started = started  # type: ignore[attr-defined]
    yield start
    for svc in started:
        svc.stop(timeout=2.0, drain=0)


@pytest.fixture
def procs() -> Iterator[List[subprocess.Popen]]:
    """Processes a test starts (append them): killed after it, stopped ones (SIGSTOP) included."""
    started: List[subprocess.Popen] = []
    yield started
    for p in started:
        if p.poll() is None:
            p.send_signal(signal.SIGCONT)
            p.kill()
        p.wait()


def free_port() -> int:
    """A port that was free a moment ago (the OS does not hand it out again at once)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn_provider(config_path: str, env: str, appkey: str, tag: str, port: int = 0) -> subprocess.Popen:
    """Run a provider in its own process (blocking start_service); returns once it is serving."""
    proc = subprocess.Popen(
        [sys.executable, str(Path(__file__).with_name("provider_main.py")), config_path, env, appkey, tag, str(port)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=str(ROOT),
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    proc.stdout.close()  # the provider closes its end after READY; keep no pipe open
    if not line.startswith("READY"):
        proc.kill()
        proc.wait()
        raise AssertionError("provider did not start: %r" % line)
    proc.port = int(line.split()[1])  # type: ignore[attr-defined]
    return proc


@pytest.fixture
def run(config_path: str) -> Callable[..., str]:
    """Run the ``thriftprobe`` command in-process on the test env; assert its exit code."""

    def run(*argv: str, expect: int = 0) -> str:
        out = io.StringIO()
        try:
            code = cli.main(["--config", config_path, "--env", TEST_ENV, *argv], stream=out)
        except SystemExit as exc:  # argparse's usage errors
            code = exc.code
        assert code == expect, out.getvalue()
        return out.getvalue()

    return run


@pytest.fixture
def gov(cfg: config.Config) -> Iterator[Governance]:
    with Governance(cfg) as g:
        yield g


def live(zk: KazooClient, path: str) -> Node:
    """The node a znode holds now."""
    return Node.from_json(zk.get(path)[0])

