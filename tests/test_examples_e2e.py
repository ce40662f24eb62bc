"""The programs in examples/, each run as a subprocess and driven over HTTP.

Each example hard-codes ``reactor.listenTCP(8080, factory)``; the test copies
it to a temporary directory with that call pointed at a free port on
127.0.0.1, runs it with ``python -u`` (so its prints arrive at once) from the
repository root, and reads its stdout in a thread.
"""

from __future__ import annotations

import contextlib
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from _examples import run_example, session_cookie
from _servers import (
    REPO_ROOT,
    Lapse,
    free_port,
    request,
    wait_for_port,
    wait_for_stderr,
)

pytestmark = pytest.mark.slow  # every test runs a program; some wait for a 5 s expiry

UID = re.compile(r"[A-Za-z0-9_-]{24}")


def with_cookie(uid: str) -> dict[str, str]:
    return {"Cookie": f"lapse_session={uid}"}


# -- session_endings.py (the seed program) ----------------------------------


def test_session_endings_expires_once_5_s_after_the_last_visit(tmp_path: Path) -> None:
    """session_endings.py (ShortSession, sessionTimeout 5), two visitors at
    once: A visits /logme every second for 6 s, B every second for 2 s, each
    with its cookie. Both keep their session (no new Set-Cookie after the
    first) and nothing is printed meanwhile, though A is past the 5 s its
    first visit gave it; then exactly one line ``Session <B> has expired.``
    appears 5 s (+-0.5 s) after B's last response, and no other line in the
    following second (A's session, visited at 6 s, lives on)."""
    with run_example("session_endings.py", tmp_path) as (server, port):
        first = request(port, "/logme")
        assert first.status == 200
        assert first.body == b""
        a_uid = session_cookie(first)
        b_uid = session_cookie(request(port, "/logme"))
        assert b_uid != a_uid
        started = time.monotonic()

        b_last_response_at = started
        for second in range(1, 7):
            time.sleep(max(0.0, started + second - time.monotonic()))
            for uid in (a_uid, b_uid) if second <= 2 else (a_uid,):
                visit = request(port, "/logme", headers=with_cookie(uid))
                assert visit.status == 200
                assert visit.header("set-cookie") is None, f"new cookie at visit {second}"
            if second <= 2:
                b_last_response_at = time.monotonic()
            assert server.lines.empty(), f"printed during the visits: {server.lines.get()}"

        line = server.wait_for_line(b_last_response_at + 6.0 - time.monotonic())
        assert line is not None, "no expiry line within 6 s of B's last visit"
        assert line.text == f"Session {b_uid} has expired."
        waited = line.at - b_last_response_at
        assert abs(waited - 5.0) <= 0.5, f"expired {waited:.3f} s after the last visit"
        extra = server.wait_for_line(1.0)
        assert extra is None, f"another line: {extra}"


def test_session_endings_root_is_404(tmp_path: Path) -> None:
    """session_endings.py has nothing at /: 404 (and no session is made)."""
    with run_example("session_endings.py", tmp_path) as (_server, port):
        response = request(port, "/")
        assert response.status == 404
        assert response.header("set-cookie") is None
        assert request(port, "/logme").status == 200


# -- session_basics.py --------------------------------------------------------


def test_session_basics_shows_keeps_and_expires_the_session(tmp_path: Path) -> None:
    """session_basics.py: / shows the session uid (24 URL-safe base64
    characters); with the cookie, the same uid; /expire says so and deletes
    the cookie (Max-Age=0); a client that kept the old cookie then gets a
    different uid."""
    with run_example("session_basics.py", tmp_path) as (_server, port):
        first = request(port, "/")
        assert first.status == 200
        match = re.fullmatch(r"Your session id is: ([A-Za-z0-9_-]{24})", first.text)
        assert match is not None, first.text
        uid = match.group(1)
        assert session_cookie(first) == uid

        second = request(port, "/", headers=with_cookie(uid))
        assert second.text == f"Your session id is: {uid}"
        assert second.header("set-cookie") is None

        expire = request(port, "/expire", headers=with_cookie(uid))
        assert expire.status == 200
        assert expire.text == "Your session has been expired."
        deletions = expire.header_all("set-cookie")
        assert len(deletions) == 1, deletions
        name_value, *attributes = [part.strip() for part in deletions[0].split(";")]
        assert name_value == "lapse_session="
        assert "Max-Age=0" in attributes
        assert "Path=/" in attributes

        after = request(port, "/", headers=with_cookie(uid))
        match = re.fullmatch(r"Your session id is: ([A-Za-z0-9_-]{24})", after.text)
        assert match is not None, after.text
        assert match.group(1) != uid
        assert session_cookie(after) == match.group(1)


def test_session_basics_expire_without_a_session_deletes_the_cookie(tmp_path: Path) -> None:
    """session_basics.py: /expire for a visitor without a cookie makes a
    session and ends it in the same request: the page says so, and the only
    Set-Cookie deletes the cookie (Max-Age=0) rather than setting a uid."""
    with run_example("session_basics.py", tmp_path) as (_server, port):
        expire = request(port, "/expire")
        assert expire.status == 200
        assert expire.text == "Your session has been expired."
        cookies = expire.header_all("set-cookie")
        assert len(cookies) == 1, cookies
        assert cookies[0].startswith("lapse_session=;")
        assert "Max-Age=0" in [part.strip() for part in cookies[0].split(";")]


# -- session_store.py ---------------------------------------------------------


