"""The small time interface that session logic depends on.

Session code never reads the wall clock itself: it asks a reactor for
``seconds()`` and schedules with ``callLater()``. The real reactor and the
test :class:`~lapse.internet.task.Clock` both provide it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol


class IDelayedCall(Protocol):
    """A call scheduled for later; Twisted's ``IDelayedCall``."""

    def getTime(self) -> float: ...
    def cancel(self) -> None: ...
    def delay(self, secondsLater: float) -> None: ...
    def reset(self, secondsFromNow: float) -> None: ...
    def active(self) -> bool: ...


class IReactorTime(Protocol):
    """What session logic needs of time: a clock and a timer."""

    def seconds(self) -> float: ...
    def callLater(
        self, delay: float, callable: Callable[..., Any], *args: Any, **kw: Any
    ) -> IDelayedCall: ...


class AlreadyCalled(ValueError):
    """The delayed call already ran."""


class AlreadyCancelled(ValueError):
    """The delayed call was cancelled."""
