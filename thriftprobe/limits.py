"""Request limits: what operators allow one provider node of a service to take, and how it is
written down.

A service's limits are one JSON object, stored in the Redis hash ``{thriftprobe_<env>}_limits``
under the field ``<appkey>|<env>|<service>`` (the record, changed by compare-and-set and audited
like weights) and pushed to running providers through ZooKeeper::

    {"rev": 3, "methods": {"*": {"concurrency": 64}, "add": {"qps": 200, "burst": 20}}}

``methods`` maps a method name, or ``"*"`` for the service as a whole (every method together),
to that method's limits: ``qps`` (a token bucket refilled at that many requests per second,
holding at most ``burst`` tokens) and ``concurrency`` (requests admitted and not yet answered).
A request must pass both its method's limits and the service's ``"*"`` limits. Every limit is
**per provider node**: a service of N nodes takes N times the limit in all.

Values are immutable and may be shared between threads.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any, Dict, Mapping, Optional

from .errors import InvalidArgument

__all__ = [
    "ALL_METHODS",
    "MAX_CONCURRENCY",
    "MAX_QPS",
    "MethodLimit",
    "ServiceLimits",
    "default_burst",
    "limits_field",
    "plain_number",
]

ALL_METHODS = "*"
MAX_QPS = 1_000_000.0
MAX_CONCURRENCY = 1_000_000
MAX_REV = 2**63 - 1  # the audit table's revision is a BIGINT: a higher one could never be audited
_METHOD_RE = re.compile(r"\w{1,128}")
_KEYS = ("qps", "burst", "concurrency")


def default_burst(qps: float) -> int:
    """The bucket size when none is set: a tenth of a second's worth, and at least 1. A bucket of
    a whole second would let 10% more through in the first second of a 10 s window."""
    return max(1, math.ceil(qps / 10.0))


@dataclass(frozen=True)
class MethodLimit:
    """The limits of one method (or of the whole service, as ``"*"``); None means no limit."""

    qps: Optional[float] = None
    burst: Optional[int] = None
    concurrency: Optional[int] = None

    def __post_init__(self) -> None:
        if self.qps is not None and (
            not _is_number(self.qps) or not math.isfinite(self.qps) or not 0 < self.qps <= MAX_QPS
        ):
            raise InvalidArgument("qps must be a number above 0 and at most %d, got %r" % (MAX_QPS, self.qps))
        if self.burst is not None:
            if not _is_int(self.burst) or not 1 <= self.burst <= MAX_CONCURRENCY:
                raise InvalidArgument("burst must be an integer 1..%d, got %r" % (MAX_CONCURRENCY, self.burst))
            if self.qps is None:
                raise InvalidArgument("burst needs qps: it is the size of the qps limit's bucket")
        if self.concurrency is not None and (
            not _is_int(self.concurrency) or not 1 <= self.concurrency <= MAX_CONCURRENCY
        ):
            raise InvalidArgument(
                "concurrency must be an integer 1..%d, got %r" % (MAX_CONCURRENCY, self.concurrency)
            )

    @property
    def empty(self) -> bool:
        return self.qps is None and self.concurrency is None

    @property
    def bucket(self) -> Optional[int]:
        """The token bucket's size: ``burst``, or ``default_burst(qps)``; None without qps."""
        if self.qps is None:
            return None
        return self.burst if self.burst is not None else default_burst(self.qps)

    def to_dict(self) -> Dict[str, Any]:
        return {k: getattr(self, k) for k in _KEYS if getattr(self, k) is not None}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "MethodLimit":
        if not isinstance(data, Mapping):
            raise InvalidArgument("a method's limits must be a JSON object, got %r" % (data,))
        unknown = sorted(set(data) - set(_KEYS))
        if unknown:
            raise InvalidArgument("unknown limit(s) %s; known: %s" % (", ".join(unknown), ", ".join(_KEYS)))
        return cls(**{k: data[k] for k in _KEYS if k in data})


@dataclass(frozen=True)
class ServiceLimits:
    """Every limit of one service, by method name (``"*"``: the service as a whole), at revision
    ``rev`` (each stored change takes the next revision; a provider only ever replaces its
    limits with those of a higher revision). Methods without a limit are left out."""

    methods: Mapping[str, MethodLimit] = field(default_factory=dict)
    rev: int = 0

    def __post_init__(self) -> None:
        if not _is_int(self.rev) or not 0 <= self.rev <= MAX_REV:
            raise InvalidArgument("rev must be an integer 0..%d, got %r" % (MAX_REV, self.rev))
        for name, limit in self.methods.items():
            check_method(name)
            if not isinstance(limit, MethodLimit):
                raise InvalidArgument("the limits of %r must be a MethodLimit, got %r" % (name, limit))
        # Frozen, and never holding an empty entry: equality then means "the same limits".
        object.__setattr__(self, "methods", {k: v for k, v in sorted(self.methods.items()) if not v.empty})

    def get(self, method: str) -> Optional[MethodLimit]:
        return self.methods.get(method)

    def with_method(self, method: str, limit: Optional[MethodLimit], rev: int) -> "ServiceLimits":
        """A copy with ``method``'s limits replaced (None or an empty limit: removed), at ``rev``."""
        methods = dict(self.methods)
        if limit is None or limit.empty:
            methods.pop(check_method(method), None)
        else:
            methods[check_method(method)] = limit
        return ServiceLimits(methods, rev)

    def to_dict(self) -> Dict[str, Any]:
        return {"rev": self.rev, "methods": {k: v.to_dict() for k, v in self.methods.items()}}

    def to_json(self) -> bytes:
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":")).encode("utf-8")

    @classmethod
    def from_json(cls, raw: bytes) -> "ServiceLimits":
        """Decode a stored value. Raises InvalidArgument (a ValueError) on anything malformed."""
        try:
            data = json.loads(raw, parse_constant=_reject_constant)
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
            raise InvalidArgument("limits are not JSON: %s" % err) from None
        except ValueError as err:
            raise InvalidArgument("limits are not JSON: %s" % err) from None
        if not isinstance(data, dict) or not isinstance(data.get("methods", {}), dict):
            raise InvalidArgument("limits must be a JSON object with an object 'methods', got %r" % (data,))
        methods = {name: MethodLimit.from_dict(value) for name, value in data.get("methods", {}).items()}
        return cls(methods, data.get("rev", 0))


def check_method(name: object) -> str:
    """Return ``name`` if it can name a method (a Thrift identifier) or ``"*"``; raise InvalidArgument."""
    if name == ALL_METHODS or (isinstance(name, str) and _METHOD_RE.fullmatch(name)):
        return str(name)
    raise InvalidArgument("method %r is invalid: it must be a Thrift method name or %r" % (name, ALL_METHODS))


def plain_number(value: float) -> str:
    """A limit's value as people write it: ``1000000``, ``2.5``, ``0.0000001`` (never ``1e+06``)."""
    if isinstance(value, int) or (math.isfinite(value) and value.is_integer()):
        return str(int(value))
    if not math.isfinite(value):
        return str(value)
    text = format(Decimal(repr(value)), "f")
    return text.rstrip("0").rstrip(".") if "." in text else text


def limits_field(appkey: str, env: str, service: str) -> str:
    """The Redis hash field that keeps one service's limits."""
    return "%s|%s|%s" % (appkey, env, service)


def _reject_constant(name: str) -> Any:
    raise ValueError("%s is not a JSON value" % name)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
