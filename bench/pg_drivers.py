"""Which PostgreSQL driver for lapse's PostgreSQL store: asyncpg or psycopg 3, measured.

    .venv/bin/python bench/pg_drivers.py [--duration 5] [--repeats 3] [--idle 10]

It starts its own PostgreSQL (bench/postgres.py), fills a table of 10,000
sessions (a ``jsonb`` data column) and runs, on uvloop as `lapse serve` does,
the statement the store's request path will run: load-and-touch of one row by
primary key in one statement,

    UPDATE sessions SET deadline = now() + make_interval(secs => timeout)
    WHERE uid = $1 AND deadline > now() RETURNING data

(prepared; ``data`` decoded to a dict by both), from 1 and from 50 concurrent
callers sharing a pool of 10 connections (one server process's pool): the same
first-come-first-served pool for both drivers, and asyncpg's own Pool (with
and without its reset query on every release) for comparison. Each
variant runs ``--duration`` s per repeat, the variants interleaved, after a
warm-up; the table gives the median operations/s, the ratio to the best
asyncpg variant, and the p99 per call. Then: the server backends' private
memory per connection after the runs, the client's memory per connection
(RSS of a fresh process opening 50 connections, in a subprocess per
driver), and the idle cost of a ``LISTEN`` connection of each driver
(statements the server ran meanwhile, by pg_stat_statements, and the
client's CPU time), after checking that a NOTIFY arrives.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import random
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

if not __package__:  # run as a script: make the bench package importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.postgres import Postgres, running_postgres

ROWS = 10_000
POOL_SIZE = 10
CONCURRENCY = (1, 50)
DBNAME = "bench"
CHANNEL = "lapse_bench"
DDL = """
CREATE TABLE sessions (
    uid text PRIMARY KEY,
    data jsonb NOT NULL,
    timeout double precision NOT NULL,
    deadline timestamptz NOT NULL
);
INSERT INTO sessions
SELECT 'uid-' || g,
       jsonb_build_object('user', 'user-' || g, 'visits', g, 'cart', jsonb_build_array(1, 2, 3)),
       3600, now() + interval '1 hour'
FROM generate_series(1, {rows}) AS g;
"""
TOUCH = (
    "UPDATE sessions SET deadline = now() + make_interval(secs => timeout) "
    "WHERE uid = {} AND deadline > now() RETURNING data"
)
TOUCH_ASYNCPG = TOUCH.format("$1")
TOUCH_PSYCOPG = TOUCH.format("%s")

Touch = Callable[[str], Awaitable[Any]]


# -- the variants: each opens its pool, gives a touch(uid) and a close() ----------


class Variant:
    name = ""

    async def open(self, dsn: str) -> None:
        raise NotImplementedError

    async def touch(self, uid: str) -> Any:
        raise NotImplementedError

    async def close(self) -> None:
        raise NotImplementedError


async def _no_reset(connection: Any) -> None:
    """The store leaves no session state on a connection: nothing to reset."""


async def _asyncpg_jsonb(connection: Any) -> None:
    await connection.set_type_codec(
        "jsonb", encoder=json.dumps, decoder=json.loads, schema="pg_catalog"
    )


class AsyncpgPool(Variant):
    """asyncpg's own Pool (prepared statements from its statement cache)."""

    def __init__(self, reset: bool) -> None:
        self.reset = reset
        self.name = "asyncpg Pool" + ("" if reset else " (reset=no-op)")

    async def open(self, dsn: str) -> None:
        import asyncpg

        kwargs: dict[str, Any] = {} if self.reset else {"reset": _no_reset}
        self.pool = await asyncpg.create_pool(
            dsn, min_size=POOL_SIZE, max_size=POOL_SIZE, init=_asyncpg_jsonb,
            server_settings={"application_name": self.name}, **kwargs,
        )  # fmt: skip

    async def touch(self, uid: str) -> Any:
        return await self.pool.fetchval(TOUCH_ASYNCPG, uid)

    async def close(self) -> None:
        await self.pool.close()


