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


class BaseDelayedCall:
    """What every delayed call shares: its target, due time and state."""

    def __init__(
        self, time: float, func: Callable[..., Any], args: tuple[Any, ...], kw: dict[str, Any]
    ) -> None:
        self.time = time
        self.func = func
        self.args = args
        self.kw = kw
        self.called = False
        self.cancelled = False

    def getTime(self) -> float:
        """When this call is due, in its reactor's ``seconds()``."""
        return self.time

    def active(self) -> bool:
        """Whether the call is still pending."""
        return not (self.called or self.cancelled)

    def _check_active(self) -> None:
        if self.called:
            raise AlreadyCalled(self)
        if self.cancelled:
            raise AlreadyCancelled(self)

    def __repr__(self) -> str:
        state = "called" if self.called else "cancelled" if self.cancelled else "pending"
        name = getattr(self.func, "__qualname__", repr(self.func))
        return f"<{type(self).__name__} {name} at {self.time} ({state})>"
