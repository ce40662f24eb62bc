"""The HTTP edge's connection settings: the cap on open connections (real
server processes), the settings' checks, and the options of ``lapse serve``
that set them. The server program and helpers are in ``tests/_edge.py``.
"""

from __future__ import annotations

import http.client
import socket
import time
from pathlib import Path
from typing import Any

import pytest
from _edge import (
    SLACK,
    TIMEOUT,
    get,
    read_until_closed,
    serve,
    trickle,
)
from _servers import (
    HOST,
    free_port,
    parse_response,
    running_server,
    write_script,
)
from conftest import Leaf

from lapse.internet.limits import HTTPLimits, default_max_connections
from lapse.web.server import Site

# -- the connection cap --------------------------------------------------------------


@pytest.mark.slow
def test_connections_over_the_cap_get_503_and_are_closed(edge_script: Path) -> None:
    """With max_connections=4: four kept-alive connections fill the cap; three
    more each get 503 with Retry-After and are closed at once (one of them
    sending a 200 KB request at once, which is read and dropped: no reset);
    when the four idle ones time out (1 s), new clients are served again."""
    with serve(edge_script, "site", max_connections=4, keep_alive_timeout=1.0) as server:
        port = int(server.args[0])
        held = []
        for _ in range(4):
            conn = http.client.HTTPConnection(HOST, port, timeout=5)
            conn.request("GET", "/")
            response = conn.getresponse()
            assert response.status == 200
            response.read()
            held.append(conn)
        for _ in range(2):
            with socket.create_connection((HOST, port), timeout=5) as sock:
                answer, took = read_until_closed(sock, 5)
            rejected = parse_response(answer)
            assert rejected.status == 503
            assert rejected.header("retry-after") == "1"
            assert took < 0.5
        with socket.create_connection((HOST, port), timeout=5) as sock:
            sock.sendall(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 200000\r\n\r\n")
            sock.sendall(b"p" * 200_000)  # no reset while it sends: the server drops it
            sock.shutdown(socket.SHUT_WR)
            hasty = b""
            while chunk := sock.recv(65536):  # a reset would raise here
                hasty += chunk
        assert parse_response(hasty, method="POST").status == 503
        for conn in held:
            assert conn.sock is not None
            assert read_until_closed(conn.sock, 1.0 + SLACK)[0] == b""
            conn.close()
        assert get(port).status == 200
        assert "connections open, the cap" in server.stderr_text()


def test_refused_connections_linger_a_bounded_number_at_a_time(edge_script: Path) -> None:
    """With the cap (1) full, forty more connections at once, their clients
    reading the 503 but not closing: at most 16 stay open on the server (dropping what comes
    until their client closes, for up to a second); the rest are closed at
    once, so a flood over the cap holds few file descriptors."""
    with serve(edge_script, "site", max_connections=1) as server:
        port = int(server.args[0])
        fds = Path(f"/proc/{server.pid}/fd")
        deadline = time.monotonic() + 5
        while True:  # the start-up probe's connection may not be gone yet
            filling = http.client.HTTPConnection(HOST, port, timeout=5)
            filling.request("GET", "/")
            response = filling.getresponse()
            response.read()
            if response.status == 200 or time.monotonic() > deadline:
                break
            filling.close()
            time.sleep(0.05)
        assert response.status == 200
        before = len(list(fds.iterdir()))
        flood = [socket.create_connection((HOST, port), timeout=5) for _ in range(40)]
        try:
            for sock in flood:
                assert sock.recv(20).startswith(b"HTTP/1.1 503 ")
            held = len(list(fds.iterdir())) - before
        finally:
            for sock in flood:
                sock.close()
            filling.close()
    assert held <= 16 + 1, f"{held} descriptors held by refused connections"


# -- pipelined requests ------------------------------------------------------------------


def test_a_pipelined_head_arriving_is_not_closed_as_idle(edge_script: Path) -> None:
    """Keep-alive timeout 0.3 s, header timeout 1.5 s: a client sends a request
    and the start of the next one's head at once, and the rest of that head
    0.8 s later. The idle (keep-alive) timer armed when the first answer is
    sent does not close the connection while the next head arrives: the
    header timeout times it, and both requests are answered 200."""
    settings = {"header_timeout": 1.5, "body_timeout": 0.5, "keep_alive_timeout": 0.3}
    with serve(edge_script, "plain", **settings) as server:
        port = int(server.args[0])
        with socket.create_connection((HOST, port), timeout=5) as sock:
            sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\nGET / HTTP/1.1\r\nHo")
            time.sleep(0.8)
            sock.sendall(b"st: x\r\nConnection: close\r\n\r\n")
            answer, _ = read_until_closed(sock, 5)
    assert answer.count(b"HTTP/1.1 200 ") == 2, answer


# -- settings ------------------------------------------------------------------------


def test_default_connection_cap_keeps_descriptors_for_the_rest() -> None:
    """The default cap leaves an eighth of the file limit (at least 64, at most
    1024, at most half) to the process's other files."""
    assert default_max_connections(1024) == 896
    assert default_max_connections(256) == 192
    assert default_max_connections(100) == 50
    assert default_max_connections(65536) == 64512
    assert default_max_connections(2) == 1


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"header_timeout": 0}, "header_timeout must be a positive number of seconds"),
        ({"keep_alive_timeout": -1.0}, "keep_alive_timeout must be a positive number"),
        ({"body_timeout": "5"}, "body_timeout must be a positive number"),
        ({"body_min_rate": -1}, "body_min_rate must be a number of bytes per second"),
        ({"max_connections": 0}, "max_connections must be a positive integer or None"),
        ({"max_uri_length": 0}, "max_uri_length must be a positive number of bytes"),
    ],
)
def test_bad_connection_settings_are_a_clear_error_when_the_site_is_made(
    settings: dict[str, Any], message: str
) -> None:
    """A bad timeout, rate or cap is a ValueError naming it, from Site(...)
    (not at the first connection)."""
    with pytest.raises(ValueError, match=message):
        Site(Leaf(), **settings)