def test_session_store_counts_visits_per_session(tmp_path: Path) -> None:
    """session_store.py: three visits with one cookie show Visit #1, #2, #3;
    a new visitor (no cookie) starts at #1; the first visitor goes on at #4."""
    with run_example("session_store.py", tmp_path) as (_server, port):
        first = request(port, "/")
        assert first.status == 200
        assert first.text == "Visit #1 for you!"
        uid = session_cookie(first)
        assert request(port, "/", headers=with_cookie(uid)).text == "Visit #2 for you!"
        assert request(port, "/", headers=with_cookie(uid)).text == "Visit #3 for you!"

        newcomer = request(port, "/")
        assert newcomer.text == "Visit #1 for you!"
        assert session_cookie(newcomer) != uid

        assert request(port, "/", headers=with_cookie(uid)).text == "Visit #4 for you!"


# -- the seed program on the shared stores -------------------------------------


def _seed_expires_on(store_url: str, tmp_path: Path, monkeypatch: Any) -> None:
    monkeypatch.setenv("LAPSE_SESSION_STORE", store_url)
    with run_example("session_endings.py", tmp_path) as (server, port):
        first = request(port, "/logme")
        uid = session_cookie(first)
        # 1 s later: an expiry counted from the first visit would come 4 s
        # after this one, outside the window below.
        time.sleep(1)
        again = request(port, "/logme", headers=with_cookie(uid))
        assert again.header("set-cookie") is None
        touched_at = time.monotonic()
        line = server.wait_for_line(touched_at + 6.0 - time.monotonic())
        assert line is not None, server.stderr_text()
        assert line.text == f"Session {uid} has expired."
        assert 4.9 <= line.at - touched_at <= 5.5


def test_seed_runs_unchanged_on_sqlite(tmp_path: Path, monkeypatch: Any) -> None:
    """With LAPSE_SESSION_STORE=sqlite:///..., the seed program as written keeps
    a visited session and prints its expiry 5 s after the last visit."""
    _seed_expires_on(f"sqlite:///{tmp_path}/seed.db", tmp_path, monkeypatch)


def test_seed_runs_unchanged_on_redis(tmp_path: Path, monkeypatch: Any, redis_server: Any) -> None:
    """With LAPSE_SESSION_STORE=redis://..., the seed program as written keeps
    a visited session and prints its expiry 5 s after the last visit."""
    _seed_expires_on(f"{redis_server.url}?prefix=seed{time.monotonic_ns()}", tmp_path, monkeypatch)


def test_two_seed_processes_share_one_redis(
    tmp_path: Path, monkeypatch: Any, redis_server: Any
) -> None:
    """Two copies of the seed program, each on its own port, and one Redis
    serve one session between them: its cookie works on either."""
    monkeypatch.setenv("LAPSE_SESSION_STORE", f"{redis_server.url}?prefix=two{time.monotonic_ns()}")
    first_dir, second_dir = tmp_path / "first", tmp_path / "second"
    first_dir.mkdir()
    second_dir.mkdir()
    with (
        run_example("session_endings.py", first_dir) as (_first, first_port),
        run_example("session_endings.py", second_dir) as (_second, second_port),
    ):
        uid = session_cookie(request(first_port, "/logme"))
        for _ in range(10):
            for port in (first_port, second_port):
                assert (
                    request(port, "/logme", headers=with_cookie(uid)).header("set-cookie") is None
                )


# -- serve_app.py (for lapse serve) ---------------------------------------------


@contextlib.contextmanager
def lapse_serve(args: list[str], tmp_path: Path) -> Iterator[int]:
    """``python -m lapse serve ARGS --port P`` from the repository root, as the
    README runs it, until it serves; its port. Stopped by PID after."""
    port = free_port()
    server = Lapse(
        Path("lapse"),
        args=["serve", *args, "--port", str(port)],
        cwd=REPO_ROOT,
        stderr_path=tmp_path / f"lapse-{port}.err",
    ).start()
    try:
        wait_for_port(port, timeout=20, proc=server.proc)
        wait_for_stderr(server, "serving", 20)
        yield port
        assert "Traceback" not in server.stderr_text(), server.stderr_text()
    finally:
        server.stop(timeout=20)


def test_serve_app_is_served_by_lapse_serve_as_the_readme_says(tmp_path: Path) -> None:
    """``lapse serve examples.serve_app:site --store sqlite:////abs.db``, run
    from the repository root as the README does: visits count up in one
    session, the count survives a restart on SQLite, and /logout ends the
    session (the next visit starts again at 1). Other paths are 404."""
    db = tmp_path / "sessions.db"
    args = ["examples.serve_app:site", "--store", f"sqlite:///{db}"]
    with lapse_serve(args, tmp_path) as port:
        first = request(port, "/")
        assert first.status == 200, first.text
        assert first.text == "visits: 1\n"
        uid = session_cookie(first)
        assert request(port, "/", headers=with_cookie(uid)).text == "visits: 2\n"
        assert request(port, "/nothing").status == 404
    assert db.exists()
    with lapse_serve(args, tmp_path) as port:
        assert request(port, "/", headers=with_cookie(uid)).text == "visits: 3\n"
        out = request(port, "/logout", headers=with_cookie(uid))
        assert out.text == "logged out\n"
        fresh = request(port, "/", headers=with_cookie(uid))
        assert fresh.text == "visits: 1\n"
        assert session_cookie(fresh) != uid
