"""``lapse sessions list|expire --user NAME --server URL``: a principal's
sessions in a running server's memory store, through its live view.

The server is ``python -m lapse.web.liveview --demo`` with its sessions
bound to principals in turn (``--principal``); it prints ``CALLBACK <uid>``
and ``HOOK <uid> <cause>`` as a session's callback and durable hook run.
The command runs in-process through ``main()``.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from _cli import lapse
from _principal_views import INJECTION
from _servers import ServerProcess, free_port, wait_for_port, write_script

TOKEN = "cli-server-test-token-0123456789"
PRINCIPALS = ["ann", "bob", INJECTION]
SESSIONS = 7
"""Bound in turn: ann has 3 sessions, bob 2, INJECTION 2."""


@pytest.fixture
def server(tmp_path: Path) -> Iterator[tuple[ServerProcess, str]]:
    """A demo server with SESSIONS memory sessions bound to PRINCIPALS in
    turn, and its live view's URL."""
    port = free_port()
    script = write_script(
        tmp_path, "liveview_demo.py", "from lapse.web.liveview import main\nmain()\n"
    )
    args = ["--demo", "--port", str(port), "--sessions", str(SESSIONS), "--token", TOKEN]
    for name in PRINCIPALS:
        args += ["--principal", name]
    process = ServerProcess(script, args=args).start()
    try:
        wait_for_port(port, timeout=20, proc=process.proc)
        process.wait_for_match(r"LIVEVIEW .*", timeout=20)
        yield process, f"http://127.0.0.1:{port}/_lapse/"
    finally:
        process.stop()


@pytest.fixture(autouse=True)
def _no_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LAPSE_LIVEVIEW_TOKEN", raising=False)
    monkeypatch.delenv("LAPSE_SESSION_STORE", raising=False)


def run(capsys: pytest.CaptureFixture[str], url: str, *argv: str) -> tuple[int, str, str]:
    return lapse(capsys, "sessions", *argv, "--server", url, "--token", TOKEN)


@pytest.mark.slow
def test_list_user_and_the_user_column_over_the_live_view(
    server: tuple[ServerProcess, str], capsys: pytest.CaptureFixture[str]
) -> None:
    """list --server has a USER column; list --user NAME --server only that
    principal's rows (their IDs, uids' starts) and its count; --json gives
    each row's principal, the markup one as the text it is."""
    _, url = server
    status, out, err = run(capsys, url, "list")
    assert status == 0, err
    assert out.splitlines()[0].split() == ["ID", "UID", "AGE", "IDLE", "LEFT", "USER"]
    assert (
        sorted(line.split()[-1] for line in out.splitlines()[1:-1] if "ann" in line) == ["ann"] * 3
    )
    status, out, _ = run(capsys, url, "list", "--user", "ann")
    assert status == 0
    rows = out.splitlines()[1:-1]
    assert len(rows) == 3 and all(row.endswith("  ann") for row in rows)
    assert out.splitlines()[-1] == f"3 of 3 live sessions of 'ann' at {url}"
    status, out, _ = run(capsys, url, "list", "--user", INJECTION, "--json")
    listing = json.loads(out)
    assert listing["live"] == 2 and listing["user"] == INJECTION
    assert [row["principal"] for row in listing["sessions"]] == [INJECTION] * 2
    status, out, _ = run(capsys, url, "show", listing["sessions"][0]["id"])
    assert status == 0 and f"principal:   {INJECTION}" in out


