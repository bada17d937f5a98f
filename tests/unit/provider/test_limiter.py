"""The provider's request limiter: token-bucket arithmetic on an injected clock, concurrency, the
service's "*" limits beside a method's, live changes of limits, and threads hammering it."""

from __future__ import annotations

import threading
import time

import pytest

from thriftprobe.limits import MethodLimit, ServiceLimits, plain_number
from thriftprobe.provider.limiter import CONCURRENCY, QPS, Limiter, Refusal

METHODS = ("add", "ping", "echo")


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def limiter(methods: dict, clock: Clock) -> Limiter:
    lim = Limiter(METHODS, clock=clock)
    lim.set(ServiceLimits(methods, rev=1))
    return lim


def admit_all(lim: Limiter, method: str, n: int) -> int:
    """How many of ``n`` requests are admitted (each admitted one released at once)."""
    admitted = 0
    for _ in range(n):
        if lim.admit(method) is None:
            admitted += 1
            lim.release(method)
    return admitted


def test_without_limits_the_limiter_is_disabled_and_admits_everything():
    lim = Limiter(METHODS)
    assert not lim.enabled
    assert lim.limits == ServiceLimits()
    assert admit_all(lim, "add", 1000) == 1000


def test_a_full_bucket_admits_its_size_then_one_per_refill_interval():
    clock = Clock()
    lim = limiter({"add": MethodLimit(qps=10, burst=3)}, clock)
    assert lim.enabled
    assert admit_all(lim, "add", 10) == 3  # the bucket starts full: burst 3
    clock.now += 0.05  # half a token
    assert lim.admit("add") == QPS
    clock.now += 0.05  # one token
    assert admit_all(lim, "add", 5) == 1
    clock.now += 10.0  # refills to the bucket's size, never more
    assert admit_all(lim, "add", 10) == 3


def test_over_a_long_window_the_bucket_admits_rate_times_time_plus_burst():
    clock = Clock()
    lim = limiter({"add": MethodLimit(qps=50)}, clock)  # default burst: 5
    admitted = 0
    for _ in range(10_000):  # 10 s in steps of 1 ms, 3 requests a step (150 a second offered)
        admitted += admit_all(lim, "add", 3)
        clock.now += 0.001
    assert admitted == pytest.approx(50 * 10 + 5, abs=1)


def test_the_default_burst_is_a_tenth_of_a_second():
    clock = Clock()
    lim = limiter({"add": MethodLimit(qps=200)}, clock)
    assert admit_all(lim, "add", 100) == 20


def test_a_refused_request_takes_no_token():
    clock = Clock()
    lim = limiter({"add": MethodLimit(qps=1, burst=1), "*": MethodLimit(qps=100, burst=2)}, clock)
    assert lim.admit("add") is None
    lim.release("add")
    for _ in range(5):
        assert lim.admit("add") == QPS  # refused by add's own bucket: "*" loses nothing
    assert admit_all(lim, "ping", 5) == 1  # "*" had 2, add's one admitted call took one


def test_a_request_over_its_concurrency_limit_takes_no_token():
    clock = Clock()
    lim = limiter({"add": MethodLimit(qps=10, burst=2, concurrency=1)}, clock)
    assert lim.admit("add") is None
    assert lim.admit("add") == CONCURRENCY
    assert lim.admit("add") == CONCURRENCY
    lim.release("add")
    assert lim.admit("add") is None  # the second token is still there
    lim.release("add")
    assert lim.admit("add") == QPS


def test_concurrency_counts_requests_admitted_and_not_released():
    lim = limiter({"add": MethodLimit(concurrency=2)}, Clock())
    assert lim.admit("add") is None
    assert lim.admit("add") is None
    refusal = lim.admit("add")
    assert refusal == CONCURRENCY and refusal.scope == "add" and refusal.limit == 2
    assert lim.admit("ping") is None  # another method has no limit
    lim.release("add")
    assert lim.admit("add") is None
    assert lim.stats()["in_flight:add"] == 2


def test_a_request_must_pass_its_methods_limits_and_the_services():
    lim = limiter({"add": MethodLimit(concurrency=5), "*": MethodLimit(concurrency=3)}, Clock())
    assert lim.admit("ping") is None
    assert lim.admit("echo") is None
    assert lim.admit("add") is None
    refusal = lim.admit("add")  # add is under its own 5, the service is at its 3
    assert refusal == CONCURRENCY and refusal.scope == "*"
    lim.release("ping")
    assert lim.admit("add") is None


