"""The PostgreSQL store's tables: made on first use, upgraded in place, and
the same SQL printed by ``lapse sessions migrate --sql`` for teams that apply
migrations themselves (and applied by ``lapse sessions migrate``).

On the suite's real PostgreSQL; each test has a schema of its own. The role
``lapse_password`` stands for an application's role that may use the tables
but not create them.
"""

from __future__ import annotations

import asyncio
import itertools
import os
from typing import Any

import pytest
from _cli import lapse
from _ports import free_port

from lapse.sessions.store import StoreUnavailable
from lapse.sessions.stores.postgres import PostgresStore
from lapse.sessions.stores.postgres.schema import SCHEMA_VERSION, STEPS, ddl

_schemas = itertools.count()


@pytest.fixture
def schema() -> str:
    return f"mig{os.getpid()}x{next(_schemas)}"


def version_of(server: Any, schema: str) -> str:
    return str(server.psql(f"SELECT max(version) FROM {schema}.lapse_schema_version"))


def indexes_of(server: Any, schema: str) -> set[str]:
    listed = server.psql(f"SELECT indexname FROM pg_indexes WHERE schemaname = '{schema}'")
    return set(listed.split())


def grant_use_only(server: Any, schema: str) -> None:
    """The application role may read and write the tables, not make any."""
    role = server.password_user
    server.psql(
        f"GRANT USAGE ON SCHEMA {schema} TO {role}; "
        f"GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA {schema} TO {role}; "
        f"GRANT USAGE ON ALL SEQUENCES IN SCHEMA {schema} TO {role}"
    )


async def round_trip(url: str) -> None:
    """A session made, loaded, ended and its expiry delivered, through a store."""
    store = PostgresStore.from_url(url)
    try:
        await store.create("schema-round-trip-uid-000", 60, {"a": 1})
        loaded = await store.load("schema-round-trip-uid-000")
        assert loaded is not None and loaded.decoded() == {"a": 1}
        assert await store.expire("schema-round-trip-uid-000")
        (expiry,) = await store.claim("me", 30, 10)
        await store.ack(expiry)
        assert await store.count() == 0
    finally:
        await store.aclose()


def test_tables_of_version_1_are_upgraded_in_place_keeping_their_sessions(
    postgres_server: Any, schema: str
) -> None:
    """Tables as version 1 left them (no index of version 2, version row 1):
    the first store of this version to open them brings them to version 2 in
    place, and a session stored before is still there with its data."""

    async def scenario() -> None:
        url = f"{postgres_server.url()}?schema={schema}"
        store = PostgresStore.from_url(url)
        await store.create("kept-through-the-upgrade-0", 600, {"cart": [1, 2]})
        await store.aclose()
        postgres_server.psql(
            f"DROP INDEX {schema}.lapse_sessions_unclaimed; "
            f"UPDATE {schema}.lapse_schema_version SET version = 1"
        )
        store = PostgresStore.from_url(url)
        try:
            assert await store.schema_version() == 1
            loaded = await store.load("kept-through-the-upgrade-0")
            assert loaded is not None and loaded.decoded() == {"cart": [1, 2]}
            assert await store.schema_version() == SCHEMA_VERSION == 2
        finally:
            await store.aclose()
        assert "lapse_sessions_unclaimed" in indexes_of(postgres_server, schema)

    asyncio.run(scenario())


def test_a_role_that_cannot_create_tables_is_told_to_run_migrate(
    postgres_server: Any, schema: str
) -> None:
    """No tables, and a role without the right to make them: opening the
    store is a permanent error that names `lapse sessions migrate`."""
    postgres_server.psql(f"CREATE SCHEMA {schema}")
    grant_use_only(postgres_server, schema)
    url = f"{postgres_server.url(user=postgres_server.password_user)}?schema={schema}"

    async def scenario() -> None:
        store = PostgresStore.from_url(url)
        try:
            with pytest.raises(StoreUnavailable, match="lapse sessions migrate") as caught:
                await store.open()
            assert caught.value.permanent
        finally:
            await store.aclose()

    asyncio.run(scenario())


def test_the_printed_sql_makes_tables_such_a_role_then_uses(
    postgres_server: Any, schema: str
) -> None:
    """`ddl()` (what `migrate --sql` prints) applied by hand as the owner:
    the store of a role that may not create tables opens them as they are
    and works."""
    postgres_server.psql(ddl(schema, "lapse_"))
    grant_use_only(postgres_server, schema)
    assert version_of(postgres_server, schema) == str(SCHEMA_VERSION)
    url = f"{postgres_server.url(user=postgres_server.password_user)}?schema={schema}"
    asyncio.run(round_trip(url))


