"""The bench's PostgreSQL systems (bench/pg_traffic.py, lapse-postgres, django-postgres): their
servers on the bench's own PostgreSQL, the statement counts, the figures and targets."""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.figures import targets  # noqa: E402
from bench.loadgen import WrkResult  # noqa: E402
from bench.options import parse_options  # noqa: E402
from bench.pg_traffic import (  # noqa: E402
    DATABASES,
    PgCounts,
    PgSnapshot,
    PostgresHandle,
    measure_window,
    per_request,
    postgres_table,
    rates,
)
from bench.scenarios import (  # noqa: E402
    IDLE_SESSIONS,
    IDLE_TIMEOUT,
    Bench,
    Outcome,
    Results,
    TouchRun,
    bench_postgres_idle,
)
from bench.systems import (  # noqa: E402
    LISTEN_LINE,
    SEED_TIMEOUT_LINE,
    SYSTEMS,
    lapse_script,
    running_server,
    server_command,
    session_cookie,
    session_kept,
)

PG_SYSTEMS = ("lapse-postgres", "django-postgres")


def wrk(rps: float) -> WrkResult:
    return WrkResult(rps=rps, requests=int(rps), non_2xx=0, socket_errors=0, p99_ms=1.0)


def outcome(touch: float, create: float) -> Outcome:
    return Outcome(touch=[TouchRun(wrk(touch), True)] * 3, create=[wrk(create)] * 3)


# ------------------------------------------------------------------ canned figures


def test_postgres_targets_compare_with_lapse_on_redis_and_must_beat_django() -> None:
    """lapse on PostgreSQL: touch >= 0.5 x lapse on Redis; touch and create strictly ahead of
    Django's db sessions (a tie is a MISS); n/a when a system was not run."""
    opts = parse_options(["--memory-counts", ""])
    outcomes = {
        "lapse-redis": outcome(20_000, 10_000),
        "lapse-postgres": outcome(10_000, 3_000),
        "django-postgres": outcome(2_000, 3_000),
    }
    found = {t.name: t for t in targets(Results(outcomes, expiry=[]), opts)}
    vs_redis = found["touch req/s: lapse (PostgreSQL) >= 0.5 x lapse (Redis)"]
    assert (vs_redis.value, vs_redis.verdict) == (pytest.approx(0.5), "PASS")
    touch = found["touch req/s: lapse (PostgreSQL) ahead of Django db sessions, same PostgreSQL"]
    assert (touch.value, touch.verdict) == (pytest.approx(5.0), "PASS")
    create = found["create req/s: lapse (PostgreSQL) ahead of Django db sessions, same PostgreSQL"]
    assert (create.value, create.verdict) == (pytest.approx(1.0), "MISS")  # a tie is not ahead
    del outcomes["django-postgres"]
    outcomes["lapse-postgres"] = outcome(9_000, 3_000)
    found = {t.name: t for t in targets(Results(outcomes, expiry=[]), opts)}
    assert found["touch req/s: lapse (PostgreSQL) >= 0.5 x lapse (Redis)"].verdict == "MISS"
    assert found[touch.name].verdict == "n/a"


def test_postgres_table_gives_statements_per_request_and_the_idle_rate_per_process() -> None:
    lapse = PgCounts(
        statements_per_touch=[1.02, 1.0, 1.01],
        statements_per_create=[1.5, 1.4, 1.6],
        long_idle_seconds=10,
        long_idle_sessions=3,
        long_idle_statements=40.0,
        long_idle_transactions=39.5,
        long_idle_queries={"SELECT a | b FROM t": 30.0, "LISTEN x": 10.0},
    )
    django = PgCounts(statements_per_touch=[4.0], statements_per_create=[5.0])
    lines = postgres_table([("lapse (PostgreSQL)", lapse), ("Django", django)])
    assert "idle statements/s per process, PostgreSQL" in lines[0]
    assert lines[2] == (
        "| lapse (PostgreSQL) | 1.01 | 1.50 | 40.0 (10 s, 3 sessions alive) | 39.5 "
        "| `SELECT a / b FROM t` 30.0; `LISTEN x` 10.0 |"
    )
    assert lines[3] == "| Django | 4.00 | 5.00 | — | — | — |"
    assert postgres_table([]) == []