def test_the_services_qps_limit_takes_every_method_together():
    clock = Clock()
    lim = limiter({"*": MethodLimit(qps=10, burst=4)}, clock)
    assert [lim.admit(m) is None for m in ("add", "ping", "echo", "add", "ping")] == [True] * 4 + [False]


def test_a_method_the_idl_does_not_declare_counts_only_against_the_service():
    lim = limiter({"nosuch": MethodLimit(concurrency=1), "*": MethodLimit(concurrency=2)}, Clock())
    assert lim.admit("nosuch") is None
    assert lim.admit("nosuch") is None  # its own limit is never checked: it is not a method
    assert lim.admit("add") == CONCURRENCY
    lim.release("nosuch")
    lim.release("nosuch")
    assert lim.stats()["in_flight"] == 0
    assert "in_flight:nosuch" not in lim.stats()


def test_refusals_describe_the_limit_they_were_over():
    clock = Clock()
    lim = limiter({"add": MethodLimit(qps=2.5, burst=1), "*": MethodLimit(concurrency=7)}, clock)
    assert lim.admit("add") is None
    qps = lim.admit("add")
    assert qps is not None and qps.reason == "qps" and type(qps.reason) is str
    assert qps.describe() == "qps limit for add (2.5 per second per node)"
    for _ in range(6):
        assert lim.admit("ping") is None
    conc = lim.admit("ping")
    assert conc is not None
    assert conc.describe() == "concurrency limit for every method together (*) (7 at once per node)"


@pytest.mark.parametrize("qps, shown", [(1e6, "1000000"), (1000000, "1000000"), (2.5, "2.5"), (0.001, "0.001"),
                                       (1e-7, "0.0000001"), (123456.75, "123456.75"), (50.0, "50")])
def test_a_qps_refusal_writes_its_rate_plainly(qps, shown):
    assert Refusal("qps", "add", qps).describe() == "qps limit for add (%s per second per node)" % shown
    assert plain_number(qps) == shown


def test_an_unchanged_bucket_keeps_its_state_across_set():
    clock = Clock()
    lim = limiter({"add": MethodLimit(qps=10, burst=3), "ping": MethodLimit(qps=5)}, clock)
    assert admit_all(lim, "add", 3) == 3
    lim.set(ServiceLimits({"add": MethodLimit(qps=10, burst=3), "ping": MethodLimit(qps=6)}, rev=2))
    assert lim.admit("add") == QPS  # still empty: not refilled by the change


def test_a_changed_bucket_keeps_what_it_held_at_most_its_new_size():
    clock = Clock()
    lim = limiter({"add": MethodLimit(qps=10, burst=10)}, clock)
    assert admit_all(lim, "add", 4) == 4  # 6 left
    lim.set(ServiceLimits({"add": MethodLimit(qps=100, burst=3)}, rev=2))
    assert admit_all(lim, "add", 10) == 3
    lim.set(ServiceLimits({"add": MethodLimit(qps=1, burst=50)}, rev=3))
    assert admit_all(lim, "add", 10) == 0  # empty, and a bigger bucket does not fill it
    clock.now += 2.0
    assert admit_all(lim, "add", 10) == 2  # refilled at the new rate


def test_a_new_bucket_starts_full_and_a_removed_limit_is_no_longer_checked():
    clock = Clock()
    lim = limiter({"add": MethodLimit(qps=1, burst=1)}, clock)
    assert admit_all(lim, "add", 5) == 1
    lim.set(ServiceLimits({"ping": MethodLimit(qps=1, burst=2)}, rev=2))
    assert admit_all(lim, "add", 50) == 50
    assert admit_all(lim, "ping", 5) == 2
    lim.set(ServiceLimits(rev=3))
    assert not lim.enabled
    assert admit_all(lim, "ping", 50) == 50


def test_releases_of_requests_admitted_under_old_limits_keep_the_counts_right():
    lim = limiter({"add": MethodLimit(concurrency=3)}, Clock())
    for _ in range(3):
        assert lim.admit("add") is None
    lim.set(ServiceLimits({"add": MethodLimit(concurrency=4), "*": MethodLimit(concurrency=10)}, rev=2))
    assert lim.admit("add") is None  # the 3 in flight still count against the new 4
    assert lim.admit("add") == CONCURRENCY
    lim.set(ServiceLimits(rev=3))  # no limit: the 4 in flight are released all the same
    for _ in range(4):
        lim.release("add")
    lim.set(ServiceLimits({"add": MethodLimit(concurrency=2)}, rev=4))
    assert lim.admit("add") is None
    assert lim.admit("add") is None
    assert lim.admit("add") == CONCURRENCY
    stats = lim.stats()
    assert stats["in_flight"] == 2 and stats["in_flight:add"] == 2
    assert stats["admitted"] - stats["released"] == 2


