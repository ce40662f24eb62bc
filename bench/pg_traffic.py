"""The bench's PostgreSQL for the PostgreSQL systems: one server (bench/postgres.py) with
pg_stat_statements loaded, a database per system, the statements each database runs
(per request, and what an idle lapse process sends), and their Markdown table.

Statements are counted by the server: ``pg_stat_statements`` with ``track = top`` (the
statements a client sends, not those run inside functions; ``BEGIN``, ``COMMIT``,
``LISTEN`` count too, ``track_utility = on``), summed over the entries of one database. The
bench's own queries run as ``psql`` in the ``postgres`` database, so they are never in
the count of a system's database. Transactions come from ``pg_stat_database``
(``xact_commit + xact_rollback``): a backend reports them up to 1 s late while busy and up
to 10 s late once idle, so over a short window that column is approximate.
"""

from __future__ import annotations

import contextlib
import http.client
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field

from bench.postgres import Postgres, running_postgres
from bench.systems import DJANGO_POSTGRES, HOST, PATH, SERVERS_DIR, SYSTEMS, System

SETTINGS = {
    "shared_preload_libraries": "'pg_stat_statements'",
    "pg_stat_statements.track": "top",
    "pg_stat_statements.track_utility": "on",
    "max_connections": "200",
}
DATABASES = {"lapse-postgres": "lapse_bench", DJANGO_POSTGRES: "django_bench"}
"""Each PostgreSQL system's database on the one server."""
SEP = "\x1f"


@dataclass(frozen=True)
class PgSnapshot:
    at: float
    statements: int
    transactions: int
    by_query: dict[str, int]


@dataclass
class PgCounts:
    """What one PostgreSQL system's database ran."""

    statements_per_touch: list[float] = field(default_factory=list)
    statements_per_create: list[float] = field(default_factory=list)
    statements_per_logged_touch: list[float] = field(default_factory=list)
    """The touch runs on a logged-in session (alternated with the anonymous ones)."""
    statements_per_login: list[float] = field(default_factory=list)
    sequential_requests: int = 0
    """Touches sent one at a time on one connection (no batching of concurrent calls):"""
    sequential_touch: float | None = None
    """statements per touch of an anonymous session, and"""
    sequential_logged_touch: float | None = None
    """of a logged-in one."""
    idle_seconds: float = 0.0
    """The idle window of the touch server (--idle-seconds), subtracted per request."""
    idle_rate: float = 0.0
    long_idle_seconds: float = 0.0
    """The idle figure's window (--pg-idle-seconds): a process alone with long sessions."""
    long_idle_sessions: int = 0
    long_idle_statements: float | None = None
    long_idle_transactions: float | None = None
    long_idle_queries: dict[str, float] = field(default_factory=dict)


class PostgresHandle:
    """The bench's PostgreSQL, started with pg_stat_statements; a database per system,
    made empty before each of its servers starts (as Redis is flushed)."""

    def __init__(self, systems: list[str]) -> None:
        self._stack = contextlib.ExitStack()
        self.server: Postgres = self._stack.enter_context(running_postgres(SETTINGS))
        try:
            self.server.psql("CREATE EXTENSION pg_stat_statements")
            self.version = self.server.psql("SHOW server_version")
            if DJANGO_POSTGRES in systems:
                self._migrate_django()
        except BaseException:
            self.close()
            raise

    @property
    def description(self) -> str:
        return (
            f"PostgreSQL {self.version}: the bench's own (bench/postgres.py), 127.0.0.1:"
            f"{self.server.port}, fsync off, pg_stat_statements; databases "
            + ", ".join(f"{db} ({key})" for key, db in DATABASES.items())
        )

    def url(self, system: System) -> str:
        return self.server.url(DATABASES[system.key])

    def _migrate_django(self) -> None:
        """Django's session table, by ``migrate``, once per run."""
        self.server.psql(f"CREATE DATABASE {DATABASES[DJANGO_POSTGRES]}")
        url = self.url(SYSTEMS[DJANGO_POSTGRES])
        cmd = [sys.executable, str(SERVERS_DIR / "django_seed.py"), "migrate", "--database", url]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"django migrate failed:\n{done.stderr[-3000:]}")

    def reset(self, system: System) -> None:
        """Empty the system's database: lapse's is made anew (its store then creates its
        tables on first use); Django's session table is truncated (migrated once)."""
        db = DATABASES[system.key]
        if system.key == DJANGO_POSTGRES:
            self.server.psql("TRUNCATE django_session", db)
        else:
            self.server.psql(f"DROP DATABASE IF EXISTS {db} WITH (FORCE)")
            self.server.psql(f"CREATE DATABASE {db}")

    def snapshot(self, system: System, by_query: bool = False) -> PgSnapshot:
        """The statements and transactions the system's database has run so far."""
        db = DATABASES[system.key]
        where = (
            "FROM pg_stat_statements s JOIN pg_database d ON d.oid = s.dbid "
            f"WHERE d.datname = '{db}'"
        )
        sql = (
            f"SELECT (SELECT coalesce(sum(calls), 0) {where}) || '{SEP}' || "
            "(SELECT xact_commit + xact_rollback FROM pg_stat_database "
            f"WHERE datname = '{db}')"
        )
        at = time.monotonic()
        statements, transactions = self.server.psql(sql).split(SEP)
        queries: dict[str, int] = {}
        if by_query:
            rows = self.server.psql(
                "SELECT left(regexp_replace(query, '\\s+', ' ', 'g'), 60) || "
                f"'{SEP}' || calls {where}"
            )
            for row in rows.splitlines():
                text, _, calls = row.rpartition(SEP)
                queries[text] = queries.get(text, 0) + int(calls)
        return PgSnapshot(at, int(statements), int(transactions or 0), queries)

    def close(self) -> None:
        self._stack.close()


