"""The command line of `bench/run.py`: the options, and where a run writes its results."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field
from pathlib import Path

from bench.systems import DEFAULT_CHART, RESULTS_DIR, SYSTEMS


@dataclass(frozen=True)
class Options:
    systems: list[str]
    duration: int
    repeats: int
    warmup: int
    create_warmup: int
    threads: int
    connections: int
    memory_counts: list[int]
    live_sessions: int
    live_repeats: int
    expiry_sessions: int
    expiry_window: float
    expiry_stores: str
    idle_seconds: float
    monitor_requests: int
    redis_url: str | None
    out: Path | None
    strict: bool
    subset: bool = False
    """Something other than the full default run: it does not replace the tracked chart."""
    update_chart: bool = False
    pg_idle_seconds: float = 10.0
    principals: bool = True
    """The principal figures on the lapse systems: login, and touch of a logged-in session."""
    worker_counts: list[int] = field(default_factory=lambda: [1, 2])
    """lapse-redis-workers: the N of ``lapse serve --workers N`` measured."""
    expiry_calls_sessions: int = 1000
    """Redis lapse systems: sessions made one at a time and left to expire, for the store
    calls per create and per expired session (0: skip)."""
    max_steal: float = 0.03
    """A measured wrk run whose CPU time stolen by the hypervisor is over this share of
    the machine's CPU time during the run is taken again (0: never)."""
    steal_retakes: int = 2
    """How many times one measured run may be taken again for steal."""

    @property
    def steal_limit_ms(self) -> float:
        """The steal over which a measured run is taken again: ``max_steal`` of the
        machine's CPU time (all CPUs) in a ``duration`` run, in ms."""
        return self.max_steal * self.duration * (os.cpu_count() or 1) * 1000

    @property
    def results_dir(self) -> Path:
        return self.out if self.out is not None else RESULTS_DIR

    @property
    def table_path(self) -> Path:
        return self.results_dir / "latest.md"

    @property
    def chart_path(self) -> Path:
        """``--out``/chart.png; else bench/chart.png (tracked, the README's) for the full
        default run or with ``--update-chart``, and bench/results/chart.png (git-ignored)
        for any other run."""
        if self.out is not None:
            return self.out / "chart.png"
        if self.subset and not self.update_chart:
            return RESULTS_DIR / "chart.png"
        return DEFAULT_CHART


NOT_MEASURED = frozenset({"redis_url", "out", "strict", "update_chart"})
"""Options that do not change what is measured: a run that sets only these is still the
full default run."""


def int_list(text: str) -> list[int]:
    return [int(c.replace("_", "")) for c in text.split(",") if c.strip()]


