"""Every ``LAPSE_*`` environment variable lapse reads: name, default, parser.

Each variable is one :class:`Setting`; code reads it with
:meth:`Setting.get` (``settings.LOG_LEVEL.get()``), never through
``os.environ`` itself. An unset or empty variable is its default; a value
its parser refuses is a :class:`SettingError` (a ``ValueError``) whose
message names the variable, so ``lapse serve`` and ``reactor.run()`` stop
with one clear line. :func:`render_table` writes the configuration
reference (``docs/configuration.md``, checked against it by a test).

This module imports nothing of lapse: reading a setting never loads the
reactor or uvicorn.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

__all__ = [
    "GC_TUNING",
    "LIVEVIEW_SECRET",
    "LIVEVIEW_TOKEN",
    "LOG_LEVEL",
    "SESSION_STORE",
    "SETTINGS",
    "Setting",
    "SettingError",
    "render_table",
]

T = TypeVar("T")

MIN_SECRET_BYTES = 32
"""``LAPSE_LIVEVIEW_SECRET``: at least this many bytes (twice as many hex digits)."""


class SettingError(ValueError):
    """A ``LAPSE_*`` variable holds a value its parser refuses; the message names it."""


@dataclass(frozen=True)
class Setting(Generic[T]):
    """One environment variable: its name, its value when unset, how it is read."""

    name: str
    default: T
    parse: Callable[[str], T]
    """Raises ValueError with the reason (the text after the value) if refused."""
    description: str
    """One line for the configuration reference."""
    read_by: str
    """Who reads it, for the reference."""
    default_text: str = ""
    """The default as the reference shows it (``repr`` of ``default`` if empty)."""
    secret: bool = False
    """Never show the value in a message (only its length)."""

    def get(self, environ: Mapping[str, str] | None = None) -> T:
        """The value in ``environ`` (``os.environ`` by default), parsed; the
        default when unset or empty. :class:`SettingError` if refused."""
        text = (os.environ if environ is None else environ).get(self.name, "")
        if not text:
            return self.default
        try:
            return self.parse(text)
        except ValueError as exc:
            if self.secret:
                problem = f"{self.name} {exc}; the value set ({len(text)} characters) is not"
            else:
                problem = f"{self.name}={text!r} {exc}"
            raise SettingError(problem) from None

    def check(self, text: str) -> T:
        """``text`` parsed as this variable's value (:class:`SettingError` if refused)."""
        return self.get({self.name: text})


def _log_level(text: str) -> str:
    level = text.strip().upper()
    if not isinstance(logging.getLevelName(level), int):
        raise ValueError("is not a logging level")
    return level


def _switch(text: str) -> bool:
    value = text.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ValueError("is not 0 or 1")


def _secret(text: str) -> bytes | None:
    try:
        secret = bytes.fromhex(text.strip())
    except ValueError:
        secret = b""
    if len(secret) < MIN_SECRET_BYTES:
        raise ValueError(
            f"must be at least {2 * MIN_SECRET_BYTES} hex digits ({MIN_SECRET_BYTES} bytes), "
            "e.g. the output of `python -c 'import secrets; print(secrets.token_hex(32))'`"
        )
    return secret


SESSION_STORE: Setting[str | None] = Setting(
    "LAPSE_SESSION_STORE",
    None,
    str,
    "the session store URL: `memory:`, `sqlite:///path.db`, `redis://host:port/db`, "
    "`redis+cluster://host:port,host:port`, `redis+sentinel://host:port/service`, "
    "`postgresql://user:password@host:port/dbname` "
    "(`lapse serve --store` sets it)",
    "`Site`, `SessionMiddleware` (without `store=`), `lapse serve`, `lapse sessions` "
    "(without `--store`)",
    default_text="`memory:`",
)

LOG_LEVEL: Setting[str | None] = Setting(
    "LAPSE_LOG_LEVEL",
    None,
    _log_level,
    "`INFO` (the access log) or `DEBUG` (session events too): log to stderr at that "
    "level, unless the program configured logging itself",
    "`reactor.run()`, `lapse serve`",
    default_text="none (no logging set up)",
)

LIVEVIEW_TOKEN: Setting[str | None] = Setting(
    "LAPSE_LIVEVIEW_TOKEN",
    None,
    str,
    "the live view's token (without one the view answers loopback clients only)",
    "`lapse serve --live-view`, `lapse sessions --server`",
    default_text="none",
    secret=True,
)

LIVEVIEW_SECRET: Setting[bytes | None] = Setting(
    "LAPSE_LIVEVIEW_SECRET",
    None,
    _secret,
    "the key the live view signs its row ids, cursors and CSRF tokens with (hex, at "
    f"least {MIN_SECRET_BYTES} bytes), so they are valid in every process sharing it; "
    "`lapse serve --workers N` makes one for its workers",
    "`LiveView`",
    default_text="a random one per live view",
    secret=True,
)

GC_TUNING: Setting[bool] = Setting(
    "LAPSE_GC_TUNING",
    True,
    _switch,
    "`0`: leave the garbage collector's thresholds alone (`1`: freeze what start-up "
    "built and raise the thresholds)",
    "`reactor.run()`",
    default_text="`1`",
)

SETTINGS: tuple[Setting[Any], ...] = (
    SESSION_STORE,
    LOG_LEVEL,
    LIVEVIEW_TOKEN,
    LIVEVIEW_SECRET,
    GC_TUNING,
)
"""Every setting, in the reference's order."""


def render_table() -> str:
    """The configuration reference: a Markdown table, one row per setting."""
    lines = [
        "| variable | default | read by | what it does |",
        "| --- | --- | --- | --- |",
    ]
    for setting in SETTINGS:
        default = setting.default_text or f"`{setting.default!r}`"
        lines.append(
            f"| `{setting.name}` | {default} | {setting.read_by} | {setting.description} |"
        )
    return "\n".join(lines) + "\n"
