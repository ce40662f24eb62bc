"""The scenarios: touch, create, memory per session, many live sessions, expiry
lateness; each measured on fresh servers and kept in one Outcome per system."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

from bench.loadgen import WrkResult, login_script, run_wrk
from bench.options import Options
from bench.pg_traffic import (
    PgCounts,
    PostgresHandle,
    measure_window,
    per_request,
    rates,
    sequential_statements,
)
from bench.redis_traffic import (
    PerRequest,
    RedisCounts,
    RedisTarget,
    counted,
    measure_idle,
    measure_monitored,
    monitor_touches,
)
from bench.side_by_side import SideBySide, bench_side_by_side, side_by_side_keys
from bench.store_calls import StoreCalls, bench_store_calls
from bench.systems import (
    EXPIRY_LATENESS,
    LAPSE_POSTGRES,
    MEMORY_PROBE,
    REFERENCE,
    SYSTEMS,
    System,
    cpu_seconds,
    login_cookie,
    principal_of,
    running_server,
    session_cookie,
    session_kept,
    steal_seconds,
)
from bench.workers import WorkersOutcome, bench_workers


@dataclass
class Bench:
    """What every scenario needs."""

    opts: Options
    wrk: str
    redis: RedisTarget | None
    """The redis-server of the Redis systems (not the cluster's)."""
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    load_at_start: str = field(
        default_factory=lambda: " ".join(f"{x:.2f}" for x in os.getloadavg())
    )
    cluster: RedisTarget | None = None
    """The Redis Cluster of the cluster systems."""
    postgres: PostgresHandle | None = None
    """The PostgreSQL of the PostgreSQL systems (a database each)."""
    pids: dict[int, int] = field(default_factory=dict)
    """The servers running, by port: their PIDs."""
    retaken: list[tuple[str, str, WrkResult]] = field(default_factory=list)
    """Measured runs set aside for steal (:meth:`measured`): system, figure, run."""

    def redis_for(self, system: System) -> RedisTarget | None:
        """The Redis that ``system`` runs on (None: not a Redis system)."""
        if not system.redis:
            return None
        return self.cluster if system.cluster else self.redis

    def run_wrk(
        self, port: int, seconds: int, cookie: str | None, script: Path | None = None
    ) -> WrkResult:
        """One wrk run; on a server started by ``server``, with its CPU time per request."""
        opts = self.opts
        pid = self.pids.get(port)
        before = cpu_seconds(pid) if pid else 0.0
        stolen = steal_seconds()
        result = run_wrk(self.wrk, opts.threads, opts.connections, port, seconds, cookie, script)
        now_stolen = steal_seconds()
        if stolen is not None and now_stolen is not None:
            result = dataclasses.replace(result, steal_ms=(now_stolen - stolen) * 1000)
        if not pid or not result.requests:
            return result
        cpu = (cpu_seconds(pid) - before) / result.requests * 1e6
        return dataclasses.replace(result, server_cpu_us=cpu)

    def measured(
        self,
        system: System,
        figure: str,
        attempt: Callable[[], _Run],
        result_of: Callable[[_Run], WrkResult],
    ) -> _Run:
        """One measured run, ``attempt()``, taken again while the hypervisor stole
        more than ``--max-steal`` of the machine's CPU time during it, up to
        ``--steal-retakes`` times; the try with the least steal is kept and the others
        are set aside in :attr:`retaken`. Steal is time neither the server nor wrk
        could run: a run that lost much of it measures the host, not the system. Not
        on Redis or PostgreSQL systems, whose store traffic is counted across runs."""
        opts = self.opts
        tries = [attempt()]
        if opts.max_steal <= 0 or system.redis or system.postgres:
            return tries[0]
        limit_ms = opts.steal_limit_ms
        while len(tries) <= opts.steal_retakes and stolen_ms(result_of(tries[-1])) > limit_ms:
            tries.append(attempt())
        kept = min(tries, key=lambda t: stolen_ms(result_of(t)))
        self.retaken += [(system.label, figure, result_of(t)) for t in tries if t is not kept]
        return kept

    def postgres_url(self, system: System) -> str | None:
        """The system's database, made empty (None: not a PostgreSQL system)."""
        if not system.postgres:
            return None
        if self.postgres is None:
            raise RuntimeError(f"no PostgreSQL for {system.key}")
        self.postgres.reset(system)
        return self.postgres.url(system)

    @contextlib.contextmanager
    def server(
        self, system: System, extra: int = 0, login: bool = False, args: tuple[str, ...] = ()
    ) -> Iterator[int]:
        """Start one server on a free loopback port (``login``: a lapse seed with the
        bench's login route; ``args``: more arguments for its program); yield the port;
        always stop it."""
        redis = self.redis_for(system)
        if redis is not None:
            redis.flush()
        redis_url = redis.url if redis is not None else None
        postgres_url = self.postgres_url(system)
        with running_server(
            system, extra, redis_url, postgres_url, login=login, args=args
        ) as server:
            if extra:
                seen = server.live_counts()
                if not seen or seen[-1] != extra:
                    self.problems.append(
                        f"{system.label}: started with {seen[-1] if seen else '?'} "
                        f"extra live sessions, expected {extra:,}"
                    )
            self.pids[server.port] = server.pid
            try:
                yield server.port
            finally:
                self.pids.pop(server.port, None)


_Run = TypeVar("_Run")


def stolen_ms(result: WrkResult) -> float:
    """The steal during ``result``'s run (0 where the machine does not say)."""
    return result.steal_ms or 0.0


@dataclass(frozen=True)
class TouchRun:
    result: WrkResult
    kept: bool


@dataclass
class Outcome:
    """Everything measured for one system."""

    touch: list[TouchRun] = field(default_factory=list)
    create: list[WrkResult] = field(default_factory=list)
    touch_logged: list[TouchRun] = field(default_factory=list)
    """Touch runs on a logged-in session, alternated with ``touch`` on the same server."""
    login: list[WrkResult] = field(default_factory=list)
    memory: dict[int, dict[str, Any]] = field(default_factory=dict)
    live_base: list[TouchRun] = field(default_factory=list)
    live_many: list[TouchRun] = field(default_factory=list)
    redis: RedisCounts | None = None
    postgres: PgCounts | None = None
    failed: list[str] = field(default_factory=list)
    workers: WorkersOutcome | None = None
    """lapse serve --workers N (bench/workers.py): its runs for each N."""
    store_calls: StoreCalls | None = None
    """lapse on Redis: store calls per create and per expired session, one at a time."""


def touch_once(
    b: Bench, system: System, port: int, seconds: int, outcome: Outcome | None = None
) -> TouchRun:
    """One wrk run on a session made just before it; then check the session is still there.
    With ``outcome``, its store traffic is counted.

    A fresh session per run: current Twisted does not refresh a session it finds by cookie,
    and Starlette's cookie is not re-read by wrk, so one session reused across runs would
    expire 5 s after creation (see README).
    """
    cookie = session_cookie(port, system)
    run = partial(b.run_wrk, port, seconds, cookie)
    result = run() if outcome is None else metered(b, system, outcome, "touch", run)
    return TouchRun(result, session_kept(port, system, cookie))


def principals_measured(b: Bench, system: System) -> bool:
    """Whether the principal figures (login, logged-in touch) are measured on ``system``:
    a lapse seed, unless ``--no-principals``."""
    return b.opts.principals and system.kind == "lapse"


def metered(
    b: Bench, system: System, outcome: Outcome, kind: str, run: Callable[[], WrkResult]
) -> WrkResult:
    """``run`` (one wrk run of ``kind``: touch, logged touch, create or login), counting
    the store traffic per request where the bench counts it (Redis: round trips and
    commands, once ``outcome.redis`` has its idle rates; PostgreSQL: statements)."""
    redis = b.redis_for(system)
    if redis is not None and outcome.redis is not None:
        c = outcome.redis
        series = {
            "touch": PerRequest(c.reads_per_request, c.commands_per_request),
            "logged touch": c.logged_touch,
            "create": c.create,
            "login": c.login,
        }[kind]
        result, before, after = counted(redis, c, series, run)
        if kind == "touch":
            for name, n in after.calls.items():
                delta = n - before.calls.get(name, 0)
                if delta and name not in ("info", "replconf"):
                    share = delta / max(result.requests, 1) / b.opts.repeats
                    c.breakdown[name] = c.breakdown.get(name, 0.0) + share
        return result
    if system.postgres and b.postgres is not None and outcome.postgres is not None:
        pg = outcome.postgres
        statements = {
            "touch": pg.statements_per_touch,
            "logged touch": pg.statements_per_logged_touch,
            "create": pg.statements_per_create,
            "login": pg.statements_per_login,
        }[kind]
        start = b.postgres.snapshot(system)
        result = run()
        end = b.postgres.snapshot(system)
        statements.append(per_request(pg, start, end, result.requests))
        return result
    return run()


def logged_touch_once(
    b: Bench, system: System, port: int, seconds: int, user: str, outcome: Outcome | None
) -> TouchRun:
    """One wrk run on a session logged in as ``user`` just before it (the login route:
    a new session, rotated, bound); then check it is still there and still ``user``'s.
    With ``outcome``, its store traffic is counted."""
    cookie = login_cookie(port, system, user)
    run = partial(b.run_wrk, port, seconds, cookie)
    result = run() if outcome is None else metered(b, system, outcome, "logged touch", run)
    kept = session_kept(port, system, cookie) and principal_of(port, cookie) == user
    return TouchRun(result, kept)


def logged_in_failed(b: Bench, system: System, outcome: Outcome, exc: Exception) -> None:
    """A login or logged-in touch failed: a problem of the run; the anonymous runs of the
    step go on without the logged-in ones."""
    label = f"{system.label}: logged-in touch"
    b.problems.append(
        f"{label} failed (the anonymous touch runs went on): {type(exc).__name__}: {exc}"
    )
    outcome.failed.append(label)


def bench_touch(b: Bench, system: System, outcome: Outcome) -> None:
    """The touch runs; on a lapse seed with the principal figures, each repeat is a run
    on an anonymous session and one on a logged-in session, on the same server, the
    order alternating, so that drift on the machine hits both alike. If a login or a
    logged-in run fails, the anonymous runs go on alone."""
    opts = b.opts
    logins = principals_measured(b, system)
    with b.server(system, login=logins) as port:
        if opts.warmup > 0:
            touch_once(b, system, port, opts.warmup)
            if logins:
                try:
                    logged_touch_once(b, system, port, opts.warmup, "bench-warmup", None)
                except Exception as exc:
                    logged_in_failed(b, system, outcome, exc)
                    logins = False
        redis = b.redis_for(system)
        if system.postgres and b.postgres is not None:
            pg = outcome.postgres = outcome.postgres or PgCounts()
            if opts.idle_seconds > 0:
                pg.idle_seconds = opts.idle_seconds
                pg.idle_rate = rates(*measure_window(b.postgres, system, opts.idle_seconds))[0]
        elif redis is not None:
            outcome.redis = RedisCounts()
            measure_idle(redis, opts.idle_seconds, outcome.redis)
        for i in range(opts.repeats):
            order = [False, True] if logins else [False]
            for logged in order if i % 2 == 0 else reversed(order):
                if logged:
                    user = f"bench-touch-{i}"
                    try:
                        once = partial(
                            logged_touch_once, b, system, port, opts.duration, user, outcome
                        )
                        outcome.touch_logged.append(
                            b.measured(system, "touch, logged in", once, lambda t: t.result)
                        )
                    except Exception as exc:
                        logged_in_failed(b, system, outcome, exc)
                        logins = False
                    continue
                outcome.touch.append(
                    b.measured(
                        system,
                        "touch",
                        partial(touch_once, b, system, port, opts.duration, outcome),
                        lambda t: t.result,
                    )
                )
        if opts.monitor_requests > 0:
            sequential_phase(b, system, port, outcome, logins)


def sequential_phase(b: Bench, system: System, port: int, outcome: Outcome, logins: bool) -> None:
    """``--monitor-requests`` touches one at a time (Redis: under MONITOR; PostgreSQL:
    statements counted), on an anonymous session and, with ``logins``, a logged-in one."""
    n = b.opts.monitor_requests
    redis = b.redis_for(system)
    if redis is not None and outcome.redis is not None:
        counts = outcome.redis
        measure_monitored(redis, port, system, n, counts)
        if logins:
            try:
                cookie = login_cookie(port, system, "bench-monitor")
            except Exception as exc:
                logged_in_failed(b, system, outcome, exc)
                return
            counts.logged_monitor = monitor_touches(redis, port, cookie, n, counts)
    elif system.postgres and b.postgres is not None and outcome.postgres is not None:
        pg = outcome.postgres
        pg.sequential_requests = n
        anonymous = session_cookie(port, system)
        pg.sequential_touch = sequential_statements(b.postgres, system, port, anonymous, n, pg)
        if logins:
            try:
                cookie = login_cookie(port, system, "bench-sequential")
            except Exception as exc:
                logged_in_failed(b, system, outcome, exc)
                return
            pg.sequential_logged_touch = sequential_statements(
                b.postgres, system, port, cookie, n, pg
            )


def bench_create(b: Bench, system: System, outcome: Outcome) -> None:
    opts = b.opts
    with b.server(system) as port:
        if opts.create_warmup > 0:
            b.run_wrk(port, opts.create_warmup, None)
        run = partial(b.run_wrk, port, opts.duration, None)
        one = partial(metered, b, system, outcome, "create", run)
        outcome.create = [
            b.measured(system, "create", one, lambda r: r) for _ in range(opts.repeats)
        ]


def bench_login(b: Bench, system: System, outcome: Outcome) -> None:
    """The login runs: wrk sends ``POST /login?user=...`` without a cookie (loadgen's
    ``login_script``), so every request makes a session, rotates it and binds it to a
    user, as the create runs make one; the same warm-up as the create runs."""
    opts = b.opts
    with b.server(system, login=True) as port, tempfile.TemporaryDirectory() as tmp:
        script = login_script(Path(tmp))
        if opts.create_warmup > 0:
            b.run_wrk(port, opts.create_warmup, None, script)
        run = partial(b.run_wrk, port, opts.duration, None, script)
        outcome.login = [metered(b, system, outcome, "login", run) for _ in range(opts.repeats)]


IDLE_SESSIONS = 3
"""Sessions alive during the idle window: the start-up probe's and two more."""
IDLE_TIMEOUT = 3600


def bench_postgres_idle(b: Bench, system: System, outcome: Outcome) -> None:
    """What one idle lapse process sends to PostgreSQL: the seed on the postgres store,
    its sessions' timeout an hour, three sessions made by GETs (the start-up probe's
    among them), then no traffic for
    ``--pg-idle-seconds``: the statements its database ran meanwhile, per second."""
    postgres_url = b.postgres_url(system)
    assert b.postgres is not None
    seconds = b.opts.pg_idle_seconds
    with running_server(system, postgres_url=postgres_url, session_timeout=IDLE_TIMEOUT) as server:
        cookies = [session_cookie(server.port, system) for _ in range(IDLE_SESSIONS - 1)]
        time.sleep(1.0)  # the writes of those requests are done; the process is idle
        statements, transactions, by_query = rates(*measure_window(b.postgres, system, seconds))
        if not session_kept(server.port, system, cookies[0]):  # still serving it, after
            raise RuntimeError("after the idle window, a session of before it was gone")
    counts = outcome.postgres = outcome.postgres or PgCounts()
    counts.long_idle_seconds = seconds
    counts.long_idle_sessions = IDLE_SESSIONS
    counts.long_idle_statements = statements
    counts.long_idle_transactions = transactions
    counts.long_idle_queries = by_query


def bench_live(b: Bench, system: System, outcome: Outcome) -> None:
    """Touch runs on two servers alive side by side, one with ``--live-sessions``
    extra sessions: measured alternately, so that drift hits both alike."""
    opts = b.opts
    with b.server(system) as base_port, b.server(system, opts.live_sessions) as many_port:
        if opts.warmup > 0:
            touch_once(b, system, base_port, opts.warmup)
            touch_once(b, system, many_port, opts.warmup)
        for _ in range(opts.live_repeats):
            outcome.live_base.append(touch_once(b, system, base_port, opts.duration))
            outcome.live_many.append(touch_once(b, system, many_port, opts.duration))


def bench_memory(system: System, count: int, outcome: Outcome) -> None:
    assert system.probe is not None
    cmd = [sys.executable, str(MEMORY_PROBE), "--system", system.probe, "--count", str(count)]
    env = {k: v for k, v in os.environ.items() if not k.startswith("LAPSE_")}
    done = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=1800, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"memory probe failed for {system.key} {count}:\n{done.stderr}")
    outcome.memory[count] = json.loads(done.stdout.strip().splitlines()[-1])