def test_site_limits_follow_its_byte_limits() -> None:
    """A Site's head budget is its URI limit + its headers limit + 4 KiB; the
    reactor leaves the Host check to the Site."""
    limits = Site(
        Leaf(), max_uri_length=1000, max_headers_total=2000, max_connections=7
    ).http_limits()
    assert limits == HTTPLimits(
        max_uri_length=1000, max_head_size=7096, max_connections=7, check_host=False
    )


# -- lapse serve -------------------------------------------------------------------------

CLI_APP = """
from lapse.web.resource import Resource
from lapse.web.server import Site


class Page(Resource):
    isLeaf = True

    def render_GET(self, request):
        return "page"


site = Site(Page())


async def plain(scope, receive, send):
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            kind = message["type"].rsplit(".", 1)[1]
            await send({"type": f"lifespan.{kind}.complete"})
            if kind == "shutdown":
                return
    headers = [(b"content-length", b"5")]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": b"plain"})
"""


@pytest.mark.slow
@pytest.mark.parametrize("target", ["edge_cliapp:site", "edge_cliapp:plain"])
def test_lapse_serve_connection_options_apply_to_any_app(tmp_path: Path, target: str) -> None:
    """``lapse serve`` with --max-connections 1, --keep-alive-timeout 0.5 and
    --header-timeout 0.5, for a Site and for a plain ASGI app: a second
    connection gets 503 while one is open; the open one is closed after
    0.5 s idle; a header trickle gets 408 after 0.5 s (not the 20 s default)."""
    write_script(tmp_path, "edge_cliapp.py", CLI_APP)
    runner = write_script(
        tmp_path, "run_lapse.py", "import sys\nfrom lapse.cli import main\nsys.exit(main())\n"
    )
    port = free_port()
    args = [
        *("serve", target, "--port", str(port), "--app-dir", str(tmp_path)),
        *("--max-connections", "1", "--keep-alive-timeout", "0.5", "--header-timeout", "0.5"),
    ]
    with running_server(runner, port, args=args):
        deadline = time.monotonic() + 5
        while True:  # the start-up probe's connection may not be gone yet
            conn = http.client.HTTPConnection(HOST, port, timeout=5)
            conn.request("GET", "/")
            response = conn.getresponse()
            if response.status == 200 or time.monotonic() > deadline:
                break
            conn.close()
            time.sleep(0.05)
        try:
            assert response.read() in (b"page", b"plain")
            with socket.create_connection((HOST, port), timeout=5) as sock:
                assert parse_response(read_until_closed(sock, 5)[0]).status == 503
            assert conn.sock is not None
            assert read_until_closed(conn.sock, TIMEOUT + SLACK)[0] == b""
        finally:
            conn.close()
        with socket.create_connection((HOST, port), timeout=5) as sock:
            answer, took = trickle(sock, b"GET / HTTP/1.1\r\nHost: x\r\nX: " + b"s" * 100, 0.1, 5)
        assert parse_response(answer).status == 408
        assert took <= TIMEOUT + SLACK


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("--header-timeout", "0", "argument --header-timeout: 0: a number of seconds above 0"),
        ("--body-timeout", "soon", "argument --body-timeout: 'soon' is not a number of seconds"),
        ("--keep-alive-timeout", "inf", "argument --keep-alive-timeout: inf: a number of seconds"),
        ("--body-min-rate", "-5", "argument --body-min-rate: -5: a number of bytes per second"),
        ("--max-connections", "0", "argument --max-connections: 0: at least 1"),
    ],
)
def test_lapse_serve_bad_connection_option_exits_2(
    option: str, value: str, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """A connection option that is no valid number is a usage error (exit 2)
    naming the option, before anything is imported."""
    from lapse.cli import main

    with pytest.raises(SystemExit) as exited:
        main(["serve", "nosuchmodule:app", option, value])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert message in err
    assert "Traceback" not in err


def test_lapse_serve_workers_get_the_connection_options(tmp_path: Path) -> None:
    """With --workers, each worker's command line carries the connection
    options given (each worker process applies them, its cap included)."""
    from lapse.cli import build_parser
    from lapse.cli.serve import _check
    from lapse.cli.supervisor import _worker_command

    argv = ["serve", "app:site", "--workers", "2", "--store", f"sqlite:///{tmp_path}/s.db"]
    argv += ["--max-connections", "100", "--header-timeout", "7.5", "--body-min-rate", "0"]
    command = _worker_command(_check(build_parser().parse_args(argv)))
    given = " ".join(command)
    assert "--max-connections 100" in given
    assert "--header-timeout 7.5" in given
    assert "--body-min-rate 0.0" in given
    assert "--keep-alive-timeout" not in given
