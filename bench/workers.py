"""Many cores (issue 15): ``lapse serve --workers N`` on the bench's redis-server.

The seed's site (its resource tree and ``ShortSession``, from examples/session_endings.py
with its listen and run lines taken out and ``site = factory`` added) is served by
``lapse serve bench_seed_site:site --workers N --store redis://...`` for each N of
``--worker-counts`` (1 and 2): with N = 1 one process serves; with N >= 2 a supervisor
binds the socket and N worker processes accept on it. wrk runs on the same machine with
the bench's ``--threads`` and ``--connections`` (-t1 -c50), like every other figure.

Per wrk run: requests/s, p99 and p99.9 (the tail hook), and the CPU time (user + system)
over the run of each worker process (``/proc/PID/stat``), of the supervisor, of
redis-server (``INFO cpu``) and of wrk itself (``RUSAGE_CHILDREN`` around it), each per
request. Their sum over the run's wall time and the machine's CPUs is how busy the
machine was: near 100 %, requests/s is the machine's ceiling, not lapse's.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import resource
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from bench.loadgen import WrkResult, run_wrk
from bench.systems import (
    HOST,
    LAPSE_EXAMPLE,
    LISTEN_LINE,
    REPO_DIR,
    System,
    cpu_seconds,
    free_port,
    redis_store_url,
    session_cookie,
    session_kept,
    stop,
    wait_until_answering,
)

if TYPE_CHECKING:
    from bench.scenarios import Bench

WORKERS = "lapse-redis-workers"
"""The system key of ``lapse serve --workers N`` on Redis."""
SITE_MODULE = "bench_seed_site"
RUN_LINE = "reactor.run()"
SERVING_LINE = re.compile(r"with (\d+) workers \(pids ([\d, ]+)\); supervisor pid (\d+)")


def seed_site_module(workdir: Path) -> Path:
    """The seed as a module for ``lapse serve``: its listen and run lines removed, its
    ``Site`` named ``site``; nothing else changed."""
    source = LAPSE_EXAMPLE.read_text()
    lines = source.splitlines(keepends=True)
    for needle in (LISTEN_LINE, RUN_LINE, "factory = Site("):
        if sum(needle in line for line in lines) != 1:
            raise RuntimeError(f"expected exactly one {needle!r} line in {LAPSE_EXAMPLE}")
    kept = [line for line in lines if LISTEN_LINE not in line and RUN_LINE not in line]
    text = "".join(kept).rstrip("\n") + "\n\n# -- added by bench/workers.py --\nsite = factory\n"
    path = workdir / f"{SITE_MODULE}.py"
    path.write_text(text)
    return path


def workers_command(
    workdir: Path, port: int, workers: int, store: str
) -> tuple[list[str], dict[str, str]]:
    """``lapse serve`` of the seed's site on ``port`` with ``workers`` processes on
    ``store``; the environment without any ``LAPSE_*`` variable."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LAPSE_")}
    command = [
        sys.executable, "-m", "lapse", "serve", f"{SITE_MODULE}:site", "--app-dir",
        str(workdir), "--host", HOST, "--port", str(port), "--workers", str(workers),
        "--store", store,
    ]  # fmt: skip
    return command, env


def worker_pids(stderr: str, workers: int, pid: int) -> tuple[list[int], int | None] | None:
    """(the worker PIDs, the supervisor's) from ``lapse serve``'s stderr once all serve;
    None while they do not yet. One worker: the process itself, no supervisor."""
    if workers == 1:
        return [pid], None
    found = SERVING_LINE.search(stderr)
    if found is None:
        return None
    pids = [int(p) for p in found.group(2).split(",")]
    if int(found.group(1)) != workers or len(pids) != workers:
        raise RuntimeError(f"asked for {workers} workers, lapse serve says: {found.group(0)}")
    return pids, int(found.group(3))


@dataclass(frozen=True)
class WorkersServer:
    port: int
    pids: list[int]
    """The worker processes (one: the ``lapse serve`` process itself)."""
    supervisor: int | None


def ours(pid: int) -> bool:
    """Whether ``pid`` is still a worker serving the bench's seed site (not a reused PID)."""
    try:
        return SITE_MODULE.encode() in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


@contextlib.contextmanager
def running_workers(redis_url: str, workers: int, timeout: float = 60) -> Iterator[WorkersServer]:
    """``lapse serve --workers N`` of the seed's site on a free loopback port, its store a
    fresh prefix on ``redis_url``; yields once every worker serves; always stopped by PID
    (SIGTERM to the supervisor, which passes it on; SIGKILL to any left after)."""
    with tempfile.TemporaryDirectory(prefix="bench-workers-") as tmp:
        workdir = Path(tmp)
        seed_site_module(workdir)
        port = free_port()
        store = redis_store_url(redis_url, f"bench-workers-{os.getpid()}-{port}")
        command, env = workers_command(workdir, port, workers, store)
        log = workdir / "stderr.log"
        pids: list[int] = []
        with log.open("wb") as stderr:
            proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                    stderr=stderr, cwd=REPO_DIR, env=env)  # fmt: skip
            try:
                wait_until_answering(proc, port, log, timeout)
                deadline = time.monotonic() + timeout
                while (found := worker_pids(log.read_text(), workers, proc.pid)) is None:
                    if proc.poll() is not None or time.monotonic() > deadline:
                        raise RuntimeError(f"not all {workers} workers served:\n{log.read_text()}")
                    time.sleep(0.1)
                pids = found[0]
                yield WorkersServer(port, pids, found[1])
            finally:
                stop(proc)
                for pid in pids if workers > 1 else []:  # a worker the supervisor left
                    if ours(pid):
                        with contextlib.suppress(ProcessLookupError):
                            os.kill(pid, signal.SIGKILL)


