"""``thriftprobe doctor``: check that config, ZooKeeper, Redis and MySQL are usable."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Dict, List, Optional, Union

from .. import config as config_mod
from ..errors import ThriftProbeError
from ..registry import open_registry
from ..stores.mysql import missing_schema
from ..stores.settings import NodeSettingsStore

__all__ = ["Check", "run_checks"]


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str

    def to_dict(self) -> Dict[str, object]:
        return {"check": self.name, "ok": self.ok, "detail": self.detail}


def _zookeeper(cfg: config_mod.Config) -> Check:
    # Through the registry interface, as every wing reaches it (its own session in this process).
    try:
        with open_registry(cfg) as registry:
            apps = registry.appkeys(cfg.env)
    except ThriftProbeError as err:
        return Check("zookeeper", False, str(err))
    detail = "%s reachable; /services/%s holds %d appkeys" % (cfg.zookeeper.describe(), cfg.env, len(apps))
    return Check("zookeeper", True, detail)


def _redis(cfg: config_mod.Config) -> Check:
    try:
        with NodeSettingsStore(cfg.redis, cfg.env) as store:
            return Check("redis", True, store.check())
    except ThriftProbeError as err:
        return Check("redis", False, str(err))


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
