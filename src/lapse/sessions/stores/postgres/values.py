"""Session data as the PostgreSQL store keeps it: one ``jsonb`` object.

``jsonb`` (and ``text``) cannot hold U+0000, which JSON and the other stores
can: a NUL in a key or a string value would make every save of that session
fail. So the store writes NUL as the pair U+E000 U+E002 and U+E000 itself as
U+E000 U+E001 (a private-use character, escaped so the mapping is one to
one), and undoes it when reading. Text without either character (nearly
all) is passed as it is.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from typing import Any

__all__ = ["dump_data", "dump_keys", "load_data", "load_encoded", "storable"]

_ESCAPE = "\ue000"
_NUL_ESCAPE = re.compile(r"(?<!\\)((?:\\\\)*)\\u0000")
"""A JSON ``\\u0000`` escape: one not itself escaped (an even run of
backslashes before it)."""
_STORED = re.compile("\ue000([\ue001\ue002])")


def dump_data(data: Mapping[str, Any]) -> str:
    """The JSON text of ``data`` for a ``jsonb`` parameter."""
    text = json.dumps(dict(data), separators=(",", ":"), ensure_ascii=False)
    if _ESCAPE in text:
        text = text.replace(_ESCAPE, "\ue000\ue001")
    if "\\u0000" in text:
        text = _NUL_ESCAPE.sub("\\1\ue000\ue002", text)
    return text


def dump_keys(keys: Iterable[str]) -> list[str]:
    """Keys as they are stored (for ``data - keys``)."""
    return [
        key.replace(_ESCAPE, "\ue000\ue001").replace("\x00", "\ue000\ue002")
        if _ESCAPE in key or "\x00" in key
        else key
        for key in keys
    ]


def load_data(text: str) -> dict[str, Any]:
    """The data a ``jsonb`` column's text holds."""
    if _ESCAPE in text:
        text = _STORED.sub(lambda m: "\\u0000" if m.group(1) == "\ue002" else _ESCAPE, text)
    data: dict[str, Any] = json.loads(text)
    return data


def load_encoded(keys: list[str], texts: list[str]) -> dict[str, str]:
    """The JSON text of each key, from a load's key and value-text arrays
    (for ``StoredSession.encoded``: decoded only when read)."""
    encoded = dict(zip(keys, texts, strict=True))
    if any(_ESCAPE in key or _ESCAPE in text for key, text in encoded.items()):
        undo = _STORED.sub
        encoded = {
            undo(lambda m: "\x00" if m.group(1) == "\ue002" else _ESCAPE, key): undo(
                lambda m: "\\u0000" if m.group(1) == "\ue002" else _ESCAPE, text
            )
            for key, text in encoded.items()
        }
    return encoded


def storable(uid: str) -> bool:
    """Whether ``uid`` can be a session's uid here: text PostgreSQL takes
    (no NUL, valid UTF-8). A cookie holding anything else names no session."""
    if uid.isascii():
        return "\x00" not in uid
    try:
        uid.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return "\x00" not in uid
