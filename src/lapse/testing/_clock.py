"""A fake store clock, and running one async contract test on a fresh store."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from lapse.sessions.store import SessionStore

__all__ = ["FakeClock", "scenario"]


class FakeClock:
    """A settable time source for stores (``clock=``): ``clock()`` reads,
    ``advance(seconds)`` moves it. Starts at ``start`` (a time well past 0)."""

    def __init__(self, start: float = 1_000_000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


Scenario = Callable[[Any, SessionStore, FakeClock], Awaitable[None]]


def scenario(test: Scenario) -> Callable[[Any, SessionStore, FakeClock], None]:
    """Make ``async def test_x(self, store, clock)`` a plain test method that
    pytest runs: on a new event loop, the ``store`` fixture's store opened
    first and closed after, ``clock`` the ``store_clock`` fixture."""

    def run(self: Any, store: SessionStore, store_clock: FakeClock) -> None:
        async def main() -> None:
            await store.open()
            try:
                await test(self, store, store_clock)
            finally:
                await store.aclose()

        asyncio.run(main())

    run.__name__ = test.__name__
    run.__qualname__ = test.__qualname__
    run.__doc__ = test.__doc__
    return run