def test_the_printed_upgrade_from_version_1_brings_version_1_tables_up(
    postgres_server: Any, schema: str
) -> None:
    """Version 1's tables made by hand, then `ddl(after=1)` applied: the
    tables are version 2 with its index, and the application role uses them
    without making anything."""
    v1 = STEPS[1].replace("{t}", f"{schema}.lapse_").replace("{p}", "lapse_")
    postgres_server.psql(
        f"CREATE SCHEMA {schema}; {v1} INSERT INTO {schema}.lapse_schema_version VALUES (1)"
    )
    assert "lapse_sessions_unclaimed" not in indexes_of(postgres_server, schema)
    postgres_server.psql(ddl(schema, "lapse_", after=1))
    assert version_of(postgres_server, schema) == "2"
    assert "lapse_sessions_unclaimed" in indexes_of(postgres_server, schema)
    grant_use_only(postgres_server, schema)
    url = f"{postgres_server.url(user=postgres_server.password_user)}?schema={schema}"
    asyncio.run(round_trip(url))


def test_migrate_sql_prints_the_script_without_connecting(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """`lapse sessions migrate --sql` prints ddl() for the URL's schema and
    prefix (no server needed: the port is closed), one transaction;
    `--from-version 1` only version 2's step."""
    url = f"postgresql://app:secret@127.0.0.1:{free_port()}/db?schema=web&table_prefix=s_"
    status, out, _ = lapse(capsys, "sessions", "migrate", "--store", url, "--sql")
    assert status == 0
    assert out == ddl("web", "s_")
    assert "BEGIN;" in out and out.rstrip().endswith("COMMIT;")
    assert "CREATE TABLE IF NOT EXISTS web.s_sessions" in out
    status, out, _ = lapse(
        capsys, "sessions", "migrate", "--store", url, "--sql", "--from-version", "1"
    )
    assert status == 0 and "CREATE TABLE" not in out and "web.s_sessions_unclaimed" not in out
    assert "s_sessions_unclaimed ON web.s_sessions" in out
    assert f"VALUES ({SCHEMA_VERSION})" in out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--store", "sqlite:///x.db", "--sql"], "is for a PostgreSQL store"),
        (["--store", "redis://127.0.0.1:1/0"], "is for a PostgreSQL store"),
        (["--store", "postgresql://u:hunter2@h/db?schema=Bad;", "--sql"], "schema is a"),
        (["--store", "postgresql://h/db", "--sql", "--from-version", "9"], "--from-version"),
        (["--store", "postgresql://h/db", "--from-version", "1"], "goes with --sql"),
        ([], "no session store"),
    ],
)
def test_migrate_refuses_what_it_cannot_do_with_exit_2(
    argv: list[str],
    message: str,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Another store, a bad URL, a version out of range, a version without
    --sql, no store at all: exit 2 with a message naming it (never the
    password)."""
    monkeypatch.delenv("LAPSE_SESSION_STORE", raising=False)
    status, out, err = lapse(capsys, "sessions", "migrate", *argv)
    assert status == 2 and out == ""
    assert message in err and "hunter2" not in err


def test_migrate_makes_the_tables_then_finds_them_current(
    postgres_server: Any, schema: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """`lapse sessions migrate` against a real server: the tables are made
    (version 2, were none); run again, already current; an unreachable
    server exits 1."""
    url = f"{postgres_server.url()}?schema={schema}"
    status, out, err = lapse(capsys, "sessions", "migrate", "--store", url)
    assert status == 0, err
    assert f"now at version {SCHEMA_VERSION} (were: none)" in out
    assert version_of(postgres_server, schema) == str(SCHEMA_VERSION)
    status, out, _ = lapse(capsys, "sessions", "migrate", "--store", url)
    assert status == 0 and f"already at version {SCHEMA_VERSION}" in out
    closed = f"postgresql://u:hunter2@127.0.0.1:{free_port()}/db?timeout=0.5"
    status, out, err = lapse(capsys, "sessions", "migrate", "--store", closed)
    assert status == 1 and "cannot migrate the session store" in err and "hunter2" not in err


@pytest.mark.parametrize(
    "argv",
    [
        ["sessions", "list", "--store", "redis://:hunter2@127.0.0.1:1/0?bogus=1"],
        ["sessions", "list", "--store", "postgresql://u:hunter2@h/db?bogus=1"],
        ["sessions", "stats", "--store", "rediss://u:hunter2@h:1/0?ssl_cert_reqs=maybe"],
    ],
)
def test_a_bad_store_url_on_the_command_line_is_shown_without_its_password(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    """`lapse sessions` names the URL it refuses, with its password hidden
    (it was shown whole before, for every kind of store)."""
    status, out, err = lapse(capsys, *argv)
    assert status == 2 and out == ""
    assert "***" in err and "hunter2" not in err
