"""Request limits, enforced: which requests one provider node admits under its ``ServiceLimits``.

A request is admitted when it passes its method's limits and the service's ``"*"`` limits:

- ``qps``: a token bucket per limit, refilled at ``qps`` tokens per second (monotonic clock) up
  to ``MethodLimit.bucket`` tokens; a request takes one token from each bucket it passes;
- ``concurrency``: requests admitted and not yet answered (``release``), per method and for the
  service as a whole.

A refused request takes nothing (no token, no place). A method the IDL does not declare (a
client may send any name) counts only against ``"*"``. The server admits a request before it is
queued or run, and releases it once its reply is encoded (before it is written to the socket), or
when it will never run.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Callable, Collection, Dict, Optional, Union

from ..limits import ALL_METHODS, MethodLimit, ServiceLimits, plain_number

__all__ = ["CONCURRENCY", "QPS", "Limiter", "Refusal"]

log = logging.getLogger(__name__)

QPS = "qps"
CONCURRENCY = "concurrency"
_WHOLE = 1.0 - 1e-9
"""A token, give or take the rounding of float seconds times a rate (1000.05 + 0.05 - 1000.0 is
just under 0.1)."""


class Refusal(str):
    """Why a request was refused: equal to ``"qps"`` or ``"concurrency"`` (``reason``), and which
    limit it was over: ``scope`` (the method's name, or ``"*"``) and ``limit`` (its value).
    Immutable; built when limits are set, so that refusing allocates nothing."""

    scope: str
    limit: Union[int, float]

    def __new__(cls, reason: str, scope: str, limit: Union[int, float]) -> "Refusal":
        self = super().__new__(cls, reason)
        self.scope = scope
        self.limit = limit
        return self

    @property
    def reason(self) -> str:
        """The plain string (``QPS`` or ``CONCURRENCY``), for labels and comparisons."""
        return QPS if self == QPS else CONCURRENCY

    def describe(self) -> str:
        """``qps limit for add (50 per second per node)``, for a reply's message."""
        scope = "every method together (*)" if self.scope == ALL_METHODS else self.scope
        if self == QPS:
            return "qps limit for %s (%s per second per node)" % (scope, plain_number(self.limit))
        return "concurrency limit for %s (%d at once per node)" % (scope, self.limit)


class _Bucket:
    """A token bucket, and the refusal of a request it has no token for. Only touched under its
    Limiter's lock."""

    __slots__ = ("capacity", "over", "rate", "stamp", "tokens")

    def __init__(self, over: Refusal, rate: float, capacity: int, tokens: float, stamp: float) -> None:
        self.over = over
        self.rate = rate
        self.capacity = capacity
        self.tokens = tokens
        self.stamp = stamp

    def refill(self, now: float) -> None:
        if now > self.stamp:
            self.tokens = min(float(self.capacity), self.tokens + (now - self.stamp) * self.rate)
            self.stamp = now


class _Rule:
    """One method's (or ``"*"``'s) limits as the limiter applies them."""

    __slots__ = ("bucket", "over_concurrency")

    def __init__(self, scope: str, limit: MethodLimit, old: Optional["_Rule"], now: float) -> None:
        self.bucket: Optional[_Bucket] = None
        if limit.qps is not None:
            capacity = limit.bucket or 1
            over = Refusal(QPS, scope, limit.qps)
            previous = old.bucket if old is not None else None
            if previous is not None:
                previous.refill(now)
            if previous is not None and previous.rate == limit.qps and previous.capacity == capacity:
                self.bucket = previous  # unchanged: its state goes on
            elif previous is not None:  # changed: what was left (at most the new size) goes on
                self.bucket = _Bucket(over, limit.qps, capacity, min(previous.tokens, float(capacity)), now)
            else:  # new: starts full
                self.bucket = _Bucket(over, limit.qps, capacity, float(capacity), now)
        self.over_concurrency = (
            Refusal(CONCURRENCY, scope, limit.concurrency) if limit.concurrency is not None else None
        )


class Limiter:
    """Admits or refuses the requests of one service under its current limits.

    ``set()``, ``admit()`` and ``release()`` may be called from any thread at once (the server's
    I/O thread and workers admit, workers release); one lock guards the state, and is held for a
    few dictionary operations. Without limits, ``enabled`` is False and the server does not call
    ``admit`` at all. ``clock`` (monotonic seconds) is for tests.

    Requests in flight are counted whenever they were admitted here, whatever the limits are, so
    that a change of limits never loses count of them: a request admitted under the old limits
    is released against the same counts. Requests that started while no limit was set were never
    admitted, so they do not count against a concurrency limit set while they run.
    """

    def __init__(
        self, methods: Collection[str], *, clock: Callable[[], float] = time.monotonic, label: str = "limiter"
    ) -> None:
        self._clock = clock
        self._label = label
        self._warned_rev: Optional[int] = None  # the revision whose unknown methods were logged
        self._lock = threading.Lock()
        self._limits = ServiceLimits()
        self._rules: Dict[str, _Rule] = {}
        self._all: Optional[_Rule] = None
        self._in_flight: Dict[str, int] = dict.fromkeys(methods, 0)  # declared methods only
        self._total = 0
        self._admitted = 0
        self._released = 0
        self.enabled = False
        """True while some limit is set: the server checks this one attribute per request."""

    @property
    def limits(self) -> ServiceLimits:
        """The limits applied now."""
        return self._limits

    def set(self, limits: ServiceLimits) -> None:
        """Apply ``limits`` from the next admission on, all at once. A bucket whose rate and size
        are unchanged keeps its tokens; a changed one keeps what it held (at most its new size); a
        new one starts full. A limit left out is no longer checked. Requests in flight stay counted.
        Limits of methods the service does not have (an operator's typo) limit nothing: logged as
        a WARNING once per revision."""
        if not isinstance(limits, ServiceLimits):
            raise TypeError("limits must be a thriftprobe.limits.ServiceLimits, got %s" % type(limits).__name__)
        unknown = [name for name in limits.methods if name != ALL_METHODS and name not in self._in_flight]
        with self._lock:
            if unknown and self._warned_rev != limits.rev:
                self._warned_rev = limits.rev
                log.warning(
                    "%s: limits rev %d name method(s) this service does not have, which limit nothing: %s"
                    " (its methods: %s)",
                    self._label, limits.rev, ", ".join(unknown), ", ".join(sorted(self._in_flight)),
                )
            now = self._clock()
            old = dict(self._rules)
            if self._all is not None:
                old[ALL_METHODS] = self._all
            rules = {name: _Rule(name, limit, old.get(name), now) for name, limit in limits.methods.items()}
            self._all = rules.pop(ALL_METHODS, None)
            self._rules = rules
            self._limits = limits
            self.enabled = bool(limits.methods)

    def admit(self, method: str) -> Optional[Refusal]:
        """None when the request is admitted (then ``release(method)`` exactly once when it is
        answered or will never run); else why not: a ``Refusal`` equal to ``"qps"`` or
        ``"concurrency"``. A refused request takes no token and no place."""
        with self._lock:
            declared = method in self._in_flight
            rule = self._rules.get(method) if declared else None
            whole = self._all
            # Concurrency first: a request refused for it must not spend a token.
            if rule is not None:
                over = rule.over_concurrency
                if over is not None and self._in_flight[method] >= over.limit:
                    return over
            if whole is not None:
                over = whole.over_concurrency
                if over is not None and self._total >= over.limit:
                    return over
            mine = rule.bucket if rule is not None else None
            theirs = whole.bucket if whole is not None else None
            if mine is not None or theirs is not None:
                now = self._clock()
                if mine is not None:
                    mine.refill(now)
                    if mine.tokens < _WHOLE:
                        return mine.over
                if theirs is not None:
                    theirs.refill(now)
                    if theirs.tokens < _WHOLE:
                        return theirs.over
                    theirs.tokens -= 1.0
                if mine is not None:
                    mine.tokens -= 1.0
            if declared:
                self._in_flight[method] += 1
            self._total += 1
            self._admitted += 1
            return None

    def release(self, method: str) -> None:
        """An admitted request of ``method`` was answered (or will never run): its place is free."""
        with self._lock:
            if method in self._in_flight:
                self._in_flight[method] -= 1
            self._total -= 1
            self._released += 1

    def cancel(self, method: str) -> None:
        """An admitted request will not run after all (the server shed it, overloaded): release
        it and give back the tokens it took, as if it had been refused."""
        with self._lock:
            rule = self._rules.get(method) if method in self._in_flight else None
            for bucket in (rule.bucket if rule is not None else None, self._all.bucket if self._all else None):
                if bucket is not None:
                    bucket.tokens = min(float(bucket.capacity), bucket.tokens + 1.0)
        self.release(method)

    def stats(self) -> Dict[str, int]:
        """Counts now: ``in_flight`` (admitted, not yet released), ``admitted`` and ``released``
        since the start; per declared method as ``in_flight:<method>``. For tests and debugging."""
        with self._lock:
            found = {"in_flight": self._total, "admitted": self._admitted, "released": self._released}
            for name, count in self._in_flight.items():
                found["in_flight:" + name] = count
            return found
