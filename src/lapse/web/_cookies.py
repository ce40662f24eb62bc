"""Cookie headers: a lenient parser and a strict formatter.

Parsing never raises: a ``Cookie`` header from the wild may hold anything, and
what cannot be read as ``name=value`` is skipped. Formatting refuses what
would break the ``Set-Cookie`` header (control characters, ``;``, ``,``).
"""

from __future__ import annotations

import re
from email.utils import formatdate

__all__ = [
    "format_delete_cookie",
    "format_session_cookie",
    "format_set_cookie",
    "parse_cookie_header",
    "vary_on_cookie",
]

_UNSAFE = re.compile(rb"[\x00-\x1f\x7f;,]")
_SAMESITE = {"lax": b"Lax", "strict": b"Strict", "none": b"None"}


def parse_cookie_header(header: bytes) -> dict[bytes, bytes]:
    """``name=value`` pairs of a ``Cookie`` header; the first of a name wins."""
    cookies: dict[bytes, bytes] = {}
    for part in header.split(b";"):
        name, sep, value = part.partition(b"=")
        name = name.strip()
        if not sep or not name:
            continue
        value = value.strip()
        if len(value) >= 2 and value[:1] == b'"' and value[-1:] == b'"':
            value = value[1:-1]
        cookies.setdefault(name, value)
    return cookies


def _check(what: str, value: bytes) -> bytes:
    if _UNSAFE.search(value):
        raise ValueError(f"cookie {what} {value!r} has a character a cookie cannot carry")
    return value


def _bytes(value: bytes | str) -> bytes:
    return value if isinstance(value, bytes) else value.encode("utf-8")


def format_set_cookie(
    name: bytes | str,
    value: bytes | str,
    *,
    expires: bytes | str | float | None = None,
    domain: bytes | str | None = None,
    path: bytes | str | None = None,
    max_age: int | str | bytes | None = None,
    comment: bytes | str | None = None,
    secure: bool | None = None,
    http_only: bool = False,
    same_site: str | None = None,
) -> bytes:
    """The value of one ``Set-Cookie`` header."""
    parts = [_check("name", _bytes(name)) + b"=" + _check("value", _bytes(value))]
    if expires is not None:
        if isinstance(expires, int | float):
            expires = formatdate(expires, usegmt=True)
        parts.append(b"Expires=" + _check("expires", _bytes(expires)))
    if domain is not None:
        parts.append(b"Domain=" + _check("domain", _bytes(domain)))
    if path is not None:
        parts.append(b"Path=" + _check("path", _bytes(path)))
    if max_age is not None:
        age = max_age if isinstance(max_age, bytes) else str(max_age).encode("ascii")
        parts.append(b"Max-Age=" + _check("max-age", age))
    if comment is not None:
        parts.append(b"Comment=" + _check("comment", _bytes(comment)))
    if secure:
        parts.append(b"Secure")
    if http_only:
        parts.append(b"HttpOnly")
    if same_site is not None:
        flag = _SAMESITE.get(same_site.lower())
        if flag is None:
            raise ValueError(f"sameSite must be 'lax', 'strict' or 'none', not {same_site!r}")
        parts.append(b"SameSite=" + flag)
    return b"; ".join(parts)


_SESSION_FLAGS = b"; Path=/; HttpOnly; SameSite=Lax"
_SECURE_SESSION_FLAGS = b"; Path=/; Secure; HttpOnly; SameSite=Lax"


def format_session_cookie(name: bytes, uid: str, *, secure: bool) -> bytes:
    """A session cookie: ``Path=/``, ``HttpOnly``, ``SameSite=Lax``, and
    ``Secure`` on a secure request. The same as :func:`format_set_cookie`
    with those flags, in one step: it is on every new session's path."""
    value = _check("value", uid.encode("utf-8"))
    return name + b"=" + value + (_SECURE_SESSION_FLAGS if secure else _SESSION_FLAGS)


_EPOCH = formatdate(0, usegmt=True).encode("ascii")


def format_delete_cookie(name: bytes, *, secure: bool) -> bytes:
    """A ``Set-Cookie`` value that makes the browser drop the cookie ``name``."""
    value = name + b"=; Path=/; Max-Age=0; Expires=" + _EPOCH + b"; HttpOnly; SameSite=Lax"
    return value + b"; Secure" if secure else value


def vary_on_cookie(headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """``headers`` saying that the response varies with the Cookie header: an
    existing ``Vary`` gains ``Cookie`` (unless it names it, or is ``*``),
    else one is added. A shared cache must not give one visitor's page to
    another: every response that read, or could have read, a session."""
    for name, value in headers:
        if name.lower() != b"vary":
            continue
        tokens = {token.strip().lower() for token in value.split(b",")}
        if b"cookie" in tokens or b"*" in tokens:
            return headers
    for index, (name, value) in enumerate(headers):
        if name.lower() == b"vary":
            merged = value + b", Cookie" if value.strip() else b"Cookie"
            return [*headers[:index], (name, merged), *headers[index + 1 :]]
    return [*headers, (b"vary", b"Cookie")]
