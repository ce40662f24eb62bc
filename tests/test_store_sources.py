"""The stores' SQL and Lua: files shipped as package data, read once at
import through importlib.resources (lapse.sessions.stores._package_text)."""

from __future__ import annotations

import asyncio
import dataclasses
import re
import sqlite3
import sys
import tomllib
from importlib import resources
from pathlib import Path

import pytest

from lapse.sessions.stores import _package_text, store_from_url
from lapse.sessions.stores._package_text import read_source, read_statements
from lapse.sessions.stores.redis.scripts import SOURCES
from lapse.sessions.stores.sqlite.queries import SQL
from lapse.sessions.stores.sqlite.schema import MIGRATIONS, SCHEMA_VERSION

ROOT = Path(__file__).resolve().parent.parent
SRC = ROOT / "src"


def declared_package_data(pyproject: Path, src: Path) -> set[Path]:
    """The files ``[tool.setuptools.package-data]`` puts in a wheel: each
    package's globs, relative to its directory (``*`` for every package)."""
    config = tomllib.loads(pyproject.read_text())
    declared: dict[str, list[str]] = config["tool"]["setuptools"]["package-data"]
    packages = [p.parent for p in src.rglob("__init__.py")]
    found: set[Path] = set()
    for name, patterns in declared.items():
        dirs = packages if name in ("*", "") else [src / name.replace(".", "/")]
        for directory in dirs:
            for pattern in patterns:
                found.update(p for p in directory.glob(pattern) if p.is_file())
    return found


def test_every_file_under_src_that_is_not_python_is_declared_package_data() -> None:
    """A wheel carries every SQL, Lua (or other non-Python) file of the
    package: each is matched by a package-data glob of pyproject.toml (the
    usual mistake: a new data file that a source checkout reads and an
    installed lapse lacks)."""
    data = {
        p
        for p in (SRC / "lapse").rglob("*")
        if p.is_file() and p.suffix not in (".py", ".pyc") and "__pycache__" not in p.parts
    }
    assert any(p.suffix == ".lua" for p in data) and any(p.suffix == ".sql" for p in data)
    missing = data - declared_package_data(ROOT / "pyproject.toml", SRC)
    assert not missing, (
        f"not in [tool.setuptools.package-data]: {sorted(str(p.relative_to(SRC)) for p in missing)}"
    )


def test_every_named_statement_compiles_against_the_current_schema() -> None:
    """Every statement of queries.sql prepares (EXPLAIN: tables, columns and
    parameter counts resolved) on a file made by schema.sql."""
    conn = sqlite3.connect(":memory:")
    for statement in MIGRATIONS[0]:
        conn.execute(statement)
    names = [field.name for field in dataclasses.fields(SQL)]
    assert len(names) > 30
    for name in names:
        statement = getattr(SQL, name)
        conn.execute("EXPLAIN " + statement, [None] * statement.count("?")).fetchall()
    conn.close()


def test_a_file_migrated_from_each_old_version_has_the_schema_of_a_new_file() -> None:
    """The migration files bring a version 1, 2 or 3 file to exactly the tables,
    columns and indexes schema.sql makes (same order: statements written for
    one run on the other)."""

    def shape(conn: sqlite3.Connection) -> list[tuple[str, str, list[tuple[object, ...]]]]:
        objects = conn.execute(
            "SELECT type, name FROM sqlite_master WHERE name NOT LIKE 'sqlite_%' ORDER BY name"
        ).fetchall()
        return [
            (kind, name, conn.execute(f"PRAGMA table_info({name})").fetchall())
            for kind, name in objects
        ]

    new = sqlite3.connect(":memory:")
    for statement in MIGRATIONS[0]:
        new.execute(statement)
    # Version 3 is version 4 without sessions.principal and its index;
    # version 2 also without sessions.version; version 1 also without
    # created, ends_at, events.target and the aliases table.
    v3 = [
        s.replace(",\n    principal TEXT", "")
        for s in MIGRATIONS[0]
        if "sessions_principal" not in s
    ]
    v2 = [s.replace(",\n    version INTEGER NOT NULL DEFAULT 0", "") for s in v3]
    v1 = [
        s.replace(",\n    created REAL,\n    ends_at REAL", "").replace(",\n    target TEXT", "")
        for s in v2
        if "aliases" not in s
    ]
    assert v1 != v2 != v3 != list(MIGRATIONS[0])
    for version, old in ((1, v1), (2, v2), (3, v3)):
        conn = sqlite3.connect(":memory:")
        for statement in old:
            conn.execute(statement)
        assert shape(conn) != shape(new)
        for statement in MIGRATIONS[version]:
            conn.execute(statement)
        assert shape(conn) == shape(new), f"from version {version}"
        conn.close()
    assert max(MIGRATIONS) + 1 == SCHEMA_VERSION


