"""Process-wide set-up for serving: logging, the garbage collector, sockets.

What ``reactor.run()`` and ``listenTCP`` do to the process beyond the event
loop: log to stderr as ``LAPSE_LOG_LEVEL`` asks (:func:`configure_logging`),
tune the collector for many long-lived sessions (:func:`tune_gc`), and bind
a listening socket (:func:`bind_socket`) or take one a supervisor bound and
passed down (:func:`adopt_socket`).
"""

from __future__ import annotations

import gc
import logging
import socket
import time

from lapse import settings
from lapse.internet.error import CannotListenError

__all__ = [
    "PYTHON_GC_THRESHOLD",
    "SERVER_GC_THRESHOLD",
    "LogFormatter",
    "adopt_socket",
    "bind_socket",
    "configure_logging",
    "tune_gc",
]


class LogFormatter(logging.Formatter):
    """``2026-01-31T12:00:00.123Z INFO lapse.access <message>``: the time in
    ISO 8601, UTC, to the millisecond; the level; the logger; the message
    (the access log's combined-format line, a session event...)."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s %(message)s")

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        return f"{stamp}.{int(record.msecs):03d}Z"


def configure_logging() -> None:
    """``LAPSE_LOG_LEVEL=INFO`` (or DEBUG...) logs to stderr at that level,
    each line stamped (see :class:`LogFormatter`), unless the program
    configured logging itself. A value that is no level is a ValueError
    naming the variable."""
    level = settings.LOG_LEVEL.get()
    if level is None or logging.getLogger().handlers:
        return
    handler = logging.StreamHandler()
    handler.setFormatter(LogFormatter())
    logging.basicConfig(level=level, handlers=[handler])


PYTHON_GC_THRESHOLD = (700, 10, 10)
"""CPython's default collection thresholds."""

SERVER_GC_THRESHOLD = (50_000, 20, 10)
"""The thresholds :func:`tune_gc` sets for serving."""


def tune_gc() -> bool:
    """Set up the garbage collector for a server that holds many sessions.

    Live sessions are long-lived objects, and with CPython's default
    thresholds the collector rescans all of them often: under a steady
    stream of new sessions a full collection came every second or so and
    paused the server for 100-250 ms (bench/README.md). So, before serving:
    ``gc.freeze()`` (what was built at start-up is never scanned again) and
    thresholds of :data:`SERVER_GC_THRESHOLD`, which make full collections
    rare. Nothing is done if the thresholds were already changed from
    CPython's defaults, or if ``LAPSE_GC_TUNING=0``. Whether it was done.
    """
    if not settings.GC_TUNING.get():
        return False
    if gc.get_threshold() != PYTHON_GC_THRESHOLD:
        return False
    gc.freeze()
    gc.set_threshold(*SERVER_GC_THRESHOLD)
    return True


def bind_socket(port: int, interface: str, backlog: int) -> socket.socket:
    """A listening, non-blocking TCP socket on ``interface:port`` (0: a free
    port); :class:`CannotListenError` if it cannot be bound."""
    family = socket.AF_INET6 if ":" in interface else socket.AF_INET
    host = interface or ("::" if family == socket.AF_INET6 else "0.0.0.0")
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(backlog)
    except (OSError, OverflowError) as exc:
        sock.close()
        raise CannotListenError(interface, port, exc) from exc
    sock.setblocking(False)
    return sock


def adopt_socket(fd: int) -> socket.socket:
    """The listening TCP socket open as file descriptor ``fd`` (bound by a
    supervisor and inherited), non-blocking; ValueError if ``fd`` is not one."""
    try:
        sock = socket.socket(fileno=fd)
    except OSError as exc:
        raise ValueError(f"file descriptor {fd} is not a socket: {exc.strerror or exc}") from None
    if sock.type != socket.SOCK_STREAM or not sock.getsockopt(
        socket.SOL_SOCKET, socket.SO_ACCEPTCONN
    ):
        sock.detach()
        raise ValueError(f"file descriptor {fd} is not a listening TCP socket")
    sock.setblocking(False)
    return sock