def measure_window(
    pg: PostgresHandle, system: System, seconds: float
) -> tuple[PgSnapshot, PgSnapshot]:
    """Two snapshots ``seconds`` apart (nothing else done meanwhile)."""
    before = pg.snapshot(system, by_query=True)
    time.sleep(seconds)
    return before, pg.snapshot(system, by_query=True)


def rates(before: PgSnapshot, after: PgSnapshot) -> tuple[float, float, dict[str, float]]:
    """Statements/s, transactions/s and statements/s by query between two snapshots."""
    elapsed = max(after.at - before.at, 1e-9)
    by_query = {
        q: (n - before.by_query.get(q, 0)) / elapsed
        for q, n in after.by_query.items()
        if n != before.by_query.get(q, 0)
    }
    return (
        (after.statements - before.statements) / elapsed,
        (after.transactions - before.transactions) / elapsed,
        dict(sorted(by_query.items(), key=lambda kv: -kv[1])),
    )


def per_request(pg: PgCounts, before: PgSnapshot, after: PgSnapshot, requests: int) -> float:
    """Statements per request of a wrk run, the touch server's idle rate subtracted."""
    idle = pg.idle_rate * (after.at - before.at)
    return (after.statements - before.statements - idle) / max(requests, 1)


def sequential_statements(
    pg: PostgresHandle, system: System, port: int, cookie: str, requests: int, counts: PgCounts
) -> float:
    """Statements per request of ``requests`` touches of ``cookie``'s session sent one
    after the other on one keep-alive connection (so the store batches nothing), the
    idle rate subtracted."""
    conn = http.client.HTTPConnection(HOST, port, timeout=5)
    try:
        before = pg.snapshot(system)
        for _ in range(requests):
            conn.request("GET", PATH, headers={"Cookie": cookie})
            response = conn.getresponse()
            response.read()
            if response.status != 200:
                raise RuntimeError(f"sequential touch got status {response.status}")
        after = pg.snapshot(system)
    finally:
        conn.close()
    return per_request(counts, before, after, requests)


def postgres_table(rows: list[tuple[str, PgCounts]]) -> list[str]:
    """Statements per request and the idle figure, one row per PostgreSQL system."""
    if not rows:
        return []

    def median(values: list[float]) -> str:
        return f"{statistics.median(values):.2f}" if values else "—"

    lines = [
        "| System | statements / touch | statements / create "
        "| idle statements/s per process, PostgreSQL | idle transactions/s "
        "| idle, by statement (statements/s) |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for label, c in rows:
        if c.long_idle_statements is None:
            idle = tx = names = "—"
        else:
            idle = (
                f"{c.long_idle_statements:.1f} ({c.long_idle_seconds:.0f} s, "
                f"{c.long_idle_sessions} sessions alive)"
            )
            tx = f"{c.long_idle_transactions or 0.0:.1f}"
            top = list(c.long_idle_queries.items())[:4]
            names = "; ".join(f"`{q.replace('|', '/')}` {v:.1f}" for q, v in top)
            names = names or "none"
        lines.append(
            f"| {label} | {median(c.statements_per_touch)} | {median(c.statements_per_create)} "
            f"| {idle} | {tx} | {names} |"
        )
    return lines