class QueuePool(Variant):
    """A minimal pool both drivers share, first come first served: a released
    connection goes to the caller that has waited longest (asyncio.Queue and
    asyncpg's Pool let the releasing task take it again at once, so at 50
    callers on 10 connections some callers wait for the whole run)."""

    async def connect(self, dsn: str) -> Any:
        raise NotImplementedError

    async def open(self, dsn: str) -> None:
        self.all = [await self.connect(dsn) for _ in range(POOL_SIZE)]
        self.idle: collections.deque[Any] = collections.deque(self.all)
        self.waiters: collections.deque[asyncio.Future[Any]] = collections.deque()

    async def acquire(self) -> Any:
        if self.idle and not self.waiters:
            return self.idle.popleft()
        waiter = asyncio.get_running_loop().create_future()
        self.waiters.append(waiter)
        return await waiter

    def release(self, connection: Any) -> None:
        while self.waiters:
            waiter = self.waiters.popleft()
            if not waiter.done():
                waiter.set_result(connection)
                return
        self.idle.append(connection)

    async def close(self) -> None:
        for connection in self.all:
            await connection.close()


class AsyncpgQueue(QueuePool):
    name = "asyncpg, FIFO pool"

    async def connect(self, dsn: str) -> Any:
        import asyncpg

        connection = await asyncpg.connect(dsn, server_settings={"application_name": self.name})
        await _asyncpg_jsonb(connection)
        return connection

    async def touch(self, uid: str) -> Any:
        connection = await self.acquire()
        try:
            return await connection.fetchval(TOUCH_ASYNCPG, uid)
        finally:
            self.release(connection)


class PsycopgQueue(QueuePool):
    """psycopg 3 (psycopg_pool is not installed: the FIFO pool), autocommit,
    server-side prepared from the first call; text or binary results."""

    def __init__(self, binary: bool) -> None:
        self.binary = binary
        self.name = "psycopg, FIFO pool" + (", binary" if binary else "")

    async def connect(self, dsn: str) -> Any:
        import psycopg

        return await psycopg.AsyncConnection.connect(
            dsn, autocommit=True, prepare_threshold=0, application_name=self.name
        )

    async def touch(self, uid: str) -> Any:
        connection = await self.acquire()
        try:
            cursor = await connection.execute(
                TOUCH_PSYCOPG, (uid,), prepare=True, binary=self.binary
            )
            row = await cursor.fetchone()
            return None if row is None else row[0]
        finally:
            self.release(connection)


def variants() -> list[Variant]:
    return [
        AsyncpgPool(reset=False),
        AsyncpgPool(reset=True),
        AsyncpgQueue(),
        PsycopgQueue(binary=False),
        PsycopgQueue(binary=True),
    ]


# -- the load ------------------------------------------------------------------


async def load(touch: Touch, callers: int, seconds: float) -> tuple[float, float]:
    """``callers`` tasks calling ``touch`` back to back for ``seconds``:
    (operations/s, p99 seconds per call)."""
    latencies: list[float] = []
    start = time.perf_counter()
    end = start + seconds

    async def caller(seed: int) -> None:
        pick = random.Random(seed)
        while True:
            now = time.perf_counter()
            if now >= end:
                return
            data = await touch(f"uid-{pick.randint(1, ROWS)}")
            latencies.append(time.perf_counter() - now)
            if not isinstance(data, dict):
                raise AssertionError(f"touch returned {data!r}, not the session's data")

    await asyncio.gather(*(caller(seed) for seed in range(callers)))
    elapsed = time.perf_counter() - start
    latencies.sort()
    return len(latencies) / elapsed, latencies[int(len(latencies) * 0.99)]


async def throughput(
    server: Postgres, seconds: float, repeats: int
) -> tuple[dict[tuple[str, int], Any], dict[str, float]]:
    """Per (variant, callers): every repeat's (ops/s, p99); and per variant,
    the private memory of its server backends after the runs (KiB each)."""
    dsn = server.url(DBNAME)
    backends: dict[str, float] = {}
    runs: dict[tuple[str, int], list[tuple[float, float]]] = {}
    chosen = variants()
    for variant in chosen:
        await variant.open(dsn)
        await load(variant.touch, 50, 0.5)  # warm-up: connections, prepared statements
    try:
        for _ in range(repeats):
            for callers in CONCURRENCY:
                for variant in chosen:
                    runs.setdefault((variant.name, callers), []).append(
                        await load(variant.touch, callers, seconds)
                    )
        for variant in chosen:
            backends[variant.name] = await asyncio.to_thread(backend_memory, server, variant.name)
    finally:
        for variant in chosen:
            await variant.close()
    return runs, backends