@dataclass(frozen=True)
class WorkersRun:
    """One wrk run on ``workers`` processes, and the CPU seconds each party used in it."""

    workers: int
    figure: str
    """touch or create."""
    result: WrkResult
    wall: float
    worker_cpu: tuple[float, ...]
    supervisor_cpu: float
    redis_cpu: float | None
    wrk_cpu: float
    kept: bool = True

    def per_request(self, seconds: float | None) -> float | None:
        """CPU seconds of the run as µs per request."""
        if seconds is None or not self.result.requests:
            return None
        return seconds / self.result.requests * 1e6

    @property
    def busy(self) -> float | None:
        """The share of the machine's CPUs the workers, supervisor, redis-server and wrk
        used over the run."""
        if self.redis_cpu is None or not self.wall:
            return None
        used = sum(self.worker_cpu) + self.supervisor_cpu + self.redis_cpu + self.wrk_cpu
        return used / (self.wall * (os.cpu_count() or 1))


@dataclass
class WorkersOutcome:
    runs: list[WorkersRun] = field(default_factory=list)
    threads: int = 1
    connections: int = 50


def redis_cpu(url: str) -> float | None:
    """redis-server's CPU seconds so far (INFO cpu, user + system of the main process)."""
    import redis

    client = redis.Redis.from_url(url)
    try:
        info = client.info("cpu")
        return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])
    except Exception:
        return None
    finally:
        client.close()


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def measured_run(
    b: Bench, server: WorkersServer, workers: int, figure: str, seconds: int, cookie: str | None
) -> WorkersRun:
    """One wrk run and everyone's CPU time around it."""
    assert b.redis is not None
    before = [cpu_seconds(pid) for pid in server.pids]
    sup_before = cpu_seconds(server.supervisor) if server.supervisor else 0.0
    redis_before, wrk_before = redis_cpu(b.redis.url), children_cpu()
    started = time.monotonic()
    result = run_wrk(b.wrk, b.opts.threads, b.opts.connections, server.port, seconds, cookie)
    wall = time.monotonic() - started
    wrk_cpu = children_cpu() - wrk_before
    redis_after = redis_cpu(b.redis.url)
    after = [cpu_seconds(pid) for pid in server.pids]
    sup_after = cpu_seconds(server.supervisor) if server.supervisor else 0.0
    return WorkersRun(
        workers=workers,
        figure=figure,
        result=result,
        wall=wall,
        worker_cpu=tuple(a - b for a, b in zip(after, before, strict=True)),
        supervisor_cpu=sup_after - sup_before,
        redis_cpu=None
        if redis_before is None or redis_after is None
        else redis_after - redis_before,
        wrk_cpu=wrk_cpu,
    )


def bench_workers(b: Bench, system: System, into: WorkersOutcome) -> None:
    """Touch and create runs on ``lapse serve --workers N`` for each N of
    ``--worker-counts``, a fresh server (and an empty store) per N and figure; errors and
    lost sessions are problems of the run."""
    opts = b.opts
    redis = b.redis_for(system)
    if redis is None:
        raise RuntimeError(f"no redis-server for {system.key}")
    into.threads, into.connections = opts.threads, opts.connections
    for n in opts.worker_counts:
        for figure in ("touch", "create"):
            redis.flush()
            with running_workers(redis.url, n) as server:
                warmup = opts.warmup if figure == "touch" else opts.create_warmup
                if warmup > 0:
                    cookie = session_cookie(server.port, system) if figure == "touch" else None
                    run_wrk(b.wrk, opts.threads, opts.connections, server.port, warmup, cookie)
                for _ in range(opts.repeats):
                    if figure == "create":
                        into.runs.append(measured_run(b, server, n, figure, opts.duration, None))
                        continue
                    cookie = session_cookie(server.port, system)
                    run = measured_run(b, server, n, figure, opts.duration, cookie)
                    kept = session_kept(server.port, system, cookie)
                    into.runs.append(dataclasses.replace(run, kept=kept))
    errors = sum(r.result.errors for r in into.runs)
    if errors:
        b.problems.append(f"{system.label}: {errors} non-2xx responses or socket errors")
    lost = sum(not r.kept for r in into.runs)
    if lost:
        b.problems.append(
            f"{system.label}: in {lost} touch runs the session was gone right after wrk"
        )
