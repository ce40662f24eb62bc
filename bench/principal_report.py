"""The principal index's figures in the report (issue 14): per lapse system, login req/s
against create req/s, and touch req/s of a logged-in session against an anonymous one's,
all from the same run; and what each costs in store calls where the bench counts them."""

from __future__ import annotations

import statistics

from bench.figures import create_rps, logged_touch_rps, login_rps, median_or_none, ratio, touch_rps
from bench.loadgen import WrkResult
from bench.scenarios import Outcome, Results
from bench.systems import SYSTEMS

TITLE = (
    "## Principal index: login vs create, logged-in vs anonymous touch "
    "(lapse, same run, same servers)"
)


def _num(value: float | None, fmt: str = ",.0f") -> str:
    return "—" if value is None else f"{value:{fmt}}"


def _times(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}x"


def _p99(runs: list[float | None]) -> str:
    value = median_or_none(runs)
    return "—" if value is None else f"{value:.2f} ms"


def _median(values: list[float]) -> str:
    return f"{statistics.median(values):.2f}" if values else "—"


def _kept(outcome: Outcome) -> str:
    runs = outcome.touch_logged
    if not runs:
        return "—"
    kept = sum(r.kept for r in runs)
    return f"{kept}/{len(runs)}" + ("" if kept == len(runs) else " ⚠")


def principal_table(results: Results) -> list[str]:
    """One row per lapse system with a login or logged-in touch figure."""
    rows = [(k, o) for k, o in results.outcomes.items() if o.login or o.touch_logged]
    if not rows:
        return []
    lines = [
        "| System | create req/s | login req/s | login / create | create p99 | login p99 "
        "| touch req/s | logged-in touch req/s | logged-in / touch | touch p99 "
        "| logged-in touch p99 | still logged in |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for key, o in rows:
        create, login = create_rps(o), login_rps(o)
        touch, logged = touch_rps(o), logged_touch_rps(o)
        lines.append(
            f"| {SYSTEMS[key].label} | {_num(create)} | {_num(login)} "
            f"| {_times(ratio(login, create))} | {_p99([r.p99_ms for r in o.create])} "
            f"| {_p99([r.p99_ms for r in o.login])} | {_num(touch)} | {_num(logged)} "
            f"| {_times(ratio(logged, touch))} | {_p99([r.result.p99_ms for r in o.touch])} "
            f"| {_p99([r.result.p99_ms for r in o.touch_logged])} | {_kept(o)} |"
        )
    return lines


def principal_calls_table(results: Results) -> list[str]:
    """Store calls per request of each kind, on the stores where the bench counts them:
    under wrk (medians of the runs, idle rate subtracted) and one request at a time."""
    lines = [
        "| System | counted | create | login | touch | logged-in touch "
        "| one at a time: touch | one at a time: logged-in touch |",
        "|---|---|---:|---:|---:|---:|---|---|",
    ]
    found = False
    for key, o in results.outcomes.items():
        label, r, pg = SYSTEMS[key].label, o.redis, o.postgres
        if SYSTEMS[key].kind != "lapse" or not (o.login or o.touch_logged):
            continue
        if r is not None:
            found = True
            anonymous = logged = "—"
            if r.monitor_requests:
                names = ", ".join(f"{n} {v:.2f}" for n, v in r.monitor_names.items())
                anonymous = f"{r.monitor_client_commands:.2f} ({names})"
            if r.logged_monitor is not None:
                m = r.logged_monitor
                names = ", ".join(f"{n} {v:.2f}" for n, v in m.names.items())
                logged = f"{m.client_commands:.2f} ({names})"
            lines.append(
                f"| {label} | round trips (server read events) | {_median(r.create.reads)} "
                f"| {_median(r.login.reads)} | {_median(r.reads_per_request)} "
                f"| {_median(r.logged_touch.reads)} | {anonymous} | {logged} |"
            )
            lines.append(
                f"| {label} | Redis commands, incl. inside Lua | {_median(r.create.commands)} "
                f"| {_median(r.login.commands)} | {_median(r.commands_per_request)} "
                f"| {_median(r.logged_touch.commands)} | client commands (MONITOR) "
                "| client commands (MONITOR) |"
            )
        elif pg is not None:
            found = True
            lines.append(
                f"| {label} | statements (pg_stat_statements) "
                f"| {_median(pg.statements_per_create)} | {_median(pg.statements_per_login)} "
                f"| {_median(pg.statements_per_touch)} "
                f"| {_median(pg.statements_per_logged_touch)} "
                f"| {_num(pg.sequential_touch, '.2f')} "
                f"| {_num(pg.sequential_logged_touch, '.2f')} |"
            )
    return lines if found else []


def _cpu(results: list[WrkResult]) -> float | None:
    return median_or_none([r.server_cpu_us for r in results])


def _difference(a: float | None, b: float | None) -> str:
    return "—" if a is None or b is None else f"{a - b:+.1f}"


def principal_cpu_table(results: Results) -> list[str]:
    """The server process's CPU µs per request (medians of the runs) of each kind, and
    what a login adds to a create and a logged-in touch to an anonymous one: the cost of
    the principal index in the lapse process, steadier than requests/s on a busy machine."""
    rows = [(k, o) for k, o in results.outcomes.items() if o.login or o.touch_logged]
    lines = [
        "| System | create µs | login µs | login - create | touch µs | logged-in touch µs "
        "| logged-in - touch | logged-in / touch |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    found = False
    for key, o in rows:
        create, login = _cpu(o.create), _cpu(o.login)
        touch = _cpu([r.result for r in o.touch])
        logged = _cpu([r.result for r in o.touch_logged])
        if all(v is None for v in (create, login, touch, logged)):
            continue
        found = True
        lines.append(
            f"| {SYSTEMS[key].label} | {_num(create, '.1f')} | {_num(login, '.1f')} "
            f"| {_difference(login, create)} | {_num(touch, '.1f')} | {_num(logged, '.1f')} "
            f"| {_difference(logged, touch)} | {_times(ratio(logged, touch))} |"
        )
    return lines if found else []
