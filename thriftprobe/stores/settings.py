"""Redis (standalone or Cluster): the persisted settings (weight, on/off) of each node.

Settings live in the hash ``thriftprobe_<env>``, one field per node
(``<appkey>|<env>|<service>|<ip>|<port>``), so an operator's weight or off switch survives a
provider restart. A ``NodeSettingsStore`` wraps one redis-py client, which is itself thread-safe
(a connection pool); share a store between threads freely, but create a new one after ``fork()``.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Dict, Iterator, Optional, Tuple, Union

import redis
from redis.backoff import NoBackoff
from redis.cluster import RedisCluster
from redis.exceptions import RedisClusterException
from redis.retry import Retry

from ..config import RedisConfig
from ..errors import BackendError, SettingsError
from ..node import DEFAULT_WEIGHT, Node, settings_field

__all__ = ["NodeSettingsStore", "hash_key"]

log = logging.getLogger(__name__)

RedisClient = Union[redis.Redis, RedisCluster]

# RedisClusterException (no node of the cluster answers) is not a RedisError.
_REDIS_ERRORS = (redis.RedisError, RedisClusterException)

_CAS_ATTEMPTS = 50
# Replace a hash field only if it still holds the value the caller read ('' = absent). One key,
# so it runs on Redis Cluster too.
_CAS_SCRIPT = """
local current = redis.call('HGET', KEYS[1], ARGV[1])
if current == false then current = '' end
if current ~= ARGV[2] then return 0 end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[3])
return 1
"""


# Delete a hash field only if it still holds the value the caller read.
_CAS_DELETE_SCRIPT = """
local current = redis.call('HGET', KEYS[1], ARGV[1])
if current == false or current ~= ARGV[2] then return 0 end
redis.call('HDEL', KEYS[1], ARGV[1])
return 1
"""


def _glob_escape(text: str) -> str:
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)


def hash_key(env: str) -> str:
    return "thriftprobe_%s" % env


def seen_key(env: str) -> str:
    """The hash that keeps, per settings field, when its node was last seen running (unix time):
    the age ``thriftprobe node prune`` goes by."""
    return "thriftprobe_%s_seen" % env


class NodeSettingsStore:
    """Load, initialise and save node settings in one environment's Redis hash."""

    def __init__(self, cfg: RedisConfig, env: str) -> None:
        self._cfg = cfg
        self._env = env
        self._key = hash_key(env)
        self._seen_key = seen_key(env)
        self._client = self._make_client(cfg)

    @staticmethod
    def _make_client(cfg: RedisConfig) -> RedisClient:
        common: Dict[str, Any] = {
            "password": cfg.password,
            "socket_timeout": cfg.socket_timeout,
            "socket_connect_timeout": cfg.socket_timeout,
            # One immediate retry (a dropped idle connection), not redis-py's default of three
            # with backoff: that made a Redis that is down take 4-15 s to report at start.
            "retry": Retry(NoBackoff(), 1),
        }
        if cfg.tls.enabled:  # like rediss://; redis-py never falls back to plaintext
            common.update(
                ssl=True,
                ssl_cert_reqs="required" if cfg.tls.verify_cert else "none",
                ssl_check_hostname=cfg.tls.check_hostname,
                ssl_ca_certs=cfg.tls.ca,
                ssl_certfile=cfg.tls.cert,
                ssl_keyfile=cfg.tls.key,
                ssl_password=cfg.tls.key_password,
            )
        try:
            if cfg.cluster:
                return RedisCluster(host=cfg.host, port=cfg.port, **common)
            return redis.Redis(host=cfg.host, port=cfg.port, **common)
        except _REDIS_ERRORS as err:  # RedisCluster contacts the cluster in its constructor
            raise BackendError("cannot connect to %s: %s" % (cfg.describe(), err)) from err

    def _where(self, fieldname: str) -> str:
        return "field %r of hash %s in %s" % (fieldname, self._key, self._cfg.describe())

    def get(self, appkey: str, service: str, host: str, port: int) -> Optional[Node]:
        """The stored settings of a node, or None if it has none. Raises SettingsError if corrupt."""
        fieldname = settings_field(appkey, self._env, service, host, port)
        try:
            raw = self._client.hget(self._key, fieldname)
        except _REDIS_ERRORS as err:
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
        except _REDIS_ERRORS as err:
            raise BackendError("cannot write %s: %s" % (self._where(fieldname), err)) from err
        if created:
            log.info("stored default settings for %s: weight %d, valid 1", fieldname, DEFAULT_WEIGHT)
            return node.with_settings(DEFAULT_WEIGHT, True, 0)
        stored = self.get(appkey, service, node.host, node.port)
        if stored is None:  # deleted between HSETNX and HGET: an operator reset it; start again
            return self.load_or_init(appkey, service, node)
        log.info("loaded settings for %s: weight %d, valid %d", fieldname, stored.weight, stored.valid)
        return node.with_settings(stored.weight, stored.valid, stored.rev)

    def update(
        self,
        appkey: str,
        service: str,
        host: str,
        port: int,
        weight: Optional[int],
        valid: Optional[bool],
        *,
        live: Optional[Node] = None,
    ) -> Tuple[Optional[Node], Node]:
        """Change a node's weight and/or valid flag with compare-and-set; return (old, new).

        The new settings carry the next revision. Concurrent updates never overwrite each other:
        a write that lost the race re-reads and applies its change on top of the winner's.
        ``live`` is the node as registered now, if it is: when it carries a higher revision than
        the stored settings (the field was lost or reset: a failover with asynchronous
        replication, a restart without persistence, an eviction, a hand edit), the change starts
        from it, so revisions never go backwards and the fields not changed keep their live
        values. ``old`` is then the live node's settings. A node with neither starts from the
        defaults (weight 10, valid 1) and ``old`` is None.
        """
        fieldname = settings_field(appkey, self._env, service, host, port)
        for _ in range(_CAS_ATTEMPTS):
            try:
                raw = self._client.hget(self._key, fieldname)
            except _REDIS_ERRORS as err:
                raise BackendError("cannot read %s: %s" % (self._where(fieldname), err)) from err
            old = None
            if raw is not None:
                try:
                    old = Node.from_json(raw)  # type: ignore[arg-type]
                except ValueError as err:
                    raise SettingsError("corrupt settings in %s: %s" % (self._where(fieldname), err)) from err
            if live is not None and (old is None or live.rev > old.rev):
                log.warning(
                    "stored settings of %s (%s) are behind the live node (rev %d); the change starts from it",
                    fieldname,
                    "missing" if old is None else "rev %d" % old.rev,
                    live.rev,
                )
                base_of_change: Optional[Node] = Node(host, port, live.weight, live.valid, rev=live.rev)
            else:
                base_of_change = old
            base = base_of_change or Node(host, port)
            new = Node(
                host,
                port,
                base.weight if weight is None else weight,
                base.valid if valid is None else valid,
                rev=base.rev + 1,
            )
            try:
                swapped = self._client.eval(_CAS_SCRIPT, 1, self._key, fieldname, raw or b"", new.to_json())
            except _REDIS_ERRORS as err:
                raise BackendError("cannot write %s: %s" % (self._where(fieldname), err)) from err
            if swapped:
                return base_of_change, new
            log.debug("concurrent change of %s; retrying", fieldname)
        raise BackendError("gave up changing %s after %d concurrent changes" % (self._where(fieldname), _CAS_ATTEMPTS))

    def mark_seen(self, appkey: str, service: str, host: str, port: int, when: Optional[float] = None) -> None:
        """Record that the node runs now (or at ``when``). Raises BackendError."""
        fieldname = settings_field(appkey, self._env, service, host, port)
        try:
            self._client.hset(self._seen_key, fieldname, int(time.time() if when is None else when))
        except _REDIS_ERRORS as err:
            raise BackendError("cannot record %s as seen in %s: %s" % (fieldname, self._cfg.describe(), err)) from err

    def last_seen(self, appkey: str, service: str, host: str, port: int) -> Optional[float]:
        """When the node was last seen running (unix time), or None if never recorded (a node
        of an SDK without the stamp, or settings written by hand). Raises BackendError."""
        fieldname = settings_field(appkey, self._env, service, host, port)
        try:
            raw = self._client.hget(self._seen_key, fieldname)
        except _REDIS_ERRORS as err:
            raise BackendError(
                "cannot read when %s was seen in %s: %s" % (fieldname, self._cfg.describe(), err)
            ) from err
        try:
            return None if raw is None else float(raw)
        except ValueError:
            return None  # corrupt: treated as never seen, so its clock starts again

    def remove(self, appkey: str, service: str, host: str, port: int) -> Tuple[bool, Optional[Node]]:
        """Delete a node's stored settings; return (removed, what they were: None if corrupt).

        Compare-and-delete, like ``update``: a change landing meanwhile is re-read, never lost
        silently. (False, None) when there was nothing stored."""
        fieldname = settings_field(appkey, self._env, service, host, port)
        for _ in range(_CAS_ATTEMPTS):
            try:
                raw = self._client.hget(self._key, fieldname)
                if raw is None:
                    return False, None
                try:
                    old: Optional[Node] = Node.from_json(raw)  # type: ignore[arg-type]
                except ValueError:
                    old = None  # corrupt settings may be forgotten too
                if self._client.eval(_CAS_DELETE_SCRIPT, 1, self._key, fieldname, raw):
                    log.info("removed the settings of %s", fieldname)
                    self._client.hdel(self._seen_key, fieldname)
                    return True, old
            except _REDIS_ERRORS as err:
                raise BackendError("cannot remove %s: %s" % (self._where(fieldname), err)) from err
            log.debug("concurrent change of %s; retrying", fieldname)
        raise BackendError("gave up removing %s after %d concurrent changes" % (self._where(fieldname), _CAS_ATTEMPTS))

    def scan(self, appkey: Optional[str] = None) -> Iterator[Tuple[str, str, Node]]:
        """Yield (appkey, service, settings) for every stored node of this env (or of one appkey).

        Corrupt entries are logged and skipped."""
        pattern = "%s|%s|*" % (_glob_escape(appkey), self._env) if appkey else "*"
        try:
            for fieldname, raw in self._client.hscan_iter(self._key, match=pattern, count=500):
                name = fieldname.decode() if isinstance(fieldname, bytes) else fieldname
                parts = name.split("|")
                if len(parts) != 5 or parts[1] != self._env:
                    continue
                try:
                    yield parts[0], parts[2], Node.from_json(raw)
                except ValueError as err:
                    log.warning("skipping corrupt settings in %s: %s", self._where(name), err)
        except _REDIS_ERRORS as err:
            raise BackendError("cannot scan hash %s in %s: %s" % (self._key, self._cfg.describe(), err)) from err

    def check(self) -> str:
        """One line on the store's health, for ``thriftprobe doctor``. Raises BackendError when
        Redis cannot be reached, SettingsError when the env's key holds something else than a hash."""
        try:
            self._client.ping()
            kind = self._client.type(self._key)
        except _REDIS_ERRORS as err:
            raise BackendError("%s unreachable: %s" % (self._cfg.describe(), err)) from err
        kind = kind.decode() if isinstance(kind, bytes) else kind
        if kind not in ("hash", "none"):
            raise SettingsError("%s: key %s is a %s, not a hash" % (self._cfg.describe(), self._key, kind))
        return "%s reachable; settings hash %s %s" % (
            self._cfg.describe(), self._key, "present" if kind == "hash" else "empty",
        )

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> "NodeSettingsStore":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
