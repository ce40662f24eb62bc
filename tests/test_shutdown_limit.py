"""The graceful-shutdown limit, over a real ``lapse serve`` process.

``--graceful-timeout SECONDS`` sets how long requests in flight may take once
a stop is asked (``reactor.graceful_timeout``); a request still running then
is ended without a traceback: 503 if nothing was sent yet, and one log line
says how many were cut.
"""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from _servers import free_port, request, running_server, write_script

from lapse.cli import build_parser

APP = """
from lapse.internet import reactor
from lapse.web.resource import Resource
from lapse.web.server import NOT_DONE_YET, Site


class Stuck(Resource):
    isLeaf = True

    def render_GET(self, request):
        print("stuck request started", flush=True)
        return NOT_DONE_YET  # never finished


class Slow(Resource):
    isLeaf = True

    def render_GET(self, request):
        print("slow request started", flush=True)
        reactor.callLater(0.3, lambda: (request.write(b"slow, finished"), request.finish()))
        return NOT_DONE_YET


root = Resource()
root.putChild(b"stuck", Stuck())
root.putChild(b"slow", Slow())
site = Site(root)
"""

SERVE = "import sys\nfrom lapse.cli import main\nsys.exit(main())\n"


def _get_in_thread(port: int, path: str, into: dict[str, Any]) -> threading.Thread:
    def run() -> None:
        try:
            into[path] = request(port, path, timeout=10)
        except BaseException as exc:
            into[path] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


@pytest.mark.slow
def test_requests_running_at_the_limit_end_with_503_and_one_line(tmp_path: Path) -> None:
    """With --graceful-timeout 0.8, SIGTERM: a request finishing within the
    limit gets its 200; one still running at the limit gets a 503 (not a
    500), the log says "ending 1 request(s)" once and shows no traceback;
    the server exits 0, about the limit after the signal."""
    write_script(tmp_path, "stuckapp.py", APP)
    script = write_script(tmp_path, "serve.py", SERVE)
    port = free_port()
    args = ["serve", "stuckapp:site", "--port", str(port), "--app-dir", str(tmp_path)]
    args += ["--graceful-timeout", "0.8"]
    with running_server(script, port, args=args) as server:
        answers: dict[str, Any] = {}
        stuck = _get_in_thread(port, "/stuck", answers)
        server.wait_for_match("stuck request started", 5)
        slow = _get_in_thread(port, "/slow", answers)
        server.wait_for_match("slow request started", 5)
        signalled = time.monotonic()
        server.send_signal(signal.SIGTERM)
        assert server.wait(10) == 0, server.stderr_text()
        took = time.monotonic() - signalled
        stuck.join(5)
        slow.join(5)
        log = server.stderr_text()
    assert answers["/slow"].status == 200 and answers["/slow"].body == b"slow, finished"
    assert answers["/stuck"].status == 503, answers["/stuck"]
    assert answers["/stuck"].header("connection") == "close"
    assert "Traceback" not in log and "Exception in ASGI" not in log, log
    assert log.count("ending 1 request(s) still running") == 1, log
    assert 0.8 <= took < 3.0


@pytest.mark.parametrize("value", ["0", "-1", "soon", "inf"])
def test_graceful_timeout_takes_positive_seconds_only(
    value: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """--graceful-timeout with no positive finite number: exit 2, a clear line."""
    with pytest.raises(SystemExit) as stopped:
        build_parser().parse_args(["serve", "app:site", "--graceful-timeout", value])
    assert stopped.value.code == 2
    assert "seconds" in capsys.readouterr().err


def test_workers_get_the_graceful_timeout_and_the_supervisor_waits_past_it(
    tmp_path: Path,
) -> None:
    """--workers passes --graceful-timeout on to each worker, and the
    supervisor waits that long (and a margin) before killing one."""
    from lapse.cli.serve import _check
    from lapse.cli.supervisor import STOP_MARGIN, Supervisor, _worker_command

    argv = ["serve", "x:y", "--port", "8099", "--workers", "2", "--store", "sqlite:///s.db"]
    argv += ["--app-dir", str(tmp_path), "--graceful-timeout", "42.5"]
    args = build_parser().parse_args(argv)
    options = _check(args)
    command = _worker_command(options)
    at = command.index("--graceful-timeout")
    assert float(command[at + 1]) == 42.5
    assert Supervisor(options).stop_timeout == 42.5 + STOP_MARGIN
