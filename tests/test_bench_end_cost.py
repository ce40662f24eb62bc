"""bench/end_cost.py: the program it times ends every session it made, and
the figure it prints."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench import end_cost  # noqa: E402


def test_the_timed_program_ends_every_session_and_prints_a_time_per_end(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """300 sessions, one repeat: the program's own check (every callback ran,
    no session left) passes, and the figure is a positive time per end."""
    end_cost.main(["--sessions", "300", "--repeats", "1"])
    line = capsys.readouterr().out.strip()
    assert line.startswith("microseconds per session end: ")
    assert float(line.split(": ")[1].split()[0]) > 0


def test_a_program_that_leaves_a_session_unended_fails_the_run(tmp_path: Path) -> None:
    """The program checks its ends: with the clock advanced short of the
    deadline, the run fails instead of timing nothing."""
    program = tmp_path / "program.py"
    program.write_text(end_cost.PROGRAM.replace("clock.advance(6)", "clock.advance(4)"))
    with pytest.raises(Exception, match="returned non-zero exit status"):
        end_cost._run(program, 10, True, False)


def test_too_few_sessions_is_refused() -> None:
    with pytest.raises(SystemExit):
        end_cost.main(["--sessions", "1"])
