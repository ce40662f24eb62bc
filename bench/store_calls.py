"""Store round trips per create and per expired session, one request at a time (issue 15's
scaling model), for lapse on Redis: one node, and the Redis Cluster (12 shards).

On a fresh lapse seed (its stdout, one line per expired session, to a file; unbuffered):

1. wait until the start-up probe's session has expired (its line), then measure the idle
   rates (as figure 8: INFO commandstats and MONITOR over ``--idle-seconds``, at least 3 s);
2. **create**: ``--expiry-calls-sessions`` (N) cookie-less GETs one after the other on one
   keep-alive connection, each a new session (the seed registers its expiry callback),
   between two snapshots: round trips (server read events) and commands per create;
3. **expiry**: no request at all, until the N sessions' lines are all out (their 5 s
   timeout), then 1 s more for what follows a callback; between two snapshots: round
   trips and commands per expired session.

Steps 2 and 3 are repeated ``--repeats`` times on the same server (each round after the
last one's sessions have all expired); the report shows the median of the rounds.

Each window's idle rate times its length is subtracted (what the process sends with
nothing to do), so a window's figure is what the N operations added. Under wrk the store
batches concurrent calls (the requests/s runs' figures); one at a time is each
operation's own cost, the one a lightly loaded process pays.
"""

from __future__ import annotations

import http.client
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

from bench.redis_traffic import (
    Monitors,
    RedisCounts,
    RedisTarget,
    combined,
    measure_idle,
    monitor_shards,
    monitor_window,
)
from bench.systems import HOST, PATH, System, parse_set_cookies, running_server

if TYPE_CHECKING:
    from bench.scenarios import Bench

EXPIRED_LINE = b"has expired."
"""The seed's line for an expired session (its notifyOnExpire callback)."""
MIN_IDLE_SECONDS = 3.0


@dataclass(frozen=True)
class Window:
    """A window's store traffic per operation, the idle rate subtracted."""

    operations: int
    seconds: float
    reads: float
    """Round trips (server read events) per operation."""
    commands: float
    """Commands per operation, those run inside Lua included (INFO commandstats)."""
    client_commands: float
    """Commands clients sent per operation (MONITOR)."""
    names: dict[str, float] = field(default_factory=dict)
    """Client commands per operation, by name (>= 0.005 shown)."""
    shards: int = 0
    """Hash tags (the store's shards) the window's client commands named."""


def median_window(windows: list[Window]) -> Window | None:
    """Each figure's median over ``windows`` (a name missing from a window counts 0)."""
    if not windows:
        return None
    names = sorted({name for w in windows for name in w.names})
    return Window(
        operations=windows[0].operations,
        seconds=statistics.median(w.seconds for w in windows),
        reads=statistics.median(w.reads for w in windows),
        commands=statistics.median(w.commands for w in windows),
        client_commands=statistics.median(w.client_commands for w in windows),
        names={n: statistics.median(w.names.get(n, 0.0) for w in windows) for n in names},
        shards=max(w.shards for w in windows),
    )


@dataclass
class StoreCalls:
    sessions: int = 0
    idle: RedisCounts | None = None
    creates: list[Window] = field(default_factory=list)
    """One window per round: N sessions made one at a time."""
    expiries: list[Window] = field(default_factory=list)
    """One window per round: those N sessions expiring."""
    expired: int = 0
    """Sessions whose expiry line was seen in the expiry windows (N x rounds if all were)."""

    @property
    def create(self) -> Window | None:
        return median_window(self.creates)

    @property
    def expiry(self) -> Window | None:
        return median_window(self.expiries)


