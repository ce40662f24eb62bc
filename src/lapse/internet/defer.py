"""A small ``Deferred``: a result that arrives later, with callback chains.

Twisted programs write ``request.notifyFinish().addErrback(cancel)``; asyncio
programs write ``await request.notifyFinish()``. This class serves both: it
runs its callback chain as Twisted's does (each callback gets the previous
result; an exception switches to the errback path as a :class:`Failure`), and
it can be awaited.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Generator
from typing import Any

__all__ = ["Deferred", "Failure"]

_PENDING = object()


class Failure:
    """An exception travelling down a ``Deferred``'s errback chain."""

    def __init__(self, exc: BaseException) -> None:
        self.value = exc
        self.type = type(exc)

    def check(self, *types: type[BaseException]) -> type[BaseException] | None:
        """The first of ``types`` this failure is an instance of, or None."""
        for kind in types:
            if isinstance(self.value, kind):
                return kind
        return None

    def trap(self, *types: type[BaseException]) -> type[BaseException]:
        """As :meth:`check`, but re-raise the exception when none matches."""
        kind = self.check(*types)
        if kind is None:
            raise self.value
        return kind

    def getErrorMessage(self) -> str:
        """The exception's message."""
        return str(self.value)

    def raiseException(self) -> None:
        """Raise the wrapped exception."""
        raise self.value

    def __repr__(self) -> str:
        return f"<Failure {self.type.__name__}: {self.value}>"


class Deferred:
    """A result not yet there, with a chain of callbacks and errbacks."""

    def __init__(self) -> None:
        self._chain: list[tuple[Callable[..., Any] | None, Callable[..., Any] | None]] = []
        self.result: Any = _PENDING
        self.called = False

    def addCallbacks(
        self,
        callback: Callable[..., Any] | None,
        errback: Callable[..., Any] | None = None,
    ) -> Deferred:
        """Add a pair: ``callback`` for results, ``errback`` for failures."""
        self._chain.append((callback, errback))
        if self.called:
            self._run()
        return self

    def addCallback(self, callback: Callable[..., Any], *args: Any, **kw: Any) -> Deferred:
        """Call ``callback(result, *args, **kw)`` on success."""
        return self.addCallbacks(lambda r: callback(r, *args, **kw))

    def addErrback(self, errback: Callable[..., Any], *args: Any, **kw: Any) -> Deferred:
        """Call ``errback(failure, *args, **kw)`` on failure."""
        return self.addCallbacks(None, lambda f: errback(f, *args, **kw))

    def addBoth(self, callback: Callable[..., Any], *args: Any, **kw: Any) -> Deferred:
        """Call ``callback`` with the result or the failure."""
        both = lambda r: callback(r, *args, **kw)  # noqa: E731
        return self.addCallbacks(both, both)

    def callback(self, result: Any = None) -> None:
        """Fire with ``result``."""
        self._fire(result)

    def errback(self, fail: BaseException | Failure) -> None:
        """Fire with a failure."""
        self._fire(fail if isinstance(fail, Failure) else Failure(fail))

    def _fire(self, result: Any) -> None:
        if self.called:
            raise RuntimeError("this Deferred has already been fired")
        self.called = True
        self.result = result
        self._run()

    def _run(self) -> None:
        while self._chain:
            callback, errback = self._chain.pop(0)
            step = errback if isinstance(self.result, Failure) else callback
            if step is None:
                continue
            try:
                self.result = step(self.result)
            except Exception as exc:
                self.result = Failure(exc)

    def __await__(self) -> Generator[Any, None, Any]:
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()

        def settle(result: Any) -> Any:
            # The result stays on the chain, as Twisted keeps it, for the
            # callbacks added after the await.
            if not future.done():
                if isinstance(result, Failure):
                    future.set_exception(result.value)
                else:
                    future.set_result(result)
            return result

        self.addBoth(settle)
        return future.__await__()

    def __repr__(self) -> str:
        state = "pending" if not self.called else f"fired with {self.result!r}"
        return f"<Deferred {state}>"
