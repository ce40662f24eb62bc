"""LAPSE_LOG_LEVEL: the access log on stderr without changing the program."""

from __future__ import annotations

import re
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

from _servers import REPO_ROOT, free_port, request, running_server, write_script

PROGRAM = """
import os, sys
os.environ["LAPSE_LOG_LEVEL"] = sys.argv[2]
from lapse.internet import reactor
from lapse.web.resource import Resource
from lapse.web.server import Site

class Page(Resource):
    isLeaf = True
    def render_GET(self, request):
        request.getSession()
        return "hi"

reactor.listenTCP(int(sys.argv[1]), Site(Page()), interface="127.0.0.1")
reactor.run()
"""


STAMP = r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3})Z"
"""The ISO 8601 UTC time, to the millisecond, that starts every log line."""


def test_log_level_info_prints_access_lines(tmp_path: Path) -> None:
    """With LAPSE_LOG_LEVEL=INFO, reactor.run() logs one line per request to
    stderr: an ISO 8601 UTC timestamp (the time of the request), the level,
    the logger, then the combined-format access line."""
    script = write_script(tmp_path, "server.py", PROGRAM)
    port = free_port()
    with running_server(script, port, args=[str(port), "INFO"]) as server:
        before = datetime.now(UTC)
        assert request(port, "/page?x=1").status == 200
        after = datetime.now(UTC)
        server.stop()
        lines = [line for line in server.stderr_text().splitlines() if '"GET ' in line]
    assert len(lines) == 1
    found = re.match(STAMP + " INFO lapse.access (127.0.0.1 - - .*)$", lines[0])
    assert found is not None, lines[0]
    stamp = datetime.fromisoformat(found.group(1)).replace(tzinfo=UTC)
    assert before - timedelta(seconds=1) <= stamp <= after + timedelta(seconds=1)
    assert found.group(2).endswith('] "GET /page?x=1 HTTP/1.1" 200 2 "-" "-"')


def test_log_level_debug_adds_session_events(tmp_path: Path) -> None:
    """With LAPSE_LOG_LEVEL=DEBUG, session creation is logged too, stamped
    with the time, the level DEBUG and the logger lapse.sessions."""
    script = write_script(tmp_path, "server.py", PROGRAM)
    port = free_port()
    with running_server(script, port, args=[str(port), "DEBUG"]) as server:
        request(port, "/")
        server.stop()
        created = re.search(
            STAMP + r" DEBUG lapse\.sessions session \S+ created$",
            server.stderr_text(),
            re.MULTILINE,
        )
        assert created is not None, server.stderr_text()


def test_unknown_log_level_is_clear_error(tmp_path: Path) -> None:
    """A LAPSE_LOG_LEVEL that is not a level stops the program with a message naming it."""
    script = write_script(tmp_path, "server.py", PROGRAM)
    result = subprocess.run(
        [sys.executable, str(script), str(free_port()), "LOUD"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode != 0
    assert "LAPSE_LOG_LEVEL='LOUD' is not a logging level" in result.stderr