def bench_expiry(b: Bench, into: list[dict[str, Any]]) -> None:
    opts = b.opts
    with tempfile.TemporaryDirectory(prefix="bench-expiry-") as tmp:
        json_path = Path(tmp) / "expiry.json"
        cmd = [
            sys.executable,
            str(EXPIRY_LATENESS),
            "--stores",
            opts.expiry_stores,
            "--sessions",
            str(opts.expiry_sessions),
            "--window",
            str(opts.expiry_window),
            "--results",
            str(opts.results_dir / "latest_expiry_lateness.md"),
            "--json",
            str(json_path),
        ]
        env = {k: v for k, v in os.environ.items() if not k.startswith("LAPSE_")}
        budget = opts.expiry_window + 120 + opts.expiry_sessions / 500
        done = subprocess.run(
            cmd, capture_output=True, text=True, check=False, timeout=budget * 3, env=env
        )
        if not json_path.exists():
            raise RuntimeError(
                f"expiry_lateness.py exited {done.returncode}:\n{done.stderr[-3000:]}"
            )
        into.extend(json.loads(json_path.read_text()))


def run_step(b: Bench, outcome: Outcome | None, label: str, step: Callable[[], None]) -> None:
    print(f"  {label} ...", end="", flush=True)
    started = time.monotonic()
    try:
        step()
    except Exception as exc:
        print(f" FAILED after {time.monotonic() - started:.0f} s: {exc}", flush=True)
        b.problems.append(f"{label} failed: {type(exc).__name__}: {exc}")
        if outcome is not None:
            outcome.failed.append(label)
        return
    print(f" {time.monotonic() - started:.0f} s", flush=True)


