"""The ``lapse`` command as a subprocess, for the tests of ``lapse serve``,
its supervisor and the live view over real processes: an application
module (``APP``), running it, visiting it."""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
from _servers import Lapse, Response, ServerProcess, request, wait_for_port, wait_for_stderr

UID = r"[A-Za-z0-9_-]{24}"

APP = '''
"""An application for lapse serve: a Site, a plain ASGI app, and non-apps."""

import os
from pathlib import Path

from lapse.web.resource import Resource
from lapse.web.server import Site

Path(os.environ.get("CLIAPP_IMPORTED", os.devnull)).write_text("imported")


class Visits(Resource):
    """Counts the visits of the session in session.data; says who answered."""

    isLeaf = True

    def render_GET(self, request):
        session = request.getSession()
        session.data["visits"] = session.data.get("visits", 0) + 1
        return (
            f"pid={os.getpid()} uid={session.uid} visits={session.data['visits']} "
            f"secure={request.isSecure()} client={request.getClientIP()}"
        )


site = Site(Visits())
memory_site = Site(Visits(), store="memory:")
root = Visits()
not_an_app = 42


def two_args(scope, receive):
    pass


async def asgi(scope, receive, send):
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            else:
                await send({"type": "lifespan.shutdown.complete"})
                return
    body = f"plain asgi scheme={scope['scheme']} client={scope['client'][0]}".encode()
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"text/plain")]})
    await send({"type": "http.response.body", "body": body})
'''

BROKEN = """
raise RuntimeError("the database is not configured")
"""


def make_app_dir(tmp_path: Path) -> Path:
    """A directory holding ``cliapp.py`` (see APP) and ``broken.py``."""
    directory = tmp_path / "app"
    directory.mkdir()
    (directory / "cliapp.py").write_text(APP, encoding="utf-8")
    (directory / "broken.py").write_text(BROKEN, encoding="utf-8")
    return directory


@contextlib.contextmanager
def lapse_serving(
    args: Sequence[str], port: int, cwd: Path, timeout: float = 20.0
) -> Iterator[Lapse]:
    """Run ``python -m lapse serve ARGS`` until it serves on ``port``; stop it after."""
    server = Lapse(Path("lapse"), args=["serve", *args], cwd=cwd, stderr_path=cwd / "lapse.err")
    server.start()
    try:
        try:
            wait_for_port(port, timeout=timeout, proc=server.proc)
            wait_for_stderr(server, "serving", timeout)
        except (RuntimeError, TimeoutError) as exc:
            raise RuntimeError(f"{exc}; stderr:\n{server.stderr_text()}") from exc
        yield server
    finally:
        server.stop(timeout=20)


def run_lapse(
    args: Sequence[str], cwd: Path, timeout: float = 30.0
) -> subprocess.CompletedProcess[str]:
    """Run ``python -m lapse ARGS`` to its end."""
    return subprocess.run(
        [sys.executable, "-m", "lapse", *args],
        cwd=cwd,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "LAPSE_SESSION_STORE": ""},
    )


def session_uid(response: Response, name: str = "lapse_session") -> str:
    """The uid of the one session cookie ``response`` sets."""
    cookies = response.header_all("set-cookie")
    assert len(cookies) == 1, cookies
    found = re.match(f"{re.escape(name)}=({UID});", cookies[0])
    assert found is not None, cookies[0]
    return found.group(1)


def visit(port: int, uid: str, headers: dict[str, str] | None = None) -> dict[str, str]:
    """GET / with the session cookie of ``uid``; the fields of the answer."""
    response = request(port, "/", headers={"Cookie": f"lapse_session={uid}", **(headers or {})})
    assert response.status == 200, response
    return dict(part.split("=", 1) for part in response.text.split())


def pid_alive(pid: int) -> bool:
    """Whether a process ``pid`` exists (and is not a zombie)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


def worker_pids(server: ServerProcess) -> list[int]:
    found = wait_for_stderr(server, r"with (\d+) workers \(pids ([\d, ]+)\)", 20)
    pids = [int(pid) for pid in found.group(2).split(", ")]
    assert len(pids) == int(found.group(1))
    return pids


def lapse(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """Run ``lapse ARGV`` in-process: (exit status, stdout, stderr)."""
    from lapse.cli import main

    try:
        status = main(list(argv))
    except SystemExit as exc:  # argparse
        status = int(exc.code or 0)
    out, err = capsys.readouterr()
    return status, out, err
