"""The report's store round trips per operation for the scaling model (issue 15): for one
lapse process on Redis, one node and the cluster, per touch and per create (under wrk, and
one at a time), per expired session, and idle per second (bench/store_calls.py,
bench/redis_traffic.py's counts)."""

from __future__ import annotations

import statistics

from bench.redis_traffic import RedisCounts
from bench.scenarios import Results
from bench.store_calls import StoreCalls, Window, median_window
from bench.systems import SYSTEMS

TITLE = (
    "## Scaling model: store round trips per operation, one lapse process on Redis "
    "(idle rate subtracted)"
)


def _median(values: list[float]) -> str:
    return f"{statistics.median(values):.2f}" if values else "—"


def _pair(reads: str, commands: str) -> str:
    return f"{reads} / {commands}"


def _window(windows: list[Window]) -> str:
    """Median round trips / commands per operation over the rounds, and their ranges."""
    w = median_window(windows)
    if w is None:
        return "—"
    cell = _pair(f"{w.reads:.2f}", f"{w.commands:.2f}")
    if len(windows) > 1:
        reads = [x.reads for x in windows]
        commands = [x.commands for x in windows]
        cell += f" ({min(reads):.2f}-{max(reads):.2f} / {min(commands):.1f}-{max(commands):.1f})"
    return cell


def _names(w: Window | None) -> str:
    if w is None:
        return "—"
    return f"{w.client_commands:.2f}: " + (
        ", ".join(f"{n} {v:.2f}" for n, v in w.names.items()) or "none"
    )


def _made(c: StoreCalls | None) -> str:
    """How many sessions the one-at-a-time windows made, and over how long: the expiry
    window's sessions end about as far apart (the store claims them in batches, so the
    rate changes the round trips per expired session)."""
    if c is None or c.create is None:
        return "—"
    rounds = f", {len(c.creates)} rounds" if len(c.creates) > 1 else ""
    return f"{c.sessions:,} in {c.create.seconds:.1f} s{rounds}"


def _shards(c: StoreCalls | None) -> str:
    seen = [w.shards for w in (c.create, c.expiry) if w is not None] if c else []
    most = max(seen, default=0)
    return str(most) if most else "1 (untagged)"


def scaling_table(results: Results) -> list[str]:
    """One row per lapse system on Redis that has any of the counts."""
    lines = [
        "| System | shards seen | touch under wrk | touch one at a time "
        "| create under wrk | create one at a time | expired session | sessions, made in "
        "| client commands per create, by name | client commands per expired session, by "
        "name | idle, per second |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|---|---:|",
    ]
    for key, o in results.outcomes.items():
        system = SYSTEMS[key]
        if system.kind != "lapse" or not system.redis:
            continue
        r, c = o.redis, o.store_calls
        if r is None and c is None:
            continue
        counts = r or RedisCounts()
        sequential = "—"
        if counts.monitor_requests:
            reads, client = counts.monitor_reads, counts.monitor_client_commands
            sequential = _pair(f"{reads:.2f}", f"{client:.2f}")
        idle = c.idle if c is not None and c.idle is not None else r
        idle_cell = "—"
        if idle is not None:
            idle_cell = _pair(f"{idle.idle_reads:.1f}", f"{idle.idle_commands:.1f}")
        lines.append(
            f"| {system.label} | {_shards(c)} "
            f"| {_pair(_median(counts.reads_per_request), _median(counts.commands_per_request))} "
            f"| {sequential} "
            f"| {_pair(_median(counts.create.reads), _median(counts.create.commands))} "
            f"| {_window(c.creates if c else [])} | {_window(c.expiries if c else [])} "
            f"| {_made(c)} "
            f"| {_names(c.create if c else None)} | {_names(c.expiry if c else None)} "
            f"| {idle_cell} |"
        )
    if len(lines) == 2:
        return []
    sessions = next((o.store_calls.sessions for o in results.outcomes.values() if o.store_calls), 0)
    lines += [
        "",
        "Each cell: round trips (server read events) / commands (those run inside Lua "
        "included), per operation; one at a time, the touch's second figure is client "
        "commands (MONITOR). Under wrk: medians of the requests/s runs, where concurrent "
        "requests share a round trip; one at a time: "
        + (
            f"{sessions:,} cookie-less GETs one after the other, then no request until those "
            "sessions had all expired (bench/store_calls.py), in rounds on one server: the "
            "median of the rounds (their range in brackets)"
            if sessions
            else "not measured"
        )
        + "; idle: the same process before those requests, round trips/s / commands/s.",
    ]
    return lines