def test_cancel_gives_back_the_place_and_the_tokens():
    clock = Clock()
    lim = limiter({"add": MethodLimit(qps=1, burst=1, concurrency=1), "*": MethodLimit(qps=1, burst=1)}, clock)
    assert lim.admit("add") is None
    lim.cancel("add")
    assert lim.admit("add") is None
    assert lim.admit("add") == CONCURRENCY
    lim.release("add")
    assert lim.admit("ping") == QPS


def test_set_refuses_what_is_not_service_limits():
    with pytest.raises(TypeError, match="ServiceLimits"):
        Limiter(METHODS).set({"add": {"qps": 1}})  # type: ignore[arg-type]


def test_threads_hammering_admit_release_and_set_never_exceed_the_limit_nor_lose_count():
    lim = Limiter(METHODS)
    lim.set(ServiceLimits({"add": MethodLimit(concurrency=3), "*": MethodLimit(concurrency=5)}, rev=1))
    state = {"add": 0, "all": 0, "max_add": 0, "max_all": 0}
    guard = threading.Lock()
    errors: list = []
    stop = threading.Event()

    def worker(method: str) -> None:
        try:
            for _ in range(2000):
                if lim.admit(method) is None:
                    with guard:
                        state["all"] += 1
                        state["max_all"] = max(state["max_all"], state["all"])
                        if method == "add":
                            state["add"] += 1
                            state["max_add"] = max(state["max_add"], state["add"])
                    time.sleep(0)  # let the others run while this one holds its place
                    with guard:
                        state["all"] -= 1
                        if method == "add":
                            state["add"] -= 1
                    lim.release(method)
        except Exception as exc:
            errors.append(exc)

    def changer() -> None:
        rev = 2
        while not stop.is_set():  # flips between the same limits and none: never a higher cap
            lim.set(ServiceLimits({"add": MethodLimit(concurrency=3), "*": MethodLimit(concurrency=5)}, rev=rev))
            lim.set(ServiceLimits({"add": MethodLimit(concurrency=3), "*": MethodLimit(concurrency=5)}, rev=rev + 1))
            rev += 2
            stop.wait(0.0005)

    threads = [threading.Thread(target=worker, args=(m,)) for m in ("add", "add", "add", "add", "ping", "echo", "ping")]
    flipper = threading.Thread(target=changer)
    flipper.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    stop.set()
    flipper.join(10)
    assert not errors
    assert state["max_add"] <= 3 and state["max_all"] <= 5
    assert state["max_add"] >= 2  # the threads did overlap: the check was tested
    stats = lim.stats()
    assert stats["in_flight"] == 0 and stats["in_flight:add"] == 0
    assert stats["admitted"] == stats["released"] > 0


def test_a_revision_the_audit_table_cannot_hold_is_refused() -> None:
    """The audit's revision is a BIGINT: a hand-edited rev of 2**64 once broke every later audit."""
    from thriftprobe.errors import InvalidArgument

    assert ServiceLimits({}, rev=2**63 - 1).rev == 2**63 - 1
    with pytest.raises(InvalidArgument, match="rev must be an integer"):
        ServiceLimits({}, rev=2**63)
    with pytest.raises(InvalidArgument):
        ServiceLimits.from_json(b'{"rev": 18446744073709551616, "methods": {}}')


def test_limits_of_methods_the_service_lacks_are_logged_once_per_revision(caplog):
    lim = Limiter(["ping", "echo"], label="Calculator-9090")
    with caplog.at_level("WARNING", logger="thriftprobe.provider.limiter"):
        lim.set(ServiceLimits({"ecko": MethodLimit(qps=5), "*": MethodLimit(concurrency=3)}, rev=4))
        lim.set(ServiceLimits({"ecko": MethodLimit(qps=6)}, rev=4))  # the same revision, applied again
        lim.set(ServiceLimits({"echo": MethodLimit(qps=6)}, rev=5))  # fixed: nothing to say
    warnings = [r.getMessage() for r in caplog.records]
    assert warnings == [
        "Calculator-9090: limits rev 4 name method(s) this service does not have, which limit nothing: ecko"
        " (its methods: echo, ping)"
    ]
    lim.set(ServiceLimits({"pong": MethodLimit(qps=1)}, rev=6))
    assert len(caplog.records) == 2 and "pong" in caplog.records[-1].getMessage()