def test_the_redis_scripts_are_the_lua_files_code_with_the_includes_in_front() -> None:
    """Each operation's script is its .lua file with the files its
    ``-- include:`` lines name (prelude.lua first, where it reads the time;
    resolve.lua where it follows aliases) in front, and no comment line."""
    package = "lapse.sessions.stores.redis"
    prelude = read_source(package, "prelude.lua")
    resolve = read_source(package, "resolve.lua")
    assert "local function now_us" in prelude and "local function resolve" in resolve
    assert {"ack", "shards", "load", "save", "login"} <= set(SOURCES)
    for name, source in SOURCES.items():
        raw = resources.files(package).joinpath(f"{name}.lua").read_text("utf-8")
        includes = re.findall(r"^-- include: (\S+)$", raw, re.MULTILINE)
        lines = source.splitlines()
        assert not [line for line in lines if line.lstrip().startswith("--")], name
        assert source.startswith(prelude) == ("prelude.lua" in includes), name
        assert (resolve in source) == ("resolve.lua" in includes), name
        for included in includes:
            assert read_source(package, included) in source, (name, included)
    assert not SOURCES["ack"].startswith(prelude) and SOURCES["load"].startswith(prelude)
    assert resolve in SOURCES["load"] and resolve in SOURCES["save"]


def test_operations_never_read_the_files_again(
    shared_store: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The SQL and Lua are read once, at import: a store made and used
    afterwards (open, every kind of write, claim, ack, inspection) reads no
    package file, so a request costs no file read."""

    def no_reading(package: str, name: str) -> str:
        raise AssertionError(f"read {package}/{name} after import")

    monkeypatch.setattr(_package_text, "_read", no_reading)

    async def main() -> None:
        store = store_from_url(shared_store, clock=lambda: 1000.0)
        await store.open()
        try:
            await store.create("u1", 30.0, {"a": 1})
            assert (await store.load("u1")) is not None
            assert await store.save("u1", {"b": 2}, ["a"])
            assert await store.rotate("u1", "u2", 5.0)
            assert await store.expire("u2")
            (expiry,) = await store.claim("me", 30.0, 10)
            await store.ack(expiry)
            await store.create("u3", 30.0, {})
            assert [info.uid for info in (await store.scan(None, 10))[0]] == ["u3"]
            assert await store.count() == 1
        finally:
            await store.aclose()

    asyncio.run(main())


@pytest.fixture
def package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An importable package ``fake_sources`` in a temporary directory."""
    directory = tmp_path / "fake_sources"
    directory.mkdir()
    (directory / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "fake_sources", raising=False)
    return directory


def test_an_include_is_replaced_by_its_file_and_comment_lines_are_left_out(
    package: Path,
) -> None:
    """What runs is the code alone: a comment line added or changed leaves
    the text (and so a Redis script's SHA1) unchanged."""
    (package / "head.lua").write_text("-- the head\n\nlocal a = 1\n")
    (package / "main.lua").write_text(
        "-- main: what it does\n-- include: head.lua\n  -- indented note\n\nreturn a -- kept\n"
    )
    assert read_source("fake_sources", "main.lua") == "\nlocal a = 1\n\nreturn a -- kept\n"
    (package / "main.lua").write_text(
        "-- main: another comment\n-- include: head.lua\n\n-- more\nreturn a -- kept\n"
    )
    assert read_source("fake_sources", "main.lua") == "\nlocal a = 1\n\nreturn a -- kept\n"


def test_includes_do_not_nest_and_a_missing_one_is_an_error(package: Path) -> None:
    (package / "a.lua").write_text("-- include: b.lua\n")
    (package / "b.lua").write_text("-- include: c.lua\nx\n")
    with pytest.raises(ValueError, match="no nesting"):
        read_source("fake_sources", "a.lua")
    (package / "b.lua").write_text("-- include: missing.lua\n")
    with pytest.raises(FileNotFoundError):
        read_source("fake_sources", "b.lua")


def test_named_statements_are_one_line_each_without_their_semicolon(package: Path) -> None:
    (package / "q.sql").write_text(
        "-- header\n\n-- name: first\n-- (uid)\nSELECT 1\n    FROM t;\n\n"
        "-- name: second\nDELETE FROM t WHERE a = ?;\n"
    )
    assert read_statements("fake_sources", "q.sql") == {
        "first": "SELECT 1 FROM t",
        "second": "DELETE FROM t WHERE a = ?",
    }


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("SELECT 1;\n-- name: a\nSELECT 2;\n", "without a -- name: line"),
        ("-- name: a\nSELECT 1;\n-- name: a\nSELECT 2;\n", "a is named twice"),
        ("-- name: a\n-- nothing here\n-- name: b\nSELECT 2;\n", "no statement under a"),
    ],
)
def test_a_malformed_statement_file_is_an_error_naming_the_problem(
    package: Path, text: str, error: str
) -> None:
    (package / "q.sql").write_text(text)
    with pytest.raises(ValueError, match=error):
        read_statements("fake_sources", "q.sql")


def test_queries_sql_names_exactly_the_statements_the_store_uses() -> None:
    """Reading queries.sql into the Queries fields fails on a name missing
    from either side (so a statement cannot be dropped or misspelt
    unnoticed)."""
    statements = read_statements("lapse.sessions.stores.sqlite", "queries.sql")
    assert set(statements) == {field.name for field in dataclasses.fields(SQL)}
    with pytest.raises(TypeError):
        type(SQL)(**{**statements, "unused": "SELECT 1"})
    del statements["touch"]
    with pytest.raises(TypeError):
        type(SQL)(**statements)
