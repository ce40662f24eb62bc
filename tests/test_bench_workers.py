"""The bench's many-cores figure (issue 15): ``lapse serve --workers N`` of the seed's site
on Redis, N = 1 and 2; its server module, its process discovery, its CPU accounting and its
section of the report. No timed assertion: the end-to-end tests check that both workers
serve and the figures are there, not their size."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.chart import workers_rows, write_chart  # noqa: E402
from bench.loadgen import WrkResult  # noqa: E402
from bench.options import parse_options  # noqa: E402
from bench.report import throughput_table  # noqa: E402
from bench.scenarios import Outcome, Results  # noqa: E402
from bench.systems import SYSTEMS, server_command, session_cookie, session_kept  # noqa: E402
from bench.workers import (  # noqa: E402
    WORKERS,
    WorkersOutcome,
    WorkersRun,
    running_workers,
    seed_site_module,
    worker_pids,
    workers_command,
)
from bench.workers_report import workers_table  # noqa: E402

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
SERVING = (
    "lapse: serving bench_seed_site:site (a Site, store redis://127.0.0.1:6379/0?prefix=x) "
    "on http://127.0.0.1:41234 with 2 workers (pids 4101, 4102); supervisor pid 4100; "
    "Ctrl-C to stop\n"
)


# ------------------------------------------------------------------ the server


def test_seed_site_module_is_the_seed_without_its_listen_and_run_lines(tmp_path: Path) -> None:
    """The module lapse serve imports is the seed's text minus listenTCP and reactor.run,
    plus ``site = factory``: the same tree (/logme) and ShortSession (5 s), nothing served
    at import."""
    seed = (REPO / "examples" / "session_endings.py").read_text()
    text = seed_site_module(tmp_path).read_text()
    removed = [line for line in seed.splitlines() if line not in text.splitlines()]
    assert removed == ["reactor.listenTCP(8080, factory)", "reactor.run()"]
    assert text.endswith("site = factory\n")
    spec = importlib.util.spec_from_file_location(
        "bench_seed_site", tmp_path / "bench_seed_site.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.site.sessionFactory.sessionTimeout == 5
    assert b"logme" in module.site.resource.children


def test_workers_command_serves_the_seed_site_with_n_workers_on_the_store_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``lapse serve bench_seed_site:site --workers N --store URL`` from the module's
    directory, on loopback; no LAPSE_* variable of the bench's environment leaks in; the
    workers system is never started as a plain seed."""
    monkeypatch.setenv("LAPSE_LOG_LEVEL", "info")
    command, env = workers_command(tmp_path, 8123, 2, "redis://127.0.0.1:1/0?prefix=p")
    assert command[:5] == [sys.executable, "-m", "lapse", "serve", "bench_seed_site:site"]
    for option, value in (("--app-dir", str(tmp_path)), ("--host", "127.0.0.1"),
                          ("--port", "8123"), ("--workers", "2"),
                          ("--store", "redis://127.0.0.1:1/0?prefix=p")):  # fmt: skip
        assert command[command.index(option) + 1] == value
    assert not [k for k in env if k.startswith("LAPSE_")]
    with pytest.raises(RuntimeError, match=r"started by bench/workers\.py"):
        server_command(SYSTEMS[WORKERS], 8123, tmp_path, 0, "redis://127.0.0.1:1/0")


def test_worker_pids_come_from_the_supervisors_serving_line() -> None:
    """N >= 2: the worker and supervisor PIDs of the line the supervisor prints once all
    serve (None before it); a line with another count is an error; N = 1: the process
    itself, no supervisor."""
    assert worker_pids(SERVING, 2, 4100) == ([4101, 4102], 4100)
    assert worker_pids("lapse: starting\n", 2, 4100) is None
    with pytest.raises(RuntimeError, match="asked for 3 workers"):
        worker_pids(SERVING, 3, 4100)
    assert worker_pids("", 1, 777) == ([777], None)


def test_worker_counts_option_and_the_system_selectable_alone() -> None:
    opts = parse_options(["--systems", WORKERS, "--worker-counts", "1,2,4"])
    assert (opts.systems, opts.worker_counts, opts.subset) == ([WORKERS], [1, 2, 4], True)
    assert parse_options([]).worker_counts == [1, 2] and WORKERS in parse_options([]).systems
    for bad in ("0,2", "two", ""):
        with pytest.raises(SystemExit):
            parse_options(["--worker-counts", bad])


# ------------------------------------------------------------------ the section


def run(n: int, figure: str, rps: float, cpu: tuple[float, ...], kept: bool = True) -> WorkersRun:
    requests = int(rps * 4)
    result = WrkResult(rps=rps, requests=requests, non_2xx=0, socket_errors=0, p99_ms=5.0,
                       p999_ms=9.0)  # fmt: skip
    return WorkersRun(n, figure, result, wall=4.0, worker_cpu=cpu, supervisor_cpu=0.04,
                      redis_cpu=0.8, wrk_cpu=2.0, kept=kept)  # fmt: skip


