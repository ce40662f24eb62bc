"""The HTTP edge: limits kept as the bytes arrive, timeouts, the connection cap, Host.

Most tests talk over real loopback sockets to a real server in a subprocess
(``reactor.listenTCP`` with uvicorn, httptools, uvloop), configured with short
timeouts (0.5 s) so that slow clients are dealt with quickly; its memory is
read from ``/proc/PID/status`` (the peak RSS is reset through
``/proc/PID/clear_refs`` first). The Site-level Host checks run in-process.
"""

from __future__ import annotations

import http.client
import json
import select
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from _servers import (
    HOST,
    Response,
    ServerProcess,
    free_port,
    parse_response,
    raw_exchange,
    request,
    running_server,
    write_script,
)
from conftest import Leaf, call

from lapse.internet.limits import HTTPLimits, default_max_connections
from lapse.web.server import Site

APP = '''
import asyncio
import json
import sys

from lapse.internet import reactor
from lapse.internet.limits import HTTPLimits
from lapse.web.resource import Resource
from lapse.web.server import Site


class Page(Resource):
    """GET: "page"; POST: the length of the body read."""

    isLeaf = True

    def render_GET(self, request):
        return "page"

    def render_POST(self, request):
        return str(len(request.content.read()))


async def plain(scope, receive, send):
    """A plain ASGI app: the length of the request body; on /slow-reader it
    waits a second (or the query's number of seconds) before it reads the body."""
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            kind = message["type"].rsplit(".", 1)[1]
            await send({"type": f"lifespan.{kind}.complete"})
            if kind == "shutdown":
                return
    if scope["path"] == "/slow-reader":
        await asyncio.sleep(float(scope["query_string"].decode() or "1.0"))
    if scope["path"] == "/answer-first":
        # Starts its answer, then reads the body.
        await send({"type": "http.response.start", "status": 200, "headers": []})
    size = 0
    more = True
    while more:
        message = await receive()
        if message["type"] == "http.disconnect":
            return
        size += len(message.get("body", b""))
        more = message.get("more_body", False)
    body = str(size).encode()
    if scope["path"] != "/answer-first":
        headers = [(b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": body})


port, kind, settings = int(sys.argv[1]), sys.argv[2], json.loads(sys.argv[3])
if kind == "site":
    reactor.listenTCP(port, Site(Page(), **settings), interface="127.0.0.1")
else:
    reactor.listenTCP(port, plain, interface="127.0.0.1", limits=HTTPLimits(**settings))
reactor.run()
'''

TIMEOUT = 0.5
"""The header, body and keep-alive timeouts of the test servers."""

SLACK = 1.5
"""How much later than its timeout a closing may come on a busy machine."""

SHORT = {"header_timeout": TIMEOUT, "body_timeout": TIMEOUT, "keep_alive_timeout": TIMEOUT}

HEAD_LIMIT = 16 * 1024 + 64 * 1024 + 4 * 1024
"""A Site's request head budget with the default byte limits."""

MIB = 1024 * 1024


