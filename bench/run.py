"""lapse and its peers on the seed program's GET /logme: one command, one table, one chart.

Run with ``make bench`` (or ``.venv/bin/python bench/run.py --help`` for the options);
``bench/run.py micro`` runs the in-process micro-benchmarks instead (bench/micro.py).
See bench/README.md for what each system is and what each number means.

The package's modules, one job each: ``options`` (the command line, where results go),
``systems`` (the servers: how each starts and stops), ``loadgen`` (wrk and its output),
``redis_traffic`` (Redis round trips per request), ``redis_cluster`` (the Redis
Cluster), ``pg_traffic`` (the PostgreSQL systems' database and statement counts),
``scenarios`` (what is measured),
``figures`` (medians, ratios, targets), ``report`` (the Markdown table), ``chart``
(the PNG), ``micro`` (the request path in process).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

if not __package__:  # run as a script: make the bench package importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.chart import write_chart
from bench.figures import unmet
from bench.loadgen import ensure_wrk
from bench.options import parse_options
from bench.pg_traffic import PostgresHandle
from bench.redis_cluster import ClusterHandle
from bench.redis_traffic import RedisHandle
from bench.report import report
from bench.scenarios import Bench, run_all
from bench.systems import SYSTEMS


def main(argv: list[str] | None = None) -> int:
    """The wrk benchmark (every option of ``--help``), or ``micro ...``: bench/micro.py."""
    args = sys.argv[1:] if argv is None else argv
    if args[:1] == ["micro"]:
        from bench.micro import main as micro_main

        return micro_main(args[1:])
    opts = parse_options(args)
    started = time.monotonic()
    command = " ".join([".venv/bin/python", "bench/run.py", *args])
    wrk = ensure_wrk()
    need_redis = any(SYSTEMS[k].redis and not SYSTEMS[k].cluster for k in opts.systems)
    need_cluster = any(SYSTEMS[k].cluster for k in opts.systems)
    redis = RedisHandle(opts.redis_url) if need_redis else None
    need_postgres = any(SYSTEMS[k].postgres for k in opts.systems)
    cluster = postgres = None
    try:
        cluster = ClusterHandle() if need_cluster else None
        postgres_error = None
        if need_postgres:
            try:
                postgres = PostgresHandle(opts.systems)
            except Exception as exc:  # its systems' steps fail, the others run
                postgres_error = f"PostgreSQL did not start: {type(exc).__name__}: {exc}"
                print(postgres_error, flush=True)
        b = Bench(opts, wrk, redis, cluster=cluster, postgres=postgres)
        if postgres_error is not None:
            b.problems.append(postgres_error)
        results = run_all(b)
        try:
            write_chart(results, opts, opts.chart_path)
        except Exception as exc:
            b.problems.append(f"chart failed: {type(exc).__name__}: {exc}")
        results.seconds = time.monotonic() - started
        text, problems, found = report(b, results, command)
    finally:
        if redis is not None:
            redis.close()
        if cluster is not None:
            cluster.close()
        if postgres is not None:
            postgres.close()
    print()
    print(text)
    opts.table_path.parent.mkdir(parents=True, exist_ok=True)
    opts.table_path.write_text(text)
    print(f"(table written to {opts.table_path}; chart: {opts.chart_path})")
    missed = unmet(found)
    if problems:
        return 1
    return 1 if opts.strict and missed else 0


if __name__ == "__main__":
    sys.exit(main())
