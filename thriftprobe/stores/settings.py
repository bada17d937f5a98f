"""Redis (standalone or Cluster): the persisted settings (weight, on/off) of each node.

Settings live in the hash ``thriftprobe_<env>``, one field per node
(``<appkey>|<env>|<service>|<ip>|<port>``), so an operator's weight or off switch survives a
provider restart. A ``NodeSettingsStore`` wraps one redis-py client, which is itself thread-safe
(a connection pool); share a store between threads freely, but create a new one after ``fork()``.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Dict, Iterator, Optional, Tuple, Union

import redis
from redis.backoff import NoBackoff
from redis.cluster import RedisCluster
from redis.exceptions import RedisClusterException
from redis.retry import Retry

from ..config import RedisConfig
from ..errors import BackendError, SettingsError
from ..node import DEFAULT_WEIGHT, Node, settings_field

__all__ = ["NodeSettingsStore", "hash_key", "redis_client"]

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


# Delete a node's settings field, and its seen stamp, only if the field still holds the value the
# caller read and the stamp still has the value it read (compared as numbers): a node that started (or was
# changed) meanwhile keeps both. KEYS[2] carries KEYS[1] as its hash tag, so both keys live in
# one slot and this runs on Redis Cluster too.
_CAS_DELETE_SCRIPT = """
local current = redis.call('HGET', KEYS[1], ARGV[1])
if current == false or current ~= ARGV[2] then return 0 end
if ARGV[4] == '1' then
  local seen = redis.call('HGET', KEYS[2], ARGV[1])
  if seen == false or tonumber(seen) ~= tonumber(ARGV[3]) then return -1 end
end
redis.call('HDEL', KEYS[1], ARGV[1])
redis.call('HDEL', KEYS[2], ARGV[1])
return 1
"""

# Stamp a node as seen now, by the clock of the Redis server that holds the stamps: every
# provider and every operator's prune compare stamps against that one clock, never their own.
_MARK_SEEN_SCRIPT = """
local now = redis.call('TIME')
redis.call('HSET', KEYS[1], ARGV[1], now[1])
return now[1]
"""

_SERVER_TIME_SCRIPT = """
local now = redis.call('TIME')
return now[1]
"""


def _glob_escape(text: str) -> str:
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)


def hash_key(env: str) -> str:
    return "thriftprobe_%s" % env


def seen_key(env: str) -> str:
    """The hash that keeps, per settings field, when its node was last seen running (unix time of
    the Redis server): the age ``thriftprobe node prune`` goes by. Its hash tag is the settings
    hash's name, so both share a Redis Cluster slot (prune removes from both at once)."""
    return "{%s}_seen" % hash_key(env)


