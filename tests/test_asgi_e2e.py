"""examples/fastapi_app.py on a real uvicorn server: run as a script and with
the uvicorn command, on a free 127.0.0.1 port, driven over HTTP."""

from __future__ import annotations

import contextlib
import json
import re
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from _servers import (
    EXAMPLES,
    REPO_ROOT,
    Response,
    ServerProcess,
    free_port,
    request,
    wait_for_port,
)

COOKIE = re.compile(r"lapse_session=([A-Za-z0-9_-]{24}); Path=/; HttpOnly; SameSite=Lax")


def visits(response: Response) -> int:
    assert response.status == 200, response.body
    count: int = json.loads(response.body)["visits"]
    return count


def expiry_lines(server: ServerProcess) -> list[str]:
    """The expiry lines printed so far, waiting up to 5 s for the first; the
    other stdout lines (uvicorn's access log) are skipped."""
    found: list[str] = []
    deadline = time.monotonic() + 5.0
    while True:
        line = server.wait_for_line(deadline - time.monotonic() if not found else 0.2)
        if line is None:
            return found
        if line.text.startswith("Session "):
            found.append(line.text)


def exercise(server: ServerProcess, port: int) -> None:
    """Count, keep, log out, start again: what a browser would do."""
    root = request(port, "/favicon.ico")
    assert root.status == 404
    assert root.header("set-cookie") is None
    first = request(port, "/")
    assert visits(first) == 1
    match = COOKIE.fullmatch(first.header("set-cookie") or "")
    assert match is not None, first.header("set-cookie")
    uid = match.group(1)
    cookie = {"Cookie": f"lapse_session={uid}"}
    second = request(port, "/", headers=cookie)
    assert visits(second) == 2
    assert second.header("set-cookie") is None
    logout = request(port, "/logout", method="POST", headers=cookie)
    assert json.loads(logout.body) == {"logged_out": True}
    assert (logout.header("set-cookie") or "").startswith("lapse_session=; Path=/; Max-Age=0")
    assert expiry_lines(server) == [f"Session {uid[:8]}... has expired."]
    again = request(port, "/", headers=cookie)
    assert visits(again) == 1
    assert COOKIE.fullmatch(again.header("set-cookie") or "") is not None


@contextlib.contextmanager
def serving(script: Path, port: int, args: list[str], tmp_path: Path) -> Iterator[ServerProcess]:
    """Run ``python -u script args`` from the repository root until it
    listens on ``port`` (its stderr in ``tmp_path``); stop it on exit."""
    server = ServerProcess(script, args=args, cwd=REPO_ROOT, stderr_path=tmp_path / "stderr")
    server.start()
    try:
        try:
            wait_for_port(port, timeout=15.0, proc=server.proc)
        except (RuntimeError, TimeoutError) as exc:
            raise RuntimeError(f"{exc}; stderr:\n{server.stderr_text()}") from exc
        yield server
    finally:
        server.stop()


@pytest.mark.slow
def test_fastapi_example_as_a_script(tmp_path: Path) -> None:
    """python examples/fastapi_app.py PORT: visits counted in the session,
    logout deletes the cookie and prints the expiry line, a request that
    uses no session sets no cookie."""
    port = free_port()
    with serving(EXAMPLES / "fastapi_app.py", port, [str(port)], tmp_path) as server:
        exercise(server, port)
        assert "Traceback" not in server.stderr_text(), server.stderr_text()


@pytest.mark.slow
def test_fastapi_example_with_the_uvicorn_command_on_sqlite(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """uvicorn examples.fastapi_app:app, sessions in SQLite (LAPSE_SESSION_STORE):
    the same behaviour; lifespan startup and shutdown complete (the keeper runs
    and is closed) and the server shuts down cleanly on SIGTERM."""
    monkeypatch.setenv("LAPSE_SESSION_STORE", f"sqlite:///{tmp_path}/sessions.db")
    port = free_port()
    args = ["uvicorn", "examples.fastapi_app:app", "--host", "127.0.0.1", "--port", str(port)]
    with serving(Path("-m"), port, args, tmp_path) as server:
        exercise(server, port)
        server.stop()
        # uvicorn re-raises the SIGTERM once its graceful shutdown is done.
        assert server.proc is not None
        assert server.proc.returncode in (0, -signal.SIGTERM), server.stderr_text()
        log = server.stderr_text()
        assert "Application startup complete." in log, log
        assert "Application shutdown complete." in log, log
        assert "Traceback" not in log, log
