"""Redis (standalone or Cluster): the record of each service's request limits.

One hash per environment, ``{thriftprobe_<env>}_limits``, one field per service
(``<appkey>|<env>|<service>``), holding the service's limits as JSON with a revision (see
``thriftprobe.limits``). The braces make the settings hash's name the key's Redis Cluster hash
tag, so every key of an environment lives in one slot. Changes are compare-and-set: a Lua script
replaces the field only if it still holds what the writer read, so two operators never lose each
other's change; each stored change takes the next revision.

A corrupt record (a hand edit, a bad restore) is never read as "no limits": ``load`` raises
SettingsError naming the repair (``thriftprobe limit set/clear/reset``), and ``read`` returns it
as it is, so that a repair can replace exactly those bytes (``replace``).

A ``LimitsStore`` wraps one redis-py client, itself thread-safe (a connection pool): share a
store between threads freely, but create a new one after ``fork()``.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Iterator, Optional, Tuple, Union

from ..config import RedisConfig
from ..errors import BackendError, ConcurrentChange, InvalidArgument, SettingsError
from ..limits import MethodLimit, ServiceLimits, check_method, limits_field
from .settings import _REDIS_ERRORS, _glob_escape, hash_key, redis_client

__all__ = ["LimitsRecord", "LimitsStore", "limits_key", "repair_hint"]

log = logging.getLogger(__name__)

# Replace the field only if it still holds the value the caller read ('' = absent): the stored
# revision is then the one the change was made on. Returns {1, new} or {0, what is there now}.
_CAS_SCRIPT = """
local current = redis.call('HGET', KEYS[1], ARGV[1])
if current == false then current = '' end
if current ~= ARGV[2] then return {0, current} end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[3])
return {1, ARGV[3]}
"""


def limits_key(env: str) -> str:
    """The Redis hash that keeps the limits of every service of ``env``."""
    return "{%s}_limits" % hash_key(env)


def repair_hint(appkey: str, service: str) -> str:
    """What an operator runs to replace a corrupt record of ``appkey``/``service``."""
    return (
        "repair it with 'thriftprobe limit reset %s %s' (drops every limit of the service) or "
        "'thriftprobe limit set/clear %s %s METHOD ...' (replaces the record with what the providers were "
        "pushed, changed)" % (appkey, service, appkey, service)
    )


@dataclass(frozen=True)
class LimitsRecord:
    """A service's record as it is in Redis: ``raw`` (None: absent) and ``limits`` decoded from it
    (None when corrupt; then ``problem`` says why). Immutable."""

    raw: Optional[bytes]
    limits: Optional[ServiceLimits]
    problem: Optional[str] = None

    @property
    def corrupt(self) -> bool:
        return self.limits is None

    @property
    def rev(self) -> int:
        """The record's revision; for a corrupt record, the ``rev`` it carries if one can be
        read at all (a repair writes above it), else 0."""
        if self.limits is not None:
            return self.limits.rev
        try:
            rev = json.loads(self.raw or b"").get("rev")
        except (ValueError, AttributeError, RecursionError):
            return 0
        return rev if isinstance(rev, int) and not isinstance(rev, bool) and rev > 0 else 0


class LimitsStore:
    """Load and change services' limits in one environment's Redis hash. Thread-safe."""

    def __init__(self, cfg: RedisConfig, env: str) -> None:
        self._cfg = cfg
        self._env = env
        self._key = limits_key(env)
        self._client = redis_client(cfg)

    def _where(self, fieldname: str) -> str:
        return "field %r of hash %s in %s" % (fieldname, self._key, self._cfg.describe())

    def _read(self, fieldname: str) -> Optional[bytes]:
        try:
            raw: Optional[bytes] = self._client.hget(self._key, fieldname)  # type: ignore[assignment]
        except _REDIS_ERRORS as err:
            raise BackendError("cannot read %s: %s" % (self._where(fieldname), err)) from err
        return raw

    def _parse(self, raw: Union[bytes, str, None], fieldname: str) -> ServiceLimits:
        if raw is None or raw in (b"", ""):
            return ServiceLimits()
        try:
            return ServiceLimits.from_json(raw.encode() if isinstance(raw, str) else raw)
        except InvalidArgument as err:
            parts = fieldname.split("|")
            appkey, service = parts[0], parts[-1]
            raise SettingsError(
                "corrupt limits in %s: %s; %s" % (self._where(fieldname), err, repair_hint(appkey, service))
            ) from err

    def read(self, appkey: str, service: str) -> LimitsRecord:
        """The service's record as it is, corrupt or not (``LimitsRecord``). Raises BackendError."""
        fieldname = limits_field(appkey, self._env, service)
        raw = self._read(fieldname)
        try:
            return LimitsRecord(raw, self._parse(raw, fieldname))
        except SettingsError as err:
            return LimitsRecord(raw, None, str(err))

    def replace(self, appkey: str, service: str, expected: LimitsRecord, new: ServiceLimits) -> ServiceLimits:
        """Write ``new`` as the service's record, only if the record still holds exactly
        ``expected.raw`` (compare-and-set against those bytes, corrupt or not), and return it.
        The caller chooses ``new.rev`` (above the record's and the pushed revisions). Raises
        ConcurrentChange (the record changed: nothing written), InvalidArgument (``new.rev`` not
        above ``expected.rev``), BackendError."""
        fieldname = limits_field(appkey, self._env, service)
        if new.rev <= expected.rev:
            raise InvalidArgument("the new limits' rev %d must be above the record's %d" % (new.rev, expected.rev))
        try:
            done, _ = self._client.eval(_CAS_SCRIPT, 1, self._key, fieldname, expected.raw or b"", new.to_json())
        except _REDIS_ERRORS as err:
            raise BackendError("cannot write %s: %s" % (self._where(fieldname), err)) from err
        if not int(done):
            raise ConcurrentChange("the limits in %s changed while being replaced" % self._where(fieldname))
        log.info("replaced the limits of %s/%s/%s%s: rev %d", appkey, self._env, service,
                 " (a corrupt record)" if expected.corrupt else "", new.rev)
        return new

    def load(self, appkey: str, service: str) -> ServiceLimits:
        """The service's stored limits; no limits at revision 0 when none were ever set.
        Raises SettingsError (corrupt: never read as "no limits") and BackendError."""
        fieldname = limits_field(appkey, self._env, service)
        return self._parse(self._read(fieldname), fieldname)

    def update(
        self,
        appkey: str,
        service: str,
        method: str,
        limit: Optional[MethodLimit],
        expected_rev: int,
        *,
        base: Optional[ServiceLimits] = None,
    ) -> ServiceLimits:
        """Replace ``method``'s limits (None or an empty limit: remove them) and return the
        service's limits as now stored, at revision ``expected_rev + 1``.

        ``base`` is what the providers were last pushed, if known: when it carries a higher
        revision than the record (Redis lost the field: a failover with asynchronous
        replication, a restart without persistence), the change starts from it, at
        ``base.rev + 1``, or running providers would ignore it as older than what they hold.

        Compare-and-set: raises ConcurrentChange when the stored revision is not
        ``expected_rev``, or changes while this writes (nothing is written then: read again and
        retry). Raises InvalidArgument (bad method), SettingsError (corrupt stored limits, left
        alone) and BackendError.
        """
        check_method(method)
        fieldname = limits_field(appkey, self._env, service)
        raw = self._read(fieldname)
        current = self._parse(raw, fieldname)
        if current.rev != expected_rev:
            raise ConcurrentChange(
                "the limits in %s are at rev %d, not %d: changed meanwhile" % (self._where(fieldname), current.rev,
                                                                               expected_rev)
            )
        start = current
        if base is not None and base.rev > current.rev:
            log.warning("stored limits of %s (rev %d) are behind the pushed ones (rev %d); the change starts "
                        "from those", fieldname, current.rev, base.rev)
            start = base
        new = start.with_method(method, limit, start.rev + 1)
        try:
            done, now = self._client.eval(_CAS_SCRIPT, 1, self._key, fieldname, raw or b"", new.to_json())
        except _REDIS_ERRORS as err:
            raise BackendError("cannot write %s: %s" % (self._where(fieldname), err)) from err
        if not int(done):
            raise ConcurrentChange("the limits in %s changed while being written" % self._where(fieldname))
        stored = self._parse(now, fieldname)
        log.info("stored limits of %s/%s/%s: rev %d", appkey, self._env, service, stored.rev)
        return stored

    def scan(self, appkey: Optional[str] = None) -> Iterator[Tuple[str, str, Optional[ServiceLimits], Optional[str]]]:
        """Yield (appkey, service, limits, problem) for every service of this env (or of one
        appkey) with stored limits; a corrupt entry comes with limits None and ``problem`` saying
        why (shown, not skipped: an operator must see it). Raises BackendError."""
        pattern = "%s|%s|*" % (_glob_escape(appkey), _glob_escape(self._env)) if appkey else "*"
        try:
            for name, raw in self._client.hscan_iter(self._key, match=pattern, count=500):
                fieldname = name.decode() if isinstance(name, bytes) else name
                parts = fieldname.split("|")
                if len(parts) != 3 or parts[1] != self._env:
                    continue
                try:
                    yield parts[0], parts[2], self._parse(raw, fieldname), None
                except SettingsError as err:
                    log.warning("%s", err)
                    yield parts[0], parts[2], None, str(err)
        except _REDIS_ERRORS as err:
            raise BackendError("cannot scan hash %s in %s: %s" % (self._key, self._cfg.describe(), err)) from err

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> "LimitsStore":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
