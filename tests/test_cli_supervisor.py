"""``lapse serve --workers N``: the supervisor, run as real processes.

The supervisor binds the listening socket once and hands it to its workers;
a worker that dies is restarted (``--fail-fast``: everything stops, see
tests/test_cli.py); a worker that cannot start is not tried again; the
workers share one live view secret. Each test serves ``cliapp.py`` of
tests/test_cli.py on a SQLite store, on a free loopback port.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import sys
import time
from pathlib import Path

import pytest
from _cli import APP, lapse_serving, pid_alive, run_lapse, session_uid, visit, worker_pids
from _servers import Lapse, free_port, request, wait_for_stderr

from lapse.cli import main
from lapse.cli.supervisor import BACKOFF_FIRST, BACKOFF_MAX, BACKOFF_RESET, backoff
from lapse.sessions.stores import store_from_url

pytestmark = [
    pytest.mark.skipif(
        not sys.platform.startswith("linux"), reason="reads the workers' state in /proc"
    ),
    pytest.mark.slow,  # real processes and real timeouts
]

REFUSE = """
import time
from pathlib import Path

if (Path(__file__).parent / "refuse").exists():
    raise RuntimeError("the refuse file says no")
while (Path(__file__).parent / "slow").exists():
    time.sleep(0.05)