def backend_memory(server: Postgres, application: str) -> float:
    """The mean private memory (KiB) of the server backends of ``application``."""
    pids = server.psql(f"SELECT pid FROM pg_stat_activity WHERE application_name = '{application}'")
    sizes = []
    for pid in pids.split():
        rollup = Path(f"/proc/{pid}/smaps_rollup").read_text()
        sizes.append(sum(int(n) for n in re.findall(r"^Private_\w+:\s+(\d+) kB", rollup, re.M)))
    return statistics.mean(sizes) if sizes else float("nan")


# -- memory per connection (a fresh process per driver) ------------------------------


def _rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


async def _memory_probe(driver: str, dsn: str, count: int) -> None:
    """Print the RSS growth (KiB) per connection beyond the first."""
    if driver == "asyncpg":
        import asyncpg

        async def connect() -> Any:
            connection = await asyncpg.connect(dsn)
            await _asyncpg_jsonb(connection)
            await connection.fetchval(TOUCH_ASYNCPG, "uid-1")
            return connection
    else:
        import psycopg

        async def connect() -> Any:
            connection = await psycopg.AsyncConnection.connect(
                dsn, autocommit=True, prepare_threshold=0
            )
            await connection.execute(TOUCH_PSYCOPG, ("uid-1",), prepare=True)
            return connection

    first = await connect()
    before = _rss_kib()
    rest = [await connect() for _ in range(count - 1)]
    after = _rss_kib()
    print(json.dumps({"per_connection_kib": (after - before) / (count - 1)}))
    for connection in [first, *rest]:
        await connection.close()


def memory_per_connection(dsn: str, driver: str, count: int = 50) -> float:
    done = subprocess.run(
        [sys.executable, __file__, "--memory-probe", driver, "--dsn", dsn, "--count", str(count)],
        capture_output=True, text=True, check=True, timeout=120,
    )  # fmt: skip
    return float(json.loads(done.stdout.splitlines()[-1])["per_connection_kib"])


# -- a LISTEN connection's idle cost ------------------------------------------------


async def listen_idle_cost(server: Postgres, driver: str, seconds: float) -> dict[str, Any]:
    """Open a connection, LISTEN, stay idle ``seconds``: the statements the
    server ran in the bench database meanwhile, the client's CPU time, and
    whether (and how fast) a NOTIFY then arrives."""
    dsn = server.url(DBNAME)
    arrived: asyncio.Queue[float] = asyncio.Queue()
    if driver == "asyncpg":
        import asyncpg

        connection = await asyncpg.connect(dsn)
        await connection.add_listener(CHANNEL, lambda *_: arrived.put_nowait(time.perf_counter()))
        consumer = None
    else:
        import psycopg

        connection = await psycopg.AsyncConnection.connect(dsn, autocommit=True)
        await connection.execute(f"LISTEN {CHANNEL}")

        async def consume() -> None:
            async for _ in connection.notifies():
                arrived.put_nowait(time.perf_counter())

        consumer = asyncio.create_task(consume())
    await asyncio.sleep(0.2)
    await asyncio.to_thread(server.psql, "SELECT pg_stat_statements_reset()")
    cpu = time.process_time()
    await asyncio.sleep(seconds)
    cpu = time.process_time() - cpu
    count_sql = (
        "SELECT coalesce(sum(calls), 0) FROM pg_stat_statements s JOIN pg_database d "
        f"ON d.oid = s.dbid WHERE d.datname = '{DBNAME}'"
    )
    calls = await asyncio.to_thread(server.psql, count_sql)
    import asyncpg

    notifier = await asyncpg.connect(dsn)  # the sender (after the counting)
    sent = time.perf_counter()
    await notifier.execute(f"NOTIFY {CHANNEL}, 'hello'")
    try:
        latency = await asyncio.wait_for(arrived.get(), 5) - sent
    except TimeoutError:
        latency = float("nan")
    await notifier.close()
    if consumer is not None:  # it holds psycopg's connection while it waits
        consumer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await consumer
    # The count sees a statement of that connection: one more, one more counted.
    before = await asyncio.to_thread(server.psql, count_sql)
    await connection.execute("SELECT 1")
    seen = int(await asyncio.to_thread(server.psql, count_sql)) - int(before)
    await connection.close()
    return {"statements": int(calls), "check": seen, "cpu_s": cpu,
            "notify_s": latency}  # fmt: skip


