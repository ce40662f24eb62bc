"""What ending one session costs on the memory store, without a durable hook.

A Site on a fake Clock (memory store, the seed's ``ShortSession`` of 5 s) makes
N sessions, each with a seed-like ``notifyOnExpire`` callback (it prints a line
to /dev/null and forgets the uid), then advances the clock past their deadline:
the keeper's timer ends them all, ENDS_PER_TURN at a time, as a server's event
loop does.

- ``--instructions``: user-space instructions per end, counted by callgrind.
  Each N is run twice, ending the sessions and not; the slope over two N of the
  difference is the end's own count (start-up and the sessions' making cancel).
- otherwise: wall-clock microseconds per end, best of ``--repeats``.

Usage: .venv/bin/python bench/end_cost.py [--instructions] [--sessions 20000]
       [--repeats 5]
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO_DIR = Path(__file__).resolve().parent.parent

PROGRAM = r"""
import sys
import time

from lapse.internet.task import Clock
from lapse.web.resource import Resource
from lapse.web.server import Session, Site


class ShortSession(Session):
    sessionTimeout = 5


count, end = int(sys.argv[1]), sys.argv[2] == "end"
out = open("/dev/null", "w")
known = set()


def expired(uid):
    print("Session", uid, "has expired.", file=out)
    known.remove(uid)


clock = Clock()
site = Site(Resource(), reactor=clock)
site.sessionFactory = ShortSession
for _ in range(count):
    session = site.makeSession()
    known.add(session.uid)
    session.notifyOnExpire(lambda uid=session.uid: expired(uid))
started = time.perf_counter()
if end:
    clock.advance(6)
    assert not known and not site.sessions, "every session ended"
print(time.perf_counter() - started)
"""


def _run(program: Path, count: int, end: bool, callgrind: bool) -> float:
    """Seconds the ends took (wall), or the run's instructions (callgrind)."""
    command = [sys.executable, str(program), str(count), "end" if end else "make"]
    if callgrind:
        with tempfile.TemporaryDirectory() as scratch:
            out = Path(scratch) / "callgrind.out"
            command = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", *command]
            done = subprocess.run(command, capture_output=True, text=True, check=True)
        found = re.search(r"refs:\s*([\d,]+)", done.stderr)
        if found is None:
            raise SystemExit(f"no instruction count in valgrind's output:\n{done.stderr}")
        return float(found.group(1).replace(",", ""))
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    return float(done.stdout.split()[-1])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--instructions", action="store_true")
    parser.add_argument("--sessions", type=int, default=20000)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    if args.sessions < 2:
        parser.error("--sessions must be at least 2")
    with tempfile.TemporaryDirectory() as scratch:
        program = Path(scratch) / "end_cost_program.py"
        program.write_text(PROGRAM, encoding="utf-8")
        if args.instructions:
            if shutil.which("valgrind") is None:
                raise SystemExit("--instructions needs valgrind (apt-get install valgrind)")
            small, large = args.sessions // 2, args.sessions
            ends = {
                n: _run(program, n, True, True) - _run(program, n, False, True)
                for n in (small, large)
            }
            each = (ends[large] - ends[small]) / (large - small)
            print(f"instructions per session end: {each:,.0f} ({small} and {large} sessions)")
            return
        best = min(_run(program, args.sessions, True, False) for _ in range(max(1, args.repeats)))
        print(
            f"microseconds per session end: {best * 1e6 / args.sessions:.2f} (best of "
            f"{args.repeats}, {args.sessions} sessions)"
        )


if __name__ == "__main__":
    main()
