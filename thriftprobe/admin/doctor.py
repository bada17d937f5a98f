"""``thriftprobe doctor``: check that config, ZooKeeper, Redis and MySQL are usable."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Dict, List, Optional, Union

import redis
from kazoo.exceptions import KazooException
from kazoo.handlers.threading import KazooTimeoutError
from redis.exceptions import RedisClusterException

from .. import config as config_mod
from ..errors import ThriftProbeError
from ..registry.zookeeper import kazoo_client
from ..stores.mysql import missing_schema
from ..stores.settings import NodeSettingsStore, hash_key

__all__ = ["Check", "run_checks"]


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str

    def to_dict(self) -> Dict[str, object]:
        return {"check": self.name, "ok": self.ok, "detail": self.detail}


def _zookeeper(cfg: config_mod.Config) -> Check:
    # A private session: the check must not depend on (or disturb) shared ones.
    try:
        zk = kazoo_client(cfg.zookeeper)
    except ThriftProbeError as err:
        return Check("zookeeper", False, str(err))
    try:
        zk.start(timeout=cfg.zookeeper.connect_timeout)
    except (KazooTimeoutError, KazooException) as err:
        return Check("zookeeper", False, "%s unreachable: %s" % (cfg.zookeeper.describe(), err))
    try:
        root = "/services/%s" % cfg.env
        stat = zk.exists(root)
        apps = len(zk.get_children(root)) if stat else 0
        return Check(
            "zookeeper",
            True,
            "%s reachable; %s %s"
            % (cfg.zookeeper.describe(), root, "holds %d appkeys" % apps if stat else "does not exist yet"),
        )
    except KazooException as err:
        return Check("zookeeper", False, "%s: %s" % (cfg.zookeeper.describe(), err))
    finally:
        zk.stop()
        zk.close()


def _redis(cfg: config_mod.Config) -> Check:
    try:
        with NodeSettingsStore(cfg.redis, cfg.env) as store:
            client = store._client
            client.ping()
            kind = client.type(hash_key(cfg.env))
            kind = kind.decode() if isinstance(kind, bytes) else kind
    except (ThriftProbeError, redis.RedisError, RedisClusterException) as err:
        return Check("redis", False, "%s unreachable: %s" % (cfg.redis.describe(), err))
    if kind not in ("hash", "none"):
        return Check("redis", False, "%s: key %s is a %s, not a hash" % (cfg.redis.describe(), hash_key(cfg.env), kind))
    return Check(
        "redis",
        True,
        "%s reachable; settings hash %s %s"
        % (cfg.redis.describe(), hash_key(cfg.env), "present" if kind == "hash" else "empty"),
    )


def _mysql(cfg: config_mod.Config) -> Check:
    try:
        missing = missing_schema(cfg.mysql)
    except ThriftProbeError as err:
        return Check("mysql", False, str(err))
    if missing:
        return Check(
            "mysql", False, "%s lacks %s: run 'thriftprobe db init'" % (cfg.mysql.describe(), ", ".join(missing))
        )
    return Check("mysql", True, "%s reachable; schema up to date" % cfg.mysql.describe())


def run_checks(path: Union[str, "os.PathLike[str]", None] = None, env: Optional[str] = None) -> List[Check]:
    """One Check per component; a config that does not load stops the rest."""
    try:
        cfg = config_mod.load(path, env)
    except ThriftProbeError as err:
        return [Check("config", False, str(err))]
    checks = [Check("config", True, "%s, env %s" % (cfg.path, cfg.env))]
    checks.append(_zookeeper(cfg))
    checks.append(_redis(cfg))
    checks.append(_mysql(cfg))
    return checks