def window(
    redis: RedisTarget, idle: RedisCounts, operations: int, action: Callable[[], None]
) -> Window:
    """``action`` between two snapshots of every node, under MONITOR: its traffic per
    operation, ``idle``'s rates times the window's length subtracted."""
    monitors = Monitors(redis.addresses)
    try:
        before = redis.node_snapshots()
        action()
        after = redis.node_snapshots()
    finally:
        feeds = monitors.stop()
    elapsed = after[-1].at - before[-1].at
    top = 0
    names: dict[str, int] = {}
    tags: set[str] = set()
    for lines in feeds:
        node_top, _, node_names = monitor_window(lines)
        top += node_top
        for name, n in node_names.items():
            names[name] = names.get(name, 0) + n
        tags |= {tag for tag in monitor_shards(lines) if tag}
    b, a = combined(before), combined(after)
    reads = a.client_reads() - b.client_reads() - a.infos - idle.idle_reads * elapsed
    commands = a.commands() - b.commands() - idle.idle_commands * elapsed
    client = top - idle.idle_client_commands * elapsed
    per_name = {
        name: (n - idle.idle_names.get(name, 0.0) * elapsed) / operations
        for name, n in sorted(names.items())
    }
    return Window(
        operations=operations,
        seconds=elapsed,
        reads=reads / operations,
        commands=commands / operations,
        client_commands=client / operations,
        names={k: v for k, v in per_name.items() if abs(v) >= 0.005},
        shards=len(tags),
    )


def make_sessions(port: int, cookie_name: str, count: int) -> None:
    """``count`` cookie-less GETs one after the other on one keep-alive connection, each
    answered 200 with a new session cookie."""
    conn = http.client.HTTPConnection(HOST, port, timeout=10)
    try:
        for _ in range(count):
            conn.request("GET", PATH)
            response = conn.getresponse()
            response.read()
            cookies = parse_set_cookies(response.msg.get_all("Set-Cookie") or [])
            if response.status != 200 or cookie_name not in cookies:
                raise RuntimeError(f"a create got {response.status}, cookies {cookies}")
    finally:
        conn.close()


def expired_count(stdout: Path) -> int:
    return stdout.read_bytes().count(EXPIRED_LINE)


def wait_expired(stdout: Path, count: int, timeout: float) -> int:
    """Wait until the server has printed ``count`` expiry lines (or ``timeout`` s);
    the number seen."""
    deadline = time.monotonic() + timeout
    while (seen := expired_count(stdout)) < count and time.monotonic() < deadline:
        time.sleep(0.05)
    return seen


def bench_store_calls(b: Bench, system: System, into: StoreCalls) -> None:
    """The create and expiry windows (module docstring) on a fresh lapse seed."""
    redis = b.redis_for(system)
    if redis is None or system.cookie is None:
        raise RuntimeError(f"{system.key} is not a lapse system on Redis")
    n = into.sessions = b.opts.expiry_calls_sessions
    cookie = system.cookie
    redis.flush()
    with tempfile.TemporaryDirectory(prefix="bench-calls-") as tmp:
        stdout = Path(tmp) / "stdout.log"
        with running_server(system, redis_url=redis.url, stdout_path=stdout) as server:
            if wait_expired(stdout, 1, 30) < 1:
                raise RuntimeError("the start-up probe's session did not expire within 30 s")
            idle = into.idle = RedisCounts()
            measure_idle(redis, max(b.opts.idle_seconds, MIN_IDLE_SECONDS), idle)
            budget = 0.0
            for done in range(b.opts.repeats):  # rounds, each after the last has expired
                started = time.monotonic()
                into.creates.append(
                    window(redis, idle, n, partial(make_sessions, server.port, cookie, n))
                )
                budget = 30 + (time.monotonic() - started)
                expected = 1 + n * (done + 1)

                def expire_all(expected: int = expected, budget: float = budget) -> None:
                    into.expired = wait_expired(stdout, expected, budget) - 1
                    time.sleep(1.0)  # what follows a callback (the acknowledgement)

                into.expiries.append(window(redis, idle, n, expire_all))
                if into.expired != n * (done + 1):
                    break
    if into.expired != n * len(into.creates):
        b.problems.append(
            f"{system.label}: {into.expired} of {n * len(into.creates)} sessions made one at "
            f"a time expired (the last round waited {budget:.0f} s)"
        )