def parse_options(argv: list[str] | None = None) -> Options:
    parser = argparse.ArgumentParser(
        description="Benchmark lapse against its peers on GET /logme (see bench/README.md)."
    )
    parser.add_argument(
        "--systems",
        default=",".join(SYSTEMS),
        help=f"comma-separated subset of {','.join(SYSTEMS)} (default: all)",
    )
    parser.add_argument("--duration", type=int, default=4, help="seconds per wrk run (4)")
    parser.add_argument("--repeats", type=int, default=5, help="wrk runs per figure, >= 3 (5)")
    parser.add_argument("--warmup", type=int, default=1, help="discarded wrk seconds (1; 0=off)")
    parser.add_argument(
        "--create-warmup",
        type=int,
        default=6,
        help="discarded wrk seconds before the create runs, > the 5 s session timeout so that "
        "sessions expire as fast as they are made while measuring (6; 0=off)",
    )
    parser.add_argument("--threads", type=int, default=1, help="wrk -t (1)")
    parser.add_argument("--connections", type=int, default=50, help="wrk -c (50)")
    parser.add_argument(
        "--memory-counts",
        default="100000,1000000",
        help="comma-separated live-session counts for the in-process memory probe "
        "(100000,1000000; empty: skip)",
    )
    parser.add_argument(
        "--live-sessions",
        type=int,
        default=1_000_000,
        help="extra live sessions for the 'touch with many live sessions' figure "
        "(1000000; 0: skip)",
    )
    parser.add_argument(
        "--live-repeats",
        type=int,
        default=9,
        help="alternating wrk runs per server for the many-live-sessions figure (9; its two "
        "medians are compared, and run-to-run noise on this machine is about 10 %%)",
    )
    parser.add_argument(
        "--expiry-sessions",
        type=int,
        default=100_000,
        help="sessions for the expiry-lateness figure (100000; 0: skip)",
    )
    parser.add_argument(
        "--expiry-window", type=float, default=60, help="their deadlines spread over s (60)"
    )
    parser.add_argument(
        "--expiry-stores",
        default="memory,redis-2p",
        help="stores for expiry lateness: memory,redis-2p (default: redis-2p is two "
        "processes on one Redis, a few thousand sessions) or e.g. memory,sqlite,redis",
    )
    parser.add_argument(
        "--idle-seconds",
        type=float,
        default=2,
        help="Redis and PostgreSQL systems: seconds without traffic before the touch runs, to "
        "measure the idle command (statement) rate subtracted per request (2)",
    )
    parser.add_argument(
        "--monitor-requests",
        type=int,
        default=200,
        help="Redis systems: sequential touches watched with MONITOR; PostgreSQL: their "
        "statements counted (200; 0: skip)",
    )
    parser.add_argument(
        "--pg-idle-seconds",
        type=float,
        default=10.0,
        help="lapse on PostgreSQL: seconds an idle process (3 sessions alive, 1 h timeout) is "
        "watched for the statements it sends (10; 0: skip)",
    )
    parser.add_argument(
        "--redis-url",
        default=None,
        help="use this (otherwise idle) redis-server instead of starting one; it is not "
        "flushed (default: start our own on a free loopback port)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="write latest.md and chart.png here (default: bench/results/latest.md; the chart "
        "to bench/chart.png for the full default run, to bench/results/chart.png otherwise)",
    )
    parser.add_argument(
        "--update-chart",
        action="store_true",
        help="write bench/chart.png (tracked, shown by the README) even though this is not the "
        "full default run (default: only the full run does; others write "
        "bench/results/chart.png)",
    )
    parser.add_argument(
        "--no-principals",
        dest="principals",
        action="store_false",
        help="skip the principal index's figures on the lapse systems (a login per request; "
        "touch of a logged-in session, alternated with the anonymous touch runs)",
    )
    parser.add_argument(
        "--worker-counts",
        default="1,2",
        help="lapse-redis-workers: comma-separated N of 'lapse serve --workers N' (1,2)",
    )
    parser.add_argument(
        "--expiry-calls-sessions",
        type=int,
        default=1000,
        help="Redis lapse systems: sessions made one at a time, then left to expire, for the "
        "store round trips per create and per expired session (1000; 0: skip)",
    )
    parser.add_argument(
        "--max-steal",
        type=float,
        default=0.03,
        help="take a measured wrk run again when the hypervisor stole more than this share "
        "of the machine's CPU time during it (0.03: 240 ms of a 4 s run on 2 CPUs; 0: never)",
    )
    parser.add_argument(
        "--steal-retakes",
        type=int,
        default=2,
        help="times one run may be taken again for steal; the run with the least steal is "
        "kept, and every run set aside is listed in the results (2)",
    )
    parser.add_argument(
        "--strict", action="store_true", help="exit 1 if a target is missed or not judged (steal)"
    )
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be at least 1 (3 or more for a median)")
    if args.live_repeats < 1:
        parser.error("--live-repeats must be at least 1 (3 or more for a median)")
    systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    unknown = [s for s in systems if s not in SYSTEMS]
    if not systems or unknown:
        parser.error(f"--systems: unknown {unknown}; choose from {','.join(SYSTEMS)}")
    systems = [s for s in SYSTEMS if s in systems]  # the table's order
    if args.duration < 1 or args.threads < 1 or args.connections < args.threads:
        parser.error("need --duration >= 1 and --connections >= --threads >= 1")
    try:
        memory_counts = int_list(args.memory_counts)
    except ValueError:
        parser.error(
            f"--memory-counts: not a comma-separated list of integers: {args.memory_counts!r}"
        )
    try:
        worker_counts = int_list(args.worker_counts)
    except ValueError:
        worker_counts = []
    if not worker_counts or min(worker_counts) < 1:
        parser.error(
            f"--worker-counts: not a comma-separated list of N >= 1: {args.worker_counts!r}"
        )
    if args.expiry_calls_sessions < 0:
        parser.error("--expiry-calls-sessions must be 0 (skip) or more")
    if not 0 <= args.max_steal < 1 or args.steal_retakes < 0:
        parser.error("need 0 <= --max-steal < 1 and --steal-retakes >= 0")
    defaults = vars(parser.parse_args([]))
    chosen = dict(
        vars(args), systems=systems, memory_counts=memory_counts, worker_counts=worker_counts
    )
    defaults.update(
        systems=list(SYSTEMS),
        memory_counts=int_list(defaults["memory_counts"]),
        worker_counts=int_list(defaults["worker_counts"]),
    )
    subset = any(chosen[k] != defaults[k] for k in defaults if k not in NOT_MEASURED)
    return Options(
        systems=systems,
        duration=args.duration,
        repeats=args.repeats,
        warmup=args.warmup,
        create_warmup=args.create_warmup,
        threads=args.threads,
        connections=args.connections,
        memory_counts=memory_counts,
        live_sessions=args.live_sessions,
        live_repeats=args.live_repeats,
        expiry_sessions=args.expiry_sessions,
        expiry_window=args.expiry_window,
        expiry_stores=args.expiry_stores,
        idle_seconds=args.idle_seconds,
        monitor_requests=args.monitor_requests,
        redis_url=args.redis_url,
        out=args.out,
        strict=args.strict,
        subset=subset,
        update_chart=args.update_chart,
        pg_idle_seconds=args.pg_idle_seconds,
        principals=args.principals,
        worker_counts=worker_counts,
        expiry_calls_sessions=args.expiry_calls_sessions,
        max_steal=args.max_steal,
        steal_retakes=args.steal_retakes,
    )
