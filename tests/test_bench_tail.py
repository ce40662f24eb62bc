"""The bench's tail-latency figures (issue 15): p99 and p99.9 from a wrk Lua done() hook
on every run (joined to the login runs' own script), in the requests/s table with the
worst run's p99, in a section for every figure, and issue 15's targets. No timed
assertion: the end-to-end tests check that real wrk runs give both figures, not their
size."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.figures import targets  # noqa: E402
from bench.loadgen import (  # noqa: E402
    TAIL_HOOK,
    WrkResult,
    ensure_wrk,
    login_script,
    parse_wrk,
    run_wrk,
    with_tail_hook,
)
from bench.options import parse_options  # noqa: E402
from bench.report import raw_lines, throughput_table  # noqa: E402
from bench.scenarios import Outcome, Results, TouchRun  # noqa: E402
from bench.systems import SYSTEMS, login_cookie, running_server  # noqa: E402
from bench.tail_report import tail_table  # noqa: E402

WRK_OUTPUT = """Running 1s test @ http://127.0.0.1:18931/logme
  1 threads and 10 connections
  Latency Distribution
     50%  617.00us
     75%    1.38ms
     90%    2.42ms
     99%    5.86ms
  10276 requests in 1.01s, 752.64KB read
Requests/sec:  10199.43
Transfer/sec:    747.03KB
"""
HOOK_LINE = "bench tail latency us: p99 5863 p99.9 12407\n"

ISSUE15_NAMES = {
    "bare": "touch req/s: lapse (memory) >= 0.7 x bare uvicorn this round (0.8 stays the goal)",
    "sqlite": "touch req/s: lapse (SQLite) >= 0.4 x lapse (memory)",
    "p99": "create p99: lapse (memory) <= 10 ms in every run",
    "touch twisted": "touch req/s: lapse (memory) >= 2.5 x Twisted",
    "create twisted": "create req/s: lapse (memory) >= 2.5 x Twisted",
}


def wrk(rps: float, p99: float | None = 1.0, p999: float | None = 2.0) -> WrkResult:
    return WrkResult(rps=rps, requests=int(rps), non_2xx=0, socket_errors=0, p99_ms=p99,
                     p999_ms=p999)  # fmt: skip


# ------------------------------------------------------------------ the hook and its parsing


def test_parse_wrk_takes_p99_and_p999_to_the_microsecond_from_the_hooks_line() -> None:
    """The hook's line gives p99.9, which --latency does not print, and p99 in µs (the
    --latency line rounds it); without the line, p99 comes from --latency, p99.9 is None."""
    hooked = parse_wrk(WRK_OUTPUT + HOOK_LINE)
    assert (hooked.p99_ms, hooked.p999_ms) == (pytest.approx(5.863), pytest.approx(12.407))
    plain = parse_wrk(WRK_OUTPUT)
    assert (plain.p99_ms, plain.p999_ms) == (pytest.approx(5.86), None)


def test_the_tail_hook_joins_the_login_script_and_refuses_a_script_with_its_own_done(
    tmp_path: Path,
) -> None:
    """wrk takes one script: the hook is appended to the login runs' (whose init and
    request stay as they were); alone for the other runs; a script that defines done()
    would lose it, so it is refused rather than silently changed."""
    login = login_script(tmp_path)
    joined = with_tail_hook(tmp_path / "", login).read_text()
    assert joined == login.read_text() + TAIL_HOOK
    assert with_tail_hook(tmp_path, None).read_text() == TAIL_HOOK
    own = tmp_path / "own.lua"
    own.write_text("function done(summary, latency, requests)\nend\n")
    with pytest.raises(ValueError, match="defines done"):
        with_tail_hook(tmp_path, own)


@pytest.mark.slow
def test_real_wrk_runs_give_p99_and_p999_on_plain_and_login_runs(tmp_path: Path) -> None:
    """Real wrk on a real lapse seed with the login route: a plain GET run and a login run
    (the login script plus the hook) both report p99 and p99.9 from the hook, p99.9 >= p99,
    every request answered 2xx, and the login run really logged in (a cookie-less POST
    still works after it)."""
    wrk_path = ensure_wrk()
    system = SYSTEMS["lapse-memory"]
    with running_server(system, login=True) as server:
        plain = run_wrk(wrk_path, 1, 4, server.port, 1, None)
        logins = run_wrk(wrk_path, 1, 4, server.port, 1, None, login_script(tmp_path))
        assert login_cookie(server.port, system, "after-the-runs")
    for result in (plain, logins):
        assert result.requests > 0 and result.errors == 0
        assert result.p99_ms is not None and result.p999_ms is not None
        assert result.p999_ms >= result.p99_ms > 0


# ------------------------------------------------------------------ tables and targets


def tail_results() -> Results:
    lapse = Outcome(
        touch=[TouchRun(wrk(30_000, 2.0, 5.0), True), TouchRun(wrk(31_000, 3.0, 9.0), True),
               TouchRun(wrk(32_000, 2.5, 6.0), True)],
        create=[wrk(20_000, 4.0, 20.0), wrk(21_000, 81.9, 140.0), wrk(22_000, 3.6, 8.0)],
        login=[wrk(9_000, 6.0, None)],
    )  # fmt: skip
    return Results(
        {
            "lapse-memory": lapse,
            "lapse-sqlite": Outcome(touch=[TouchRun(wrk(12_000), True)], create=[wrk(5_000)]),
            "twisted": Outcome(touch=[TouchRun(wrk(11_000), True)], create=[wrk(7_000)]),
            "uvicorn-bare": Outcome(touch=[TouchRun(wrk(40_000), True)], create=[wrk(45_000)]),
        },
        expiry=[],
    )


def test_requests_table_gives_p99_p999_medians_and_the_worst_runs_p99() -> None:
    """Touch and create each show the median p99, the median p99.9 and the highest p99
    of the runs: one bad create run (81.9 ms) shows in the worst-run column even though
    the median (4.00 ms) hides it."""
    rows = {line.split(" | ")[0][2:]: line for line in throughput_table(tail_results())[2:]}
    assert rows["lapse (memory)"] == (
        "| lapse (memory) | 31,000 | 1.00x | 2.50 ms | 6.00 ms | 3.00 ms "
        "| 21,000 | 1.00x | 4.00 ms | 20.00 ms | 81.90 ms | 3/3 |"
    )


def test_tail_section_has_a_row_per_system_and_figure_measured() -> None:
    """Every figure measured with wrk (login too) gets its p99 and p99.9, median and worst
    run; a p99.9 missing from every run shows as a dash, not as zero."""
    lines = tail_table(tail_results())
    assert "| lapse (memory) | create | 3 | 4.00 ms | 20.00 ms | 81.90 ms | 140.00 ms |" in lines
    assert "| lapse (memory) | login | 1 | 6.00 ms | — | 6.00 ms | — |" in lines
    assert sum(line.startswith("| Twisted |") for line in lines) == 2
    assert tail_table(Results({}, expiry=[])) == []
    raw = "\n".join(raw_lines(tail_results()))
    assert "| 4.00, 81.90, 3.60 | 20.00, 140.00, 8.00 |" in raw


def test_issue15_targets_judge_ratios_of_medians_and_create_p99_of_every_run() -> None:
    """Touch and create over Twisted >= 2.5, touch over bare >= 0.7 this round, SQLite over
    memory >= 0.4, and create p99 <= 10 ms judged on the worst run: 81.9 ms in one run of
    three is a miss although the median run is 4 ms."""
    found = {t.name: t for t in targets(tail_results(), parse_options(["--memory-counts", ""]))}
    checks = {
        "bare": (31_000 / 40_000, "PASS"),
        "sqlite": (12_000 / 31_000, "MISS"),
        "p99": (81.9, "MISS"),
        "touch twisted": (31_000 / 11_000, "PASS"),
        "create twisted": (21_000 / 7_000, "PASS"),
    }
    for key, (value, verdict) in checks.items():
        target = found[ISSUE15_NAMES[key]]
        assert (target.value, target.verdict) == (pytest.approx(value), verdict), key
    results = tail_results()
    results.outcomes["lapse-memory"].create[1] = wrk(21_000, 9.9, 30.0)
    again = {t.name: t for t in targets(results, parse_options(["--memory-counts", ""]))}
    assert again[ISSUE15_NAMES["p99"]].verdict == "PASS"
    del results.outcomes["lapse-sqlite"]
    again = {t.name: t for t in targets(results, parse_options(["--memory-counts", ""]))}
    assert again[ISSUE15_NAMES["sqlite"]].verdict == "n/a"


def test_the_bare_apps_burn_spends_at_least_its_cpu_time_in_each_request() -> None:
    """The control of bench/tail_control.py: with --burn-us, each request spins until its
    thread has used that much CPU time (so a request costs at least that), then answers
    as the plain bare app does."""
    import asyncio
    import time

    from bench.servers.bare_asgi import BODY, START, app, burning

    sent: list[dict[str, object]] = []

    async def send(message: dict[str, object]) -> None:
        sent.append(message)

    paced = burning(0.002)
    before = time.thread_time()
    asyncio.run(paced({"type": "http"}, None, send))
    assert time.thread_time() - before >= 0.002
    assert sent == [START, BODY]
    sent.clear()
    asyncio.run(app({"type": "http"}, None, send))
    assert sent == [START, BODY]


@pytest.mark.slow
def test_tail_control_runs_lapse_and_the_paced_control_in_turn_and_tabulates_them(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A tiny real run (1 round of 1 s): it measures lapse's and the bare app's CPU per
    request, states the control's burn, and gives a row per run and a median row per
    server with requests/s, CPU, Little's mean, p99, p99.9 and steal."""
    from bench.tail_control import main

    assert main(["--runs", "1", "--seconds", "1", "--warmup", "0"]) == 0
    out = capsys.readouterr().out
    assert "the control spins" in out
    rows = [line for line in out.splitlines() if line.startswith("| lapse create |")]
    controls = [line for line in out.splitlines() if line.startswith("| control |")]
    assert len(rows) == 1 and len(controls) == 1
    assert "**lapse create, median of 1**" in out and "**control, median of 1**" in out
    cells = rows[0].split("|")[2:-1]
    assert float(cells[0].replace(",", "")) > 0 and float(cells[1]) > 0


@pytest.mark.slow
def test_tail_probe_reports_the_servers_own_read_to_write_and_write_to_read_times() -> None:
    """bench/tail_probe.py on a tiny run: the probe inserted into the seed records, per
    request answered in the protocol's callback, the time from the loop reading it to
    its response's write and from a write to the next read on that connection, and the
    summary gives their p50/p99/p99.9 and max beside wrk's figures."""
    import re
    import subprocess

    probe = [sys.executable, str(REPO / "bench" / "tail_probe.py")]
    out = subprocess.run(
        [*probe, "--runs", "1", "--seconds", "1", "--warmup", "0"],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    assert re.search(r"^run 1: .* wrk p50 [\d.]+ p99 [\d.]+", out, re.MULTILINE), out
    for what in ("read -> write", "write -> next read"):
        found = re.search(
            rf"server, {what} \((\d+)\): p50 ([\d.]+) p99 ([\d.]+) p99.9 ([\d.]+) max ([\d.]+) ms",
            out,
        )
        assert found is not None, out
        count, p50, p99, p999, worst = (float(x) for x in found.groups())
        assert count > 0 and p50 <= p99 <= p999 <= worst
