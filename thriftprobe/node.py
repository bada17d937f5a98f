"""Node: one provider instance (host, port, weight, valid) and how it is written down.

The same JSON object ``{"host", "port", "weight", "valid"}`` lives in two places: the provider's
ephemeral znode ``/services/<env>/<appkey>/<service>_<ip>_<port>`` and the Redis hash
``thriftprobe_<env>``, field ``<appkey>|<env>|<service>|<ip>|<port>``. Extra keys (pid, start
time, SDK version...) ride along in ``extras`` and are preserved. Nodes are immutable and may be
shared between threads.

Traffic control keys a provider may declare ride in ``extras`` too, read through the properties
``version``, ``group``, ``tags``, ``priority``, ``warmup`` and ``start_time``. A node written
without them (by an older provider) reads as version ``""``, group ``""``, no tags, priority 0
and no warm-up; so does a node whose value is malformed (it is not refused: the rest of the node
is good), except a malformed priority, which reads as the last tier (100).

``rev`` is the settings revision: every operator change stores weight and valid with the next
revision, and a live znode is only ever overwritten by settings of a higher revision, so
concurrent writers (operators, a restarting provider) converge on the newest change. Data
written without it (by the original design) reads as revision 0.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field, replace
from typing import Any, Dict, Mapping, Optional, Tuple

from .errors import InvalidArgument

__all__ = [
    "DEFAULT_WEIGHT",
    "MAX_PRIORITY",
    "MAX_WARMUP",
    "MAX_WEIGHT",
    "Node",
    "parse_znode_name",
    "service_path",
    "settings_field",
    "validate_host",
    "validate_names",
    "validate_traffic",
]

DEFAULT_WEIGHT = 10
MAX_WEIGHT = 1000
MAX_PRIORITY = 100
MAX_WARMUP = 86400.0  # a day
MAX_TAGS = 32
_CORE_KEYS = ("host", "port", "weight", "valid")


@dataclass(frozen=True)
class Node:
    host: str
    port: int
    weight: int = DEFAULT_WEIGHT
    valid: bool = True
    extras: Mapping[str, Any] = field(default_factory=dict, compare=False)
    rev: int = 0

    @property
    def address(self) -> Tuple[str, int]:
        return (self.host, self.port)

    @property
    def available(self) -> bool:
        """True when the node may receive calls: switched on and with a positive weight."""
        return self.valid and self.weight > 0

    @property
    def version(self) -> str:
        value = self.extras.get("version", "")
        return value if isinstance(value, str) else ""

    @property
    def group(self) -> str:
        value = self.extras.get("group", "")
        return value if isinstance(value, str) else ""

    @property
    def tags(self) -> Mapping[str, str]:
        value = self.extras.get("tags")
        if not isinstance(value, dict):
            return {}
        return {k: v for k, v in value.items() if isinstance(k, str) and isinstance(v, str)}

    @property
    def priority(self) -> int:
        """The node's tier: 0 is the primary, 1 the first fallback, and so on. A value that is
        not an integer 0..100 reads as 100, the last tier: a node that says its tier wrongly
        is never taken for a primary."""
        value = self.extras.get("priority", 0)
        return value if _is_int(value) and 0 <= value <= MAX_PRIORITY else MAX_PRIORITY

    @property
    def warmup(self) -> float:
        """Seconds over which consumers ramp the node's weight up after ``start_time`` (0: none)."""
        value = self.extras.get("warmup", 0)
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 <= value <= MAX_WARMUP:
            return 0.0
        return float(value)

    @property
    def start_time(self) -> Optional[float]:
        """When the provider started serving (``time.time()`` seconds), if it said."""
        value = self.extras.get("start_time")
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
            return None
        return float(value)

    def znode_name(self, service: str) -> str:
        return "%s_%s_%d" % (service, self.host, self.port)

    def with_settings(self, weight: int, valid: bool, rev: int) -> "Node":
        return replace(self, weight=weight, valid=valid, rev=rev)

    def to_dict(self) -> Dict[str, Any]:
        data: Dict[str, Any] = dict(self.extras)
        data.update(host=self.host, port=self.port, weight=self.weight, valid=1 if self.valid else 0)
        if self.rev:
            data["rev"] = self.rev
        return data

    def to_json(self) -> bytes:
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":")).encode("utf-8")

    @classmethod
    def from_json(cls, raw: bytes) -> "Node":
        """Decode a znode or Redis value. Raises ValueError on anything but a well-formed node."""
        try:
            # Python's json reads NaN, Infinity and 1e400 (inf): no JSON, and no JSON after them
            # either (an operator's tool would serve them on as invalid JSON).
            data = json.loads(raw, parse_constant=_reject_constant, parse_float=_finite_float)
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ValueError("not JSON: %s" % err) from err
        except (RecursionError, ValueError) as err:  # nested too deep; an integer of 10,000 digits
            raise ValueError("not a node: %s" % err) from None
        if not isinstance(data, dict):
            raise ValueError("not a JSON object: %r" % (data,))  # noqa: TRY004 - callers catch ValueError for any bad data
        return cls.from_dict(data)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Node":
        missing = [k for k in _CORE_KEYS if k not in data]
        if missing:
            raise ValueError("missing keys %s in %r" % (", ".join(missing), dict(data)))
        host, port, weight, valid = (data[k] for k in _CORE_KEYS)
        if not isinstance(host, str) or not host:
            raise ValueError("host must be a non-empty string, got %r" % (host,))
        if not _is_int(port) or not 0 < port < 65536:
            raise ValueError("port must be an integer 1..65535, got %r" % (port,))
        if not _is_int(weight) or not 0 <= weight <= MAX_WEIGHT:
            raise ValueError("weight must be an integer 0..%d, got %r" % (MAX_WEIGHT, weight))
        if valid not in (0, 1):  # also accepts True/False
            raise ValueError("valid must be 0 or 1, got %r" % (valid,))
        rev = data.get("rev", 0)
        if not _is_int(rev) or rev < 0:
            raise ValueError("rev must be an integer >= 0, got %r" % (rev,))
        extras = {k: v for k, v in data.items() if k not in _CORE_KEYS and k != "rev"}
        return cls(host=host, port=int(port), weight=int(weight), valid=bool(valid), extras=extras, rev=rev)