def workers_results() -> Results:
    runs = [
        run(1, "touch", 10_000, (3.6,)), run(1, "touch", 11_000, (3.96,)),
        run(1, "touch", 12_000, (4.32,)),
        run(2, "touch", 9_000, (1.8, 1.8)), run(2, "touch", 10_000, (2.4, 1.6)),
        run(2, "touch", 11_000, (2.2, 2.2)),
        run(1, "create", 8_000, (3.2,)), run(2, "create", 6_000, (1.2, 1.2)),
    ]  # fmt: skip
    outcome = Outcome(workers=WorkersOutcome(runs=runs))
    return Results({WORKERS: outcome}, expiry=[])


def test_workers_section_gives_req_s_per_worker_the_ratio_and_cpu_per_request() -> None:
    """Per N and figure: median req/s, per worker, N / 1 worker, the workers' CPU µs per
    request (summed over workers), each worker's share, redis-server's and wrk's, their
    sum, how busy the machine's CPUs were, and one core's worth of requests/s."""
    title, lines = workers_table(workers_results())
    assert title.startswith("## Many cores: lapse serve --workers N on Redis")
    summary = lines[: lines.index("")]  # the per-run table follows the explanation
    rows = {tuple(line.split(" | ")[:2]): line for line in summary if line.startswith("| ")}
    one, two = rows[("| 1", "touch")], rows[("| 2", "touch")]
    # 11,000 req/s, 44,000 requests, 3.96 s of worker CPU: 90 µs per request
    assert one.startswith("| 1 | touch | 11,000 | 11,000 | 1.00x | 5.00 ms | 9.00 ms | 90.0 | — |")
    assert two.startswith("| 2 | touch | 10,000 | 5,000 | 0.91x | 5.00 ms | 9.00 ms | 100.0 |")
    assert "| 53 / 47 % |" in two  # 6.4 s and 5.6 s over the three runs
    busy = 100 * (3.96 + 0.04 + 0.8 + 2.0) / (4.0 * (os.cpu_count() or 1))
    assert f"| {busy:.0f} % | 11,111 | 3/3 |" in one
    assert rows[("| 2", "create")].split(" | ")[4] == "0.75x"
    assert workers_table(Results({}, expiry=[])) == ("", [])


def test_workers_system_stays_out_of_the_requests_table_and_is_charted(tmp_path: Path) -> None:
    """It has its own section: no empty row in the requests/s table; the chart draws its
    touch and create bars for each N, alone or beside the other systems."""
    results = workers_results()
    assert len(throughput_table(results)) == 2
    assert workers_rows(results) == [
        ("lapse serve --workers 1 (Redis)", [11_000, None, 8_000, None]),
        ("lapse serve --workers 2 (Redis)", [10_000, None, 6_000, None]),
    ]
    path = tmp_path / "chart.png"
    write_chart(results, parse_options(["--systems", WORKERS]), path)
    assert path.read_bytes()[:8] == PNG_SIGNATURE


# ------------------------------------------------------------------ end to end


@pytest.mark.slow
def test_two_workers_serve_one_socket_share_sessions_and_are_stopped(redis_server: Any) -> None:
    """On a real redis-server: with N = 2 the supervisor's line names two live worker
    processes, children of it; a session made on one connection is kept on 20 new
    connections (whichever worker takes them); after the block every process is gone."""
    system = SYSTEMS[WORKERS]
    with running_workers(redis_server.url, 2) as server:
        assert len(server.pids) == 2 and server.supervisor is not None
        for pid in server.pids:
            stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            assert int(stat[1]) == server.supervisor  # its parent
        cookie = session_cookie(server.port, system)
        assert all(session_kept(server.port, system, cookie) for _ in range(20))
        pids = [*server.pids, server.supervisor]
    for pid in pids:
        assert not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text()


@pytest.mark.slow
def test_bench_run_of_the_workers_system_alone_writes_its_section(
    tmp_path: Path, redis_server: Any
) -> None:
    """`bench/run.py --systems lapse-redis-workers` (1 s runs) exits 0 with no problem, and
    its table has the section with a touch and a create row for N = 1 and 2, every one
    with its CPU figures; the chart is drawn."""
    command = [
        sys.executable, "bench/run.py", "--systems", WORKERS, "--duration", "1",
        "--repeats", "1", "--warmup", "0", "--create-warmup", "0", "--memory-counts", "",
        "--live-sessions", "0", "--expiry-sessions", "0", "--redis-url", redis_server.url,
        "--out", str(tmp_path),
    ]  # fmt: skip
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=240,
                          check=False)  # fmt: skip
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-3000:]
    table = (tmp_path / "latest.md").read_text()
    assert "## Many cores: lapse serve --workers N on Redis" in table
    assert "Problems: none" in table
    for n in (1, 2):
        for figure in ("touch", "create"):
            row = next(line for line in table.splitlines()
                       if line.startswith(f"| {n} | {figure} | "))  # fmt: skip
            assert "—" not in row.split(" | ")[7]  # the workers' CPU µs per request
    assert (tmp_path / "chart.png").read_bytes()[:8] == PNG_SIGNATURE
