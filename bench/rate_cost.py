"""What a server's rate alone does to its CPU per request: the bare app made slower.

bench/cpu_profile.py finds lapse's seed spending more kernel time per request than
the bare ASGI app, with the same system calls per request (one read, one write).
This asks how much of that a slower server pays whatever it does: the bare app
(bench/servers/bare_asgi.py) with ``--spin-us N``, an empty Python loop of about N
µs per request (user space only: no system call, no allocation), for each N of
``--spins``, then the lapse seed touching one session, each under ``wrk -t1 -c50``
as cpu_profile.py drives them (the server's user and kernel time from
/proc/PID/stat around each 4 s run, median of ``--runs``).

If the kernel's share grows as the spin slows the bare app to lapse's rate, that
share belongs to the rate (wrk waiting and being woken, fewer requests per loop
turn), not to what lapse does in the kernel.

Usage: .venv/bin/python bench/rate_cost.py [--spins 0,10,20,30,40] [--runs 3]
The table also goes to bench/results/rate_cost.md (git-ignored).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

if not __package__:  # run as a script: make the bench package importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.cpu_profile import BARE, cpu_per_request
from bench.loadgen import ensure_wrk
from bench.systems import free_port, lapse_script

RESULTS = Path(__file__).resolve().parent / "results" / "rate_cost.md"

Row = tuple[str, float, float, float]
"""(server, user µs, kernel µs, requests/s)."""


def parse_spins(text: str) -> list[float]:
    """``--spins``: comma-separated µs, each >= 0."""
    try:
        spins = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"spins are numbers of µs, not {text!r}") from None
    if not spins or any(spin < 0 for spin in spins):
        raise argparse.ArgumentTypeError(f"give at least one spin, each >= 0, not {text!r}")
    return spins


def table(rows: list[Row], runs: int) -> list[str]:
    """The Markdown table, rows in the order measured."""
    lines = [
        f"Server CPU per request under wrk -t1 -c50 (median of {runs} runs of 4 s):",
        "",
        "| server | requests/s | user µs | kernel µs | total µs |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, user, kernel, rps in rows:
        lines.append(f"| {name} | {rps:,.0f} | {user:.1f} | {kernel:.1f} | {user + kernel:.1f} |")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--spins", type=parse_spins, default=[0.0, 10.0, 20.0, 30.0, 40.0])
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args(argv)
    if args.runs < 1:
        parser.error("--runs must be at least 1")
    wrk = ensure_wrk()
    env = dict(os.environ)
    rows: list[Row] = []
    for spin in args.spins:
        port = free_port()
        command = [sys.executable, str(BARE), str(port)]
        if spin > 0:
            command += ["--spin-us", str(spin)]
        user, kernel, rps = cpu_per_request(command, port, env, args.runs, wrk)
        rows.append((f"bare app, spin {spin:g} µs", user, kernel, rps))
        print(table(rows, args.runs)[-1], flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        port = free_port()
        seed = lapse_script(port, Path(tmp), extra_sessions=0)
        user, kernel, rps = cpu_per_request([sys.executable, str(seed)], port, env, args.runs, wrk)
    rows.append(("lapse seed, touch", user, kernel, rps))
    lines = table(rows, args.runs)
    print("\n" + "\n".join(lines))
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
