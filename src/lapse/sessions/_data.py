"""Session data: the state that persists with a session, in any store.

Values must be JSON that every store can hold: assigning anything else
raises at the assignment, naming the key (a ``TypeError`` for a value of a
type JSON has no form for, a ``ValueError`` for NaN or an infinity, a string
with a lone surrogate (not UTF-8), or nesting too deep to encode), so a bad
value never reaches a store's write. The mapping records which keys changed
since the last save, so the site writes only those, and two requests of one
session that change different keys both persist. Values are stored as JSON:
mutating a nested value in place (``data["cart"].append(x)``) is not seen;
assign it again.

A mapping may sit on a *base*: the JSON texts of the data as a store holds
it, decoded one key at a time when read. So a request's cost does not grow
with the number of keys it does not read, and several mappings (one per
request in flight) can share one base without sharing decoded, mutable
values.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping, MutableMapping
from typing import Any

__all__ = ["SessionData", "encode_value"]

_encoder = json.JSONEncoder(ensure_ascii=False, allow_nan=False, separators=(",", ":"))


def encode_value(key: str, value: Any) -> str:
    """The JSON text of ``value`` as every store writes it, checked: a
    ``TypeError`` or ``ValueError`` naming ``key`` if no store can hold it."""
    try:
        text = _encoder.encode(value)
    except TypeError as exc:
        raise TypeError(
            f"session data {key!r}: a {type(value).__name__} is not JSON-serialisable ({exc})"
        ) from None
    except ValueError as exc:  # NaN, infinities, circular references
        raise ValueError(f"session data {key!r}: not storable as JSON: {exc}") from None
    except RecursionError:
        raise ValueError(f"session data {key!r}: nested too deep to store") from None
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(
            f"session data {key!r}: a string in it is not valid Unicode (a lone surrogate); "
            "stores keep UTF-8"
        ) from None
    return text


def _check_key(key: Any) -> None:
    if not isinstance(key, str):
        raise TypeError(f"session data keys are str, not {type(key).__name__}")
    try:
        key.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(
            f"session data key {key!r} is not valid Unicode (a lone surrogate)"
        ) from None


class SessionData(MutableMapping[str, Any]):
    """A dict of JSON values that remembers what changed, optionally read
    lazily from a base of JSON texts (see the module docstring)."""

    __slots__ = ("_base", "_changed", "_mirrors", "_removed", "_values", "_version")

    def __init__(
        self,
        values: dict[str, Any] | None = None,
        *,
        base: Mapping[str, str] | None = None,
        version: int | None = None,
    ) -> None:
        # Decoded values: assigned ones, and those read from the base so far.
        self._values: dict[str, Any] = {} if values is None else values
        # The JSON texts behind the keys not read yet; never changed here.
        self._base = base
        # The version of the store's data the base is (None: unknown).
        self._version = version
        # Made on the first change: most sessions never change their data,
        # and an empty dict and set would cost more than the rest of a session.
        self._changed: dict[str, str] | None = None  # key -> its JSON text
        self._removed: set[str] | None = None
        # Plain dicts kept equal to this mapping as it changes (the ASGI
        # middleware's ``request.session``, a dict for the code that reads a
        # dict's storage directly: json, ``==``, C extensions).
        self._mirrors: list[dict[str, Any]] | None = None

    def __getitem__(self, key: str) -> Any:
        try:
            return self._values[key]
        except KeyError:
            base = self._base
            if base is None or (self._removed is not None and key in self._removed):
                raise
            value = self._values[key] = json.loads(base[key])
            return value

    def __contains__(self, key: object) -> bool:
        if key in self._values:
            return True
        base = self._base
        return (
            base is not None
            and key in base
            and not (self._removed is not None and key in self._removed)
        )

    def __setitem__(self, key: str, value: Any) -> None:
        _check_key(key)
        text = encode_value(key, value)
        self._values[key] = value
        if self._changed is None:
            self._changed = {}
        self._changed[key] = text
        if self._removed:
            self._removed.discard(key)
        if self._mirrors:
            for mirror in self._mirrors:
                dict.__setitem__(mirror, key, value)

    def __delitem__(self, key: str) -> None:
        if key not in self:
            raise KeyError(key)
        self._values.pop(key, None)
        if self._changed:
            self._changed.pop(key, None)
        if self._removed is None:
            self._removed = set()
        self._removed.add(key)
        if self._mirrors:
            for mirror in self._mirrors:
                dict.pop(mirror, key, None)

    def __iter__(self) -> Iterator[str]:
        base = self._base
        if base is None:
            yield from self._values
            return
        removed = self._removed or ()
        for key in base:
            if key not in removed:
                yield key
        yield from [key for key in self._values if key not in base]

    def __len__(self) -> int:
        base = self._base
        if base is None:
            return len(self._values)
        gone = sum(1 for key in self._removed or () if key in base)
        added = sum(1 for key in self._values if key not in base)
        return len(base) - gone + added

    @property
    def dirty(self) -> bool:
        """Whether anything changed since the last save."""
        return bool(self._changed or self._removed)

    def take_changes(self) -> tuple[dict[str, Any], set[str]]:
        """The changed values and removed keys since the last call; resets them."""
        changed, _, removed = self._take()
        return changed, removed

    def _take(self) -> tuple[dict[str, Any], dict[str, str], set[str]]:
        """The changes since the last call, values and JSON texts; resets them."""
        texts = self._changed or {}
        changed = {key: self._values[key] for key in texts}
        removed = self._removed or set()
        self._changed = self._removed = None
        return changed, texts, removed

    def _texts(self) -> dict[str, str]:
        """Every key's JSON text (encoding what was assigned or read)."""
        base = self._base or {}
        removed = self._removed or ()
        texts = {key: text for key, text in base.items() if key not in removed}
        changed = self._changed or {}
        for key, value in self._values.items():
            text = changed.get(key)
            if text is None and key not in texts:
                text = encode_value(key, value)
            if text is not None:
                texts[key] = text
        return texts

    def __repr__(self) -> str:
        return f"<SessionData {len(self)} keys, {len(self._changed or ())} changed>"
