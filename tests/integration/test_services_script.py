"""tests/services.sh as a new user meets it: ports set in the environment reach the config that
the schema, the demo and the tests use, and a server that refuses our credentials is named
together with the variable to set."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Dict, Iterator

import pymysql
import pytest
from conftest import ROOT, free_port, wait_until

from thriftprobe import config

SCRIPT = str(ROOT / "tests" / "services.sh")
REDIS_SERVER = shutil.which("redis-server", path="/usr/bin:/usr/sbin") or "/usr/bin/redis-server"


def run_script(env: Dict[str, str], *args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", SCRIPT, *args], env={**os.environ, **env}, capture_output=True, text=True,
                          timeout=timeout, check=False)


@pytest.fixture
def state(tmp_path: Path) -> Iterator[Dict[str, str]]:
    """A private state folder (pid files, logs, the written config) and ports nobody uses."""
    env = {
        "THRIFTPROBE_STATE_DIR": str(tmp_path / "state"),
        "THRIFTPROBE_PYTHON": sys.executable,
        "THRIFTPROBE_START_TIMEOUT": "60",
    }
    yield env  # a test adds its ports here, so the stop below finds what it started
    done = run_script(env, "stop")  # stops only what this script started with this state folder
    assert done.returncode == 0, done.stderr


def _started(env: Dict[str, str]) -> list:
    """The servers still running from this state folder (there must be none after stop)."""
    folder = env["THRIFTPROBE_STATE_DIR"]
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if os.readlink("/proc/%s/cwd" % pid).startswith(folder):
                found.append(int(pid))
        except OSError:
            continue
    return found


def test_a_redis_port_from_the_environment_reaches_the_written_config(state):
    port = free_port()
    state["THRIFTPROBE_REDIS_PORT"] = str(port)
    done = run_script(state, "start", "redis")
    assert done.returncode == 0, done.stderr
    written = Path(state["THRIFTPROBE_STATE_DIR"]) / "config.yml"
    assert config.load(written, "dev").redis.port == port
    status = run_script(state, "status", "redis")
    assert status.returncode == 0 and "127.0.0.1:%d" % port in status.stdout
    assert _started(state)
    assert run_script(state, "stop", "redis").returncode == 0
    wait_until(lambda: not _started(state), what="the private Redis to stop")


@pytest.mark.slow
def test_a_mysql_port_from_the_environment_gets_the_schema_and_the_demo_appkey(state):
    port = free_port()
    state["THRIFTPROBE_MYSQL_PORT"] = str(port)
    done = run_script(state, "start", "mariadb", timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    cfg = config.load(Path(state["THRIFTPROBE_STATE_DIR"]) / "config.yml", "dev")
    assert cfg.mysql.port == port
    with pymysql.connect(host="127.0.0.1", port=port, user="root", password="", database="thriftprobe") as conn, \
            conn.cursor() as cur:
        cur.execute("SELECT appkey FROM serviceapp WHERE appkey = %s", ("demo.calc",))
        assert cur.fetchall() == (("demo.calc",),)


def test_a_redis_that_wants_a_password_is_named_with_the_variable_to_set(state, tmp_path):
    port = free_port()
    server = subprocess.Popen(
        [REDIS_SERVER, "--port", str(port), "--bind", "127.0.0.1", "--requirepass", "not-ours", "--save", "",
         "--appendonly", "no", "--dir", str(tmp_path)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        wait_until(lambda: subprocess.run(["bash", "-c", ">/dev/tcp/127.0.0.1/%d" % port],
                                          capture_output=True, check=False).returncode == 0,
                   what="the password-protected Redis")
        state["THRIFTPROBE_REDIS_PORT"] = str(port)
        done = run_script(state, "start", "redis")
        assert done.returncode != 0
        assert "requires a password" in done.stderr and "THRIFTPROBE_REDIS_PORT" in done.stderr
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(10)
