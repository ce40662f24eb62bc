"""Session data: the state that persists with a session, in any store.

Values must be JSON-serialisable: assigning anything else is a TypeError
naming the key. The mapping records which keys changed since the last save,
so the site writes only those, and two requests of one session that change
different keys both persist. Values are stored as JSON: mutating a nested
value in place (``data["cart"].append(x)``) is not seen; assign it again.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, MutableMapping
from typing import Any

__all__ = ["SessionData"]


class SessionData(MutableMapping[str, Any]):
    """A dict of JSON values that remembers what changed."""

    __slots__ = ("_changed", "_removed", "_values")

    def __init__(self, values: dict[str, Any] | None = None) -> None:
        self._values: dict[str, Any] = {} if values is None else values
        # Made on the first change: most sessions never change their data,
        # and two empty sets would cost more than the rest of a session.
        self._changed: set[str] | None = None
        self._removed: set[str] | None = None

    def __getitem__(self, key: str) -> Any:
        return self._values[key]

    def __setitem__(self, key: str, value: Any) -> None:
        if not isinstance(key, str):
            raise TypeError(f"session data keys are str, not {type(key).__name__}")
        try:
            json.dumps(value)
        except (TypeError, ValueError) as exc:
            raise TypeError(
                f"session data {key!r}: a {type(value).__name__} is not JSON-serialisable"
            ) from exc
        self._values[key] = value
        if self._changed is None:
            self._changed = set()
        self._changed.add(key)
        if self._removed:
            self._removed.discard(key)

    def __delitem__(self, key: str) -> None:
        del self._values[key]
        if self._changed:
            self._changed.discard(key)
        if self._removed is None:
            self._removed = set()
        self._removed.add(key)

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    @property
    def dirty(self) -> bool:
        """Whether anything changed since the last save."""
        return bool(self._changed or self._removed)

    def take_changes(self) -> tuple[dict[str, Any], set[str]]:
        """The changed values and removed keys since the last call; resets them."""
        changed = {key: self._values[key] for key in self._changed or ()}
        removed = self._removed or set()
        self._changed = self._removed = None
        return changed, removed

    def restore_changes(self, changed: dict[str, Any], removed: set[str]) -> None:
        """Mark changes as unsaved again (their save failed)."""
        if changed:
            self._changed = (self._changed or set()) | changed.keys()
        if removed:
            self._removed = (self._removed or set()) | removed

    def __repr__(self) -> str:
        return f"<SessionData {len(self._values)} keys, {len(self._changed or ())} changed>"
