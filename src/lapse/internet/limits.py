"""What the HTTP server allows a connection: sizes, timeouts, a connection cap.

:class:`HTTPLimits` is what lapse's reactor enforces on every connection as
the bytes arrive (``lapse.internet._http``). A lapse ``Site`` makes its own
from its keyword arguments; any other ASGI application gets the defaults
unless ``reactor.listenTCP(..., limits=HTTPLimits(...))`` says otherwise.
"""

from __future__ import annotations

import resource
from dataclasses import dataclass

__all__ = ["HEAD_FRAMING", "HTTPLimits", "default_max_connections"]

HEAD_FRAMING = 4 * 1024
"""Bytes a request head may take beyond its URI and its header fields: the
method, the version, each field's ``": "`` and line ends."""


def default_max_connections(soft_limit: int) -> int:
    """The connection cap for a process allowed ``soft_limit`` open files.

    An eighth of the descriptors (at least 64, at most 1024; at most half of
    them) is kept for everything else the process opens: the listening
    sockets, the event loop's own, session stores, logs, the application's
    files and clients. With the common limit of 1024 the cap is 896.
    """
    reserve = min(1024, max(64, soft_limit // 8), soft_limit // 2)
    return max(1, soft_limit - reserve)


def _soft_nofile() -> int:
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft > 1 << 24:
        return 1 << 24
    return soft


@dataclass(frozen=True)
class HTTPLimits:
    """What the server allows a connection, enforced as the bytes arrive.

    A lapse ``Site`` makes its own from its keyword arguments
    (``Site.http_limits()``); any other application is served with these
    defaults unless ``listenTCP(..., limits=...)`` says otherwise.
    """

    max_uri_length: int = 16 * 1024
    """The request target, in bytes (414 beyond it; at most 65,535)."""
    max_head_size: int = 16 * 1024 + 64 * 1024 + HEAD_FRAMING
    """The request line and header section together, in bytes (431 beyond it)."""
    header_timeout: float = 20.0
    """Seconds for a request head to arrive (408 after it)."""
    body_timeout: float = 20.0
    """Seconds for a request body to arrive, before the rate extension."""
    body_min_rate: float = 500.0
    """Bytes per second of body that extend ``body_timeout`` by a second each."""
    keep_alive_timeout: float = 5.0
    """Seconds a connection may wait for its next request (or its first)."""
    max_connections: int | None = None
    """Open connections in the process (503 beyond it); None: from RLIMIT_NOFILE."""
    check_host: bool = True
    """Refuse a request with no ``Host`` (HTTP/1.1) or two; False when the
    application checks that itself."""

    def __post_init__(self) -> None:
        for name in ("max_uri_length", "max_head_size"):
            value = getattr(self, name)
            if type(value) is not int or value < 1:
                raise ValueError(f"{name} must be a positive number of bytes, not {value!r}")
        for name in ("header_timeout", "body_timeout", "keep_alive_timeout"):
            value = getattr(self, name)
            if not isinstance(value, int | float) or isinstance(value, bool) or not value > 0:
                raise ValueError(f"{name} must be a positive number of seconds, not {value!r}")
        rate = self.body_min_rate
        if not isinstance(rate, int | float) or isinstance(rate, bool) or not rate >= 0:
            raise ValueError(
                f"body_min_rate must be a number of bytes per second (0 or more), not {rate!r}"
            )
        cap = self.max_connections
        if cap is not None and (type(cap) is not int or cap < 1):
            raise ValueError(f"max_connections must be a positive integer or None, not {cap!r}")

    def connection_cap(self) -> int:
        """``max_connections``, or the default for this process's file limit."""
        if self.max_connections is not None:
            return self.max_connections
        return default_max_connections(_soft_nofile())
