"""Header collections, as Twisted's ``Headers``: case-insensitive, multi-valued.

Names and values are bytes inside. The str API decodes values as UTF-8 and,
for bytes that are not UTF-8, as Latin-1, so a header never fails to read.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

__all__ = ["Headers", "decode_header", "encode_header"]


def decode_header(value: bytes) -> str:
    """A header value as str: UTF-8 where it is, Latin-1 where it is not."""
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        return value.decode("latin-1")


def encode_header(value: bytes | str) -> bytes:
    """A header name or value as bytes, with line breaks made spaces.

    Folding CR and LF away keeps a value from starting a header of its own.
    """
    raw = value if isinstance(value, bytes) else value.encode("utf-8")
    if b"\r" in raw or b"\n" in raw:
        raw = raw.replace(b"\r\n", b" ").replace(b"\r", b" ").replace(b"\n", b" ")
    return raw


class Headers:
    """A case-insensitive multimap of header names to lists of values."""

    def __init__(self, raw: Iterable[tuple[bytes, bytes]] = ()) -> None:
        self._raw: dict[bytes, list[bytes]] = {}
        for name, value in raw:
            self._raw.setdefault(name.lower(), []).append(value)

    def hasHeader(self, name: bytes | str) -> bool:
        """Whether a header called ``name`` is present."""
        return encode_header(name).lower() in self._raw

    def getRawHeaders(
        self, name: bytes | str, default: list[bytes] | list[str] | None = None
    ) -> list[bytes] | list[str] | None:
        """Every value of ``name`` (str values for a str name), or ``default``."""
        values = self._raw.get(encode_header(name).lower())
        if values is None:
            return default
        if isinstance(name, str):
            return [decode_header(v) for v in values]
        return list(values)

    def setRawHeaders(self, name: bytes | str, values: Iterable[bytes | str]) -> None:
        """Replace every value of ``name`` with ``values``."""
        self._raw[encode_header(name).lower()] = [encode_header(v) for v in values]

    def addRawHeader(self, name: bytes | str, value: bytes | str) -> None:
        """Add one value to ``name``."""
        self._raw.setdefault(encode_header(name).lower(), []).append(encode_header(value))

    def removeHeader(self, name: bytes | str) -> None:
        """Remove every value of ``name``."""
        self._raw.pop(encode_header(name).lower(), None)

    def getAllRawHeaders(self) -> Iterator[tuple[bytes, list[bytes]]]:
        """Each name (lower case) with its values."""
        return iter(list(self._raw.items()))

    def items(self) -> Iterator[tuple[bytes, bytes]]:
        """Each (name, value) pair, a name repeated for each of its values."""
        for name, values in self._raw.items():
            for value in values:
                yield name, value

    def __contains__(self, name: object) -> bool:
        return isinstance(name, bytes | str) and self.hasHeader(name)

    def __repr__(self) -> str:
        return f"<Headers {len(self._raw)} names>"
