"""The PostgreSQL store's tables and their migrations, from the ``.sql``
files of this package (read once, at import).

The version is the one row of ``schema.prefix_schema_version``. Tables of an
older version are brought up to date in place by the first process of this
version that opens the store (in one transaction, under an advisory lock, so
processes starting together do it once); tables of a newer version are
refused. :func:`ddl` is the same SQL as text, for teams that apply
migrations themselves (``lapse sessions migrate --store URL --sql``).
"""

from __future__ import annotations

from lapse.sessions.stores._package_text import read_source

__all__ = ["SCHEMA_VERSION", "STEPS", "ddl", "steps_after"]

SCHEMA_VERSION = 3

_PACKAGE = __name__.rpartition(".")[0]

STEPS: dict[int, str] = {
    1: read_source(_PACKAGE, "schema.sql"),
    2: read_source(_PACKAGE, "migrate_1_to_2.sql"),
    3: read_source(_PACKAGE, "migrate_2_to_3.sql"),
}
"""The SQL that makes each version from the one before (version 1: from
nothing). ``{t}`` is ``schema.prefix``, ``{p}`` the prefix."""


def steps_after(version: int, schema: str, prefix: str) -> str:
    """The SQL that brings tables of ``version`` (0: none) to
    :data:`SCHEMA_VERSION` (schema and prefix are checked identifiers: see
    config.IDENTIFIER), the version row included."""
    if not 0 <= version <= SCHEMA_VERSION:
        raise ValueError(f"schema versions are 0 (none) to {SCHEMA_VERSION}, not {version}")
    if version == SCHEMA_VERSION:
        return ""
    code = "".join(STEPS[n] for n in range(version + 1, SCHEMA_VERSION + 1))
    code += (
        "DELETE FROM {t}schema_version;\n"
        f"INSERT INTO {{t}}schema_version (version) VALUES ({SCHEMA_VERSION});\n"
    )
    return code.replace("{t}", f"{schema}.{prefix}").replace("{p}", prefix)


def ddl(schema: str, prefix: str, after: int = 0) -> str:
    """A script to apply by hand (psql, a migration tool): one transaction
    that makes the schema if need be and brings its tables from version
    ``after`` (0: none) to :data:`SCHEMA_VERSION`."""
    if after == SCHEMA_VERSION:
        return f"-- lapse session tables {schema}.{prefix}*: already at version {after}\n"
    return (
        f"-- lapse session tables {schema}.{prefix}*: version {after or 'none'} to "
        f"{SCHEMA_VERSION}\nBEGIN;\nCREATE SCHEMA IF NOT EXISTS {schema};\n"
        f"{steps_after(after, schema, prefix)}COMMIT;\n"
    )
