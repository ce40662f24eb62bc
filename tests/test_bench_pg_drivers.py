"""bench/pg_drivers.py (asyncpg against psycopg 3 on the store's load-and-touch
statement) and bench/postgres.py (the bench's own PostgreSQL), end to end on
a tiny configuration."""

from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.postgres import running_postgres  # noqa: E402


@pytest.fixture
def own_tmp(monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A temporary directory of this test's own (readable by ``nobody``,
    whom the bench's PostgreSQL runs as), made the default for tempfile and
    for the processes it starts: what the bench leaves behind is looked for
    there, not among other tests' servers in the shared /tmp."""
    own = Path(tempfile.mkdtemp(prefix="lapse-test-tmp-"))
    own.chmod(0o755)
    monkeypatch.setattr(tempfile, "tempdir", str(own))
    monkeypatch.setenv("TMPDIR", str(own))
    try:
        yield own
    finally:
        shutil.rmtree(own, ignore_errors=True)


def _bench_dirs(root: Path) -> set[str]:
    return set(glob.glob(os.path.join(root, "lapse-bench-postgres-*")))


@pytest.mark.slow
def test_bench_postgres_runs_as_nobody_on_loopback_and_leaves_nothing(own_tmp: Path) -> None:
    """The bench's server answers, listens on 127.0.0.1 only, runs unprivileged;
    leaving the block stops its process and removes its directory."""
    with running_postgres() as server:
        assert len(_bench_dirs(own_tmp)) == 1  # (its directory is looked for here)
        assert server.psql("SELECT 6 * 7") == "42"
        assert server.psql("SHOW listen_addresses") == "127.0.0.1"
        status = Path(f"/proc/{server.pid}/status").read_text()
        assert re.search(r"^Uid:\s+(\d+)", status, re.M)[1] != "0"  # type: ignore[index]
        pid = server.pid
    assert not Path(f"/proc/{pid}").exists()
    assert _bench_dirs(own_tmp) == set()


@pytest.mark.slow
def test_pg_drivers_measures_both_drivers_and_a_listen_connection_idle(own_tmp: Path) -> None:
    """The script, run as a script from another directory, prints operations/s
    and p99 for every variant at 1 and 50 callers, memory per connection, and
    for each driver's LISTEN connection: no statement while idle (and the one
    statement run afterwards is seen, so the count could see one), and a
    NOTIFY that arrives."""
    pytest.importorskip("asyncpg")
    pytest.importorskip("psycopg")
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
    assert _bench_dirs(own_tmp) == set()