def test_statements_per_request_subtract_the_idle_rate_of_the_window() -> None:
    before = PgSnapshot(10.0, 1_000, 50, {"q": 1_000})
    after = PgSnapshot(14.0, 3_160, 90, {"q": 3_000, "r": 160})
    counts = PgCounts(idle_rate=40.0)
    assert per_request(counts, before, after, 2_000) == pytest.approx(1.0)
    statements, transactions, by_query = rates(before, after)
    assert (statements, transactions) == (pytest.approx(540.0), pytest.approx(10.0))
    assert by_query == {"q": pytest.approx(500.0), "r": pytest.approx(40.0)}


# ------------------------------------------------------------------ command lines


def test_lapse_postgres_is_the_unchanged_seed_with_its_database_as_the_store(
    tmp_path: Path,
) -> None:
    """lapse-postgres runs the seed with LAPSE_SESSION_STORE set to its database's URL (no
    other LAPSE_* variable); django-postgres runs django_seed.py on the same URL form; both
    refuse to start without a database; the idle figure's script differs from the seed only
    in its listen line and its sessions' timeout."""
    url = "postgresql://postgres@127.0.0.1:5999/lapse_bench"
    cmd, env = server_command(SYSTEMS["lapse-postgres"], 8123, tmp_path, 0, None, url)
    assert cmd == [sys.executable, str(tmp_path / "lapse_session_endings.py")]
    assert env["LAPSE_SESSION_STORE"] == url
    assert [k for k in env if k.startswith("LAPSE_")] == ["LAPSE_SESSION_STORE"]
    cmd, env = server_command(SYSTEMS["django-postgres"], 8123, tmp_path, 0, None, url)
    assert cmd[1:] == [str(REPO / "bench/servers/django_seed.py"), "8123", "--database", url]
    assert not any(k.startswith("LAPSE_") for k in env)
    for key in PG_SYSTEMS:
        with pytest.raises(RuntimeError, match=f"no PostgreSQL database for {key}"):
            server_command(SYSTEMS[key], 8123, tmp_path, 0, None, None)
    seed = (REPO / "examples" / "session_endings.py").read_text()
    long = lapse_script(8123, tmp_path, 0, session_timeout=3600).read_text()
    expected = seed.replace(LISTEN_LINE, 'listenTCP(8123, factory, interface="127.0.0.1")')
    assert long == expected.replace(SEED_TIMEOUT_LINE, "sessionTimeout = 3600")


# ------------------------------------------------------------------ on a real PostgreSQL


@pytest.fixture(scope="module")
def bench_postgres() -> Iterator[PostgresHandle]:
    handle = PostgresHandle(list(PG_SYSTEMS))
    try:
        yield handle
    finally:
        handle.close()


@pytest.mark.parametrize("key", PG_SYSTEMS)
def test_each_postgres_system_serves_the_seed_page_from_its_own_database(
    bench_postgres: PostgresHandle, key: str
) -> None:
    """On the bench's PostgreSQL (Django's table migrated once at start): the system's server
    starts on its emptied database, makes a session on a cookie-less GET, finds it again
    with its cookie, and the statements it ran are counted in its database only. Twice, so
    that the second start finds the database emptied by the reset (no session left)."""
    system = SYSTEMS[key]
    for _ in range(2):
        bench_postgres.reset(system)
        assert sessions_in(bench_postgres, key) == 0
        serve_one_session(bench_postgres, key)
        assert sessions_in(bench_postgres, key) >= 2  # the start-up probe's session and ours


