"""Teams install thriftprobe with pip from a private index: build, upload, install, run.

Builds the wheel and the sdist with ``python -m build``, serves them from a real pypiserver on
127.0.0.1, uploads them with twine, then for every Python >= 3.9 on this machine installs
thriftprobe into a brand-new virtualenv from that index (dependencies from the normal registry)
and runs a provider + consumer round trip from the installed package, away from the source tree.
One more install pins every dependency to its declared minimum.
"""

from __future__ import annotations

import glob
import json
import os
import re
import subprocess
import sys
import tarfile
import urllib.request
import zipfile
from pathlib import Path
from typing import Dict, List

import pytest
from conftest import IDL, ROOT, free_port, wait_until

import thriftprobe

PUBLIC_INDEX = os.environ.get("THRIFTPROBE_PUBLIC_INDEX", "https://pypi.org/simple")
LOWEST = {"thriftpy2": "0.7.1", "kazoo": "2.9.0", "redis": "4.3.6", "PyMySQL": "1.1.0", "PyYAML": "6.0.1"}

ROUND_TRIP = r'''
import json, sys
import thriftprobe
from thriftprobe import build_client, start_service

config_path, idl, appkey = sys.argv[1:4]
assert thriftprobe.__file__.startswith(sys.prefix), thriftprobe.__file__  # the installed copy

class Calculator:
    def ping(self): return "installed"
    def compute(self, operation): raise NotImplementedError
    def echo(self, text): return text
    def sleep_ms(self, ms): pass
    def record(self, event): pass

svc = start_service(idl, appkey, "Calculator", Calculator(), 0, config=config_path, env="test",
                    bind_host="127.0.0.1", block=False, drain=0)
try:
    with build_client(idl, appkey, "Calculator", config=config_path, env="test") as client:
        result = {"ping": client.ping(), "echo": client.echo("round trip")}
finally:
    svc.stop()

# The asyncio twins, on this Python's own asyncio (before 3.11: the timeout fallback).
import asyncio
from thriftprobe import aio

class AsyncCalculator(Calculator):
    async def ping(self): return "installed-aio"
    async def sleep_ms(self, ms): await asyncio.sleep(ms / 1000.0)

async def aio_round_trip():
    asvc = await aio.start_service(idl, appkey, "Calculator", AsyncCalculator(), 0, config=config_path, env="test",
                                   bind_host="127.0.0.1", block=False, drain=0)
    try:
        async with await aio.build_client(idl, appkey, "Calculator", config=config_path, env="test") as client:
            got = {"aio_ping": await client.ping()}
            try:
                await client.with_timeout(100).sleep_ms(3000)
            except Exception as err:
                got["aio_timeout"] = type(err).__name__
            try:
                await asyncio.wait_for(client.sleep_ms(3000), 0.1)
            except asyncio.TimeoutError:
                got["aio_wait_for"] = "TimeoutError"
            got["aio_echo"] = await client.echo("after")
            return got
    finally:
        await asvc.stop()

result.update(asyncio.run(aio_round_trip()))
from importlib.metadata import version
result.update(file=thriftprobe.__file__, version=thriftprobe.__version__,
              python="%d.%d" % sys.version_info[:2],
              deps={name: version(name) for name in ("thriftpy2", "kazoo", "redis", "PyMySQL", "PyYAML")})
print(json.dumps(result))
'''


def pythons() -> Dict[str, str]:
    """One interpreter per minor version >= 3.9 found on this machine, by version."""
    candidates = [sys.executable, *sorted(glob.glob(os.path.expanduser("~/.pyenv/versions/3.*/bin/python3")))]
    candidates += sorted(glob.glob("/usr/bin/python3.[0-9]*"))
    found: Dict[str, str] = {}
    for exe in candidates:
        if not re.search(r"python3(\.\d+)?$", exe) or not os.access(exe, os.X_OK):
            continue
        done = subprocess.run([exe, "-c", "import sys, venv; print('%d.%d' % sys.version_info[:2])"],
                              capture_output=True, text=True, check=False)
        version = done.stdout.strip()
        if done.returncode == 0 and tuple(map(int, version.split("."))) >= (3, 9):
            found.setdefault(version, exe)
    return dict(sorted(found.items(), key=lambda kv: tuple(map(int, kv[0].split(".")))))


PYTHONS = pythons()


def run(*argv: str, **kwargs) -> subprocess.CompletedProcess:
    done = subprocess.run(list(argv), capture_output=True, text=True, timeout=600, check=False, **kwargs)
    assert done.returncode == 0, "%s failed:\n%s\n%s" % (" ".join(argv), done.stdout[-3000:], done.stderr[-3000:])
    return done


