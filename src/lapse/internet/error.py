"""Errors raised by the reactor facade."""

from __future__ import annotations

from lapse.internet.interfaces import AlreadyCalled, AlreadyCancelled

__all__ = [
    "AlreadyCalled",
    "AlreadyCancelled",
    "CannotListenError",
    "ConnectionDone",
    "ConnectionLost",
    "ReactorAlreadyRunning",
    "ReactorNotRunning",
]


class CannotListenError(OSError):
    """A port could not be bound: in use, not permitted, or a bad address."""

    def __init__(self, interface: str, port: int, reason: BaseException) -> None:
        super().__init__(f"Couldn't listen on {interface or 'any'}:{port}: {reason}.")
        self.interface = interface
        self.port = port
        self.socketError = reason


class ReactorNotRunning(RuntimeError):
    """``stop()`` was called on a reactor that is not running."""


class ReactorAlreadyRunning(RuntimeError):
    """``run()`` was called on a reactor that is already running."""


class StartupError(SystemExit):
    """``run()`` cannot start serving: an application that can never work
    (its session store cannot work as configured, say). Its message is one
    line; left uncaught, the program ends with it on stderr and status 1."""


class ConnectionLost(ConnectionError):
    """The connection was lost before the response was finished."""


class ConnectionDone(ConnectionLost):
    """The connection was closed cleanly by the other side."""
