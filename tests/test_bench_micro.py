"""The in-process micro-benchmarks, bench/micro.py (``bench/run.py micro``): their table,
their command, and every case run for a few requests."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench import micro  # noqa: E402


def test_micro_table_gives_the_median_spread_and_ratio_to_the_bare_app() -> None:
    figures = [
        micro.Figure("bare", 100, [4.0, 5.0, 4.5]),
        micro.Figure("site touch", 100, [30.0, 27.0, 40.0]),
    ]
    lines = micro.table(figures)
    assert lines[2] == "| bare | 4.5 | 4.0-5.0 | 1.0x | 100 x 3 |"
    assert lines[3] == "| site touch | 30.0 | 27.0-40.0 | 6.7x | 100 x 3 |"


def test_run_py_micro_is_the_micro_benchmarks_command(capsys: pytest.CaptureFixture[str]) -> None:
    from bench import run

    with pytest.raises(SystemExit) as exited:
        run.main(["micro", "--help"])
    assert exited.value.code == 0
    assert capsys.readouterr().out.startswith("usage: bench/run.py micro")


def test_micro_benchmark_measures_every_case_through_the_asgi_call(
    tmp_path: Path, redis_server: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    """`bench/run.py micro` with few requests: every case runs (each request answered 200,
    touches keep their session), the table and the JSON name them all."""
    out = tmp_path / "micro.json"
    argv = ["--requests", "20", "--rounds", "2", "--keys", "50", "--redis-url",
            redis_server.url, "--json", str(out)]  # fmt: skip
    assert micro.main(argv) == 0
    rows = json.loads(out.read_text())
    assert [r["case"] for r in rows] == [
        "bare", "site touch", "site touch, logged in", "site create", "site login",
        "middleware touch", "middleware create",
        "sqlite touch, 10 keys", "sqlite touch, 50 keys",
        "redis touch, 10 keys", "redis touch, 50 keys",
    ]  # fmt: skip
    assert all(len(r["rounds"]) == 2 and r["median"] > 0 for r in rows)
    printed = capsys.readouterr().out
    assert "| bare |" in printed and "| 1.0x |" in printed