def sessions_in(pg: PostgresHandle, key: str) -> int:
    """Rows in the system's session table (0 while lapse's store has made no table yet)."""
    db = DATABASES[key]
    if key == "django-postgres":
        return int(pg.server.psql("SELECT count(*) FROM django_session", db))
    if pg.server.psql("SELECT to_regclass('public.lapse_sessions') IS NOT NULL", db) != "t":
        return 0
    return int(pg.server.psql("SELECT count(*) FROM public.lapse_sessions", db))


def serve_one_session(bench_postgres: PostgresHandle, key: str) -> None:
    system = SYSTEMS[key]
    other = SYSTEMS[next(k for k in PG_SYSTEMS if k != key)]
    with running_server(system, postgres_url=bench_postgres.url(system)) as server:
        others = bench_postgres.snapshot(other).statements
        before = bench_postgres.snapshot(system).statements
        cookie = session_cookie(server.port, system)
        assert cookie.startswith(f"{system.cookie}=")
        assert session_kept(server.port, system, cookie)
        assert bench_postgres.snapshot(system).statements > before
        assert bench_postgres.snapshot(other).statements == others


def test_idle_window_counts_exactly_the_statements_sent_to_that_database(
    bench_postgres: PostgresHandle,
) -> None:
    """Twelve statements another client sends to lapse's database during the window are
    counted as twelve, by text; the bench's own probes (in the postgres database) are not."""
    system = SYSTEMS["lapse-postgres"]
    bench_postgres.reset(system)
    db = DATABASES[system.key]

    def other_client() -> None:
        time.sleep(0.2)
        bench_postgres.server.psql("; ".join(["SELECT 4242"] * 12), db)

    thread = threading.Thread(target=other_client)
    thread.start()
    try:
        before, after = measure_window(bench_postgres, system, 1.0)
    finally:
        thread.join()
    assert after.statements - before.statements == 12
    assert after.by_query["SELECT $1"] - before.by_query.get("SELECT $1", 0) == 12


def test_idle_figure_watches_a_seed_process_holding_a_few_long_sessions(
    bench_postgres: PostgresHandle,
) -> None:
    """The idle step runs the seed on lapse's emptied database with an hour's timeout: three
    sessions (the start-up probe's and two more) are in the store, live, with that timeout,
    and the figure is the statement rate of the window (whatever the keeper sends)."""
    bench = Bench(parse_options(["--pg-idle-seconds", "0.5"]), "wrk", None)
    bench.postgres = bench_postgres
    result = Outcome()
    bench_postgres_idle(bench, SYSTEMS["lapse-postgres"], result)
    assert result.postgres is not None
    counts = result.postgres
    assert (counts.long_idle_seconds, counts.long_idle_sessions) == (0.5, IDLE_SESSIONS)
    assert counts.long_idle_statements is not None and counts.long_idle_statements >= 0
    live = bench_postgres.server.psql(
        f"SELECT count(*) FROM public.lapse_sessions WHERE NOT ended AND timeout = {IDLE_TIMEOUT}",
        DATABASES["lapse-postgres"],
    )
    assert int(live) == IDLE_SESSIONS


def test_a_postgres_that_cannot_start_fails_only_its_systems_steps(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Without a PostgreSQL (no server installed) the run does not crash: it says why once
    under Problems, each step of the PostgreSQL systems fails with "no PostgreSQL for ...",
    and the exit status is 1."""
    from bench import run

    def no_server(systems: list[str]) -> PostgresHandle:
        raise RuntimeError("no PostgreSQL server: run `apt-get install -y postgresql`")

    monkeypatch.setattr(run, "PostgresHandle", no_server)
    argv = ["--systems", "lapse-postgres", "--duration", "1", "--repeats", "1",
            "--out", str(tmp_path)]  # fmt: skip
    assert run.main(argv) == 1
    capsys.readouterr()
    table = (tmp_path / "latest.md").read_text()
    assert "- PostgreSQL did not start: RuntimeError: no PostgreSQL server" in table
    for step in ("touch existing session", "create sessions", "idle 10 s, 3 long sessions"):
        assert (
            f"- lapse (PostgreSQL): {step} failed: RuntimeError: no PostgreSQL for "
            "lapse-postgres" in table
        )
