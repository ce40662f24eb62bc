"""Running the programs of examples/ as subprocesses, as their README says.

Each example hard-codes ``reactor.listenTCP(8080, factory)``;
:func:`run_example` copies it to a temporary directory with that call
pointed at a free port on 127.0.0.1 and runs it with ``python -u`` from the
repository root (its stdout read in a thread), stopping it by PID after.
"""

from __future__ import annotations

import contextlib
import re
import time
from collections.abc import Iterator
from pathlib import Path

from _servers import (
    EXAMPLES,
    REPO_ROOT,
    Response,
    ServerProcess,
    free_port,
    request,
    running_server,
)

__all__ = ["LISTEN_CALL", "run_example", "session_cookie", "two_seeds_share_one_session"]

LISTEN_CALL = "reactor.listenTCP(8080, factory)"


@contextlib.contextmanager
def run_example(name: str, tmp_path: Path) -> Iterator[tuple[ServerProcess, int]]:
    """Run ``examples/<name>`` on a free port; the server and its port."""
    source = (EXAMPLES / name).read_text(encoding="utf-8")
    assert source.count(LISTEN_CALL) == 1, f"{name} does not listen as expected"
    port = free_port()
    patched = source.replace(
        LISTEN_CALL, f'reactor.listenTCP({port}, factory, interface="127.0.0.1")'
    )
    script = tmp_path / name
    script.write_text(patched, encoding="utf-8")
    with running_server(script, port, cwd=REPO_ROOT) as server:
        yield server, port
        assert server.proc is not None and server.proc.poll() is None, server.stderr_text()
        assert "Traceback" not in server.stderr_text(), server.stderr_text()


def session_cookie(response: Response) -> str:
    """The uid of the one ``lapse_session`` cookie the response sets."""
    cookies = response.header_all("set-cookie")
    assert len(cookies) == 1, cookies
    match = re.match(r"lapse_session=([A-Za-z0-9_-]{24});", cookies[0])
    assert match is not None, cookies[0]
    return match.group(1)


def two_seeds_share_one_session(tmp_path: Path) -> None:
    """Run the seed program twice (on the store ``LAPSE_SESSION_STORE``
    names) and check: a session made by the first is the same session in the
    second (no new cookie); each process registered its own notifyOnExpire
    callback on first sight, and each prints the expiry line exactly once,
    5 s (+-0.6 s) after the last visit."""
    first_dir, second_dir = tmp_path / "first", tmp_path / "second"
    first_dir.mkdir()
    second_dir.mkdir()
    with (
        run_example("session_endings.py", first_dir) as (first, first_port),
        run_example("session_endings.py", second_dir) as (second, second_port),
    ):
        uid = session_cookie(request(first_port, "/logme"))
        for _ in range(3):
            for port in (first_port, second_port):
                again = request(port, "/logme", headers={"Cookie": f"lapse_session={uid}"})
                assert again.status == 200
                assert again.header("set-cookie") is None
        last = time.monotonic()
        for server in (first, second):
            line = server.wait_for_line(last + 6.0 - time.monotonic())
            assert line is not None, server.stderr_text()
            assert line.text == f"Session {uid} has expired."
            assert 4.9 <= line.at - last <= 5.6, line.at - last
        time.sleep(0.5)
        assert first.wait_for_line(0) is None
        assert second.wait_for_line(0) is None
