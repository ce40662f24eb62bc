"""The benchmark driver, bench/run.py, end to end on a tiny configuration."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def test_bench_runs_end_to_end_on_a_tiny_configuration(tmp_path: Path, redis_server: Any) -> None:
    """`bench/run.py` on the systems whose dependencies the `test` extra installs (lapse on
    memory and on Redis, the latter on the test run's redis-server, and bare uvicorn), with
    1 s wrk runs and small counts, exits 0 (no errors, no lost session, right counts); its
    Markdown table in `--out` has a row per system in every figure's table and the targets;
    and `--out`/chart.png is a PNG. Nothing about speed is asserted."""
    command = [
        sys.executable,
        "bench/run.py",
        "--systems",
        "lapse-memory,lapse-redis,uvicorn-bare",
        "--duration",
        "1",
        "--repeats",
        "3",
        "--warmup",
        "0",
        "--create-warmup",
        "0",
        "--memory-counts",
        "1000",
        "--live-sessions",
        "1000",
        "--live-repeats",
        "3",
        "--expiry-sessions",
        "200",
        "--expiry-window",
        "2",
        "--idle-seconds",
        "1",
        "--monitor-requests",
        "50",
        "--redis-url",
        redis_server.url,
        "--out",
        str(tmp_path),
    ]
    done = subprocess.run(
        command, cwd=REPO, capture_output=True, text=True, timeout=300, check=False
    )
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-3000:]

    table = (tmp_path / "latest.md").read_text()
    lines = table.splitlines()

    def rows(label: str) -> list[str]:
        return [line for line in lines if line.startswith(f"| {label} |")]

    assert len(rows("lapse (memory)")) >= 4  # requests/s, memory, many live, raw repeats
    assert len(rows("lapse (Redis)")) >= 3  # requests/s, Redis traffic, raw repeats
    assert len(rows("bare uvicorn (no sessions)")) >= 2  # requests/s, raw repeats
    assert rows("memory")  # expiry lateness, memory store
    for heading in (
        "## Requests/s",
        "## Memory per live session",
        "## Touch with 1,000 other live sessions",
        "## Expiry lateness",
        "## Redis traffic per touch request",
        "## Targets",
    ):
        assert heading in table
    assert "Problems: none" in table
    assert (tmp_path / "chart.png").read_bytes()[:8] == PNG_SIGNATURE
