"""Redis (standalone or Cluster): the persisted settings (weight, on/off) of each node.

Settings live in the hash ``thriftprobe_<env>``, one field per node
(``<appkey>|<env>|<service>|<ip>|<port>``), so an operator's weight or off switch survives a
provider restart. A ``NodeSettingsStore`` wraps one redis-py client, which is itself thread-safe
(a connection pool); share a store between threads freely, but create a new one after ``fork()``.
"""

from __future__ import annotations

import logging
from typing import Optional, Union

import redis
from redis.cluster import RedisCluster

from .config import RedisConfig
from .errors import BackendError, SettingsError
from .node import DEFAULT_WEIGHT, Node, settings_field

__all__ = ["NodeSettingsStore", "hash_key"]

log = logging.getLogger(__name__)

RedisClient = Union[redis.Redis, RedisCluster]


def hash_key(env: str) -> str:
    return "thriftprobe_%s" % env


class NodeSettingsStore:
    """Load, initialise and save node settings in one environment's Redis hash."""

    def __init__(self, cfg: RedisConfig, env: str) -> None:
        self._cfg = cfg
        self._env = env
        self._key = hash_key(env)
        self._client = self._make_client(cfg)

    @staticmethod
    def _make_client(cfg: RedisConfig) -> RedisClient:
        common = dict(
            password=cfg.password,
            socket_timeout=cfg.socket_timeout,
            socket_connect_timeout=cfg.socket_timeout,
        )
        try:
            if cfg.cluster:
                return RedisCluster(host=cfg.host, port=cfg.port, **common)  # type: ignore[arg-type]
            return redis.Redis(host=cfg.host, port=cfg.port, **common)  # type: ignore[arg-type]
        except redis.RedisError as err:  # RedisCluster contacts the cluster in its constructor
            raise BackendError("cannot connect to %s: %s" % (cfg.describe(), err)) from err

    def _where(self, fieldname: str) -> str:
        return "field %r of hash %s in %s" % (fieldname, self._key, self._cfg.describe())

    def get(self, appkey: str, service: str, host: str, port: int) -> Optional[Node]:
        """The stored settings of a node, or None if it has none. Raises SettingsError if corrupt."""
        fieldname = settings_field(appkey, self._env, service, host, port)
        try:
            raw = self._client.hget(self._key, fieldname)
        except redis.RedisError as err:
            raise BackendError("cannot read %s: %s" % (self._where(fieldname), err)) from err
        if raw is None:
            return None
        try:
            return Node.from_json(raw)  # type: ignore[arg-type]
        except ValueError as err:
            raise SettingsError("corrupt settings in %s: %s" % (self._where(fieldname), err)) from err

    def load_or_init(self, appkey: str, service: str, node: Node) -> Node:
        """Return ``node`` with its stored weight and valid flag, storing defaults if it has none.

        The defaults (weight 10, valid 1) are written with HSETNX, so two starts racing never
        overwrite an operator's setting. Corrupt stored settings raise SettingsError: falling back
        to defaults could switch an operator-disabled node back on.
        """
        fieldname = settings_field(appkey, self._env, service, node.host, node.port)
        defaults = Node(node.host, node.port, DEFAULT_WEIGHT, True)
        try:
            created = self._client.hsetnx(self._key, fieldname, defaults.to_json())
        except redis.RedisError as err:
            raise BackendError("cannot write %s: %s" % (self._where(fieldname), err)) from err
        if created:
            log.info("stored default settings for %s: weight %d, valid 1", fieldname, DEFAULT_WEIGHT)
            return node.with_settings(DEFAULT_WEIGHT, True)
        stored = self.get(appkey, service, node.host, node.port)
        if stored is None:  # deleted between HSETNX and HGET: an operator reset it; start again
            return self.load_or_init(appkey, service, node)
        log.info("loaded settings for %s: weight %d, valid %d", fieldname, stored.weight, stored.valid)
        return node.with_settings(stored.weight, stored.valid)

    def put(self, appkey: str, service: str, node: Node) -> None:
        """Store a node's settings (host, port, weight, valid), replacing what was there."""
        fieldname = settings_field(appkey, self._env, service, node.host, node.port)
        core = Node(node.host, node.port, node.weight, node.valid)
        try:
            self._client.hset(self._key, fieldname, core.to_json())
        except redis.RedisError as err:
            raise BackendError("cannot write %s: %s" % (self._where(fieldname), err)) from err

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> "NodeSettingsStore":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