@pytest.fixture(scope="module")
def dist(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    run(sys.executable, "-m", "build", "--sdist", "--wheel", "--outdir", str(out), str(ROOT))
    return out


def test_wheel_holds_the_package_and_nothing_else(dist):
    wheel = zipfile.ZipFile(next(dist.glob("thriftprobe-*.whl")))
    names = wheel.namelist()
    version = thriftprobe.__version__
    assert all(n.startswith(("thriftprobe/", "thriftprobe-%s.dist-info/" % version)) for n in names), names
    assert {"thriftprobe/py.typed", "thriftprobe/config.template.yml", "thriftprobe/__init__.py"} <= set(names)
    assert not [n for n in names if "tests/" in n or n.endswith("config.yml") or ".venv" in n]
    meta = wheel.read("thriftprobe-%s.dist-info/METADATA" % version).decode()
    assert "Requires-Python: >=3.9" in meta
    for name, minimum in LOWEST.items():
        assert "Requires-Dist: %s>=%s" % (name, minimum) in meta
    entry_points = wheel.read("thriftprobe-%s.dist-info/entry_points.txt" % version).decode()
    assert "thriftprobe = thriftprobe.admin.cli:main" in entry_points


def test_sdist_holds_no_local_config(dist):
    with tarfile.open(next(dist.glob("thriftprobe-*.tar.gz"))) as sdist:
        names = sdist.getnames()
    assert any(n.endswith("/setup.py") for n in names)
    assert not [n for n in names if n.endswith("config/config.yml") or "/.venv/" in n or "/.git/" in n]


@pytest.fixture(scope="module")
def private_index(dist, tmp_path_factory):
    packages = tmp_path_factory.mktemp("packages")
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "pypiserver", "run", "-i", "127.0.0.1", "-p", str(port), "-a", ".", "-P", ".",
         str(packages)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    url = "http://127.0.0.1:%d" % port

    def up() -> bool:
        try:
            return urllib.request.urlopen(url + "/simple/", timeout=1).status == 200
        except OSError:
            return False

    try:
        wait_until(up, 30, "pypiserver")
        files = [str(p) for p in dist.iterdir()]
        run(sys.executable, "-m", "twine", "upload", "--non-interactive", "--repository-url", url + "/",
            "-u", "ci", "-p", "ci", *files)
        assert sorted(os.listdir(packages)) == sorted(os.path.basename(f) for f in files)
        yield url + "/simple/"
    finally:
        server.terminate()
        server.wait(10)


def install_and_round_trip(python: str, index: str, venv: Path, config_path: str, appkey: str,
                           constraints: List[str] = ()) -> dict:
    run(python, "-m", "venv", str(venv))
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check",
           "--index-url", index, "--extra-index-url", PUBLIC_INDEX]
    for line in constraints:
        pip += ["--constraint", line]
    run(*pip, "thriftprobe")
    helped = run(str(venv / "bin" / "thriftprobe"), "--help")
    assert "node" in helped.stdout and "console" in helped.stdout
    workdir = venv.parent / "elsewhere"  # not the source tree, so only the installed copy can be imported
    workdir.mkdir(exist_ok=True)
    script = workdir / "round_trip.py"
    script.write_text(ROUND_TRIP)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "THRIFTPROBE_CONFIG")}
    done = run(str(venv / "bin" / "python"), str(script), config_path, IDL, appkey, cwd=str(workdir), env=env)
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("version", list(PYTHONS))
def test_pip_install_from_private_index_and_round_trip(version, private_index, tmp_path, config_path, appkey):
    result = install_and_round_trip(PYTHONS[version], private_index, tmp_path / "venv", config_path, appkey)
    assert result["ping"] == "installed" and result["echo"] == "round trip"
    assert (result["aio_ping"], result["aio_echo"]) == ("installed-aio", "after")
    assert (result["aio_timeout"], result["aio_wait_for"]) == ("TTransportException", "TimeoutError")
    assert result["python"] == version and result["version"] == thriftprobe.__version__
    assert "site-packages" in result["file"]


def test_lowest_declared_dependencies_work(private_index, tmp_path, config_path, appkey):
    oldest = next(iter(PYTHONS))
    constraints = tmp_path / "lowest.txt"
    constraints.write_text("".join("%s==%s\n" % kv for kv in LOWEST.items()))
    result = install_and_round_trip(PYTHONS[oldest], private_index, tmp_path / "venv", config_path, appkey,
                                    [str(constraints)])
    assert result["ping"] == "installed"
    assert result["deps"] == LOWEST, result["deps"]


def test_supported_pythons_were_found():
    assert "%d.%d" % sys.version_info[:2] in PYTHONS
    print("Pythons tested: %s" % ", ".join(PYTHONS))