@pytest.fixture(scope="module")
def script(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_script(tmp_path_factory.mktemp("edge"), "edge_app.py", APP)


def serve(script: Path, kind: str, **settings: Any) -> Any:
    """Run the test server (``kind`` "site" or "plain") with ``settings``."""
    port = free_port()
    return running_server(script, port, args=[str(port), kind, json.dumps(settings)])


@pytest.fixture(scope="module")
def site_server(script: Path) -> Iterator[tuple[int, ServerProcess]]:
    """A Site with 0.5 s timeouts and a minimum body rate of 1000 B/s."""
    with serve(script, "site", body_min_rate=1000, **SHORT) as server:
        port = int(server.args[0])
        yield port, server
        assert server.proc is not None and server.proc.poll() is None, server.stderr_text()
        assert "Traceback" not in server.stderr_text(), server.stderr_text()


@pytest.fixture(scope="module")
def plain_server(script: Path) -> Iterator[tuple[int, ServerProcess]]:
    """A plain ASGI app with 0.5 s timeouts and a minimum body rate of 10 MB/s."""
    with serve(script, "plain", body_min_rate=10_000_000, **SHORT) as server:
        yield int(server.args[0]), server
        assert "Traceback" not in server.stderr_text(), server.stderr_text()


# -- helpers ----------------------------------------------------------------------


def status_kib(pid: int, field: str) -> int:
    """A ``VmRSS``/``VmHWM``-style field of /proc/PID/status, in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} in /proc/{pid}/status")


def reset_peak_rss(pid: int) -> int:
    """Reset the process's peak RSS (VmHWM) to its RSS now; that RSS, in KiB."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")
    return status_kib(pid, "VmRSS")


def read_until_closed(sock: socket.socket, timeout: float) -> tuple[bytes, float]:
    """What ``sock`` receives until the server closes it (end of stream or
    reset), and how long that took; fail if it stays open past ``timeout``."""
    started = time.monotonic()
    received = bytearray()
    sock.settimeout(timeout)
    while True:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            break
        except TimeoutError:
            raise AssertionError(
                f"still open after {timeout} s; received {bytes(received)[:200]!r}"
            ) from None
        if not chunk:
            break
        received += chunk
    return bytes(received), time.monotonic() - started


def flood_header(port: int, limit: int = 16 * MIB) -> tuple[int, bytes]:
    """Send a request whose one header never ends, 64 KiB at a time, until
    the server answers; (bytes sent, what came back until it closed). Fail
    if nothing came back after ``limit`` bytes."""
    sock = socket.create_connection((HOST, port), timeout=5)
    with sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Flood: ")
        chunk = b"a" * 65536
        sent = 0
        sock.setblocking(False)
        while True:
            readable, writable, _ = select.select([sock], [sock], [], 5)
            if readable:
                break
            assert writable, "the server neither read nor answered for 5 s"
            assert sent < limit, f"no answer after {sent} bytes of one header"
            try:
                sent += sock.send(chunk)
            except (BrokenPipeError, ConnectionResetError):
                break
        sock.setblocking(True)
        answer, _ = read_until_closed(sock, 5)
    return sent, answer


def get(port: int, path: str = "/", timeout: float = 5) -> Response:
    return request(port, path, timeout=timeout)


# -- limits as the bytes arrive ------------------------------------------------------


def test_one_unterminated_header_is_431_without_buffering_it(
    site_server: tuple[int, ServerProcess],
) -> None:
    """A header that never ends, sent as fast as the socket takes it: the
    server answers 431 after about its head budget (84 KiB), long before the
    64 MiB the client would send, and its peak RSS grows by under 3 MiB (it
    grew by the whole header before: 4 such clients took it from 31 to 385 MiB)."""
    port, server = site_server
    before = reset_peak_rss(server.pid)
    sent, answer = flood_header(port)
    grown = status_kib(server.pid, "VmHWM") - before
    response = parse_response(answer)
    assert response.status == 431
    assert response.header("connection") == "close"
    assert sent < 16 * MIB  # what the loopback socket buffers hold, at most
    assert grown < 3 * 1024, f"peak RSS grew by {grown} KiB"
    assert get(port).status == 200


@pytest.mark.slow
def test_floods_of_headers_on_several_connections_leave_others_served(
    site_server: tuple[int, ServerProcess],
) -> None:
    """Four clients send never-ending headers over and over for about 1.5 s
    (each refused with 431, then again); meanwhile another client's requests
    are all answered 200 within 1 s, and the server's peak RSS grows by under
    8 MiB."""
    port, server = site_server
    before = reset_peak_rss(server.pid)
    stop = time.monotonic() + 1.5
    statuses: list[int] = []
    errors: list[BaseException] = []

    def attack() -> None:
        try:
            while time.monotonic() < stop:
                statuses.append(parse_response(flood_header(port)[1]).status)
        except BaseException as exc:  # reported below
            errors.append(exc)

    attackers = [threading.Thread(target=attack) for _ in range(4)]
    for thread in attackers:
        thread.start()
    slowest = 0.0
    served = 0
    while time.monotonic() < stop:
        started = time.monotonic()
        assert get(port, timeout=5).status == 200
        slowest = max(slowest, time.monotonic() - started)
        served += 1
    for thread in attackers:
        thread.join(30)
    grown = status_kib(server.pid, "VmHWM") - before
    assert not errors, errors
    assert statuses and set(statuses) == {431}
    assert served >= 3
    assert slowest < 1.0, f"a normal request took {slowest:.2f} s"
    assert grown < 8 * 1024, f"peak RSS grew by {grown} KiB"


def test_uri_over_max_uri_length_is_414_before_the_request_line_ends(
    site_server: tuple[int, ServerProcess],
) -> None:
    """A request target past 16 KiB, its request line never finished: 414 at
    once (the server does not wait for the rest of the line)."""
    port, _ = site_server
    with socket.create_connection((HOST, port), timeout=5) as sock:
        sock.sendall(b"GET /" + b"a" * (16 * 1024 + 100))
        answer, took = read_until_closed(sock, 5)
    assert parse_response(answer).status == 414
    assert took < TIMEOUT  # not the header timeout's 408


def test_uri_over_64_kib_is_414_not_the_parsers_400(
    site_server: tuple[int, ServerProcess],
) -> None:
    """A whole request whose URI is 70 KiB (past what httptools can parse):
    414, as the README promises, where it was httptools' 400."""
    port, _ = site_server
    head = b"GET /" + b"a" * (70 * 1024) + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    assert parse_response(raw_exchange(port, head)).status == 414
    assert get(port).status == 200


def test_head_just_within_the_budget_is_served(site_server: tuple[int, ServerProcess]) -> None:
    """A request with 60 KiB of headers in 8 KiB fields and a 15 KiB URI
    (within every limit) arriving in one write: 200."""
    port, _ = site_server
    fields = b"".join(b"X-F%d: %s\r\n" % (i, b"v" * 8000) for i in range(7))
    head = b"GET /" + b"q" * (15 * 1024) + b" HTTP/1.1\r\nHost: x\r\n" + fields
    response = parse_response(raw_exchange(port, head + b"Connection: close\r\n\r\n"))
    assert response.status == 200
    assert response.body == b"page"


@pytest.mark.slow
def test_a_refusal_does_not_cut_into_the_answer_of_a_pipelined_request(
    plain_server: tuple[int, ServerProcess],
) -> None:
    """A request the app takes a second to answer and, pipelined behind it,
    one whose header never ends: the first is answered 200 in full; then the
    connection closes, with no 431 written into (or before) that answer."""
    port, _ = plain_server
    data = (
        b"GET /slow-reader HTTP/1.1\r\nHost: x\r\n\r\n"
        + b"GET / HTTP/1.1\r\nHost: x\r\nX-Flood: "
        + b"a" * (3 * HEAD_LIMIT)
    )
    with socket.create_connection((HOST, port), timeout=5) as sock:
        sock.sendall(data)
        answer, _ = read_until_closed(sock, 5)
    first = parse_response(answer)
    assert first.status == 200
    assert first.body == b"0"
    assert answer.endswith(b"\r\n\r\n0"), answer


def test_a_refused_client_still_sending_is_not_reset(
    site_server: tuple[int, ServerProcess],
) -> None:
    """The server answers 431 to a head past its budget while the client is
    still sending; it then reads and drops what comes rather than close with
    unread bytes, which would reset the connection (a reset makes some TCP
    stacks discard the answer before the client reads it): the client sends
    all of its 300 KiB and more after reading the answer, and sees a clean
    end of stream, never a reset."""
    port, _ = site_server
    with socket.create_connection((HOST, port), timeout=5) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nX-Long: " + b"a" * (300 * 1024))
        answer = bytearray()
        while chunk := sock.recv(65536):
            answer += chunk
        assert parse_response(bytes(answer)).status == 431
        sock.sendall(b"b" * 65536)
        sock.shutdown(socket.SHUT_WR)
        assert sock.recv(65536) == b""


# -- slow clients ------------------------------------------------------------------


def test_a_connection_that_never_sends_is_closed_after_the_keep_alive_timeout(
    site_server: tuple[int, ServerProcess],
) -> None:
    """A client that connects and sends nothing: closed, silently, after the
    0.5 s keep-alive timeout."""
    port, _ = site_server
    with socket.create_connection((HOST, port), timeout=5) as sock:
        answer, took = read_until_closed(sock, TIMEOUT + SLACK)
    assert answer == b""
    assert took >= TIMEOUT - 0.1


def test_an_idle_keep_alive_connection_is_closed_after_its_timeout(
    site_server: tuple[int, ServerProcess],
) -> None:
    """After a 200 on a kept-alive connection, nothing more is sent: the
    server closes it, silently, after the 0.5 s keep-alive timeout."""
    port, _ = site_server
    conn = http.client.HTTPConnection(HOST, port, timeout=5)
    try:
        conn.request("GET", "/")
        response = conn.getresponse()
        assert response.status == 200
        assert response.read() == b"page"
        assert conn.sock is not None
        answer, took = read_until_closed(conn.sock, TIMEOUT + SLACK)
    finally:
        conn.close()
    assert answer == b""
    assert took >= TIMEOUT - 0.1


def trickle(sock: socket.socket, data: bytes, every: float, timeout: float) -> tuple[bytes, float]:
    """Send ``data`` a byte at a time, one every ``every`` seconds, until the
    server answers or closes; (what it sent back until it closed, seconds
    from the first byte)."""
    started = time.monotonic()
    for byte in data:
        readable, _, _ = select.select([sock], [], [], every)
        if readable:
            break
        try:
            sock.sendall(bytes([byte]))
        except (BrokenPipeError, ConnectionResetError):
            break
        assert time.monotonic() - started < timeout, "the trickle was never cut off"
    answer, _ = read_until_closed(sock, timeout)
    return answer, time.monotonic() - started


def test_a_header_trickle_gets_408_after_the_header_timeout(
    site_server: tuple[int, ServerProcess],
) -> None:
    """Slowloris: a request head sent a byte every 0.1 s (its connection busy
    all along) is answered 408 and closed after the 0.5 s header timeout."""
    port, _ = site_server
    head = b"GET / HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"s" * 200
    with socket.create_connection((HOST, port), timeout=5) as sock:
        answer, took = trickle(sock, head, 0.1, TIMEOUT + SLACK)
    assert parse_response(answer).status == 408
    assert TIMEOUT - 0.1 <= took <= TIMEOUT + SLACK


def test_a_body_trickle_gets_408_after_the_body_timeout(
    site_server: tuple[int, ServerProcess],
) -> None:
    """A POST whose 10,000-byte body comes a byte every 0.1 s (10 B/s, below
    the 1000 B/s minimum): 408 and closed about 0.5 s after its headers."""
    port, _ = site_server
    head = b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 10000\r\n\r\n"
    with socket.create_connection((HOST, port), timeout=5) as sock:
        sock.sendall(head)
        answer, took = trickle(sock, b"b" * 10000, 0.1, TIMEOUT + SLACK)
    assert parse_response(answer, method="POST").status == 408
    assert TIMEOUT - 0.1 <= took <= TIMEOUT + SLACK


@pytest.mark.slow
def test_a_slow_but_steady_upload_above_the_minimum_rate_is_served(
    site_server: tuple[int, ServerProcess],
) -> None:
    """A 3,000-byte body sent 300 bytes every 0.1 s (3000 B/s, above the
    1000 B/s minimum) takes about 1 s, twice the body timeout: 200, all read."""
    port, _ = site_server
    with socket.create_connection((HOST, port), timeout=5) as sock:
        sock.sendall(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3000\r\n\r\n")
        started = time.monotonic()
        for _ in range(10):
            time.sleep(0.1)
            sock.sendall(b"u" * 300)
        took = time.monotonic() - started
        response = http.client.HTTPResponse(sock, method="POST")
        response.begin()
        assert response.status == 200
        assert response.read() == b"3000"
    assert took > 2 * TIMEOUT


@pytest.mark.slow
def test_time_the_app_leaves_the_body_unread_does_not_count(
    plain_server: tuple[int, ServerProcess],
) -> None:
    """An app that waits 1 s before reading a 4 MiB body: uvicorn stops
    reading after 64 KiB, so the client cannot send; that second is not the
    client's delay: 200, though the body timeout is 0.5 s and the minimum
    rate 10 MB/s."""
    port, _ = plain_server
    body = b"x" * (4 * MIB)
    response = request(port, "/slow-reader", method="POST", body=body, timeout=10)
    assert response.status == 200
    assert response.body == str(len(body)).encode()


@pytest.mark.slow
def test_waiting_for_100_continue_is_not_the_clients_delay(
    plain_server: tuple[int, ServerProcess],
) -> None:
    """A client sends ``Expect: 100-continue`` and waits for the 100, which
    comes when the app reads the body, 0.8 s later (past the 0.5 s body
    timeout): then it sends its body and gets 200, not 408. (Not 1 s: the
    server's body checks come every 0.5 s, and one right after the 100 still
    counts the time since the check before: a race of its own, reported.)"""
    port, _ = plain_server
    with socket.create_connection((HOST, port), timeout=5) as sock:
        sock.sendall(
            b"POST /slow-reader?0.8 HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n"
            b"Content-Length: 10\r\n\r\n"
        )
        interim = b""
        while not interim.endswith(b"\r\n\r\n"):
            chunk = sock.recv(1)
            assert chunk, interim
            interim += chunk
        assert interim.startswith(b"HTTP/1.1 100 "), interim
        sock.sendall(b"0123456789")
        response = http.client.HTTPResponse(sock, method="POST")
        response.begin()
        assert response.status == 200
        assert response.read() == b"10"


def test_a_body_too_slow_after_the_answer_started_closes_without_a_408(
    plain_server: tuple[int, ServerProcess],
) -> None:
    """An app that starts its answer before reading the body, and a body that
    trickles: the connection is closed after the body timeout, and no 408 is
    written into the answer already started."""
    port, _ = plain_server
    with socket.create_connection((HOST, port), timeout=5) as sock:
        sock.sendall(b"POST /answer-first HTTP/1.1\r\nHost: x\r\nContent-Length: 10000\r\n\r\n")
        answer, took = trickle(sock, b"b" * 10000, 0.1, TIMEOUT + SLACK)
    assert answer.startswith(b"HTTP/1.1 200 "), answer
    assert b"408" not in answer
    assert TIMEOUT - 0.1 <= took <= TIMEOUT + SLACK


# -- the connection cap --------------------------------------------------------------


@pytest.mark.slow
def test_connections_over_the_cap_get_503_and_are_closed(script: Path) -> None:
    """With max_connections=4: four kept-alive connections fill the cap; three
    more each get 503 with Retry-After and are closed at once (one of them
    sending a 200 KB request at once, which is read and dropped: no reset);
    when the four idle ones time out (1 s), new clients are served again."""
    with serve(script, "site", max_connections=4, keep_alive_timeout=1.0) as server:
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


def test_refused_connections_linger_a_bounded_number_at_a_time(script: Path) -> None:
    """With the cap (1) full, forty more connections at once, their clients
    reading the 503 but not closing: at most 16 stay open on the server (dropping what comes
    until their client closes, for up to a second); the rest are closed at
    once, so a flood over the cap holds few file descriptors."""
    with serve(script, "site", max_connections=1) as server:
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


# -- Host ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("head", "status"),
    [
        (b"GET / HTTP/1.1\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost: a\r\n", 200),
        (b"GET / HTTP/1.0\r\n", 200),
        (b"GET / HTTP/1.0\r\nHost: a\r\nHost: a\r\n", 400),
    ],
    ids=["1.1-none", "1.1-two", "1.1-one", "1.0-none", "1.0-two"],
)
@pytest.mark.parametrize("app", ["site", "plain"])
def test_host_rules_of_rfc_9112(
    site_server: tuple[int, ServerProcess],
    plain_server: tuple[int, ServerProcess],
    app: str,
    head: bytes,
    status: int,
) -> None:
    """HTTP/1.1 without Host, or any request with two: 400, from a Site and
    from a plain ASGI app (the reactor checks); one Host, or HTTP/1.0 without
    one: 200."""
    port = site_server[0] if app == "site" else plain_server[0]
    response = parse_response(raw_exchange(port, head + b"Connection: close\r\n\r\n"))
    assert response.status == status
    if status == 400:
        assert b"Host" in response.body


@pytest.mark.parametrize(
    ("host", "headers", "version", "status"),
    [
        (None, [], "1.1", 400),
        (b"a", [(b"host", b"b")], "1.1", 400),
        (b"a", [], "1.1", 200),
        (None, [], "1.0", 200),
        (None, [(b"host", b"a"), (b"host", b"a")], "1.0", 400),
        (None, [], "2", 200),
    ],
    ids=["1.1-none", "1.1-two", "1.1-one", "1.0-none", "1.0-two", "2-none"],
)
def test_site_checks_host_under_any_server(
    host: bytes | None, headers: list[tuple[bytes, bytes]], version: str, status: int
) -> None:
    """In-process, as under another ASGI server: the Site answers 400 to
    HTTP/1.1 without Host and to two Hosts in any version; HTTP/1.0 (and
    HTTP/2, which carries the authority otherwise) without Host is served."""
    site = Site(Leaf(b"leaf"))
    response = call(site, "GET", "/", host=None, headers=headers, http_version=version)
    if host is not None:
        response = call(
            site, "GET", "/", host=None, headers=[(b"host", host), *headers], http_version=version
        )
    assert response.status == status
    if status == 200:
        assert response.body == b"leaf"


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
    from lapse.cli import _check, _worker_command, build_parser

    argv = ["serve", "app:site", "--workers", "2", "--store", f"sqlite:///{tmp_path}/s.db"]
    argv += ["--max-connections", "100", "--header-timeout", "7.5", "--body-min-rate", "0"]
    command = _worker_command(_check(build_parser().parse_args(argv)))
    given = " ".join(command)
    assert "--max-connections 100" in given
    assert "--header-timeout 7.5" in given
    assert "--body-min-rate 0.0" in given
    assert "--keep-alive-timeout" not in given
