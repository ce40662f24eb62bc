"""The Redis store's URL, checked: ``redis://[[user]:password@]host[:port][/db][?prefix=name]``
or ``rediss://``. Anything wrong is a :class:`StoreConfigError` naming it (never
the password)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import parse_qs, unquote, urlsplit

from lapse.sessions.store import StoreConfigError
from lapse.sessions.stores import check_no_control

__all__ = ["Target", "parse_url", "redact"]


@dataclass(frozen=True, slots=True)
class Target:
    """A parsed store URL."""

    tls: bool
    host: str
    port: int
    db: int
    username: str | None
    password: str | None
    prefix: str | None
    redacted: str


def redact(url: str) -> str:
    """``url`` with the password (if any) replaced by ``***``."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    end = len(rest)
    for stop in "/?#":
        pos = rest.find(stop)
        if pos != -1:
            end = min(end, pos)
    netloc, tail = rest[:end], rest[end:]
    userinfo, at, hostport = netloc.rpartition("@")
    if not at or ":" not in userinfo:
        return url
    user = userinfo.split(":", 1)[0]
    return f"{scheme}://{user}:***@{hostport}{tail}"


def parse_url(url: str) -> Target:
    """Check a store URL; :class:`StoreConfigError` naming what is wrong."""
    if not isinstance(url, str):
        raise StoreConfigError(f"a Redis store URL is a string, not {type(url).__name__}")
    check_no_control(url, "a Redis store URL")
    redacted = redact(url)

    def bad(why: str) -> StoreConfigError:
        return StoreConfigError(f"bad Redis store URL {redacted!r}: {why}")

    try:
        parts = urlsplit(url)
    except ValueError as exc:
        raise bad(str(exc)) from None
    scheme = parts.scheme.lower()
    if scheme not in ("redis", "rediss"):
        raise bad(f"the scheme must be redis:// or rediss://, not {parts.scheme + ':'!r}")
    if parts.fragment:
        raise bad("a fragment (#...) means nothing here")
    host = parts.hostname
    if not host:
        raise bad("no host")
    try:
        port = parts.port
    except ValueError:
        raise bad("the port must be a number from 1 to 65535") from None
    if port == 0:
        raise bad("the port must be a number from 1 to 65535")
    path = parts.path
    if path in ("", "/"):
        db = 0
    elif re.fullmatch(r"/\d+", path):
        db = int(path[1:])
    else:
        raise bad(f"the path must be /<db number>, not {path!r}")
    prefix: str | None = None
    try:
        query = parse_qs(parts.query, keep_blank_values=True, strict_parsing=bool(parts.query))
    except ValueError as exc:
        raise bad(f"bad query: {exc}") from None
    for name, values in query.items():
        if name != "prefix":
            raise bad(f"unknown option {name!r} (the only option is prefix)")
        if len(values) != 1 or not values[0]:
            raise bad("prefix must be given once, not empty")
        prefix = values[0]
    username = unquote(parts.username) if parts.username else None
    password = unquote(parts.password) if parts.password is not None else None
    return Target(
        tls=scheme == "rediss",
        host=host,
        port=port or 6379,
        db=db,
        username=username,
        password=password or None,
        prefix=prefix,
        redacted=redacted,
    )
