"""Session store backends, chosen by URL.

- ``memory:``: this process's memory (the default; Twisted's semantics);
- ``sqlite:///path/to/file.db``: one file, survives restarts, shared by the
  processes of one machine;
- ``redis://[:password@]host:port/db`` (or ``rediss://``), and
  ``redis+cluster://`` (Redis Cluster) or ``redis+sentinel://`` (Redis with
  Sentinel): shared by processes on many machines; needs ``pip install
  hiredis``;
- ``postgresql://user:password@host:port/dbname`` (or ``postgres://``):
  shared by processes on many machines; needs ``pip install asyncpg``.

:func:`store_from_url` parses a URL at once, so a bad one is an error at
start-up, never at the first request.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from lapse.sessions.store import SessionStore, StoreConfigError

__all__ = ["DEFAULT_STORE_URL", "store_from_url"]

DEFAULT_STORE_URL = "memory:"

_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]")


def check_no_control(text: str, what: str) -> None:
    """:class:`StoreConfigError` if ``text`` holds a control character (NUL,
    a line break, ...), naming it and where, but not echoing ``text`` (a
    store URL may carry a password)."""
    found = _CONTROL.search(text)
    if found is not None:
        raise StoreConfigError(
            f"{what} cannot hold control characters: {found.group()!r} at position {found.start()}"
        )


def store_from_url(url: str, clock: Callable[[], float] | None = None) -> SessionStore:
    """The store a URL names; :class:`StoreConfigError` if it names none."""
    if not isinstance(url, str) or not url.strip():
        raise StoreConfigError(f"a session store URL is a non-empty string, not {url!r}")
    check_no_control(url, "a session store URL")
    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    if scheme == "memory":
        if url.rstrip("/") != "memory:":
            raise StoreConfigError(f"the memory store takes no options: {url!r}")
        from lapse.sessions.stores.memory import MemoryStore

        return MemoryStore(clock)
    if scheme == "sqlite":
        from lapse.sessions.stores.sqlite import SQLiteStore

        return SQLiteStore.from_url(url, clock)
    if scheme in _REDIS_SCHEMES:
        from lapse.sessions.stores.redis import RedisStore

        return RedisStore.from_url(url, clock)
    if scheme in ("postgresql", "postgres"):
        from lapse.sessions.stores.postgres import PostgresStore

        return PostgresStore.from_url(url, clock)
    from lapse.sessions.stores.redis.url import redact

    raise StoreConfigError(
        f"unknown session store URL {redact(url)!r}: use memory:, sqlite:///path.db, "
        "redis://host:port/db, redis+cluster://host:port,host:port, "
        "redis+sentinel://host:port/service or postgresql://user@host:port/dbname"
    )


_REDIS_SCHEMES = frozenset(
    f"{base}{kind}" for base in ("redis", "rediss") for kind in ("", "+cluster", "+sentinel")
)
