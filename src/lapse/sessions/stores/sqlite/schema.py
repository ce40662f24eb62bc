"""The SQLite store's schema and its migrations, from the ``.sql`` files of
this package (read once, at import).

The schema version is the file's ``PRAGMA user_version``. A file of an older
version is migrated in place, in the transaction that opens it, by the first
process of this version that opens it (:class:`~.runner.Runner` calls
:func:`migrate` when it connects); processes of older versions then refuse
the file, as this one refuses a newer file.
"""

from __future__ import annotations

import sqlite3

from lapse.sessions.stores._package_text import read_source

__all__ = ["MIGRATIONS", "SCHEMA_VERSION", "migrate"]

SCHEMA_VERSION = 4

_PACKAGE = __name__.rpartition(".")[0]


def _statements(*names: str) -> tuple[str, ...]:
    """The statements of these files, in order (comments are left out by
    the reader, so a ``;`` can only end a statement)."""
    script = "".join(read_source(_PACKAGE, name) for name in names)
    return tuple(part.strip() for part in script.split(";") if part.strip())


MIGRATIONS: dict[int, tuple[str, ...]] = {
    0: _statements("schema.sql"),
    1: _statements("migrate_1_to_2.sql", "migrate_2_to_3.sql", "migrate_3_to_4.sql"),
    2: _statements("migrate_2_to_3.sql", "migrate_3_to_4.sql"),
    3: _statements("migrate_3_to_4.sql"),
}
"""The statements that bring a file of each older version to the current one
(version 0: a new file)."""


def migrate(conn: sqlite3.Connection) -> int | None:
    """Bring the file to :data:`SCHEMA_VERSION`, inside the caller's
    transaction; the file's version if it is newer than this lapse knows
    (nothing is changed then), else None."""
    (version,) = conn.execute("PRAGMA user_version").fetchone()
    if version > SCHEMA_VERSION:
        return int(version)
    if version < SCHEMA_VERSION:
        for statement in MIGRATIONS[version]:
            conn.execute(statement)
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
    return None
