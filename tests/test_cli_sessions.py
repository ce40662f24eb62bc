"""``lapse sessions list|show|expire|stats`` against a real SQLite file, a
real Redis server (and Redis Cluster) and a real PostgreSQL.

The command runs in-process through ``main()`` (stdout and stderr captured),
except where a server's keeper must run at the same time: then it is a real
subprocess. Its own messages are one line each on stderr, prefixed ``lapse:``;
exit status 2 for a bad command line or store URL, 1 for an unreachable store
or a session that is not live.
"""

from __future__ import annotations

import asyncio
import io
import itertools
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from _cli import lapse

from lapse.sessions import Expiry
from lapse.sessions.stores import store_from_url
from lapse.web.resource import Resource
from lapse.web.server import Site

_prefixes = itertools.count()


@pytest.fixture(params=["sqlite", "redis", "redis-cluster", "postgres"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The URL of a fresh, empty shared store of each kind (the file exists);
    on a Redis Cluster, sessions are spread over 12 shards on 3 primaries; on
    PostgreSQL, a schema of its own (its tables made)."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'sessions.db'}"
        seed(url, [])
        return url
    prefix = f"clisessions{os.getpid()}x{next(_prefixes)}"
    if request.param == "postgres":
        url = f"{request.getfixturevalue('postgres_server').url()}?schema={prefix}"
        seed(url, [])
        return url
    if request.param == "redis-cluster":
        return str(request.getfixturevalue("redis_cluster").url(prefix=prefix))
    server = request.getfixturevalue("redis_server")
    return f"{server.url}?prefix={prefix}"


def seed(url: str, sessions: list[tuple[str, float, dict[str, Any]]]) -> None:
    """Create ``(uid, timeout, data)`` sessions in the store at ``url``."""

    async def run() -> None:
        store = store_from_url(url)
        await store.open()
        try:
            await asyncio.gather(*(store.create(uid, t, data) for uid, t, data in sessions))
        finally:
            await store.aclose()

    asyncio.run(run())


def live_count(url: str) -> int:
    async def run() -> int:
        store = store_from_url(url)
        try:
            return await store.count()
        finally:
            await store.aclose()

    return asyncio.run(run())


UIDS = [f"{'abcdefgh'[i % 8]}{i:03d}" + "x" * 20 for i in range(5)]


def test_list_shows_short_uids_times_and_the_live_count(
    store_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """list prints a header, one line per session (uid shortened, age, idle,
    time left) and 'N of M live sessions'; --full prints whole uids."""
    seed(store_url, [(uid, 600 + 60 * i, {"i": i}) for i, uid in enumerate(UIDS)])
    status, out, err = lapse(capsys, "sessions", "list", "--store", store_url)
    assert (status, err) == (0, "")
    lines = out.splitlines()
    assert lines[0].split() == ["UID", "AGE", "IDLE", "LEFT", "USER"]
    # latest deadline first: the longest timeout
    assert lines[1].startswith(UIDS[4][:8] + "\u2026")
    assert "13m" in lines[1] or "14m" in lines[1]
    assert all(uid not in out for uid in UIDS)
    assert lines[-1].startswith("5 of 5 live sessions in ")
    status, out, _ = lapse(
        capsys, "sessions", "list", "--full", "--limit", "2", "--store", store_url
    )
    assert status == 0
    assert UIDS[4] in out and UIDS[3] in out and UIDS[0] not in out
    assert "2 of 5 live sessions" in out and "--limit N for more" in out


def test_list_json_is_one_document_json_load_reads(
    store_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """list --json prints one JSON document (json.load reads it): the store,
    the live count and a list with one object per session: uid, times, data."""
    seed(store_url, [(uid, 600, {"i": i}) for i, uid in enumerate(UIDS)])
    status, out, _ = lapse(
        capsys, "sessions", "list", "--json", "--limit", "3", "--store", store_url
    )
    assert status == 0
    listing = json.load(io.StringIO(out))
    assert listing["live"] == 5 and len(listing["sessions"]) == 3
    assert listing["store"] == store_from_url(store_url).url
    status, out, _ = lapse(capsys, "sessions", "list", "--json", "--store", store_url)
    assert status == 0
    rows = json.loads(out)["sessions"]
    assert sorted(row["uid"] for row in rows) == sorted(UIDS)
    for row in rows:
        assert row["data"] == {"i": UIDS.index(row["uid"])}
        assert 590 < row["left"] <= 600
        assert row["created"] <= row["last_access"] < row["deadline"]


def test_show_prints_everything_including_data(
    store_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """show UID prints uid, creation, last access, end and each data key; --json too."""
    seed(store_url, [(UIDS[0], 900, {"user": "ann", "cart": [1, 2]})])
    status, out, _ = lapse(capsys, "sessions", "show", UIDS[0], "--store", store_url)
    assert status == 0
    assert f"uid:         {UIDS[0]}" in out
    assert "created:" in out and "last access:" in out and "ends:" in out
    assert 'user: "ann"' in out and "cart: [1, 2]" in out
    status, out, _ = lapse(capsys, "sessions", "show", UIDS[0], "--json", "--store", store_url)
    assert status == 0
    assert json.loads(out)["data"] == {"user": "ann", "cart": [1, 2]}


def test_show_of_a_session_that_is_not_live_exits_1(
    store_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    status, out, err = lapse(capsys, "sessions", "show", "nope", "--store", store_url)
    assert status == 1 and out == ""
    assert err.startswith("lapse: error: no live session 'nope'") and err.count("\n") == 1


def test_show_and_expire_take_the_shortened_uid_list_shows(
    store_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """The shortened uid 'list' prints (with or without its ellipsis), or any
    start of at least 6 characters that names one live session, works for
    show and expire; a start shared by several sessions is refused, saying
    how many, and ends nothing; a start too short or matching nothing says
    to give the whole uid ('list --full')."""
    twins = ["sharedPRE" + "1" * 15, "sharedPRE" + "2" * 15]
    seed(store_url, [(uid, 600, {"i": i}) for i, uid in enumerate(UIDS + twins)])
    status, out, _ = lapse(capsys, "sessions", "list", "--store", store_url)
    shown = next(line.split()[0] for line in out.splitlines() if line.startswith(UIDS[2][:8]))
    assert shown == UIDS[2][:8] + "\u2026"
    status, out, err = lapse(capsys, "sessions", "show", shown, "--store", store_url)
    assert (status, err) == (0, "") and f"uid:         {UIDS[2]}" in out
    status, out, err = lapse(capsys, "sessions", "show", UIDS[3][:6], "--store", store_url)
    assert (status, err) == (0, "") and f"uid:         {UIDS[3]}" in out
    status, out, err = lapse(capsys, "sessions", "expire", shown, "--store", store_url)
    assert (status, err, out) == (0, "", f"expired {shown}\n")
    assert live_count(store_url) == len(UIDS) + 1
    status, out, err = lapse(
        capsys, "sessions", "expire", "sharedPRE", UIDS[4], "--store", store_url
    )
    assert status == 1 and out == f"expired {UIDS[4]}\n"
    assert "'sharedPRE' is the start of 2 live sessions' uids" in err and err.count("\n") == 1
    assert live_count(store_url) == len(UIDS)
    for given in ("a000", "zzzzzzzz\u2026"):
        status, out, err = lapse(capsys, "sessions", "show", given, "--store", store_url)
        assert status == 1 and out == "" and err.count("\n") == 1
        assert f"no live session {given!r}" in err and "'list --full'" in err


def test_expire_ends_the_named_sessions_and_exits_1_for_unknown_ones(
    store_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """expire UID... ends each; a uid that is not live is reported, exit 1."""
    seed(store_url, [(uid, 600, {}) for uid in UIDS])
    status, out, err = lapse(capsys, "sessions", "expire", UIDS[0], UIDS[1], "--store", store_url)
    assert (status, err) == (0, "")
    assert out.splitlines() == [f"expired {UIDS[0]}", f"expired {UIDS[1]}"]
    assert live_count(store_url) == 3
    status, out, err = lapse(capsys, "sessions", "expire", UIDS[0], UIDS[2], "--store", store_url)
    assert status == 1
    assert out == f"expired {UIDS[2]}\n"
    assert err.startswith(f"lapse: no live session {UIDS[0]!r} in ") and err.count("\n") == 1


def test_expire_all_in_batches_shows_progress_on_stderr(
    store_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """expire --all --yes ends a few hundred sessions in batches (scan +
    concurrent expires), redrawing 'done/total (percent), rate' with \\r."""
    seed(store_url, [(f"bulk{i:04d}" + "y" * 20, 300 + i, {"i": i}) for i in range(350)])
    status, out, err = lapse(
        capsys, "sessions", "expire", "--all", "--yes", "--batch", "40", "--store", store_url
    )
    assert status == 0
    assert out.startswith("expired 350 sessions in ")
    frames = err.split("\r")
    assert frames[0] == "" and len(frames) >= 10  # 0/350, then one per batch of 40
    assert frames[1].startswith("expired 0/350 (0%)")
    assert frames[2].startswith("expired 40/350 (11%), ")
    assert frames[-1].startswith("expired 350/350 (100%), ") and frames[-1].endswith("/s\n")
    assert live_count(store_url) == 0


def test_expire_all_asks_first(
    store_url: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without --yes, expire --all asks; anything but y expires nothing (exit 1)."""
    seed(store_url, [(uid, 600, {}) for uid in UIDS])
    monkeypatch.setattr(sys, "stdin", io.StringIO("n\n"))
    status, out, err = lapse(capsys, "sessions", "expire", "--all", "--store", store_url)
    assert status == 1 and out == ""
    assert "End all 5 live sessions in " in err and err.endswith("lapse: nothing expired\n")
    assert live_count(store_url) == 5
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))  # no terminal: no
    assert lapse(capsys, "sessions", "expire", "--all", "--store", store_url)[0] == 1
    monkeypatch.setattr(sys, "stdin", io.StringIO("y\n"))
    status, out, _ = lapse(capsys, "sessions", "expire", "--all", "--store", store_url)
    assert status == 0 and out.startswith("expired 5 sessions")
    assert live_count(store_url) == 0


def test_stats_shows_the_live_count_and_a_histogram(
    store_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """stats prints the store URL, the live count and the upcoming expiries per
    slice; --json gives the same numbers."""
    seed(store_url, [(f"s{i}", timeout, {}) for i, timeout in enumerate([50, 150, 250, 7200])])
    status, out, _ = lapse(capsys, "sessions", "stats", "--store", store_url)
    assert status == 0
    assert "live sessions: 4" in out
    assert "ending in the next 1h00m (5m00s slices):" in out
    first = next(line for line in out.splitlines() if line.strip().startswith("0s -"))
    assert first.split()[3:] == ["3", "#" * 40]
    assert "later: 1" in out
    status, out, _ = lapse(
        capsys,
        "sessions",
        "stats",
        "--json",
        "--horizon",
        "300",
        "--buckets",
        "3",
        "--store",
        store_url,
    )
    report = json.loads(out)
    assert (report["live"], report["ending"], report["bucket_seconds"]) == (4, [1, 1, 1], 100)


def test_stats_redacts_the_password_of_the_store_url(capsys: pytest.CaptureFixture[str]) -> None:
    """A Redis password never appears in the output, not even in an error."""
    url = "redis://:hunter2@127.0.0.1:1/0"
    status, out, err = lapse(capsys, "sessions", "stats", "--store", url)
    assert status == 1 and out == ""
    assert "hunter2" not in err
    assert err.startswith("lapse: error: cannot reach the session store: ") and err.count("\n") == 1


def test_store_comes_from_the_environment(
    store_url: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    seed(store_url, [(UIDS[0], 600, {})])
    monkeypatch.setenv("LAPSE_SESSION_STORE", store_url)
    status, out, _ = lapse(capsys, "sessions", "list")
    assert status == 0 and "1 of 1 live sessions" in out


@pytest.mark.parametrize(
    ("argv", "env", "message"),
    [
        (["list", "--store", "memory:"], None, "inside the server process"),
        (["stats"], "memory:", "a shared store"),
        (["list", "--store", "mysql://x"], None, "--store mysql://x: unknown session store URL"),
        (["list"], "sqlite://nohost", "LAPSE_SESSION_STORE=sqlite://nohost: bad SQLite store"),
        (["list"], None, "no session store: give --store URL or set LAPSE_SESSION_STORE"),
        (["expire", "--store", "sqlite:///x.db"], None, "expire takes session uids, --all or"),
        (["expire", "a", "--all", "--store", "sqlite:///x.db"], None, "(one of them)"),
    ],
)
def test_bad_usage_exits_2_with_one_line(
    argv: list[str],
    env: str | None,
    message: str,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A bad store URL, the memory store (which lives in the server: use a
    shared store or the live view) or bad arguments: exit 2, one line."""
    monkeypatch.delenv("LAPSE_SESSION_STORE", raising=False)
    if env is not None:
        monkeypatch.setenv("LAPSE_SESSION_STORE", env)
    status, out, err = lapse(capsys, "sessions", *argv)
    assert status == 2 and out == ""
    assert err.startswith("lapse: error: ") and message in err and err.count("\n") == 1
    assert "Traceback" not in err
    if "memory" in argv or env == "memory:":
        assert "live view" in err


@pytest.mark.parametrize(
    "url",
    [
        "sqlite:///" + "a" * 5000,
        "sqlite:///" + "d/" * 2100 + "x.db",
        "sqlite:///x\x01.db",
        "redis://:secret@host:6379/0\n",
    ],
    ids=["long-name", "long-path", "control-char", "line-break"],
)
def test_unusable_store_url_exits_2_with_one_short_line(
    url: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A store URL no store can have (a path too long for a file, a control
    character): exit 2 and one line, the URL cut short and escaped, never a
    traceback; from --store and from LAPSE_SESSION_STORE alike."""
    status, out, err = lapse(capsys, "sessions", "list", "--store", url)
    assert status == 2 and out == ""
    assert err.startswith("lapse: error: --store ") and err.count("\n") == 1, err
    assert len(err) < 400 and "Traceback" not in err and "secret\n" not in err
    monkeypatch.setenv("LAPSE_SESSION_STORE", url)
    status, out, err = lapse(capsys, "sessions", "stats")
    assert status == 2 and err.startswith("lapse: error: LAPSE_SESSION_STORE=")
    assert err.count("\n") == 1 and len(err) < 400


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["stats", "--buckets", "1001"], "--buckets: 1001: at most 1000"),
        (["stats", "--buckets", "100000000000"], "at most 1000"),
        (["stats", "--horizon", "315360001"], "--horizon: 315360001: at most 315360000"),
        (["stats", "--horizon", "1" + "0" * 400], "(401 characters): at most"),
        (["stats", "--horizon", "9" * 5000], "(5000 characters)' is not a whole number"),
        (["expire", "--all", "--batch", "100001"], "--batch: 100001: at most 100000"),
    ],
)
def test_histogram_and_batch_sizes_have_upper_bounds(
    argv: list[str], message: str, store_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """--buckets (at most 1000 lines), --horizon (at most ten years) and
    --batch have upper bounds: exit 2 with argparse's message, no traceback,
    no 5000-digit echo; the bounds themselves are accepted."""
    status, out, err = lapse(capsys, "sessions", *argv, "--store", store_url)
    assert status == 2 and out == "" and message in err and "Traceback" not in err
    assert len(err) < 600
    status, out, _ = lapse(
        capsys,
        "sessions",
        "stats",
        "--buckets",
        "1000",
        "--horizon",
        "315360000",
        "--store",
        store_url,
    )
    assert status == 0 and out.count("\n") == 1000 + 4


def test_unreachable_stores_exit_1_with_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A Redis nobody listens on, or an SQLite file that does not exist (not
    created by the command), is exit 1 with one line."""
    missing = tmp_path / "missing.db"
    status, _, err = lapse(capsys, "sessions", "list", "--store", f"sqlite:///{missing}")
    assert status == 1 and "no such file" in err and err.count("\n") == 1
    assert not missing.exists()
    status, _, err = lapse(capsys, "sessions", "list", "--store", "redis://127.0.0.1:1/0")
    assert status == 1 and err.count("\n") == 1
    assert "cannot reach the session store" in err and "127.0.0.1:1" in err


class Page(Resource):
    isLeaf = True

    def render_GET(self, request: Any) -> str:
        return request.getSession().uid  # type: ignore[no-any-return]


def test_expired_sessions_reach_the_servers_hook(
    store_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Sessions ended by 'lapse sessions expire' (one, then --all) are handed to
    the durable expiry hook of a server on the same store, cause "expired",
    with their data."""
    hooked: list[Expiry] = []
    sessions = [(f"hook{i:03d}" + "z" * 20, 600, {"i": i}) for i in range(60)]
    seed(store_url, sessions)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    env.pop("LAPSE_SESSION_STORE", None)

    async def lapse_process(*argv: str) -> str:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "lapse",
            "sessions",
            *argv,
            "--store",
            store_url,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
        )
        out, err = await proc.communicate()
        assert proc.returncode == 0, err
        return out.decode()

    async def scenario() -> None:
        site = Site(Page(), store=store_url, on_expire=hooked.append)
        site._keeper.poll_interval = 0.05
        site._keeper.start()
        try:
            await lapse_process("expire", sessions[0][0])
            await lapse_process("expire", "--all", "--yes", "--batch", "7")
            for _ in range(200):
                if len(hooked) >= 60:
                    break
                await asyncio.sleep(0.05)
        finally:
            await site._keeper.aclose()

    asyncio.run(scenario())
    assert sorted((e.uid, e.cause, dict(e.data)) for e in hooked) == sorted(
        (uid, "expired", data) for uid, _, data in sessions
    )


@pytest.mark.slow
def test_output_cut_by_its_reader_ends_quietly_with_status_141(
    store_url: str, tmp_path: Path
) -> None:
    """'lapse sessions show UID | head -c 100': when the reader closes the pipe
    early, the command ends with status 141 (128 + SIGPIPE, as a shell
    reports for git or cat there) and prints no traceback, for a command
    that writes its output in one piece (show) and line by line (list)."""
    big = {f"key{i:04d}": "v" * 200 for i in range(2000)}  # ~0.5 MB: past any pipe buffer
    many = [(f"pipe{i:04d}" + "p" * 20, 600, {}) for i in range(3000)]
    seed(store_url, [("bigdata" + "b" * 20, 600, big), *many])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    env.pop("LAPSE_SESSION_STORE", None)
    for argv in (
        ["show", "bigdata" + "b" * 20],
        ["list", "--full", "--limit", "3001"],
        ["list", "--json", "--limit", "3001"],
    ):
        with subprocess.Popen(  # closes the pipes (and waits) on the way out
            [sys.executable, "-m", "lapse", "sessions", *argv, "--store", store_url],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            env=env,
        ) as proc:
            assert proc.stdout is not None and proc.stderr is not None
            assert proc.stdout.read(100)  # head -c 100
            proc.stdout.close()
            err = proc.stderr.read().decode()
            assert proc.wait(timeout=30) == 141, (argv, err)
            assert err == "", (argv, err)


class Stubborn:
    """A store's source whose ``expire`` cannot end one session (as a server
    worker that cannot read a row id another worker gave out)."""

    def __init__(self, inner: Any, keep: str) -> None:
        self.inner = inner
        self.keep = keep
        self.kind, self.url, self.where, self.row_ids = "store", inner.url, inner.where, False

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def expire(self, names: list[str]) -> list[bool]:
        ended = await self.inner.expire([n for n in names if n != self.keep])
        return ended + [False] * (len(names) - len(ended))


def test_expire_all_exits_1_naming_how_many_are_left(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``expire --all --yes`` whose source leaves a session live (every pass
    finds it, none ends it) says how many are left and exits 1, after
    ending the others; it does not report success."""
    import argparse

    from lapse.cli.sessions import EXPIRE_PASSES, _expire_all
    from lapse.cli.sources import StoreSource, open_store

    url = f"sqlite:///{tmp_path / 'sessions.db'}"
    seed(url, [(uid, 600, {}) for uid in UIDS])

    async def run() -> int:
        source = StoreSource(open_store(url))
        try:
            args = argparse.Namespace(yes=True, batch=2)
            return await _expire_all(Stubborn(source, UIDS[1]), args)
        finally:
            await source.aclose()

    assert asyncio.run(run()) == 1
    out, err = capsys.readouterr()
    assert out == f"expired {len(UIDS) - 1} sessions in {url}\n"
    assert f"lapse: error: 1 sessions are still live in {url} after {EXPIRE_PASSES} passes" in err
    assert live_count(url) == 1
