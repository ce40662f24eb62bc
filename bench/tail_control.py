"""The create p99 of lapse beside a control: the bare app made exactly as slow.

Under wrk (closed loop, 50 connections, saturation) a request's latency is set
mostly by the rate: Little's law makes the mean 50 / requests/s, whatever the server
does inside. So a p99 alone cannot say whether a server's own pauses make its tail.
This runs, in turn on the same machine:

- lapse: the seed program (examples/session_endings.py, memory store), every request
  making a session (no cookie), warmed up past its 5 s session timeout;
- the control: the bare uvicorn app (bench/servers/bare_asgi.py) with ``--burn-us``,
  each request spinning until it has used the CPU time that makes its CPU per request
  lapse's create's (found by two calibration runs, after one of lapse), so that it
  serves about as fast, with no allocation, no collection, no expiry: nothing that
  stalls a loop.

Each of ``--runs`` rounds runs both (the order alternating), ``--seconds`` each; per
run: requests/s, the server's CPU µs per request, Little's mean (connections /
requests/s), wrk's p99 and p99.9, and the CPU time stolen by the hypervisor. Their
medians close the table. Whatever p99 the control gets is what the machine and wrk
give a server of that speed with no pause of its own.

Usage: .venv/bin/python bench/tail_control.py [--runs 5] [--seconds 4]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

if not __package__:  # run as a script: make the bench package importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.figures import median_or_none, worst_p99
from bench.loadgen import WrkResult, ensure_wrk
from bench.options import parse_options
from bench.report import num
from bench.scenarios import Bench
from bench.systems import BARE, HOST, SYSTEMS

CONNECTIONS = 50
CALIBRATIONS = 2
"""Runs of the bare app to find its spin: without one, then with the difference in CPU
per request; the next spin adds what is still missing (a slower bare app spends more
per request outside its spin too: fewer requests share each loop turn)."""
WARMUP = 6
"""Seconds of create load before measuring: past the seed's 5 s timeout, so sessions
end as fast as they are made."""


def burn_args(burn_us: float) -> tuple[str, ...]:
    """The bare app's arguments to spend ``burn_us`` of CPU per request (none for 0)."""
    return ("--burn-us", f"{burn_us:.1f}") if burn_us > 0 else ()


def cpu_of(result: WrkResult) -> float:
    if result.server_cpu_us is None:
        raise RuntimeError("no CPU time for the server's run")
    return result.server_cpu_us


def row(name: str, r: WrkResult) -> str:
    return (
        f"| {name} | {r.rps:,.0f} | {cpu_of(r):.1f} | {1000 * CONNECTIONS / r.rps:.2f} "
        f"| {num(r.p99_ms, '.2f')} | {num(r.p999_ms, '.2f')} | {num(r.steal_ms)} |"
    )


def median_row(name: str, runs: list[WrkResult]) -> str:
    def med(values: list[float | None]) -> str:
        return num(median_or_none(values), ".2f")

    rps = statistics.median(r.rps for r in runs)
    return (
        f"| **{name}, median of {len(runs)}** | {rps:,.0f} "
        f"| {statistics.median(cpu_of(r) for r in runs):.1f} | {1000 * CONNECTIONS / rps:.2f} "
        f"| {med([r.p99_ms for r in runs])} (worst {num(worst_p99(runs), '.2f')}) "
        f"| {med([r.p999_ms for r in runs])} | {med([r.steal_ms for r in runs])} |"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--seconds", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=WARMUP)
    args = parser.parse_args(argv)
    if args.runs < 1 or args.seconds < 1 or args.warmup < 0:
        parser.error("need --runs >= 1, --seconds >= 1, --warmup >= 0")
    opts = parse_options(["--duration", str(args.seconds), "--connections", str(CONNECTIONS)])
    b = Bench(opts, ensure_wrk(), None)
    lapse_runs: list[WrkResult] = []
    control_runs: list[WrkResult] = []
    bare = SYSTEMS[BARE]
    with b.server(SYSTEMS["lapse-memory"]) as lapse:
        if args.warmup:
            b.run_wrk(lapse, args.warmup, None)
        lapse_cpu = cpu_of(b.run_wrk(lapse, args.seconds, None))
        burn = 0.0
        for _ in range(CALIBRATIONS):
            with b.server(bare, args=burn_args(burn)) as port:
                b.run_wrk(port, 1, None)
                control_cpu = cpu_of(b.run_wrk(port, args.seconds, None))
            print(
                f"lapse create: {lapse_cpu:.1f} µs CPU per request; bare app spinning "
                f"{burn:.1f} µs: {control_cpu:.1f}",
                flush=True,
            )
            burn = max(burn + lapse_cpu - control_cpu, 0.0)
        print(f"the control spins {burn:.1f} µs per request", flush=True)
        with b.server(bare, args=burn_args(burn)) as port:
            b.run_wrk(port, 1, None)
            for run in range(args.runs):
                order = [lapse, port] if run % 2 == 0 else [port, lapse]
                for target in order:
                    result = b.run_wrk(target, args.seconds, None)
                    (lapse_runs if target == lapse else control_runs).append(result)
    print(
        f"\n{HOST}, wrk -t1 -c{CONNECTIONS} -d{args.seconds}s, no cookie "
        "(lapse: every request makes a session)\n"
    )
    print(
        "| server | requests/s | server CPU µs/request | Little's mean, ms | p99, ms "
        "| p99.9, ms | CPU stolen, ms |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, runs in (("lapse create", lapse_runs), ("control", control_runs)):
        for r in runs:
            print(row(name, r))
    print(median_row("lapse create", lapse_runs))
    print(median_row("control", control_runs))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