def _reject_constant(name: str) -> Any:
    raise ValueError("not JSON: %s is not a JSON value" % name)


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError("not JSON: %s is out of a double's range" % text)
    return value


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def parse_znode_name(name: str) -> Optional[Tuple[str, str, int]]:
    """Split ``<service>_<ip>_<port>`` into its parts, or None if the name is not of that form.

    Splitting from the right keeps service names that contain underscores intact, so service
    ``calc`` never picks up the nodes of service ``calc_v2``.
    """
    parts = name.rsplit("_", 2)
    if len(parts) != 3 or not parts[0] or not parts[1] or not _PORT_RE.fullmatch(parts[2]):
        return None
    return parts[0], parts[1], int(parts[2])


def settings_field(appkey: str, env: str, service: str, host: str, port: int) -> str:
    """The Redis hash field that keeps one node's settings."""
    return "%s|%s|%s|%s|%d" % (appkey, env, service, host, port)


def service_path(env: str, appkey: str) -> str:
    """The ZooKeeper folder that holds the nodes of every service of one appkey."""
    return "/services/%s/%s" % (env, appkey)


# Matched with fullmatch: with re.match, "$" also matches before a final newline.
_SERVICE_RE = re.compile(r"\w+")
_APPKEY_RE = re.compile(r"[\w.\-]+")
_PORT_RE = re.compile(r"[0-9]{1,5}")  # ASCII digits only: str.isdigit() also accepts "²" and "９"
# A host name (253 characters at most, DNS's limit) or an IPv4/IPv6 address: no '_' (it splits
# znode names), no '|' or '/' (Redis field, znode path), no whitespace or control characters.
_HOST_RE = re.compile(r"[^\s_|/\x00-\x1f\x7f]{1,253}")


MAX_NAME = 128  # the width of the appkey and service columns in MySQL


