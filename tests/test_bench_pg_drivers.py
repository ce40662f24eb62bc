"""bench/pg_drivers.py (asyncpg against psycopg 3 on the store's load-and-touch
statement) and bench/postgres.py (the bench's own PostgreSQL), end to end on
a tiny configuration."""

from __future__ import annotations

import glob
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.postgres import running_postgres  # noqa: E402


def _bench_dirs() -> set[str]:
    return set(glob.glob(os.path.join(tempfile.gettempdir(), "lapse-bench-postgres-*")))


@pytest.mark.slow
def test_bench_postgres_runs_as_nobody_on_loopback_and_leaves_nothing() -> None:
    """The bench's server answers, listens on 127.0.0.1 only, runs unprivileged;
    leaving the block stops its process and removes its directory."""
    before = _bench_dirs()
    with running_postgres() as server:
        assert server.psql("SELECT 6 * 7") == "42"
        assert server.psql("SHOW listen_addresses") == "127.0.0.1"
        status = Path(f"/proc/{server.pid}/status").read_text()
        assert re.search(r"^Uid:\s+(\d+)", status, re.M)[1] != "0"  # type: ignore[index]
        pid = server.pid
    assert not Path(f"/proc/{pid}").exists()
    assert _bench_dirs() <= before


@pytest.mark.slow
def test_pg_drivers_measures_both_drivers_and_a_listen_connection_idle() -> None:
    """The script, run as a script from another directory, prints operations/s
    and p99 for every variant at 1 and 50 callers, memory per connection, and
    for each driver's LISTEN connection: no statement while idle (and the one
    statement run afterwards is seen, so the count could see one), and a
    NOTIFY that arrives."""
    pytest.importorskip("asyncpg")
    pytest.importorskip("psycopg")
    before = _bench_dirs()
    done = subprocess.run(
        [sys.executable, str(REPO / "bench" / "pg_drivers.py"),
         "--duration", "0.3", "--repeats", "1", "--idle", "0.5"],
        cwd=tempfile.gettempdir(), capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    rows = re.findall(r"^\| (.+?) \| (1|50) \| ([\d,]+) \| ([\d.]+)x \| ([\d.]+) ms \|$",
                      done.stdout, re.M)  # fmt: skip
    names = {name for name, *_ in rows}
    assert {"asyncpg, FIFO pool", "psycopg, FIFO pool"} <= names
    assert len(rows) == 2 * len(names)
    assert all(int(ops.replace(",", "")) > 0 for _, _, ops, _, _ in rows)
    for driver in ("asyncpg", "psycopg"):
        idle = rf"^\| {driver} \| -?\d+ KiB \| 0 \(1 seen\) \| [\d.]+ ms \| [\d.]+ ms \|$"
        line = re.search(idle, done.stdout, re.M)
        assert line, done.stdout
    assert _bench_dirs() <= before
