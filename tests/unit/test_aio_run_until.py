"""aio.pool.run_until: a deadline on an awaitable that never swallows an outside cancel. Both
implementations: asyncio.timeout_at (3.11+) and the task-based one for older Pythons, forced
here by hiding timeout_at."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any, List

import pytest

from thriftprobe.aio.pool import run_until


@pytest.fixture(params=["timeout_at", "fallback"])
def flavour(request: Any, monkeypatch: pytest.MonkeyPatch) -> str:
    if request.param == "fallback":
        monkeypatch.delattr(asyncio, "timeout_at", raising=False)
    elif not hasattr(asyncio, "timeout_at"):
        pytest.skip("asyncio.timeout_at needs Python 3.11")
    return str(request.param)


def test_the_result_comes_back_in_time(flavour: str) -> None:
    async def main() -> int:
        loop = asyncio.get_running_loop()
        return await run_until(asyncio.sleep(0.01, result=7), loop.time() + 5)

    assert asyncio.run(main()) == 7


def test_past_the_deadline_it_is_a_timeout_and_the_work_is_cancelled(flavour: str) -> None:
    cancelled: List[bool] = []

    async def slow() -> None:
        try:
            await asyncio.sleep(5)
        except asyncio.CancelledError:
            cancelled.append(True)
            raise

    async def main() -> None:
        loop = asyncio.get_running_loop()
        with pytest.raises(TimeoutError):
            await run_until(slow(), loop.time() + 0.05)
        await asyncio.sleep(0)

    asyncio.run(main())
    assert cancelled == [True]


def test_an_outside_cancel_in_the_same_turn_as_the_deadline_stays_a_cancel(flavour: str) -> None:
    """The race that made a wait_for around a call return late results on Python 3.10: the
    deadline's timer and task.cancel() in one turn of the loop, 50 times."""

    async def main() -> List[str]:
        loop = asyncio.get_running_loop()
        seen = []
        for _ in range(50):
            when = loop.time() + 0.01
            task = asyncio.ensure_future(run_until(asyncio.sleep(1), when))
            loop.call_at(when, task.cancel)
            try:
                await task
                seen.append("returned")
            except asyncio.CancelledError:
                seen.append("cancelled")
            except TimeoutError:
                seen.append("timeout")
        return seen

    seen = asyncio.run(main())
    assert set(seen) == {"cancelled"}, seen


def test_a_result_that_comes_too_late_is_discarded(flavour: str) -> None:
    """The fallback runs the work as a task of its own: a result it still produced after the
    caller was cancelled goes to ``discard`` (with timeout_at the work is the caller's own)."""
    if flavour != "fallback":
        pytest.skip("with asyncio.timeout_at the work runs in the caller's task")
    discarded: List[str] = []

    async def opens() -> str:
        with contextlib.suppress(asyncio.CancelledError):  # it finishes anyway, as a connect may
            await asyncio.sleep(0.05)
        return "socket"

    async def main() -> None:
        loop = asyncio.get_running_loop()
        task = asyncio.ensure_future(run_until(opens(), loop.time() + 5, discard=discarded.append))
        await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await asyncio.sleep(0.1)

    asyncio.run(main())
    assert discarded == ["socket"]