def validate_names(appkey: object, service: object) -> None:
    """Raise InvalidArgument unless both names are safe to use in znode paths and Redis fields.

    A service name is ``^\\w+$``; an appkey is a non-empty string of word characters, dots and
    dashes (no ``/`` or ``|``, which would break the path and the Redis field), and not ``.`` or
    ``..`` (path components). Both are at most 128 characters (their MySQL columns).
    """
    if not isinstance(service, str) or not _SERVICE_RE.fullmatch(service) or len(service) > MAX_NAME:
        raise InvalidArgument(
            "service_name %r is invalid: it must be 1 to %d letters, digits and underscores" % (service, MAX_NAME)
        )
    validate_appkey(appkey)


def validate_appkey(appkey: object) -> str:
    """Return ``appkey`` if it is a valid appkey (see ``validate_names``); raise InvalidArgument."""
    if (
        not isinstance(appkey, str)
        or not _APPKEY_RE.fullmatch(appkey)
        or appkey in (".", "..")
        or len(appkey) > MAX_NAME
    ):
        raise InvalidArgument(
            "appkey %r is invalid: it must be 1 to %d letters, digits, '_', '.' and '-', and not '.' or '..'"
            % (appkey, MAX_NAME)
        )
    return appkey


def validate_host(host: object) -> str:
    """Return ``host`` if it can name a node in znode names and Redis fields; raise InvalidArgument."""
    if not isinstance(host, str) or not _HOST_RE.fullmatch(host):
        raise InvalidArgument(
            "host %r is invalid: it must be 1..253 characters, without '_', '|', '/', spaces or control characters"
            % (host,)
        )
    return host


_LABEL_RE = re.compile(r"[\w.\-+]{0,64}")  # versions and groups: "", "1.4.2", "2.0.0-rc1+b7", "blue"
_TAG_KEY_RE = re.compile(r"\w{1,64}")
_TAG_VALUE_RE = re.compile(r"[^\x00-\x1f\x7f]{0,128}")


def validate_traffic(
    version: object, group: object, tags: object, priority: object, warmup: object
) -> Dict[str, Any]:
    """The traffic-control keys a provider declares, checked, as the extras to write; raise
    InvalidArgument on a malformed one. A provider declares exact values (no ``*``)."""
    if not isinstance(version, str) or not _LABEL_RE.fullmatch(version):
        raise InvalidArgument(
            "version %r is invalid: it must be at most 64 letters, digits, '.', '-', '+' and '_'" % (version,)
        )
    if not isinstance(group, str) or not _LABEL_RE.fullmatch(group):
        raise InvalidArgument(
            "group %r is invalid: it must be at most 64 letters, digits, '.', '-', '+' and '_'" % (group,)
        )
    if tags is None:
        tags = {}
    if not isinstance(tags, Mapping) or len(tags) > MAX_TAGS:
        raise InvalidArgument("tags must be a mapping of at most %d names to values, got %r" % (MAX_TAGS, tags))
    for key, value in tags.items():
        if not isinstance(key, str) or not _TAG_KEY_RE.fullmatch(key):
            raise InvalidArgument("tag name %r is invalid: it must be 1 to 64 letters, digits and '_'" % (key,))
        if not isinstance(value, str) or not _TAG_VALUE_RE.fullmatch(value) or value == "*":
            raise InvalidArgument(
                "tag %s=%r is invalid: the value must be a string of at most 128 characters, no control "
                "characters, and not '*'" % (key, value)
            )
    if not isinstance(priority, int) or isinstance(priority, bool) or not 0 <= priority <= MAX_PRIORITY:
        raise InvalidArgument("priority must be an integer 0..%d (0 = primary), got %r" % (MAX_PRIORITY, priority))
    if (
        not isinstance(warmup, (int, float)) or isinstance(warmup, bool) or not math.isfinite(warmup)
        or not 0 <= warmup <= MAX_WARMUP
    ):
        raise InvalidArgument("warmup must be 0..%d seconds, got %r" % (MAX_WARMUP, warmup))
    found: Dict[str, Any] = {"priority": priority, "warmup": warmup}
    if version:
        found["version"] = version
    if group:
        found["group"] = group
    if tags:
        found["tags"] = dict(tags)
    return found
