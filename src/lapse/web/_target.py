"""Request targets: query strings and urlencoded forms as Twisted reads
them, a query's secrets redacted for logs, a path split into segments."""

from __future__ import annotations

from urllib.parse import unquote_to_bytes

from lapse.web.error import BadRequest

__all__ = ["SEGMENT_SAFE", "parse_query", "redact_query", "split_path"]


def parse_query(data: bytes) -> dict[bytes, list[bytes]]:
    """The arguments of a query string or urlencoded form, as Twisted gives them.

    Pairs are split on ``&``; ``+`` is a space; ``%XX`` is decoded to its
    byte, whatever the bytes (UTF-8 or not), and a ``%`` that starts no
    escape stays as it is. Keys and values are bytes; a key without ``=``
    has the value ``b""``; empty pairs are skipped. It never raises.
    """
    args: dict[bytes, list[bytes]] = {}
    if not data:
        return args
    for pair in data.split(b"&"):
        if not pair:
            continue
        key, _, value = pair.partition(b"=")
        if b"+" in pair or b"%" in pair:
            key, value = _unquote_plus(key), _unquote_plus(value)
        found = args.get(key)
        if found is None:
            args[key] = [value]
        else:
            found.append(value)
    return args


def _unquote_plus(part: bytes) -> bytes:
    """A query key or value decoded: ``+`` a space, ``%XX`` its byte."""
    if b"+" in part:
        part = part.replace(b"+", b" ")
    return unquote_to_bytes(part) if b"%" in part else part


def redact_query(uri: bytes, names: frozenset[bytes]) -> bytes:
    """``uri`` with the value of each query argument named in ``names`` (as
    :func:`parse_query` reads names, escapes included) replaced by
    ``[redacted]``; ``uri`` itself if it has none."""
    path, mark, query = uri.partition(b"?")
    if not mark:
        return uri
    pairs = query.split(b"&")
    changed = False
    for index, pair in enumerate(pairs):
        key = pair.partition(b"=")[0]
        if _unquote_plus(key) in names:
            pairs[index] = key + b"=[redacted]"
            changed = True
    return path + b"?" + b"&".join(pairs) if changed else uri


SEGMENT_SAFE = b"!$&'()*+,;=:@-._~"
"""What a path segment carries unescaped (RFC 3986 pchar, less ``%``)."""


def split_path(raw: bytes) -> list[bytes]:
    """The percent-decoded segments of a request path, dot segments resolved.

    ``.`` and ``..`` segments are removed as RFC 3986 (5.2.4) says, never
    climbing above the root. A segment that only decodes to ``.`` or ``..``
    (``%2e%2e``) is a :class:`BadRequest`: it is a traversal attempt.
    An encoded slash (``%2F``) stays inside its segment.
    """
    known = _split.get(raw)
    if known is not None:
        return list(known)
    if not raw.startswith(b"/"):
        raise BadRequest("The request target must be an absolute path.")
    segments = _split_new(raw)
    if len(raw) <= _SPLIT_LONGEST and len(_split) < _SPLIT_MAX:
        _split[raw] = tuple(segments)
    return segments


_SPLIT_MAX = 4096
_SPLIT_LONGEST = 256
_split: dict[bytes, tuple[bytes, ...]] = {}
"""Paths already split (most requests repeat a few): at most _SPLIT_MAX of
them, each at most _SPLIT_LONGEST bytes; no more once full."""


def _split_new(raw: bytes) -> list[bytes]:
    segments = raw[1:].split(b"/")
    if b"." in raw:
        kept: list[bytes] = []
        for segment in segments:
            if segment == b"..":
                if kept:
                    kept.pop()
            elif segment != b".":
                kept.append(segment)
        if segments[-1] in (b".", b".."):
            kept.append(b"")
        segments = kept or [b""]
    if b"%" in raw:
        segments = [unquote_to_bytes(segment) for segment in segments]
        if any(segment in (b".", b"..") for segment in segments):
            raise BadRequest("Encoded dot segments are not allowed in a path.")
    return segments
