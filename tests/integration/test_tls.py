"""TLS that is asked for is TLS or nothing: against the local servers, which speak plaintext
only, a config that requires TLS fails clearly instead of falling back (issue 10 C11)."""

from __future__ import annotations

import time

import pytest

from thriftprobe import BackendError, config
from thriftprobe.registry import open_registry
from thriftprobe.stores import mysql
from thriftprobe.stores.settings import NodeSettingsStore

PLAIN = {
    "mysql": "{host: 127.0.0.1, port: 3306, username: root, password: '', database: thriftprobe_test%s}",
    "redis": "{host: 127.0.0.1, port: 6379, socket_timeout: 300%s}",
    "zkserver": "{host: 127.0.0.1, port: 2181, session_timeout: 2000, connect_timeout: 1500%s}",
}


def load(tmp_path, section, tls):
    """A config whose ``section`` carries the TLS keys ``tls`` (YAML flow-mapping text)."""
    text = "".join(
        "%s:\n  tls: %s\n" % (name, flow % ((", " + tls) if name == section else ""))
        for name, flow in PLAIN.items()
    )
    path = tmp_path / "c.yml"
    path.write_text(text)
    return config.load(path, "tls")


@pytest.mark.parametrize("tls", ["ssl: true", "ssl_mode: required", "ssl_mode: verify_identity"])
def test_mysql_that_must_be_tls_refuses_a_server_without_it(services, tmp_path, tls):
    cfg = load(tmp_path, "mysql", tls)
    refused = pytest.raises(BackendError, match=r"mysql 127.0.0.1:3306/thriftprobe_test \(TLS [a-z_]+\)")
    with refused as exc, mysql.connect(cfg.mysql) as conn, conn.cursor() as cur:
        cur.execute("SELECT 1")
    assert "SSL" in str(exc.value) or "not encrypted" in str(exc.value)


def test_mysql_without_tls_settings_still_connects_in_plaintext(services, tmp_path):
    cfg = load(tmp_path, "mysql", "ssl: false")
    with mysql.connect(cfg.mysql) as conn, conn.cursor() as cur:
        cur.execute("SELECT 1")
        assert cur.fetchone() == (1,)


@pytest.mark.parametrize("tls", ["ssl: true", "ssl_mode: required"])
def test_redis_that_must_be_tls_refuses_a_server_without_it(services, tmp_path, tls):
    cfg = load(tmp_path, "redis", tls)
    with NodeSettingsStore(cfg.redis, cfg.env) as store, pytest.raises(BackendError, match=r"\(TLS [a-z_]+\)"):
        store.get("a.b", "S", "127.0.0.1", 1)


@pytest.mark.parametrize("tls", ["ssl: true", "ssl_mode: required"])
def test_zookeeper_that_must_be_tls_refuses_a_server_without_it(services, tmp_path, tls):
    cfg = load(tmp_path, "zkserver", tls)
    began = time.monotonic()
    with pytest.raises(BackendError, match=r"zookeeper 127.0.0.1:2181 \(TLS [a-z_]+\)"):
        open_registry(cfg).close()
    assert time.monotonic() - began < cfg.zookeeper.connect_timeout + 3