from cliapp import site
"""


@pytest.fixture
def app_dir(tmp_path: Path) -> Path:
    """``cliapp.py`` (tests/test_cli.py's APP) and ``refusing.py``, which
    fails to import once a file ``refuse`` exists next to it, and waits in
    its import while a file ``slow`` does."""
    directory = tmp_path / "app"
    directory.mkdir()
    (directory / "cliapp.py").write_text(APP, encoding="utf-8")
    (directory / "refusing.py").write_text(REFUSE, encoding="utf-8")
    return directory


def serve_args(app_dir: Path, port: int, target: str = "cliapp:site") -> list[str]:
    args = [target, "--port", str(port), "--app-dir", str(app_dir), "--workers", "2"]
    return [*args, "--store", f"sqlite:///{app_dir / 'shared.db'}"]


def children(pid: int) -> set[int]:
    """The live (not zombie) processes whose parent is ``pid``."""
    found = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat.rpartition(")")[2].split()
        if fields[0] != "Z" and int(fields[1]) == pid:
            found.add(int(entry.name))
    return found


def wait_until(condition: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


def test_backoff_doubles_to_a_cap_and_resets_after_a_long_run() -> None:
    """The wait before a restart: the first, then doubling while the worker
    keeps dying young, never above the cap; back to the first once a
    worker has served a while."""
    waits = [backoff(None, 0.0)]
    for _ in range(10):
        waits.append(backoff(waits[-1], 1.0))
    assert waits[:4] == [BACKOFF_FIRST, 2 * BACKOFF_FIRST, 4 * BACKOFF_FIRST, 8 * BACKOFF_FIRST]
    assert max(waits) == BACKOFF_MAX == waits[-1]
    assert backoff(BACKOFF_MAX, BACKOFF_RESET) == BACKOFF_FIRST


def test_a_killed_worker_is_replaced_and_the_server_keeps_answering(app_dir: Path) -> None:
    """A worker killed with SIGKILL: the supervisor says so in one line and
    starts another after the first back-off; meanwhile and after, every
    request is answered, in the same session."""
    port = free_port()
    with lapse_serving(serve_args(app_dir, port), port, app_dir) as server:
        doomed, other = worker_pids(server)
        uid = session_uid(request(port, "/"))
        os.kill(doomed, signal.SIGKILL)
        visits = 1
        deadline = time.monotonic() + 10
        # (The killed worker may still be listed for a moment after the kill.)
        while not children(server.pid) - {other, doomed} and time.monotonic() < deadline:
            visits += 1
            assert visit(port, uid)["visits"] == str(visits)  # the other worker answers
        (replacement,) = children(server.pid) - {other, doomed}
        assert pid_alive(other)
        lines = [line for line in server.stderr_text().splitlines() if f" {doomed} " in line]
        assert lines == [
            f"lapse: worker {doomed} exited with signal SIGKILL; "
            f"restarting it in {BACKOFF_FIRST:g} s"
        ]
        answered: set[str] = set()
        deadline = time.monotonic() + 10  # the replacement imports the app first
        while time.monotonic() < deadline:
            visits += 1
            fields = visit(port, uid)
            assert fields["visits"] == str(visits)
            answered.add(fields["pid"])
            if str(replacement) in answered:
                break
        assert str(replacement) in answered, answered
        assert server.proc is not None and server.proc.poll() is None
        assert "Traceback" not in server.stderr_text()


def test_the_workers_serve_the_one_socket_the_supervisor_bound(app_dir: Path) -> None:
    """Each worker's --listen-fd is the supervisor's own listening socket (the
    same socket inode, inherited, not a socket of its own bound with
    SO_REUSEPORT), and the port is really taken: another ``lapse serve`` on
    it exits 1, "in use"."""
    port = free_port()
    with lapse_serving(serve_args(app_dir, port), port, app_dir) as server:
        for pid in worker_pids(server):
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            fd = argv[argv.index(b"--listen-fd") + 1].decode()
            own = os.readlink(f"/proc/{pid}/fd/{fd}")
            assert own.startswith("socket:[")
            assert own == os.readlink(f"/proc/{server.pid}/fd/{fd}")
        alone = ["serve", "cliapp:site", "--port", str(port), "--app-dir", str(app_dir)]
        second = run_lapse(alone, app_dir)
        assert second.returncode == 1, second.stderr
        assert "in use" in second.stderr and second.stderr.count("\n") == 1


def test_workers_on_port_0_serve_the_free_port_the_supervisor_picked(app_dir: Path) -> None:
    """``--workers 2 --port 0``: the supervisor binds a free port once, says
    which, and the workers serve it (before, each bound the port itself, so
    it had to be given)."""
    args = ["serve", *serve_args(app_dir, 0)]
    server = Lapse(Path("lapse"), args=args, cwd=app_dir, stderr_path=app_dir / "lapse.err")
    server.start()
    try:
        found = wait_for_stderr(server, r"on http://127\.0\.0\.1:(\d+) with 2 workers", 20)
        port = int(found.group(1))
        assert port != 0
        pids = {str(pid) for pid in worker_pids(server)}
        uid = session_uid(request(port, "/"))
        for visits in range(2, 6):
            fields = visit(port, uid)
            assert fields["visits"] == str(visits) and fields["pid"] in pids
    finally:
        server.stop(timeout=20)


def test_the_workers_share_one_live_view_secret(
    app_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The supervisor gives every worker the same LAPSE_LIVEVIEW_SECRET: one it
    makes (hex, 32 bytes), or the one in its environment."""
    port = free_port()
    secrets: list[set[str]] = []
    for given in (None, "ab" * 40):
        if given is None:
            monkeypatch.delenv("LAPSE_LIVEVIEW_SECRET", raising=False)
        else:
            monkeypatch.setenv("LAPSE_LIVEVIEW_SECRET", given)
        with lapse_serving(serve_args(app_dir, port), port, app_dir) as server:
            found = set()
            for pid in worker_pids(server):
                environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
                (value,) = [v for v in environ if v.startswith(b"LAPSE_LIVEVIEW_SECRET=")]
                found.add(value.partition(b"=")[2].decode())
            secrets.append(found)
    assert all(len(found) == 1 for found in secrets)
    made, given = (found.pop() for found in secrets)
    assert re.fullmatch("[0-9a-f]{64}", made)
    assert given == "ab" * 40


def test_a_bad_live_view_secret_is_refused_before_any_worker(
    app_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A LAPSE_LIVEVIEW_SECRET that is no 32-byte hex: exit 2, one line naming
    the variable (not the value), and no worker started (nothing imported)."""
    monkeypatch.setenv("LAPSE_LIVEVIEW_SECRET", "not-hex-hunter2")
    monkeypatch.setenv("CLIAPP_IMPORTED", str(app_dir / "imported"))
    result = run_lapse(["serve", *serve_args(app_dir, free_port())], app_dir)
    assert result.returncode == 2
    (line,) = result.stderr.splitlines()
    assert line.startswith("lapse: error: LAPSE_LIVEVIEW_SECRET ") and "hunter2" not in line
    assert not (app_dir / "imported").exists()


def test_a_worker_that_cannot_start_again_stops_the_supervisor(app_dir: Path) -> None:
    """A worker that dies, and whose replacement fails at start-up (its module
    no longer imports), is not restarted in a loop: the supervisor stops the
    other worker and exits with the replacement's status, its error said once."""
    port = free_port()
    with lapse_serving(serve_args(app_dir, port, "refusing:site"), port, app_dir) as server:
        doomed, other = worker_pids(server)
        (app_dir / "refuse").write_text("")
        os.kill(doomed, signal.SIGKILL)
        assert server.wait(10) == 2, server.stderr_text()
        err = server.stderr_text()
        assert err.count("the refuse file says no") == 1, err
        assert not pid_alive(other)
        assert "Traceback" not in err


# -- the live view across workers (the check) ---------------------------


def test_live_view_across_two_workers_shows_and_expires_every_session(
    app_dir: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """``lapse serve --workers 2 --live-view`` on SQLite with 200 sessions
    made through the app: ``show ID --server`` succeeds 10 times out of 10,
    whichever worker answers, and ``expire --all --yes --server`` exits 0
    leaving no live session in the store."""
    monkeypatch.delenv("LAPSE_LIVEVIEW_TOKEN", raising=False)
    monkeypatch.delenv("LAPSE_SESSION_STORE", raising=False)
    port = free_port()
    store_url = f"sqlite:///{app_dir / 'shared.db'}"
    args = [*serve_args(app_dir, port), "--live-view", "_lapse"]
    with lapse_serving(args, port, app_dir):
        for _ in range(200):
            assert request(port, "/").status == 200
        url = f"http://127.0.0.1:{port}/_lapse/"
        assert main(["sessions", "list", "--json", "--limit", "5", "--server", url]) == 0
        listing = json.loads(capsys.readouterr().out)
        assert listing["live"] == 200
        handle = listing["sessions"][3]["id"]
        for _ in range(10):
            assert main(["sessions", "show", handle, "--server", url]) == 0
            assert f"id:          {handle}" in capsys.readouterr().out
        status = main(["sessions", "expire", "--all", "--yes", "--server", url])
        out, err = capsys.readouterr()
        assert status == 0, err
        assert out.startswith("expired 200 sessions")
    assert asyncio.run(_live_count(store_url)) == 0


async def _live_count(url: str) -> int:
    store = store_from_url(url)
    try:
        return int(await store.count())
    finally:
        await store.aclose()


def test_a_replacement_killed_while_it_starts_is_restarted_again(app_dir: Path) -> None:
    """A replacement killed by a signal before it serves (still importing the
    app) did not fail at start-up: it is restarted too, after a doubled
    wait, and the server goes on with two workers."""
    port = free_port()
    with lapse_serving(serve_args(app_dir, port, "refusing:site"), port, app_dir) as server:
        doomed, other = worker_pids(server)
        (app_dir / "slow").write_text("")
        os.kill(doomed, signal.SIGKILL)
        # (The killed worker may still be listed for a moment after the kill.)
        wait_until(lambda: children(server.pid) - {other, doomed}, 10, "no replacement started")
        (starting,) = children(server.pid) - {other, doomed}
        os.kill(starting, signal.SIGKILL)
        (app_dir / "slow").unlink()
        wait_until(
            lambda: children(server.pid) - {other, doomed, starting}, 10, "no second replacement"
        )
        assert server.proc is not None and server.proc.poll() is None
        err = server.stderr_text()
        assert (
            f"worker {starting} exited with signal SIGKILL; restarting it in "
            f"{2 * BACKOFF_FIRST:g} s" in err
        ), err
        uid = session_uid(request(port, "/"))
        assert visit(port, uid)["visits"] == "2"
