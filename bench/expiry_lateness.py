"""Expiry lateness: how long after its deadline each session's expiry hook runs.

For each store (memory, SQLite, Redis) one ``Site`` in this process creates N sessions
whose timeouts are spread uniformly over a window, and its ``on_expire`` hook records when
each session is delivered. Lateness = hook time - the session's expected deadline.
The target: p99 lateness within 250 ms, no session missing, none delivered twice.

``redis-2p``: two worker processes (this script, ``worker``) share one redis-server, each
making half of ``--shared-sessions`` sessions over ``--shared-window`` seconds; a session
is delivered by whichever process claims it, so its hook time is read from both. The
processes sleep until their next deadline and wake on each other's news (a blocking read
of the store's stream), not polling.

Run ``.venv/bin/python bench/expiry_lateness.py --help``; see bench/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import platform
import random
import secrets
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from lapse.sessions import Expiry, Session
from lapse.web.resource import Resource
from lapse.web.server import Site

BENCH_DIR = Path(__file__).resolve().parent
REPO_DIR = BENCH_DIR.parent
RESULTS_FILE = BENCH_DIR / "results" / "expiry_lateness.md"
STORES = ("memory", "sqlite", "redis", "redis-2p")
SHARED = "redis-2p"
"""Two processes on one redis-server (see the module)."""
TARGET_P99_MS = 250.0
GRACE = 30.0
"""Seconds to wait past the last expected deadline before calling a session missing."""
SETTLE = 1.0
"""Seconds to keep listening after the last delivery, to catch duplicates."""


# ---------------------------------------------------------------------------- options


@dataclass(frozen=True)
class Options:
    sessions: int
    window: float
    stores: list[str]
    seed: int
    results: Path = RESULTS_FILE
    json_path: Path | None = None
    shared_sessions: int = 4000
    shared_window: float = 20.0


def parse_options(argv: list[str] | None = None) -> Options:
    parser = argparse.ArgumentParser(
        description="Measure how late lapse delivers session expiries (see bench/README.md)."
    )
    parser.add_argument("--sessions", type=int, default=None, help="sessions per store (10000)")
    parser.add_argument(
        "--window", type=float, default=None, help="deadlines spread over this many seconds (60)"
    )
    parser.add_argument(
        "--stores", default=",".join(STORES), help="comma-separated: memory,sqlite,redis"
    )
    parser.add_argument("--seed", type=int, default=1, help="random seed for the timeouts (1)")
    parser.add_argument(
        "--shared-sessions", type=int, default=4000, help="sessions of redis-2p, in all (4000)"
    )
    parser.add_argument(
        "--shared-window", type=float, default=20.0, help="redis-2p's deadlines spread (20 s)"
    )
    parser.add_argument(
        "--quick", action="store_true", help="1,000 sessions over 10 s (unless given explicitly)"
    )
    parser.add_argument(
        "--results",
        type=Path,
        default=RESULTS_FILE,
        help="where to write the Markdown table (bench/results/expiry_lateness.md)",
    )
    parser.add_argument(
        "--json", type=Path, default=None, help="also write the figures as JSON here (bench/run.py)"
    )
    args = parser.parse_args(argv)
    sessions = args.sessions if args.sessions is not None else 1000 if args.quick else 10_000
    window = args.window if args.window is not None else 10.0 if args.quick else 60.0
    stores = [s.strip() for s in args.stores.split(",") if s.strip()]
    for store in stores:
        if store not in STORES:
            parser.error(f"unknown store {store!r}; choose from {', '.join(STORES)}")
    if not stores:
        parser.error("no store given")
    if sessions < 1 or args.shared_sessions < 2:
        parser.error("--sessions must be at least 1, --shared-sessions at least 2")
    for given in (window, args.shared_window):
        if not given >= 0 or not math.isfinite(given):
            parser.error("a window must be a finite number of seconds >= 0")
    shared = (args.shared_sessions, args.shared_window)
    return Options(sessions, window, stores, args.seed, args.results, args.json, *shared)


# ---------------------------------------------------------------------------- measuring


class TimeoutFactory:
    """``Site.sessionFactory``: a plain Session whose timeout is ``self.timeout``,
    set on the instance before the site hands the session to its store."""

    def __init__(self) -> None:
        self.timeout: float = 900.0

    def __call__(self, site: Site, uid: str) -> Session:
        session = Session(site, uid)
        session.sessionTimeout = self.timeout
        return session


@dataclass
class Result:
    store: str
    sessions: int
    create_seconds: float = 0.0
    create_rtt_ms: list[float] = field(default_factory=list)
    lateness_ms: list[float] = field(default_factory=list)
    """Per delivered session: first hook call - expected deadline (acknowledged create)."""
    upper_ms: list[float] = field(default_factory=list)
    """Per delivered session: first hook call - earliest possible deadline (create sent)."""
    deliveries: int = 0
    duplicates: int = 0
    unknown: int = 0
    missing: int = 0

    @property
    def early(self) -> int:
        return sum(1 for value in self.lateness_ms if value < 0)

    @property
    def surely_early(self) -> int:
        """Deliveries before even the earliest time the store could have set."""
        return sum(1 for value in self.upper_ms if value < 0)

    def p(self, q: float) -> float:
        return percentile(sorted(self.lateness_ms), q)

    @property
    def passed(self) -> bool:
        return (
            self.missing == 0
            and self.duplicates == 0
            and self.unknown == 0
            and bool(self.lateness_ms)
            and self.p(99) <= TARGET_P99_MS
        )


def percentile(ordered: list[float], q: float) -> float:
    """Nearest-rank percentile of an already sorted list (nan if empty)."""
    if not ordered:
        return math.nan
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


@contextmanager
def store_url(store: str) -> Iterator[str]:
    """A fresh store URL: a temp SQLite file, or our own redis-server with a unique prefix."""
    if store == "memory":
        yield "memory:"
    elif store == "sqlite":
        folder = tempfile.mkdtemp(prefix="lapse-lateness-")
        try:
            yield f"sqlite:///{folder}/sessions.db"
        finally:
            shutil.rmtree(folder, ignore_errors=True)
    else:
        sys.path.insert(0, str(REPO_DIR / "tests"))
        from _redis_server import RedisServer

        with RedisServer() as server:
            yield f"{server.url}?prefix=lapse-lateness-{secrets.token_hex(4)}"


async def measure(store: str, url: str, opts: Options, seed: int) -> Result:
    rng = random.Random(seed)
    timeouts = [1.0 + rng.uniform(0.0, opts.window) for _ in range(opts.sessions)]
    calls: dict[str, list[float]] = {}

    def hook(expiry: Expiry) -> None:
        calls.setdefault(expiry.uid, []).append(time.time())

    site = Site(Resource(), store=url, on_expire=hook)
    factory = TimeoutFactory()
    site.sessionFactory = factory
    keeper = site.keeper
    result = Result(store, opts.sessions)
    expected: dict[str, float] = {}
    earliest: dict[str, float] = {}
    try:
        await site.store.open()
        keeper.start()  # shared stores: the claim/events loop; memory: nothing to start
        started = time.time()
        for timeout in timeouts:
            # One create at a time, so that [sent, acknowledged] brackets the
            # moment the store computed the deadline tightly.
            factory.timeout = timeout
            sent = time.time()
            session = site.makeSession()
            if keeper.shared:
                await keeper.persist([session])
                acked = time.time()
            else:
                acked = session.lastModified  # the memory store's clock read at creation
            result.create_rtt_ms.append((time.time() - sent) * 1000)
            expected[session.uid] = acked + timeout
            earliest[session.uid] = sent + timeout
        result.create_seconds = time.time() - started
        progress(f"{store}: {opts.sessions} sessions created in {result.create_seconds:.1f} s")

        give_up = max(expected.values()) + GRACE
        last_count = -1
        last_report = time.monotonic()
        while len(calls) < opts.sessions and time.time() < give_up:
            await asyncio.sleep(0.05)
            if time.monotonic() - last_report >= 10 and len(calls) != last_count:
                last_count, last_report = len(calls), time.monotonic()
                progress(f"{store}: {len(calls)}/{opts.sessions} delivered")
        await asyncio.sleep(SETTLE)
    finally:
        await keeper.aclose()

    tally(result, calls, expected, earliest)
    return result


def tally(
    result: Result,
    calls: dict[str, list[float]],
    expected: dict[str, float],
    earliest: dict[str, float],
) -> None:
    """Fill ``result`` from the hook calls (uid -> times) and the deadlines."""
    for uid, times in calls.items():
        times.sort()
        result.deliveries += len(times)
        if uid not in expected:
            result.unknown += 1
            continue
        result.duplicates += len(times) - 1
        result.lateness_ms.append((times[0] - expected[uid]) * 1000)
        result.upper_ms.append((times[0] - earliest[uid]) * 1000)
    result.missing = sum(1 for uid in expected if uid not in calls)


# ---------------------------------------------------------------------------- two processes


async def work(url: str, sessions: int, window: float, seed: int, base: Path) -> None:
    """One process of ``redis-2p``: make ``sessions`` sessions (their deadlines to
    ``base.created``), record every hook call it runs (``base.calls``, a line each), and
    serve until ``base.stop`` exists."""
    rng = random.Random(seed)
    timeouts = [1.0 + rng.uniform(0.0, window) for _ in range(sessions)]
    lock = threading.Lock()
    out = open(base.with_suffix(".calls"), "a", buffering=1)  # noqa: SIM115

    def hook(expiry: Expiry) -> None:
        line = f"{expiry.uid} {time.time():.6f}\n"
        with lock:
            out.write(line)

    site = Site(Resource(), store=url, on_expire=hook)
    factory = TimeoutFactory()
    site.sessionFactory = factory
    keeper = site.keeper
    made: dict[str, list[float]] = {}
    try:
        await site.store.open()
        keeper.start()
        for timeout in timeouts:
            factory.timeout = timeout
            sent = time.time()
            session = site.makeSession()
            await keeper.persist([session])
            made[session.uid] = [time.time() + timeout, sent + timeout]
        partial = base.with_suffix(".part")
        partial.write_text(json.dumps(made))
        partial.rename(base.with_suffix(".created"))
        stop = base.with_suffix(".stop")
        while not stop.exists():
            await asyncio.sleep(0.1)
    finally:
        await keeper.aclose()
        out.close()


def read_calls(paths: list[Path]) -> dict[str, list[float]]:
    calls: dict[str, list[float]] = {}
    for path in paths:
        if path.exists():
            for line in path.read_text().splitlines():
                uid, _, at = line.partition(" ")
                if at:
                    calls.setdefault(uid, []).append(float(at))
    return calls


async def measure_shared(url: str, opts: Options) -> Result:
    """``redis-2p``: two worker processes on ``url``; the hook calls of both."""
    total, window, seed = opts.shared_sessions, opts.shared_window, opts.seed
    result = Result(SHARED, total)
    folder = Path(tempfile.mkdtemp(prefix="lapse-lateness-2p-"))
    bases = [folder / f"p{i}" for i in range(2)]
    halves = (total // 2, total - total // 2)
    procs = [
        subprocess.Popen(
            [sys.executable, __file__, "worker", url, *map(str, (n, window, seed + i, base))]
        )
        for i, (n, base) in enumerate(zip(halves, bases, strict=True))
    ]
    try:
        started = time.time()
        created = [base.with_suffix(".created") for base in bases]
        while not all(path.exists() for path in created):
            if any(proc.poll() is not None for proc in procs):
                raise RuntimeError("a redis-2p worker exited before making its sessions")
            await asyncio.sleep(0.05)
        result.create_seconds = time.time() - started
        expected: dict[str, float] = {}
        earliest: dict[str, float] = {}
        for path in created:
            for uid, (at, low) in json.loads(path.read_text()).items():
                expected[uid], earliest[uid] = at, low
                result.create_rtt_ms.append((at - low) * 1000)
        progress(f"{SHARED}: {total} sessions created in {result.create_seconds:.1f} s")
        give_up = max(expected.values()) + GRACE
        calls_files = [base.with_suffix(".calls") for base in bases]
        while len(read_calls(calls_files)) < total and time.time() < give_up:
            await asyncio.sleep(0.25)
        await asyncio.sleep(SETTLE)
    finally:
        for base in bases:
            base.with_suffix(".stop").touch()
        for proc in procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    tally(result, read_calls(calls_files), expected, earliest)
    shutil.rmtree(folder, ignore_errors=True)
    return result


def progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------- report


def ms(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:.1f}"


def report(results: list[Result], opts: Options, command: str) -> str:
    lines = [
        "# Expiry lateness",
        "",
        f"Command: `{command}`  ",
        f"{opts.sessions} sessions per store, timeouts 1 s + uniform(0, {opts.window:g} s), "
        f"seed {opts.seed}; one process, `asyncio.run` ({SHARED}: {opts.shared_sessions} "
        f"sessions over {opts.shared_window:g} s, made half in each of two processes on one "
        f"redis-server); Python {platform.python_version()}, "
        f"{platform.machine()}, {time.strftime('%Y-%m-%d %H:%M:%S %Z')}.",
        "",
        "Lateness = time.time() when `on_expire` was called - expected deadline (time.time() "
        "when the create was acknowledged + the session's timeout; memory store: "
        "`lastModified + sessionTimeout`). Negative = early. Percentiles are nearest-rank over "
        "the first delivery of each session. Redis computes deadlines from the server's `TIME`; "
        "the server runs on this machine, so its clock is this machine's wall clock.",
        "",
        "| store | sessions | deliveries | duplicates | missing | early | min ms | p50 ms "
        "| p99 ms | max ms | create s | create rtt max ms | p99 <= 250 ms, none missing/dup |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in results:
        ordered = sorted(r.lateness_ms)
        lowest = ordered[0] if ordered else math.nan
        highest = ordered[-1] if ordered else math.nan
        lines.append(
            f"| {r.store} | {r.sessions} | {r.deliveries} | {r.duplicates} | {r.missing} "
            f"| {r.early} | {ms(lowest)} | {ms(percentile(ordered, 50))} "
            f"| {ms(percentile(ordered, 99))} | {ms(highest)} | {r.create_seconds:.1f} "
            f"| {ms(max(r.create_rtt_ms, default=math.nan))} "
            f"| {'PASS' if r.passed else 'FAIL'} |"
        )
    lines += [
        "",
        "Column create rtt: the time from sending one create to its acknowledgement; the "
        "store's real deadline lies within that interval (+ timeout), so true lateness is at "
        "most that much above the measured value. Column early: deliveries before the expected "
        "deadline.",
    ]
    problems: list[str] = []
    for r in results:
        if r.missing:
            problems.append(f"{r.store}: {r.missing} sessions never delivered")
        if r.duplicates:
            problems.append(f"{r.store}: {r.duplicates} duplicate deliveries")
        if r.unknown:
            problems.append(f"{r.store}: {r.unknown} deliveries of uids this run did not create")
        if r.lateness_ms and r.p(99) > TARGET_P99_MS:
            problems.append(f"{r.store}: p99 lateness {r.p(99):.1f} ms > {TARGET_P99_MS:g} ms")
        if r.surely_early:
            problems.append(
                f"{r.store}: {r.surely_early} deliveries before the create was even sent "
                "+ timeout (early beyond doubt; not part of the pass/fail check)"
            )
    lines += ["", "Problems: " + ("none" if not problems else "")]
    lines += [f"- {problem}" for problem in problems]
    return "\n".join(lines) + "\n"


def summary(r: Result, opts: Options) -> dict[str, object]:
    """One store's figures, for bench/run.py (NaN percentiles become None)."""
    ordered = sorted(r.lateness_ms)

    def num(value: float) -> float | None:
        return None if math.isnan(value) else value

    return {
        "store": r.store,
        "sessions": r.sessions,
        "window": opts.shared_window if r.store == SHARED else opts.window,
        "deliveries": r.deliveries,
        "duplicates": r.duplicates,
        "missing": r.missing,
        "unknown": r.unknown,
        "early": r.early,
        "surely_early": r.surely_early,
        "min_ms": num(ordered[0]) if ordered else None,
        "p50_ms": num(percentile(ordered, 50)),
        "p99_ms": num(percentile(ordered, 99)),
        "max_ms": num(ordered[-1]) if ordered else None,
        "create_seconds": r.create_seconds,
        "passed": r.passed,
    }


async def run_all(opts: Options) -> list[Result]:
    results: list[Result] = []
    for store in opts.stores:
        with store_url(store) as url:
            progress(f"{store}: {url}")
            if store == SHARED:
                results.append(await measure_shared(url, opts))
            else:
                results.append(await measure(store, url, opts, opts.seed))
    return results


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args[:1] == ["worker"]:
        url, sessions, window, seed, base = args[1:]
        asyncio.run(work(url, int(sessions), float(window), int(seed), Path(base)))
        return 0
    opts = parse_options(argv)
    command = " ".join([".venv/bin/python", "bench/expiry_lateness.py", *sys.argv[1:]])
    results = asyncio.run(run_all(opts))
    table = report(results, opts, command)
    print(table)
    opts.results.parent.mkdir(parents=True, exist_ok=True)
    opts.results.write_text(table)
    if opts.json_path is not None:
        opts.json_path.write_text(json.dumps([summary(r, opts) for r in results]))
    return 0 if all(r.passed for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
