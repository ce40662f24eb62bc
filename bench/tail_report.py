"""Tail latency in the report (issue 15): p99 and p99.9 of every figure of every system,
the median over its runs and its worst run.

wrk's ``--latency`` prints the 50/75/90/99th percentiles only; every wrk run of the bench
carries loadgen's ``TAIL_HOOK``, a Lua ``done`` hook that prints p99 and p99.9 of the same
latency histogram in µs, so both come from one place. wrk is closed-loop (each connection
waits for its answer before it sends again): the figures compare systems under the same
load, they are not what an open-loop client would see (coordinated omission).
"""

from __future__ import annotations

from collections.abc import Callable

from bench.figures import median_or_none
from bench.loadgen import WrkResult
from bench.scenarios import Outcome, Results
from bench.systems import SYSTEMS

TITLE = (
    "## Tail latency: p99 and p99.9 of every figure (wrk's latency histogram, a Lua done() "
    "hook; median of the runs and the worst run)"
)

FIGURES: tuple[tuple[str, Callable[[Outcome], list[WrkResult]]], ...] = (
    ("touch", lambda o: [r.result for r in o.touch]),
    ("create", lambda o: o.create),
    ("touch, logged in", lambda o: [r.result for r in o.touch_logged]),
    ("login", lambda o: o.login),
    ("touch, 1 live", lambda o: [r.result for r in o.live_base]),
    ("touch, many live", lambda o: [r.result for r in o.live_many]),
)
"""The figures measured with wrk, by name, and their runs in an Outcome."""


def worst(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return max(present) if present else None


def ms(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f} ms"


def tail_cells(runs: list[WrkResult]) -> tuple[str, str, str, str]:
    """p99 and p99.9 of ``runs``: (median p99, median p99.9, worst p99, worst p99.9)."""
    p99 = [r.p99_ms for r in runs]
    p999 = [r.p999_ms for r in runs]
    return (
        ms(median_or_none(p99)),
        ms(median_or_none(p999)),
        ms(worst(p99)),
        ms(worst(p999)),
    )


def tail_table(results: Results) -> list[str]:
    """One row per system and figure it was measured on."""
    lines = [
        "| System | figure | runs | p99 (median) | p99.9 (median) | p99, worst run "
        "| p99.9, worst run |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for key, outcome in results.outcomes.items():
        for figure, runs_of in FIGURES:
            runs = runs_of(outcome)
            if runs:
                cells = " | ".join(tail_cells(runs))
                lines.append(f"| {SYSTEMS[key].label} | {figure} | {len(runs)} | {cells} |")
    return lines if len(lines) > 2 else []
