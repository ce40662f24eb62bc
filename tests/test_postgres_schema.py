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


_DOWN_TO_2 = (
    "DROP INDEX {s}.lapse_sessions_principal; "
    "ALTER TABLE {s}.lapse_sessions DROP COLUMN principal; "
)
"""What version 3 added (psql, ``{s}`` the schema)."""


def test_tables_of_version_1_are_upgraded_in_place_keeping_their_sessions(
    postgres_server: Any, schema: str
) -> None:
    """Tables as version 1 left them (no index of version 2, no principal
    column of version 3, version row 1): the first store of this version to
    open them brings them to the current version in place, and a session
    stored before is still there with its data."""

    async def scenario() -> None:
        url = f"{postgres_server.url()}?schema={schema}"
        store = PostgresStore.from_url(url)
        await store.create("kept-through-the-upgrade-0", 600, {"cart": [1, 2]})
        await store.aclose()
        postgres_server.psql(
            f"DROP INDEX {schema}.lapse_sessions_unclaimed; {_DOWN_TO_2}"
            f"UPDATE {schema}.lapse_schema_version SET version = 1".replace("{s}", schema)
        )
        store = PostgresStore.from_url(url)
        try:
            assert await store.schema_version() == 1
            loaded = await store.load("kept-through-the-upgrade-0")
            assert loaded is not None and loaded.decoded() == {"cart": [1, 2]}
            assert await store.schema_version() == SCHEMA_VERSION == 3
        finally:
            await store.aclose()
        assert {"lapse_sessions_unclaimed", "lapse_sessions_principal"} <= indexes_of(
            postgres_server, schema
        )

    asyncio.run(scenario())


def test_tables_of_version_2_gain_the_principal_column_keeping_their_sessions(
    postgres_server: Any, schema: str
) -> None:
    """Tables of version 2 (no principal column, version row 2) holding a live
    session, an ended one waiting for its hook and an alias: the first store
    of version 3 adds the column and its index in place; every row is kept
    (unbound), and the index serves at once (bind, list, the hook's claim)."""

    async def scenario() -> None:
        url = f"{postgres_server.url()}?schema={schema}"
        store = PostgresStore.from_url(url)
        await store.create("v2-live-session-uid-000000", 600, {"cart": [1, 2]})
        await store.create("v2-ended-session-uid-00000", 600, {"n": 1})
        await store.expire("v2-ended-session-uid-00000")
        await store.create("v2-rotated-session-uid-000", 600, {"r": 1})
        await store.rotate("v2-rotated-session-uid-000", "v2-rotated-session-uid-new", 600)
        await store.aclose()
        postgres_server.psql(
            f"{_DOWN_TO_2}UPDATE {{s}}.lapse_schema_version SET version = 2".replace("{s}", schema)
        )
        assert "lapse_sessions_principal" not in indexes_of(postgres_server, schema)
        store = PostgresStore.from_url(url)
        try:
            assert await store.schema_version() == 2
            loaded = await store.load("v2-live-session-uid-000000")
            assert loaded is not None and loaded.decoded() == {"cart": [1, 2]}
            assert loaded.principal is None
            assert await store.schema_version() == SCHEMA_VERSION == 3
            assert await store.set_principal("v2-rotated-session-uid-000", "alice") == []
            (row,) = await store.sessions_of("alice")
            assert (row.uid, dict(row.data)) == ("v2-rotated-session-uid-new", {"r": 1})
            (expiry,) = await store.claim("me", 30, 10)
            assert (expiry.uid, expiry.cause) == ("v2-ended-session-uid-00000", "expired")
        finally:
            await store.aclose()
        assert "lapse_sessions_principal" in indexes_of(postgres_server, schema)

    asyncio.run(scenario())


def test_the_printed_upgrade_from_version_2_is_the_principal_column_alone(
    postgres_server: Any, schema: str
) -> None:
    """`ddl(after=2)` (`migrate --sql --from-version 2`) applied by hand to
    version 2 tables holding a session: version 3, the column and its index,
    the session kept; the application role binds and lists principals."""
    postgres_server.psql(
        ddl(schema, "lapse_", after=0).replace("BEGIN;", "").replace("COMMIT;", "")
    )
    postgres_server.psql(
        f"INSERT INTO {schema}.lapse_sessions (uid, timeout, deadline, data) VALUES "
        f"('v2-session-made-by-hand-00', 600, extract(epoch FROM now()) + 600, '{{\"a\": 1}}'); "
        f"{_DOWN_TO_2}UPDATE {{s}}.lapse_schema_version SET version = 2".replace("{s}", schema)
    )
    step = ddl(schema, "lapse_", after=2)
    assert "CREATE TABLE" not in step and "sessions_unclaimed" not in step
    assert "ADD COLUMN IF NOT EXISTS principal text" in step
    postgres_server.psql(step)
    assert version_of(postgres_server, schema) == "3"
    grant_use_only(postgres_server, schema)
    url = f"{postgres_server.url(user=postgres_server.password_user)}?schema={schema}"

    async def scenario() -> None:
        store = PostgresStore.from_url(url)
        try:
            assert await store.set_principal("v2-session-made-by-hand-00", "o'brien") == []
            (row,) = await store.sessions_of("o'brien")
            assert (row.uid, dict(row.data), row.principal) == (
                "v2-session-made-by-hand-00",
                {"a": 1},
                "o'brien",
            )
        finally:
            await store.aclose()

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
    tables are the current version with version 2's index, and the
    application role uses them without making anything."""
    v1 = STEPS[1].replace("{t}", f"{schema}.lapse_").replace("{p}", "lapse_")
    postgres_server.psql(
        f"CREATE SCHEMA {schema}; {v1} INSERT INTO {schema}.lapse_schema_version VALUES (1)"
    )
    assert "lapse_sessions_unclaimed" not in indexes_of(postgres_server, schema)
    postgres_server.psql(ddl(schema, "lapse_", after=1))
    assert version_of(postgres_server, schema) == str(SCHEMA_VERSION)
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