@pytest.mark.slow
def test_expire_user_over_the_live_view_runs_callbacks_and_hooks(
    server: tuple[ServerProcess, str], capsys: pytest.CaptureFixture[str]
) -> None:
    """expire --user ann --except ID --server ends ann's other sessions in the
    server, which runs each one's callback and its durable hook (cause
    "expired"); the kept one and bob's stay; a second run ends the kept one."""
    process, url = server
    _, out, _ = run(capsys, url, "list", "--user", "ann", "--json")
    ann = json.loads(out)["sessions"]
    kept = ann[0]
    status, out, err = run(capsys, url, "expire", "--user", "ann", "--except", kept["id"])
    assert (status, err) == (0, "")
    ended = sorted(str(row["uid"]) for row in ann[1:])
    assert sorted(out.splitlines()[:-1]) == [f"expired {uid}" for uid in ended]
    assert out.splitlines()[-1] == f"expired 2 sessions of 'ann' at {url}"
    _, out, _ = run(capsys, url, "list", "--user", "ann", "--json")
    assert [row["id"] for row in json.loads(out)["sessions"]] == [kept["id"]]
    status, out, _ = run(capsys, url, "expire", "--user", "ann")
    assert status == 0 and out.splitlines() == [
        f"expired {kept['uid']}",
        f"expired 1 sessions of 'ann' at {url}",
    ]
    _, out, _ = run(capsys, url, "list", "--user", "bob", "--json")
    assert json.loads(out)["live"] == 2
    status, out, err = run(capsys, url, "expire", "--user", "bob", "--except", "r" + "0" * 54)
    assert status == 1 and out == "" and "except: id is not a row id" in err
    _, out, _ = run(capsys, url, "list", "--user", "bob", "--json")
    assert json.loads(out)["live"] == 2
    # Each of the three ended sessions: its callback and its hook, in the server.
    said = [process.wait_for_match(r"(?:CALLBACK|HOOK) .*").group(0) for _ in range(6)]
    uids = [*ended, kept["uid"]]
    assert sorted(said) == sorted(
        [f"CALLBACK {uid}" for uid in uids] + [f"HOOK {uid} expired" for uid in uids]
    )


LOGIN_APP = '''
import sys

sys.path.insert(0, {tests!r})
from _no_index_store import NoIndexStore

from lapse.web.resource import Resource
from lapse.web.server import Site


class Login(Resource):
    """GET /?user=NAME: the session, bound to NAME (on a store that can)."""

    isLeaf = True

    async def render_GET(self, request):
        session = request.getSession()
        if b"user" in request.args:
            await session.set_principal(request.args[b"user"][0].decode())
        return session.uid


site = Site(Login())
no_index_site = Site(Login(), store=NoIndexStore())
'''


@pytest.mark.slow
def test_expire_user_through_lapse_serve_without_a_token(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Against 'lapse serve --live-view' without a token (loopback only),
    expire --user works (the command gets the CSRF pair from the page, as a
    browser does) while a POST to api/expire-user without it (a cross-site
    form) is refused with 403 and ends nothing. A server whose store keeps no
    index of principals: list --user is exit 1, one line saying so."""
    from _cli import lapse_serving
    from _servers import request

    tests = str(Path(__file__).resolve().parent)
    (tmp_path / "loginapp.py").write_text(LOGIN_APP.format(tests=tests), encoding="utf-8")
    port = free_port()
    args = ["loginapp:site", "--port", str(port), "--app-dir", str(tmp_path)]
    with lapse_serving([*args, "--live-view", "_lapse"], port, tmp_path):
        for user in ("ann", "ann", "bob"):
            assert request(port, f"/?user={user}").status == 200
        url = f"http://127.0.0.1:{port}/_lapse/"
        forged = request(
            port,
            "/_lapse/api/expire-user",
            method="POST",
            body=json.dumps({"user": "ann"}).encode(),
            headers={"Content-Type": "application/json"},
        )
        assert forged.status == 403
        status, out, err = lapse(capsys, "sessions", "list", "--user", "ann", "--server", url)
        assert status == 0 and "2 of 2 live sessions of 'ann'" in out, err
        status, out, err = lapse(capsys, "sessions", "expire", "--user", "ann", "--server", url)
        assert (status, err) == (0, "") and out.endswith(f"expired 2 sessions of 'ann' at {url}\n")
        status, out, _ = lapse(capsys, "sessions", "list", "--server", url)
        assert status == 0 and "1 of 1 live sessions" in out and out.splitlines()[1].endswith("bob")
    port = free_port()
    args = ["loginapp:no_index_site", "--port", str(port), "--app-dir", str(tmp_path)]
    with lapse_serving([*args, "--live-view", "_lapse"], port, tmp_path):
        url = f"http://127.0.0.1:{port}/_lapse/"
        for argv in (["list", "--user", "ann"], ["expire", "--user", "ann"]):
            status, out, err = lapse(capsys, "sessions", *argv, "--server", url)
            assert status == 1 and out == "" and err.count("\n") == 1
            assert "cannot list or end sessions by user" in err and "no index" in err