# -- the report ----------------------------------------------------------------------


def report(
    runs: dict[tuple[str, int], Any],
    backends: dict[str, float],
    memory: dict[str, float],
    idle: dict[str, Any],
    args: argparse.Namespace,
) -> str:
    lines = [
        f"Load-and-touch by primary key (UPDATE ... RETURNING jsonb), {ROWS} rows, pool of "
        f"{POOL_SIZE}, uvloop; median of {args.repeats} x {args.duration:g} s",
        "",
        "| driver / pool | callers | operations/s | vs best asyncpg | p99 per call |",
        "|---|---:|---:|---:|---:|",
    ]
    for callers in CONCURRENCY:
        medians = {
            name: (statistics.median(r[0] for r in rs), statistics.median(r[1] for r in rs))
            for (name, c), rs in runs.items()
            if c == callers
        }
        best = max(ops for name, (ops, _) in medians.items() if name.startswith("asyncpg"))
        for name, (ops, p99) in medians.items():
            lines.append(
                f"| {name} | {callers} | {ops:,.0f} | {ops / best:.2f}x | {p99 * 1000:.2f} ms |"
            )
    lines += ["", "| driver / pool | server backend private memory per connection |", "|---|---:|"]
    lines += [f"| {name} | {kib / 1024:.1f} MiB |" for name, kib in backends.items()]
    lines += [
        "",
        f"| driver | client RSS per connection | LISTEN idle {args.idle:g} s: statements run "
        "(a query then: seen) | client CPU idle | NOTIFY arrives in |",
        "|---|---:|---:|---:|---:|",
    ]
    for driver in ("asyncpg", "psycopg"):
        cost = idle[driver]
        lines.append(
            f"| {driver} | {memory[driver]:.0f} KiB | {cost['statements']} "
            f"({cost['check']} seen) | "
            f"{cost['cpu_s'] * 1000:.1f} ms | {cost['notify_s'] * 1000:.2f} ms |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per run (5)")
    parser.add_argument("--repeats", type=int, default=3, help="runs per variant (3)")
    parser.add_argument("--idle", type=float, default=10.0, help="LISTEN idle seconds (10)")
    parser.add_argument("--memory-probe", choices=("asyncpg", "psycopg"), help=argparse.SUPPRESS)
    parser.add_argument("--dsn", help=argparse.SUPPRESS)
    parser.add_argument("--count", type=int, default=50, help=argparse.SUPPRESS)
    args = parser.parse_args()
    import uvloop

    if args.memory_probe:
        uvloop.run(_memory_probe(args.memory_probe, args.dsn, args.count))
        return
    settings = {
        "shared_preload_libraries": "'pg_stat_statements'",
        "pg_stat_statements.track": "all",
        "max_connections": "200",
    }
    with running_postgres(settings) as server:
        # In the postgres database: the bench's own queries (reset, count) are
        # not counted in the bench database the LISTEN connection uses.
        server.psql("CREATE EXTENSION pg_stat_statements")
        server.psql(f"CREATE DATABASE {DBNAME}")
        server.psql(DDL.format(rows=ROWS), DBNAME)
        dsn = server.url(DBNAME)
        runs, backends = uvloop.run(throughput(server, args.duration, args.repeats))
        memory = {driver: memory_per_connection(dsn, driver) for driver in ("asyncpg", "psycopg")}
        idle = {
            driver: uvloop.run(listen_idle_cost(server, driver, args.idle))
            for driver in ("asyncpg", "psycopg")
        }
    print(report(runs, backends, memory, idle, args))


if __name__ == "__main__":
    main()
