"""How the Redis store's values look in Redis: times as integer
microseconds, a session's data as one hash field per key (``d:<key>``, its
value JSON), read back from flat field/value replies."""

from __future__ import annotations

import json
import math
from typing import Any

from lapse.sessions.store import SessionInfo

__all__ = ["US", "decoded", "encode", "encoded", "field", "session_info", "us"]

US = 1_000_000
"""Microseconds per second: times are stored as integer microseconds."""


def us(seconds: float, what: str) -> int:
    """``seconds`` in whole microseconds; a ValueError naming ``what`` if not finite."""
    if not math.isfinite(seconds):
        raise ValueError(f"{what} must be a finite number of seconds, not {seconds!r}")
    return round(seconds * US)


def decoded(flat: list[str]) -> dict[str, Any]:
    """Session data from a flat HGETALL reply (``d:<key>`` fields only)."""
    data: dict[str, Any] = {}
    for i in range(0, len(flat) - 1, 2):
        name = flat[i]
        if name.startswith("d:"):
            data[name[2:]] = json.loads(flat[i + 1])
    return data


def encoded(flat: list[str]) -> dict[str, str]:
    """Session data as JSON texts by key, from a flat HGETALL reply."""
    return {
        flat[i][2:]: flat[i + 1] for i in range(0, len(flat) - 1, 2) if flat[i].startswith("d:")
    }


def session_info(uid: str, score: str, flat: list[str]) -> SessionInfo:
    """A :class:`SessionInfo` from a deadline score and the session's HGETALL."""
    timeout = field(flat, "_t")
    created_us = field(flat, "_c")
    deadline = int(score) / US
    created = None if created_us is None else int(created_us) / US
    last = deadline if timeout is None else deadline - int(timeout) / US
    if created is not None and last < created:
        last = created
    return SessionInfo(uid, created, last, deadline, decoded(flat), field(flat, "_p"))


def field(flat: list[str], name: str) -> str | None:
    """The value of ``name`` in a flat field/value list (a hash, a stream entry)."""
    for i in range(0, len(flat) - 1, 2):
        if flat[i] == name:
            return flat[i + 1]
    return None


def encode(value: Any) -> str:
    """A data value as the JSON text stored in its field."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)
