"""What a SQLite store is given, checked: its ``sqlite:///`` URL and its path.
Anything wrong is a :class:`StoreConfigError` naming it, at construction."""

from __future__ import annotations

import os
from typing import NamedTuple

from lapse.sessions.store import StoreConfigError
from lapse.sessions.stores import check_no_control

__all__ = [
    "DEFAULT_AUTOCHECKPOINT",
    "DEFAULT_SYNCHRONOUS",
    "SYNCHRONOUS_MODES",
    "URL_PREFIX",
    "UrlOptions",
    "check_autocheckpoint",
    "check_synchronous",
    "checked_path",
    "parse_url",
]

URL_PREFIX = "sqlite:///"
_URL_OPTIONS = ("busy_timeout", "timeout", "synchronous", "wal_autocheckpoint")

SYNCHRONOUS_MODES = ("off", "normal", "full", "extra")
"""SQLite's ``PRAGMA synchronous`` values the store accepts (see the package
docstring for what each risks in a power loss)."""
DEFAULT_SYNCHRONOUS = "normal"
DEFAULT_AUTOCHECKPOINT = 1000
"""SQLite's own default: a checkpoint once the WAL holds 1000 pages."""
_MAX_AUTOCHECKPOINT = 1_000_000


class UrlOptions(NamedTuple):
    """What a ``sqlite:///`` URL gives."""

    path: str
    busy_timeout: float
    timeout: float
    synchronous: str
    wal_autocheckpoint: int


def check_synchronous(value: object) -> str:
    """``value`` as a ``synchronous`` mode (lower case); StoreConfigError if
    it is none."""
    mode = value.lower() if isinstance(value, str) else None
    if mode not in SYNCHRONOUS_MODES:
        raise StoreConfigError(
            f"synchronous is one of {', '.join(SYNCHRONOUS_MODES)}, not {value!r}"
        )
    return mode


def check_autocheckpoint(value: object) -> int:
    """``value`` as a ``wal_autocheckpoint`` page count (at least 1: SQLite's
    0, no automatic checkpoint, would let the WAL grow without bound);
    StoreConfigError if it is none."""
    pages = value
    if isinstance(value, str) and value.isascii() and value.isdigit():
        pages = int(value)
    if (
        isinstance(pages, bool)
        or not isinstance(pages, int)
        or not 1 <= pages <= _MAX_AUTOCHECKPOINT
    ):
        raise StoreConfigError(
            f"wal_autocheckpoint is a number of pages from 1 to {_MAX_AUTOCHECKPOINT}, "
            f"not {value!r}"
        )
    return pages


_PATH_MAX = 4095
_NAME_MAX = 255
"""Linux's limits on a file path and on one name in it, in bytes."""


def checked_path(path: str) -> str:
    """``path`` made absolute; :class:`StoreConfigError` if no file can have it."""
    check_no_control(path, "a SQLite store path")
    absolute = os.path.abspath(path)
    try:
        raw = os.fsencode(absolute)
    except UnicodeError:
        raise StoreConfigError(
            f"the SQLite store path {path!r} cannot be a file name on this system"
        ) from None
    longest = max(len(name) for name in raw.split(b"/"))
    if len(raw) > _PATH_MAX or longest > _NAME_MAX:
        raise StoreConfigError(
            f"the SQLite store path is too long for a file: {len(raw)} bytes, its longest "
            f"name {longest} (at most {_PATH_MAX}, and {_NAME_MAX} for each name)"
        )
    return absolute


def parse_url(url: str) -> UrlOptions:
    """The path and options a ``sqlite:///`` URL gives (see
    :meth:`SQLiteStore.from_url <lapse.sessions.stores.sqlite.SQLiteStore.from_url>`)."""
    if not isinstance(url, str):
        raise StoreConfigError(f"a SQLite store URL is a string, not {url!r}")
    if not url.lower().startswith("sqlite:"):
        raise StoreConfigError(
            f"not a SQLite store URL: {url!r} (use sqlite:///relative.db "
            "or sqlite:////absolute/path.db)"
        )
    if not url.lower().startswith(URL_PREFIX):
        raise StoreConfigError(
            f"bad SQLite store URL {url!r}: it is sqlite:/// (three slashes, no host) "
            "then the file path, e.g. sqlite:///sessions.db or sqlite:////abs/sessions.db"
        )
    rest = url[len(URL_PREFIX) :]
    if "#" in rest:
        raise StoreConfigError(f"bad SQLite store URL {url!r}: a fragment (#) means nothing")
    path, _, query = rest.partition("?")
    if not path:
        raise StoreConfigError(
            f"bad SQLite store URL {url!r}: no file path after sqlite:/// "
            "(e.g. sqlite:///sessions.db)"
        )
    if path == ":memory:":
        raise StoreConfigError(
            f"bad SQLite store URL {url!r}: an in-memory database cannot be shared "
            "by processes nor survive a restart (use memory: instead)"
        )
    options: dict[str, str] = {}
    for item in query.split("&") if query else []:
        name, eq, value = item.partition("=")
        if name not in _URL_OPTIONS:
            raise StoreConfigError(
                f"bad SQLite store URL {url!r}: unknown option {name!r} "
                f"(the options are: {', '.join(_URL_OPTIONS)})"
            )
        if not eq or name in options:
            raise StoreConfigError(f"bad SQLite store URL {url!r}: option {name!r} needs one value")
        options[name] = value
    busy_timeout = 5.0
    if "busy_timeout" in options:
        try:
            busy_timeout = float(options["busy_timeout"])
        except ValueError:
            busy_timeout = -1.0
        if not 0 <= busy_timeout < float("inf"):
            raise StoreConfigError(
                f"bad SQLite store URL {url!r}: busy_timeout is seconds >= 0, "
                f"not {options['busy_timeout']!r}"
            )
    timeout = 1.0
    if "timeout" in options:
        try:
            timeout = float(options["timeout"])
        except ValueError:
            timeout = 0.0
        if not 0 < timeout < float("inf"):
            raise StoreConfigError(
                f"bad SQLite store URL {url!r}: timeout is seconds > 0, not {options['timeout']!r}"
            )
    try:
        synchronous = check_synchronous(options.get("synchronous", DEFAULT_SYNCHRONOUS))
        autocheckpoint = check_autocheckpoint(
            options.get("wal_autocheckpoint", DEFAULT_AUTOCHECKPOINT)
        )
    except StoreConfigError as exc:
        raise StoreConfigError(f"bad SQLite store URL {url!r}: {exc}") from None
    return UrlOptions(path, busy_timeout, timeout, synchronous, autocheckpoint)
