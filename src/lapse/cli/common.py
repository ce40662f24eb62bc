"""What every part of the ``lapse`` command shares: exit statuses, the
one-line error, argument types, how durations are shown."""

from __future__ import annotations

import argparse
import re
import sys
import time
from collections.abc import Callable
from typing import Any

EXIT_FAILED = 1
"""Serving failed: the port could not be bound, or a worker died."""

EXIT_USAGE = 2
"""The command line cannot be served as given."""

EXIT_BROKEN_PIPE = 141
"""The reader of the output went away (``lapse sessions list | head``): the
status a shell reports for a command ended by SIGPIPE (128 + 13), as ``git``
and the coreutils end there, so ``set -o pipefail`` still sees a cut output."""


class CommandError(Exception):
    """What to tell the user on one line, and the exit status."""

    def __init__(self, message: str, status: int = EXIT_USAGE) -> None:
        super().__init__(message)
        self.status = status


_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]")


def _shown(text: str, limit: int = 120) -> str:
    """``text`` for a one-line message: control characters escaped, cut
    after ``limit`` characters."""
    if len(text) > limit:
        text = text[:limit] + f"... ({len(text)} characters)"
    return _CONTROL.sub(lambda found: repr(found.group())[1:-1], text)


def _shown_url(url: str) -> str:
    """A store URL for a one-line message: its passwords hidden, then as
    :func:`_shown`."""
    from lapse.sessions.stores.redis.url import redact

    return _shown(redact(url))


def _say(message: str) -> None:
    print(f"lapse: {message}", file=sys.stderr, flush=True)


def _finite(text: str, unit: str, bound: str, zero: bool) -> float:
    """A finite number of ``unit``, above 0 (or 0 or more with ``zero``)."""
    try:
        number = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of {unit}") from None
    if not ((number >= 0 if zero else number > 0) and number < float("inf")):
        raise argparse.ArgumentTypeError(f"{text}: a number of {unit}{bound}")
    return number


def _seconds(text: str) -> float:
    """A positive, finite number of seconds (the connection timeouts)."""
    return _finite(text, "seconds", " above 0", zero=False)


def _rate(text: str) -> float:
    """A finite number of bytes per second, 0 or more (--body-min-rate)."""
    return _finite(text, "bytes per second", ", 0 or more", zero=True)


def _port_number(text: str) -> int:
    try:
        number = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number") from None
    if not 0 <= number <= 65535:
        raise argparse.ArgumentTypeError(f"{number} is not a port number (0-65535)")
    return number


def _positive(text: str) -> int:
    """A whole number, at least 1 (workers, limits, batch sizes, buckets)."""
    try:
        number = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{_shown(text, 40)!r} is not a whole number") from None
    if number < 1:
        raise argparse.ArgumentTypeError(f"{_shown(text, 40)}: at least 1")
    return number


def _at_most(limit: int) -> Callable[[str], int]:
    """A whole number from 1 to ``limit``, as an argparse type."""

    def convert(text: str) -> int:
        number = _positive(text)
        if number > limit:
            raise argparse.ArgumentTypeError(f"{_shown(text, 40)}: at most {limit}")
        return number

    convert.__name__ = "number"  # what argparse names in its messages
    return convert


def _principal(text: str) -> str:
    """``--user NAME``: a principal as the stores take it (``check_principal``)."""
    from lapse.sessions.store import check_principal

    try:
        return check_principal(text)
    except (TypeError, ValueError) as exc:
        raise argparse.ArgumentTypeError(_shown(str(exc))) from None


_principal.__name__ = "user name"  # what argparse names in its messages


def _user_shown(principal: str | None, limit: int = 40) -> str:
    """A principal for a terminal: text a user chose, so anything that is not
    printable (bidirectional overrides, zero-width marks) is escaped, and it
    is cut after ``limit`` characters; None is ``-``."""
    if principal is None:
        return "-"
    text = "".join(c if c.isprintable() else repr(c)[1:-1] for c in principal)
    return text if len(text) <= limit else text[: limit - 1] + "\u2026"


def _duration(seconds: float) -> str:
    """``seconds`` as ``2d03h``, ``1h05m``, ``3m07s`` or ``12s``."""
    whole = max(0, int(seconds))
    days, rest = divmod(whole, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d{hours:02d}h"
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"


def _when(stamp: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(stamp))


def _is_memory(url: str) -> bool:
    return url.split(":", 1)[0].strip().lower() == "memory"


def store_for(url: str, source: str) -> Any:
    """The store ``url`` names (not opened); a :class:`CommandError` naming
    ``source`` (where the URL came from) if it is not a store URL."""
    from lapse.sessions.store import StoreConfigError
    from lapse.sessions.stores import store_from_url

    try:
        return store_from_url(url)
    except StoreConfigError as exc:
        raise CommandError(f"{source}: {exc}") from None