@dataclass
class Results:
    outcomes: dict[str, Outcome]
    expiry: list[dict[str, Any]]
    seconds: float = 0.0
    side: SideBySide = field(default_factory=SideBySide)
    """The ratio targets' systems, their runs taken in turn (bench/side_by_side.py)."""


def run_all(b: Bench) -> Results:
    opts = b.opts
    outcomes = {key: Outcome() for key in opts.systems}
    results = Results(outcomes, [])
    for key in opts.systems:
        system, outcome = SYSTEMS[key], outcomes[key]
        print(f"{system.label}:", flush=True)
        if system.kind == "lapse-workers":
            outcome.workers = WorkersOutcome()
            counts = ", ".join(map(str, opts.worker_counts))
            label = f"{system.label}: touch and create, N = {counts}"
            run_step(b, outcome, label, partial(bench_workers, b, system, outcome.workers))
            continue
        touch = partial(bench_touch, b, system, outcome)
        run_step(b, outcome, f"{system.label}: touch existing session", touch)
        create = partial(bench_create, b, system, outcome)
        run_step(b, outcome, f"{system.label}: create sessions", create)
        if principals_measured(b, system):
            login = partial(bench_login, b, system, outcome)
            run_step(b, outcome, f"{system.label}: log in (new session, rotate, bind)", login)
        if system.kind == "lapse" and system.redis and opts.expiry_calls_sessions > 0:
            calls = outcome.store_calls = StoreCalls()
            label = (
                f"{system.label}: store calls, {opts.expiry_calls_sessions:,} creates one at a "
                "time, then their expiry"
            )
            run_step(b, outcome, label, partial(bench_store_calls, b, system, calls))
        if key == LAPSE_POSTGRES and opts.pg_idle_seconds > 0:
            idle = partial(bench_postgres_idle, b, system, outcome)
            label = (
                f"{system.label}: idle {opts.pg_idle_seconds:g} s, {IDLE_SESSIONS} long sessions"
            )
            run_step(b, outcome, label, idle)
    side = side_by_side_keys(opts.systems)
    if side and opts.repeats > 0:
        names = ", ".join(SYSTEMS[key].label for key in side)
        print(f"side by side: {names}:", flush=True)
        label = f"side by side, runs in turn: {names}"
        run_step(b, None, label, partial(bench_side_by_side, b, side, results.side, touch_once))
    for key in opts.systems:
        system, outcome = SYSTEMS[key], outcomes[key]
        if system.probe is None or not opts.memory_counts:
            continue
        print(f"{system.label}:", flush=True)
        for count in opts.memory_counts:
            probe = partial(bench_memory, system, count, outcome)
            run_step(b, outcome, f"{system.label}: memory, {count:,} sessions", probe)
    if opts.live_sessions > 0:
        for key in opts.systems:
            system, outcome = SYSTEMS[key], outcomes[key]
            if system.live:
                print(f"{system.label}:", flush=True)
                live = partial(bench_live, b, system, outcome)
                label = f"{system.label}: touch, 1 vs {opts.live_sessions:,} live"
                run_step(b, outcome, label, live)
    if opts.expiry_sessions > 0 and REFERENCE in opts.systems:
        print("lapse expiry lateness:", flush=True)
        label = f"expiry lateness, {opts.expiry_sessions:,} sessions in {opts.expiry_window:g} s"
        run_step(b, None, label, partial(bench_expiry, b, results.expiry))
    return results
