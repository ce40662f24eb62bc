"""``lapse sessions list|show|expire|stats --server URL``: the sessions of a
running server's memory store, through its live view's JSON API.

The server is ``python -m lapse.web.liveview --demo`` (a memory store, a
token) on a free loopback port, in a subprocess; it prints ``CALLBACK
<uid>`` when a session's ``notifyOnExpire`` callback runs and ``HOOK <uid>
<cause>`` when the durable hook does. The command runs in-process through
``main()``; its own messages are one line each on stderr, prefixed
``lapse:``; exit 2 for a bad command line, 1 for a server that cannot be
reached, refuses (403) or has no live view (404).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from _cli import lapse
from _servers import ServerProcess, free_port, request, wait_for_port, write_script

TOKEN = "cli-server-test-token-0123456789"
SESSIONS = 7


@pytest.fixture
def server(tmp_path: Path) -> Iterator[tuple[ServerProcess, str]]:
    """A demo server with SESSIONS memory sessions and its live view's URL."""
    port = free_port()
    script = write_script(
        tmp_path, "liveview_demo.py", "from lapse.web.liveview import main\nmain()\n"
    )
    args = ["--demo", "--port", str(port), "--sessions", str(SESSIONS), "--token", TOKEN]
    process = ServerProcess(script, args=args).start()
    try:
        wait_for_port(port, timeout=20, proc=process.proc)
        process.wait_for_match(r"LIVEVIEW .*")
        yield process, f"http://127.0.0.1:{port}/_lapse/"
    finally:
        process.stop()


