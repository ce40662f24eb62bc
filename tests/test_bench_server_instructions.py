"""bench/server_instructions.py: the server it starts under callgrind, and the
count it reads back from callgrind's dumps."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench import server_instructions  # noqa: E402


def test_the_seed_runs_under_callgrind_on_loopback_with_its_dumps_in_the_work_dir(
    tmp_path: Path,
) -> None:
    command = server_instructions.server_command("seed", 45678, tmp_path, "/usr/bin/valgrind")
    assert command[:2] == ["/usr/bin/valgrind", "--tool=callgrind"]
    assert command[2] == f"--callgrind-out-file={tmp_path / 'callgrind.out.%p'}"
    seed = Path(command[-1]).read_text()
    assert 'listenTCP(45678, factory, interface="127.0.0.1")' in seed
    assert "listenTCP(8080, factory)" not in seed
    bare = server_instructions.server_command("bare", 45678, tmp_path, "/usr/bin/valgrind")
    assert bare[-2:] == [str(server_instructions.BARE), "45678"]


def test_the_count_is_the_last_dumps_summary_and_a_missing_one_is_an_error(
    tmp_path: Path,
) -> None:
    """The dump written after the counters were zeroed is the newest one of the
    server's pid; another pid's dumps are not read."""
    (tmp_path / "callgrind.out.7.1").write_text("events: Ir\nsummary: 500\n")
    newer = tmp_path / "callgrind.out.7.2"
    newer.write_text("version: 1\nevents: Ir\nsummary: 1234\ntotals: 1234\n")
    later = time.time() + 5
    os.utime(newer, (later, later))
    (tmp_path / "callgrind.out.8.3").write_text("summary: 99999\n")
    assert server_instructions.dumped_total(tmp_path, 7) == 1234
    with pytest.raises(RuntimeError, match="no dump"):
        server_instructions.dumped_total(tmp_path, 9)
    (tmp_path / "callgrind.out.10.1").write_text("events: Ir\n")
    with pytest.raises(RuntimeError, match="no total"):
        server_instructions.dumped_total(tmp_path, 10)