def redis_client(cfg: RedisConfig) -> RedisClient:
    """A redis-py client for ``cfg`` (standalone or Cluster, TLS as configured); thread-safe (a
    connection pool). Raises BackendError when a Cluster cannot be reached."""
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
        return redis_client(cfg)

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

    def load_or_init(
        self, appkey: str, service: str, node: Node, recover: Optional[Callable[[], Optional[Node]]] = None
    ) -> Node:
        """Return ``node`` with its settings: the stored ones, or those ``recover()`` finds (the
        audit trail) when they carry a higher revision (Redis lost the field, or a failover
        promoted a replica that missed the latest change, while the node was down); the defaults
        (weight 10, valid 1, rev 0) when neither has any. What is returned is stored.

        Writes are compare-and-set (HSETNX for a missing field), so two starts racing, or a start
        racing an operator, never overwrite a newer setting. Corrupt stored settings raise
        SettingsError: falling back to defaults could switch an operator-disabled node back on.
        ``recover`` may raise; nothing is written then.
        """
        fieldname = settings_field(appkey, self._env, service, node.host, node.port)
        recorded = recover() if recover is not None else None
        for _ in range(_CAS_ATTEMPTS):
            try:
                raw = self._client.hget(self._key, fieldname)
            except _REDIS_ERRORS as err:
                raise BackendError("cannot read %s: %s" % (self._where(fieldname), err)) from err
            stored = self._parse(raw, fieldname)
            if stored is not None and (recorded is None or stored.rev >= recorded.rev):
                log.info(
                    "loaded settings for %s: weight %d, valid %d, rev %d",
                    fieldname, stored.weight, stored.valid, stored.rev,
                )
                return node.with_settings(stored.weight, stored.valid, stored.rev)
            first = recorded or Node(node.host, node.port, DEFAULT_WEIGHT, True)
            try:
                if raw is None:
                    written = self._client.hsetnx(self._key, fieldname, first.to_json())
                else:
                    written = self._client.eval(_CAS_SCRIPT, 1, self._key, fieldname, raw, first.to_json())
            except _REDIS_ERRORS as err:
                raise BackendError("cannot write %s: %s" % (self._where(fieldname), err)) from err
            if written:
                if recorded is None:
                    log.info("stored default settings for %s: weight %d, valid 1", fieldname, first.weight)
                else:  # a node removed by forget/prune, or settings Redis lost
                    log.log(
                        logging.INFO if stored is None else logging.WARNING,
                        "settings of %s taken from the audit trail (Redis had %s): weight %d, valid %d, rev %d",
                        fieldname,
                        "none" if stored is None else "rev %d" % stored.rev,
                        first.weight, first.valid, first.rev,
                    )
                return node.with_settings(first.weight, first.valid, first.rev)
            # Written by someone else between our read and our write: read theirs.
        raise BackendError("gave up loading %s after %d concurrent changes" % (self._where(fieldname), _CAS_ATTEMPTS))

    def _parse(self, raw: Union[bytes, str, None], fieldname: str) -> Optional[Node]:
        if raw is None:
            return None
        try:
            return Node.from_json(raw)  # type: ignore[arg-type]
        except ValueError as err:
            raise SettingsError("corrupt settings in %s: %s" % (self._where(fieldname), err)) from err

    def restore(self, appkey: str, service: str, live: Node) -> Node:
        """Keep the stored settings at least as new as the running node's: when the field is
        missing or holds a lower revision than ``live`` (Redis lost it: a failover with
        asynchronous replication, a restart without persistence, an eviction), write ``live``'s
        weight, valid flag and revision back, with compare-and-set. Returns the settings stored
        now: ``live``'s, or newer ones an operator wrote. Raises SettingsError (corrupt field,
        left alone) and BackendError.
        """
        fieldname = settings_field(appkey, self._env, service, live.host, live.port)
        wanted = Node(live.host, live.port, live.weight, live.valid, rev=live.rev)
        for _ in range(_CAS_ATTEMPTS):
            try:
                raw = self._client.hget(self._key, fieldname)
            except _REDIS_ERRORS as err:
                raise BackendError("cannot read %s: %s" % (self._where(fieldname), err)) from err
            stored: Optional[Node] = None
            if raw is not None:
                try:
                    stored = Node.from_json(raw)  # type: ignore[arg-type]
                except ValueError as err:
                    raise SettingsError("corrupt settings in %s: %s" % (self._where(fieldname), err)) from err
                if stored.rev >= live.rev:
                    return stored
            try:
                swapped = self._client.eval(_CAS_SCRIPT, 1, self._key, fieldname, raw or b"", wanted.to_json())
            except _REDIS_ERRORS as err:
                raise BackendError("cannot write %s: %s" % (self._where(fieldname), err)) from err
            if swapped:
                log.warning(
                    "settings of %s were %s in Redis; wrote back the running node's: weight %d, valid %d, rev %d",
                    fieldname,
                    "missing" if stored is None else "behind (rev %d)" % stored.rev,
                    live.weight,
                    live.valid,
                    live.rev,
                )
                return wanted
        raise BackendError("gave up restoring %s after %d concurrent changes" % (self._where(fieldname), _CAS_ATTEMPTS))

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
        recover: Optional[Callable[[], Optional[Node]]] = None,
    ) -> Tuple[Optional[Node], Node]:
        """Change a node's weight and/or valid flag with compare-and-set; return (old, new).

        The new settings carry the next revision. Concurrent updates never overwrite each other:
        a write that lost the race re-reads and applies its change on top of the winner's.
        ``live`` is the node as registered now, if it is: when it carries a higher revision than
        the stored settings (the field was lost or reset: a failover with asynchronous
        replication, a restart without persistence, an eviction, a hand edit), the change starts
        from it, so revisions never go backwards and the fields not changed keep their live
        values. ``old`` is then the live node's settings. For a node that is not live, the same
        holds for what ``recover()`` finds (the audit trail: Redis lost the field, or holds older
        settings, while the node is down). A node with none of these starts from the defaults
        (weight 10, valid 1) and ``old`` is None.
        """
        fieldname = settings_field(appkey, self._env, service, host, port)
        # The audit trail is asked once, only for a node that is not live (a live node's keeper
        # keeps Redis at least at its revision).
        recorded = recover() if recover is not None and live is None else None
        for _ in range(_CAS_ATTEMPTS):
            try:
                raw = self._client.hget(self._key, fieldname)
            except _REDIS_ERRORS as err:
                raise BackendError("cannot read %s: %s" % (self._where(fieldname), err)) from err
            old = self._parse(raw, fieldname)
            base_of_change = old
            for source, candidate in (("live node", live), ("audit trail", recorded)):
                if candidate is not None and (base_of_change is None or candidate.rev > base_of_change.rev):
                    log.warning(
                        "stored settings of %s (%s) are behind the %s (rev %d); the change starts from it",
                        fieldname,
                        "missing" if old is None else "rev %d" % old.rev,
                        source,
                        candidate.rev,
                    )
                    base_of_change = Node(host, port, candidate.weight, candidate.valid, rev=candidate.rev)
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

    def mark_seen(self, appkey: str, service: str, host: str, port: int, when: Optional[float] = None) -> float:
        """Record that the node runs now, by the Redis server's clock (or at ``when``, a time of
        that clock); return the stamp. Raises BackendError."""
        fieldname = settings_field(appkey, self._env, service, host, port)
        try:
            if when is not None:
                self._client.hset(self._seen_key, fieldname, int(when))
                return float(int(when))
            return float(self._client.eval(_MARK_SEEN_SCRIPT, 1, self._seen_key, fieldname))
        except _REDIS_ERRORS as err:
            raise BackendError("cannot record %s as seen in %s: %s" % (fieldname, self._cfg.describe(), err)) from err

    def server_time(self) -> float:
        """Now, by the clock of the Redis server that keeps the seen stamps. Raises BackendError."""
        try:
            return float(self._client.eval(_SERVER_TIME_SCRIPT, 1, self._seen_key))
        except _REDIS_ERRORS as err:
            raise BackendError("cannot read the time of %s: %s" % (self._cfg.describe(), err)) from err

    def last_seen(self, appkey: str, service: str, host: str, port: int) -> Optional[float]:
        """When the node was last seen running (unix time), or None if never recorded (a node
        of an SDK without the stamp, or settings written by hand). Raises BackendError."""
        raw = self._raw_seen(settings_field(appkey, self._env, service, host, port))
        try:
            return None if raw is None else float(raw)
        except ValueError:
            return None  # corrupt: treated as never seen, so its clock starts again

    def _raw_seen(self, fieldname: str) -> Optional[bytes]:
        try:
            raw: Optional[bytes] = self._client.hget(self._seen_key, fieldname)  # type: ignore[assignment]
        except _REDIS_ERRORS as err:
            raise BackendError(
                "cannot read when %s was seen in %s: %s" % (fieldname, self._cfg.describe(), err)
            ) from err
        return raw

    def remove(
        self, appkey: str, service: str, host: str, port: int, *, seen: Optional[float] = None
    ) -> Tuple[bool, Optional[Node]]:
        """Delete a node's stored settings and seen stamp; return (removed, what they were: None
        if corrupt). (False, None) when there was nothing stored.

        Compare-and-delete, like ``update``: a change landing meanwhile is re-read, never lost
        silently. With ``seen`` (the stamp the caller decided by, from ``last_seen``), nothing is
        removed, (False, settings) returned, if the node was stamped since: it started meanwhile.
        """
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
                done = self._client.eval(
                    _CAS_DELETE_SCRIPT,
                    2,
                    self._key,
                    self._seen_key,
                    fieldname,
                    raw,
                    "" if seen is None else repr(float(seen)),
                    "0" if seen is None else "1",
                )
            except _REDIS_ERRORS as err:
                raise BackendError("cannot remove %s: %s" % (self._where(fieldname), err)) from err
            if done == 1:
                log.info("removed the settings of %s", fieldname)
                return True, old
            if done == -1:
                log.info("kept the settings of %s: its node was seen running meanwhile", fieldname)
                return False, old
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
