"""The stores' call bound that does not count time the event loop was held
(lapse.sessions.stores._deadline.bounded), on a real event loop: short real
waits, since what it measures is the loop's own clock."""

from __future__ import annotations

import asyncio
import time

import pytest

from lapse.sessions.stores._deadline import bounded


def test_a_reply_that_came_while_the_loop_was_held_is_taken_not_timed_out() -> None:
    """The loop held 0.3 s past a 0.1 s bound, the reply arriving during the
    hold: the call gets it (asyncio.timeout would raise TimeoutError)."""

    async def scenario() -> str:
        loop = asyncio.get_running_loop()
        reply: asyncio.Future[str] = loop.create_future()
        loop.call_later(0.02, reply.set_result, "answer")
        loop.call_soon(time.sleep, 0.3)  # a page holding the loop
        async with bounded(0.1):
            return await reply

    assert asyncio.run(scenario()) == "answer"


def test_asyncio_timeout_does_fail_in_that_case() -> None:
    """The reason for bounded(): the same hold under asyncio.timeout."""

    async def scenario() -> str:
        loop = asyncio.get_running_loop()
        reply: asyncio.Future[str] = loop.create_future()
        loop.call_later(0.02, reply.set_result, "answer")
        loop.call_soon(time.sleep, 0.3)
        async with asyncio.timeout(0.1):
            return await reply

    with pytest.raises(TimeoutError):
        asyncio.run(scenario())


def test_no_reply_is_a_timeout_error_within_the_bound() -> None:
    async def scenario() -> float:
        started = time.monotonic()
        with pytest.raises(TimeoutError, match=r"no answer within 0\.1 s"):
            async with bounded(0.1):
                await asyncio.get_running_loop().create_future()
        return time.monotonic() - started

    assert 0.09 < asyncio.run(scenario()) < 0.3


def test_no_reply_after_a_hold_still_times_out_after_the_time_given_back() -> None:
    """Held 0.3 s, no reply ever: TimeoutError once the time given back (the
    hold, at most one more bound) has passed as well."""

    async def scenario() -> float:
        loop = asyncio.get_running_loop()
        started = time.monotonic()
        loop.call_soon(time.sleep, 0.3)
        with pytest.raises(TimeoutError):
            async with bounded(0.1):
                await loop.create_future()
        return time.monotonic() - started

    assert 0.35 < asyncio.run(scenario()) < 0.7


@pytest.mark.parametrize(
    ("hold", "after"),
    [(0.5, 0.25), (0.37, 0.1)],
    ids=["ends-well-past-the-deadline", "ends-just-at-the-deadline"],
)
def test_a_hold_that_began_before_the_deadline_is_given_back_in_full(
    hold: float, after: float
) -> None:
    """A 0.4 s bound; 0.05 s in, the loop is held ``hold`` s, through the
    deadline; the call's next round trip starts only after the hold and takes
    ``after`` s. The call ran free for less than its bound, so it gets its
    reply: the whole hold is given back, not just how late the timer rang
    (which was 0.15 s, or nothing counted as late at all)."""

    async def scenario() -> str:
        loop = asyncio.get_running_loop()
        reply: asyncio.Future[str] = loop.create_future()

        def hold_then_ask() -> None:
            time.sleep(hold)  # a page holding the loop
            loop.call_later(after, reply.set_result, "answer")

        loop.call_later(0.05, hold_then_ask)
        async with bounded(0.4):
            return await reply

    assert asyncio.run(scenario()) == "answer"


def test_a_cancel_from_outside_stays_a_cancel_and_leaves_no_count_behind() -> None:
    """Someone else's cancel is not turned into TimeoutError; a body that
    finishes leaves the task's cancel count as it was."""

    async def cancelled() -> None:
        async with bounded(5.0):
            await asyncio.sleep(10)

    async def scenario() -> None:
        task = asyncio.create_task(cancelled())
        await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        async with bounded(5.0):
            await asyncio.sleep(0)
        current = asyncio.current_task()
        assert current is not None and current.cancelling() == 0

    asyncio.run(scenario())