@pytest.fixture(autouse=True)
def _no_env_token(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LAPSE_LIVEVIEW_TOKEN", raising=False)
    monkeypatch.delenv("LAPSE_SESSION_STORE", raising=False)


def rows(capsys: pytest.CaptureFixture[str], url: str) -> list[dict[str, object]]:
    status, out, err = lapse(
        capsys, "sessions", "list", "--json", "--server", url, "--token", TOKEN
    )
    assert status == 0, err
    listing = json.loads(out)  # one document, not JSON Lines
    assert listing["server"] == url and listing["live"] == len(listing["sessions"])
    rows: list[dict[str, object]] = listing["sessions"]
    return rows


def test_list_shows_the_servers_memory_sessions(
    server: tuple[ServerProcess, str], capsys: pytest.CaptureFixture[str]
) -> None:
    """list --server shows every session of the server's memory store: an ID (the
    uid encrypted and authenticated, not the uid), the uid's start, age, idle
    time, time left."""
    _, url = server
    listed = rows(capsys, url)
    assert len(listed) == SESSIONS
    for row in listed:
        assert re.fullmatch(r"r[A-Za-z0-9_-]{54}", str(row["id"]))
        assert re.fullmatch(r"[A-Za-z0-9_-]{8}\u2026", str(row["uid"]))
        assert isinstance(row["left"], float) and row["left"] > 0
    status, out, _ = lapse(capsys, "sessions", "list", "--server", url, "--token", TOKEN)
    assert status == 0
    assert out.splitlines()[0].split() == ["ID", "UID", "AGE", "IDLE", "LEFT", "USER"]
    assert f"{SESSIONS} of {SESSIONS} live sessions at {url}" in out
    status, out, _ = lapse(
        capsys, "sessions", "list", "--limit", "2", "--server", url, "--token", TOKEN
    )
    assert status == 0 and f"2 of {SESSIONS} live sessions" in out and "--limit N for more" in out
    assert TOKEN not in out


def test_token_from_the_environment(
    server: tuple[ServerProcess, str],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Without --token, LAPSE_LIVEVIEW_TOKEN is sent; stats reads api/summary."""
    _, url = server
    monkeypatch.setenv("LAPSE_LIVEVIEW_TOKEN", TOKEN)
    status, out, err = lapse(capsys, "sessions", "stats", "--json", "--server", url)
    assert status == 0, err
    report = json.loads(out)
    assert report["live"] == SESSIONS and report["store"] == "memory:"
    assert sum(report["ending"]) == SESSIONS and len(report["ending"]) == 12
    assert len(report["per_minute"]["created"]) == 60
    status, out, _ = lapse(capsys, "sessions", "stats", "--server", url)
    assert status == 0 and f"live sessions: {SESSIONS}" in out and "per minute" in out
    assert TOKEN not in out


def test_show_gives_the_row_not_the_data(
    server: tuple[ServerProcess, str], capsys: pytest.CaptureFixture[str]
) -> None:
    """show ID --server prints what the live view has for the row; no data. An
    ID the view never gave out is exit 1, one line saying so (the view's 400)."""
    _, url = server
    row = rows(capsys, url)[0]
    status, out, _ = lapse(
        capsys, "sessions", "show", str(row["id"]), "--server", url, "--token", TOKEN
    )
    assert status == 0
    assert f"id:          {row['id']}" in out and str(row["uid"]) in out
    assert "not exposed by the live view" in out
    status, out, _ = lapse(
        capsys, "sessions", "show", str(row["id"]), "--json", "--server", url, "--token", TOKEN
    )
    assert status == 0 and json.loads(out)["uid"] == row["uid"]
    status, out, err = lapse(
        capsys, "sessions", "show", "f" * 32, "--server", url, "--token", TOKEN
    )
    assert status == 1 and out == "" and err.count("\n") == 1
    assert "HTTP 400: id is not a row id this live view gave out" in err


def test_expire_one_runs_its_callback_and_hook_in_the_server(
    server: tuple[ServerProcess, str], capsys: pytest.CaptureFixture[str]
) -> None:
    """expire ID --server ends the session in the server: its notifyOnExpire
    callback and the durable hook run there, and list no longer shows it; the
    same ID again is exit 1."""
    process, url = server
    row = rows(capsys, url)[0]
    argv = ("sessions", "expire", str(row["id"]), "--server", url, "--token", TOKEN)
    status, out, _ = lapse(capsys, *argv)
    assert status == 0 and out == f"expired {row['id']}\n"
    callback = process.wait_for_match(r"CALLBACK (\S+)")
    hook = process.wait_for_match(r"HOOK (\S+) (\w+)")
    assert callback.group(1) == row["uid"]
    assert hook.groups() == (row["uid"], "expired")
    remaining = rows(capsys, url)
    assert len(remaining) == SESSIONS - 1
    assert row["id"] not in [r["id"] for r in remaining]
    status, _, err = lapse(capsys, *argv)
    assert status == 1 and "no live session with ID" in err


def test_expire_all_yes_empties_the_server_with_progress(
    server: tuple[ServerProcess, str], capsys: pytest.CaptureFixture[str]
) -> None:
    """expire --all --yes --server ends every session (paging through
    api/sessions), with the store path's progress line on stderr; each one's
    callback and hook run in the server."""
    process, url = server
    argv = ("sessions", "expire", "--all", "--yes", "--batch", "3", "--server", url)
    status, out, err = lapse(capsys, *argv, "--token", TOKEN)
    assert status == 0
    assert out == f"expired {SESSIONS} sessions at {url}\n"
    assert f"expired {SESSIONS}/{SESSIONS} (100%)" in err and "\r" in err
    assert rows(capsys, url) == []
    hooks = [process.wait_for_match(r"HOOK (\S+) expired") for _ in range(SESSIONS)]
    assert len({hook.group(1) for hook in hooks}) == SESSIONS
    status, out, _ = lapse(capsys, *argv, "--token", TOKEN)
    assert status == 0 and out == f"no live sessions at {url}\n"


def test_expire_all_asks_first(
    server: tuple[ServerProcess, str],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """expire --all without --yes asks; no answer ends nothing (exit 1)."""
    _, url = server
    monkeypatch.setattr("sys.stdin", __import__("io").StringIO(""))
    status, _, err = lapse(capsys, "sessions", "expire", "--all", "--server", url, "--token", TOKEN)
    assert status == 1 and f"End all {SESSIONS} live sessions" in err and "nothing expired" in err
    assert len(rows(capsys, url)) == SESSIONS


def test_wrong_token_is_exit_1_with_403(
    server: tuple[ServerProcess, str], capsys: pytest.CaptureFixture[str]
) -> None:
    """A wrong (or missing) token: exit 1, one line saying 403; the token is never printed."""
    _, url = server
    wrong = "wrong-token-not-this-one"
    for extra in (["--token", wrong], []):
        status, out, err = lapse(capsys, "sessions", "list", "--server", url, *extra)
        assert status == 1 and out == ""
        assert err.startswith("lapse: error: ") and err.count("\n") == 1
        assert "403" in err and "--token" in err and wrong not in err


def test_no_live_view_there_is_exit_1_with_404(
    server: tuple[ServerProcess, str], capsys: pytest.CaptureFixture[str]
) -> None:
    """A URL where the server has no live view: exit 1, one line saying 404."""
    _, url = server
    elsewhere = url.replace("/_lapse/", "/nothing/")
    status, _, err = lapse(capsys, "sessions", "stats", "--server", elsewhere, "--token", TOKEN)
    assert status == 1 and "404" in err and "no live view" in err and err.count("\n") == 1


def test_unreachable_server_is_exit_1(capsys: pytest.CaptureFixture[str]) -> None:
    """Nobody listening at the URL: exit 1, one line naming it."""
    url = f"http://127.0.0.1:{free_port()}/_lapse/"
    status, out, err = lapse(capsys, "sessions", "list", "--server", url)
    assert status == 1 and out == ""
    assert err.startswith("lapse: error: cannot reach the server at " + url)
    assert err.count("\n") == 1


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ["list", "--store", "sqlite:///x.db", "--server", "http://127.0.0.1:1/_lapse/"],
            "--store and --server are mutually exclusive",
        ),
        (["list", "--server", "ftp://host/_lapse/"], "give the live view's http(s) URL"),
        (["list", "--server", "http://h:1/_lapse/?token=x"], "without a query"),
        (
            ["list", "--store", "sqlite:///x.db", "--token", "abcdefgh"],
            "--token goes with --server",
        ),
        (["list", "--full", "--server", "http://127.0.0.1:1/"], "--full goes with --store"),
        (["stats", "--horizon", "60", "--server", "http://127.0.0.1:1/"], "histogram is fixed"),
        (["list", "--store", "memory:"], "--server URL"),
    ],
)
def test_bad_usage_is_exit_2_with_one_line(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """--store with --server, a URL that is no live view base, options of the
    other path, or memory: with --store (which points to --server): exit 2."""
    status, out, err = lapse(capsys, "sessions", *argv)
    assert status == 2 and out == ""
    assert err.startswith("lapse: error: ") and message in err and err.count("\n") == 1


def test_expire_through_a_view_without_a_token_of_lapse_serve(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Against 'lapse serve --live-view' without a token (loopback only, its
    default), expire ID and expire --all --server work: the command gets the
    CSRF cookie and token from the page as a browser does. A POST without
    them (what a cross-site form sends) is still refused with 403."""
    from _cli import APP, lapse_serving

    (tmp_path / "cliapp.py").write_text(APP, encoding="utf-8")
    port = free_port()
    args = ["cliapp:site", "--port", str(port), "--app-dir", str(tmp_path), "--live-view", "_lapse"]
    with lapse_serving(args, port, tmp_path):
        for _ in range(4):
            assert request(port, "/").status == 200  # each visit: a new session
        url = f"http://127.0.0.1:{port}/_lapse/"
        listed = rows_without_token(capsys, url)
        assert len(listed) == 4
        forged = request(
            port,
            "/_lapse/api/expire",
            method="POST",
            body=json.dumps({"id": listed[0]["id"]}).encode(),
            headers={"Content-Type": "application/json"},
        )
        assert forged.status == 403
        status, out, err = lapse(
            capsys, "sessions", "expire", str(listed[0]["id"]), "--server", url
        )
        assert (status, err) == (0, "") and out == f"expired {listed[0]['id']}\n"
        assert len(rows_without_token(capsys, url)) == 3
        status, out, err = lapse(capsys, "sessions", "expire", "--all", "--yes", "--server", url)
        assert status == 0, err
        assert out == f"expired 3 sessions at {url}\n"
        assert rows_without_token(capsys, url) == []


def rows_without_token(capsys: pytest.CaptureFixture[str], url: str) -> list[dict[str, object]]:
    status, out, err = lapse(capsys, "sessions", "list", "--json", "--server", url)
    assert status == 0, err
    listed: list[dict[str, object]] = json.loads(out)["sessions"]
    return listed


def test_a_view_that_wants_a_token_says_so_when_none_is_given(
    server: tuple[ServerProcess, str], capsys: pytest.CaptureFixture[str]
) -> None:
    """Without a token, a view that has one answers 403: the message says the
    view wants a token and where to give it (not 'check' a token never given)."""
    _, url = server
    status, out, err = lapse(capsys, "sessions", "expire", "f" * 32, "--server", url)
    assert status == 1 and out == "" and err.count("\n") == 1
    assert "wants a token (403 Forbidden)" in err and "--token" in err
    assert "LAPSE_LIVEVIEW_TOKEN" in err
