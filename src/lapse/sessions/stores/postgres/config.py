"""The PostgreSQL store's URL: ``postgresql://user:password@host:port/dbname``
(or ``postgres://``) with ``?schema=``, ``?table_prefix=``, ``?sslmode=``,
``?timeout=`` and ``?pool_size=``; every mistake a :class:`StoreConfigError` that names it, never
the password."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from urllib.parse import parse_qsl, unquote, urlsplit

from lapse.sessions.store import StoreConfigError
from lapse.sessions.stores.redis.url import redact

__all__ = ["SCHEMES", "SSL_MODES", "PostgresConfig", "parse_url"]

SCHEMES = ("postgresql", "postgres")
SSL_MODES = ("disable", "require", "verify-ca", "verify-full")
MAX_POOL_SIZE = 100
"""The most connections ``?pool_size=`` may ask of one process's pool."""
IDENTIFIER = re.compile(r"[a-z_][a-z0-9_]{0,39}")
"""A schema name or table prefix: a plain lowercase identifier (no quoting
needed, and room left under PostgreSQL's 63 bytes for the table names)."""


@dataclass(frozen=True, slots=True)
class PostgresConfig:
    """Where and how to connect, from a URL."""

    host: str
    port: int
    user: str | None
    password: str | None
    database: str | None
    schema: str = "public"
    table_prefix: str = "lapse_"
    sslmode: str = "disable"
    timeout: float = 1.0
    pool_size: int = 10
    """The most connections of the store's pool (one process's)."""

    @property
    def safe_url(self) -> str:
        """The URL to log: no password."""
        user = "" if self.user is None else self.user + ("" if self.password is None else ":***")
        at = "@" if user else ""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return (
            f"postgresql://{user}{at}{host}:{self.port}/{self.database or ''}"
            f"?schema={self.schema}&table_prefix={self.table_prefix}"
        )


def _seconds(name: str, text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 < value < math.inf:
        raise StoreConfigError(f"{name} is seconds > 0, not {text!r}")
    return value


def _pool_size(text: str) -> int:
    if not (text.isascii() and text.isdigit() and 1 <= int(text) <= MAX_POOL_SIZE):
        raise StoreConfigError(f"pool_size is a whole number 1 to {MAX_POOL_SIZE}, not {text!r}")
    return int(text)


def parse_url(url: str) -> PostgresConfig:
    """The configuration a ``postgresql://`` URL names, or StoreConfigError."""
    shown = redact(url)
    try:
        parts = urlsplit(url)
        port = parts.port or 5432
    except ValueError as exc:
        raise StoreConfigError(f"bad PostgreSQL store URL {shown!r}: {exc}") from None
    if parts.scheme.lower() not in SCHEMES:
        raise StoreConfigError(f"not a PostgreSQL URL (postgresql://...): {shown!r}")
    if not parts.hostname:
        raise StoreConfigError(f"the PostgreSQL store URL names no host: {shown!r}")
    if parts.fragment:
        raise StoreConfigError(f"the PostgreSQL store URL cannot have a #fragment: {shown!r}")
    database = unquote(parts.path[1:]) if parts.path.startswith("/") else ""
    if "/" in database:
        raise StoreConfigError(f"the PostgreSQL store URL path is one database name: {shown!r}")
    options: dict[str, str] = {}
    try:
        pairs = parse_qsl(parts.query, keep_blank_values=True, strict_parsing=bool(parts.query))
    except ValueError:
        raise StoreConfigError(f"bad query string in the PostgreSQL store URL {shown!r}") from None
    for name, value in pairs:
        if name in options:
            raise StoreConfigError(f"the PostgreSQL store option {name!r} is given twice")
        options[name] = value
    known = {"schema", "table_prefix", "sslmode", "timeout", "pool_size"}
    unknown = sorted(set(options) - known)
    if unknown:
        raise StoreConfigError(
            f"unknown PostgreSQL store option(s) {', '.join(unknown)} "
            f"(known: {', '.join(sorted(known))})"
        )
    schema = options.get("schema", "public")
    prefix = options.get("table_prefix", "lapse_")
    for name, value in (("schema", schema), ("table_prefix", prefix)):
        if not IDENTIFIER.fullmatch(value):
            raise StoreConfigError(
                f"{name} is a lowercase identifier ([a-z_][a-z0-9_]*, at most 40), not {value!r}"
            )
    sslmode = options.get("sslmode", "disable")
    if sslmode not in SSL_MODES:
        raise StoreConfigError(f"sslmode is one of {', '.join(SSL_MODES)}, not {sslmode!r}")
    timeout = _seconds("timeout", options["timeout"]) if "timeout" in options else 1.0
    pool_size = _pool_size(options.get("pool_size", "10"))
    return PostgresConfig(
        host=parts.hostname,
        port=port,
        user=unquote(parts.username) if parts.username else None,
        password=unquote(parts.password) if parts.password is not None else None,
        database=database or None,
        schema=schema,
        table_prefix=prefix,
        sslmode=sslmode,
        timeout=timeout,
        pool_size=pool_size,
    )
