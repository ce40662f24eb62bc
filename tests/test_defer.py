"""The small Deferred behind notifyFinish()."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from lapse.internet.defer import Deferred, Failure


def test_callbacks_chain_results() -> None:
    """Each callback receives the previous one's result."""
    d = Deferred()
    seen: list[Any] = []
    d.addCallback(lambda r: r + 1).addCallback(seen.append)
    d.callback(1)
    assert seen == [2]


def test_exception_switches_to_errback() -> None:
    """A callback that raises sends a Failure down the errback path."""
    d = Deferred()
    seen: list[Any] = []
    d.addCallback(lambda r: 1 / 0).addCallback(seen.append).addErrback(seen.append)
    d.callback(None)
    (failure,) = seen
    assert isinstance(failure, Failure) and failure.check(ZeroDivisionError)


def test_callbacks_added_after_firing_run_at_once() -> None:
    """A Deferred that already fired runs new callbacks immediately."""
    d = Deferred()
    d.callback("x")
    seen: list[Any] = []
    d.addBoth(seen.append)
    assert seen == ["x"]


def test_fire_twice_is_error() -> None:
    """A Deferred fires once."""
    d = Deferred()
    d.callback(None)
    with pytest.raises(RuntimeError):
        d.callback(None)


def test_await_result_and_failure() -> None:
    """Awaiting a Deferred gives its result or raises its exception."""

    async def scenario() -> tuple[Any, BaseException | None]:
        ok, bad = Deferred(), Deferred()
        loop = asyncio.get_running_loop()
        loop.call_soon(ok.callback, 42)
        loop.call_soon(bad.errback, KeyError("k"))
        result = await ok
        try:
            await bad
        except KeyError as exc:
            return result, exc
        return result, None

    result, error = asyncio.run(scenario())
    assert result == 42 and isinstance(error, KeyError)


def test_await_keeps_the_result_for_later_callbacks() -> None:
    """Awaiting a Deferred leaves its result (or failure) on the chain, as
    Twisted does: a callback added after the await still gets it."""

    async def scenario() -> tuple[list[Any], list[Any]]:
        ok, bad = Deferred(), Deferred()
        loop = asyncio.get_running_loop()
        loop.call_soon(ok.callback, 42)
        loop.call_soon(bad.errback, KeyError("k"))
        assert await ok == 42
        with pytest.raises(KeyError):
            await bad
        later: list[Any] = []
        failures: list[Any] = []
        ok.addCallback(later.append)
        bad.addErrback(lambda failure: failures.append(failure.value))
        return later, failures

    later, failures = asyncio.run(scenario())
    assert later == [42]
    assert len(failures) == 1 and isinstance(failures[0], KeyError)


def test_already_called_errors_are_in_lapse_internet_error() -> None:
    """AlreadyCalled and AlreadyCancelled are in lapse.internet.error, where
    Twisted has them, and are the ones a delayed call raises."""
    from lapse.internet import error
    from lapse.internet.task import Clock

    clock = Clock()
    call = clock.callLater(1, lambda: None)
    call.cancel()
    with pytest.raises(error.AlreadyCancelled):
        call.cancel()
    done = clock.callLater(1, lambda: None)
    clock.advance(1)
    with pytest.raises(error.AlreadyCalled):
        done.cancel()
    assert issubclass(error.AlreadyCalled, ValueError)
