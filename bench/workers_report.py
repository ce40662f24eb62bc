"""The report's section on ``lapse serve --workers N`` on Redis (bench/workers.py)."""

from __future__ import annotations

import os
import statistics

from bench.figures import median_or_none, ratio
from bench.scenarios import Results
from bench.tail_report import ms
from bench.workers import WorkersOutcome, WorkersRun


def title(outcome: WorkersOutcome) -> str:
    return (
        f"## Many cores: lapse serve --workers N on Redis (the seed's site; wrk -t{outcome.threads}"
        f" -c{outcome.connections} on the same {os.cpu_count()}-CPU machine)"
    )


def _num(value: float | None, fmt: str = ",.0f", unit: str = "") -> str:
    return "—" if value is None else f"{value:{fmt}}{unit}"


def _median_us(runs: list[WorkersRun], part: str) -> float | None:
    """The median over ``runs`` of one party's CPU µs per request."""
    values = []
    for r in runs:
        seconds = {
            "workers": sum(r.worker_cpu),
            "supervisor": r.supervisor_cpu,
            "redis": r.redis_cpu,
            "wrk": r.wrk_cpu,
        }[part]
        values.append(r.per_request(seconds))
    return median_or_none(values)


def _split(runs: list[WorkersRun]) -> str:
    """Each worker's share of the workers' CPU time, summed over the runs."""
    per_worker = [sum(r.worker_cpu[i] for r in runs) for i in range(len(runs[0].worker_cpu))]
    total = sum(per_worker)
    if len(per_worker) < 2 or not total:
        return "—"
    return " / ".join(f"{100 * v / total:.0f}" for v in per_worker) + " %"


def workers_table(results: Results) -> tuple[str, list[str]]:
    """(title, lines) of the section; ("", []) if ``lapse serve --workers`` was not run."""
    outcome = next((o.workers for o in results.outcomes.values() if o.workers), None)
    if outcome is None or not outcome.runs:
        return "", []
    cpus = os.cpu_count() or 1
    lines = [
        "| workers | figure | req/s | req/s per worker | vs 1 worker | p99 | p99.9 "
        "| workers' CPU µs/req (sum) | split between workers | supervisor µs/req "
        "| redis-server µs/req | wrk µs/req | all, µs/req | machine busy "
        "| one core of worker CPU, req/s | session kept |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    base: dict[str, float | None] = {}
    for figure in ("touch", "create"):
        for n in sorted({r.workers for r in outcome.runs}):
            runs = [r for r in outcome.runs if r.workers == n and r.figure == figure]
            if not runs:
                continue
            rps = statistics.median(r.result.rps for r in runs)
            if n == 1:
                base[figure] = rps
            parts = {p: _median_us(runs, p) for p in ("workers", "supervisor", "redis", "wrk")}
            known = [v for v in parts.values() if v is not None]
            total = sum(known) if len(known) == len(parts) else None
            busy = median_or_none([r.busy for r in runs])
            kept = sum(r.kept for r in runs)
            errors = sum(r.result.errors for r in runs)
            flag = f" ⚠ {errors} errors" if errors else ""
            core = 1e6 / parts["workers"] if parts["workers"] else None
            lines.append(
                f"| {n} | {figure} | {rps:,.0f}{flag} | {rps / n:,.0f} "
                f"| {_num(ratio(rps, base.get(figure)), '.2f', 'x')} "
                f"| {ms(median_or_none([r.result.p99_ms for r in runs]))} "
                f"| {ms(median_or_none([r.result.p999_ms for r in runs]))} "
                f"| {_num(parts['workers'], '.1f')} | {_split(runs)} "
                f"| {_num(parts['supervisor'], '.1f')} | {_num(parts['redis'], '.1f')} "
                f"| {_num(parts['wrk'], '.1f')} | {_num(total, '.1f')} "
                f"| {_num(None if busy is None else 100 * busy, '.0f', ' %')} "
                f"| {_num(core)} "
                f"| {f'{kept}/{len(runs)}' if figure == 'touch' else 'n/a'} |"
            )
    lines += [
        "",
        f"All, µs/req: the CPU time the workers, the supervisor, redis-server and wrk used per "
        f"request; machine busy: that time over the run's wall time x {cpus} CPUs. Where it "
        "is near 100 %, requests/s is what the machine can do with wrk and redis-server on "
        "it, not what lapse's workers could: N = 2 cannot then run faster than N = 1, and "
        "N=2/N=1 shows the cost of sharing the cores, not how lapse scales. What the figure "
        "does show: both workers serve (the split), a session made by one is found by the "
        "other (session kept), and what a request costs each party, steadier than "
        "requests/s. One core of worker CPU: 1e6 / the workers' µs per request, the "
        "requests/s one worker would serve on a core of its own with the store and the "
        "clients elsewhere (an estimate; Redis's own limits not included).",
        "",
        "| workers | figure | req/s | p99 | p99.9 | requests | errors | each worker's CPU s "
        "| supervisor CPU s | redis-server CPU s | wrk CPU s | wall s |",
        "|---:|---|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|",
    ]
    for r in outcome.runs:
        lines.append(
            f"| {r.workers} | {r.figure} | {r.result.rps:,.0f} | {ms(r.result.p99_ms)} "
            f"| {ms(r.result.p999_ms)} | {r.result.requests:,} | {r.result.errors} "
            f"| {', '.join(f'{c:.2f}' for c in r.worker_cpu)} | {r.supervisor_cpu:.2f} "
            f"| {_num(r.redis_cpu, '.2f')} | {r.wrk_cpu:.2f} | {r.wall:.2f} |"
        )
    return title(outcome), lines
