"""Retry policy: which failed calls may be sent again, and a budget that stops retry storms.

A call that failed before its request was sent (no connection) always moves to another node:
that is not a retry and costs no budget. A call that failed after sending (timeout, reset, EOF)
may have run on the provider, so it is sent again only when its method is marked idempotent,
at most ``attempts`` times in all, and only while the budget allows.
"""

from __future__ import annotations

import threading
import time
from typing import Collection, FrozenSet

__all__ = ["Retry", "RetryBudget"]


class RetryBudget:
    """Allow retries up to ``ratio`` of recent calls, plus ``min_per_second`` so that a client
    making few calls can still retry. Tokens: each call deposits ``ratio``; each retry withdraws
    one; the balance is capped at ``ratio * window_calls + min_per_second`` (the burst).

    Thread-safe (deposits are approximate under contention, withdrawals exact).
    """

    def __init__(self, ratio: float = 0.2, min_per_second: float = 10.0, window_calls: int = 100) -> None:
        if not 0 <= ratio <= 1 or min_per_second < 0 or window_calls < 1:
            raise ValueError("RetryBudget needs 0 <= ratio <= 1, min_per_second >= 0, window_calls >= 1")
        self.ratio = ratio
        self.min_per_second = min_per_second
        self._cap = ratio * window_calls + min_per_second
        self._tokens = self._cap
        self._last = time.monotonic()
        self._lock = threading.Lock()

    def deposit(self) -> None:
        """Called once per call (not per retry). Lock-free on purpose: it is on every call, and
        a deposit lost to a concurrent one only makes the budget a little stricter."""
        if self.ratio and self._tokens < self._cap:
            self._tokens = min(self._cap, self._tokens + self.ratio)

    def reinit_after_fork(self) -> None:
        self._lock = threading.Lock()

    def withdraw(self) -> bool:
        """Take one retry from the budget; False when it is spent."""
        with self._lock:
            now = time.monotonic()
            self._tokens = min(self._cap, self._tokens + (now - self._last) * self.min_per_second)
            self._last = now
            if self._tokens >= 1.0:
                self._tokens -= 1.0
                return True
            return False


class Retry:
    """What to retry after a failure once the request was sent.

    ``idempotent``: the IDL method names safe to run twice. ``attempts``: the most sends of one
    call, the first included. ``budget``: shared by every call of the client. Thread-safe.
    """

    def __init__(
        self, idempotent: Collection[str] = (), attempts: int = 2, budget: "RetryBudget | None" = None
    ) -> None:
        if isinstance(idempotent, str):
            raise TypeError("idempotent must be a collection of method names, not a string")
        if attempts < 1:
            raise ValueError("attempts must be >= 1")
        self.idempotent: FrozenSet[str] = frozenset(idempotent)
        self.attempts = attempts
        self.budget = budget or RetryBudget()

    def may_retry(self, method: str, attempt: int) -> bool:
        """Whether a call of ``method`` whose ``attempt``-th send failed after sending may go again."""
        return method in self.idempotent and attempt < self.attempts and self.budget.withdraw()
