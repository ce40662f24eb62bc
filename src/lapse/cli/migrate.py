"""``lapse sessions migrate``: the PostgreSQL store's tables, made or brought
up to date now (a deploy step), or their DDL printed (``--sql``) for teams
that apply migrations themselves. The other stores need no such step: a
SQLite file is upgraded by the first process that opens it, and Redis keeps
no schema."""

from __future__ import annotations

import argparse
import asyncio

from lapse.cli.common import EXIT_FAILED, CommandError
from lapse.cli.sources import store_url

__all__ = ["run_migrate"]

NOT_POSTGRES = (
    "{source}: 'lapse sessions migrate' is for a PostgreSQL store (postgresql://...); "
    "a SQLite file is upgraded in place by the first process that opens it, and Redis "
    "keeps no schema"
)


def run_migrate(args: argparse.Namespace) -> int:
    """Print the DDL (``--sql``), or apply it; the exit status."""
    from lapse.sessions.store import StoreConfigError
    from lapse.sessions.stores.postgres.config import SCHEMES, parse_url
    from lapse.sessions.stores.postgres.schema import SCHEMA_VERSION, ddl

    url, source = store_url(args.store)
    if url.partition(":")[0].lower() not in SCHEMES:
        raise CommandError(NOT_POSTGRES.format(source=source))
    try:
        config = parse_url(url)
    except StoreConfigError as exc:
        raise CommandError(f"{source}: {exc}") from None
    after = args.from_version
    if after is not None and not 0 <= after <= SCHEMA_VERSION:
        raise CommandError(f"--from-version is 0 (no tables) to {SCHEMA_VERSION}, not {after}")
    if args.sql:
        print(ddl(config.schema, config.table_prefix, after or 0), end="")
        return 0
    if after is not None:
        raise CommandError("--from-version goes with --sql (applying reads the version)")
    return asyncio.run(_apply(url, source))


async def _apply(url: str, source: str) -> int:
    from lapse.sessions.store import StoreConfigError, StoreUnavailable
    from lapse.sessions.stores.postgres import PostgresStore
    from lapse.sessions.stores.postgres.schema import SCHEMA_VERSION

    try:
        store = PostgresStore.from_url(url)
    except StoreConfigError as exc:
        raise CommandError(f"{source}: {exc}") from None
    tables = f"{store.config.schema}.{store.config.table_prefix}*"
    try:
        before = await store.schema_version()
        await store.open()
    except StoreUnavailable as exc:
        raise CommandError(f"cannot migrate the session store: {exc}", EXIT_FAILED) from None
    finally:
        await store.aclose()
    if before == SCHEMA_VERSION:
        print(f"{store.url}: tables {tables} already at version {SCHEMA_VERSION}")
    else:
        was = f"version {before}" if before else "none"
        print(f"{store.url}: tables {tables} now at version {SCHEMA_VERSION} (were: {was})")
    return 0
