"""The HTTP edge: limits kept as the bytes arrive, timeouts, Host (the connection
cap and the settings: test_http_connections.py).

Most tests talk over real loopback sockets to a real server in a subprocess
(``reactor.listenTCP`` with uvicorn, httptools, uvloop), configured with short
timeouts (0.5 s) so that slow clients are dealt with quickly; its memory is
read from ``/proc/PID/status`` (the peak RSS is reset through
``/proc/PID/clear_refs`` first). The Site-level Host checks run in-process.
"""

from __future__ import annotations

import http.client
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from _edge import (
    HEAD_LIMIT,
    MIB,
    SHORT,
    SLACK,
    TIMEOUT,
    flood_header,
    get,
    read_until_closed,
    reset_peak_rss,
    serve,
    status_kib,
    trickle,
)
from _servers import (
    HOST,
    ServerProcess,
    parse_response,
    raw_exchange,
    request,
)
from conftest import Leaf, call

from lapse.web.server import Site


@pytest.fixture(scope="module")
def site_server(edge_script: Path) -> Iterator[tuple[int, ServerProcess]]:
    """A Site with 0.5 s timeouts and a minimum body rate of 1000 B/s."""
    with serve(edge_script, "site", body_min_rate=1000, **SHORT) as server:
        port = int(server.args[0])
        yield port, server
        assert server.proc is not None and server.proc.poll() is None, server.stderr_text()
        assert "Traceback" not in server.stderr_text(), server.stderr_text()


@pytest.fixture(scope="module")
def plain_server(edge_script: Path) -> Iterator[tuple[int, ServerProcess]]:
    """A plain ASGI app with 0.5 s timeouts and a minimum body rate of 10 MB/s."""
    with serve(edge_script, "plain", body_min_rate=10_000_000, **SHORT) as server:
        yield int(server.args[0]), server
        assert "Traceback" not in server.stderr_text(), server.stderr_text()


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


def test_a_pipelined_head_begun_with_the_request_before_it_is_timed(
    plain_server: tuple[int, ServerProcess],
) -> None:
    """A request and the start of a pipelined one's head, in one send; the
    head's rest never comes: the first is answered 200, the second 408 after
    the header timeout (the head's time runs from the read that began it; it
    was not timed, and the connection was closed silently as idle)."""
    port, _ = plain_server
    with socket.create_connection((HOST, port), timeout=5) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\nGET / HTTP/1.1\r\nHo")
        answer, _ = read_until_closed(sock, TIMEOUT + SLACK)
    assert answer.startswith(b"HTTP/1.1 200 "), answer
    assert b"HTTP/1.1 408 " in answer, answer


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


def read_interim(sock: socket.socket) -> bytes:
    """An interim response's head, read a byte at a time (nothing past it)."""
    interim = b""
    while not interim.endswith(b"\r\n\r\n"):
        chunk = sock.recv(1)
        assert chunk, interim
        interim += chunk
    return interim


@pytest.mark.slow
def test_waiting_for_100_continue_is_not_the_clients_delay(
    plain_server: tuple[int, ServerProcess],
) -> None:
    """A client sends ``Expect: 100-continue`` and waits for the 100, which
    comes when the app reads the body, 0.9 s later (past the 0.5 s body
    timeout); it sends its body 0.3 s after the 100 and gets 200, not 408:
    the body's time starts at the 100. (The server's body checks came at 0.5
    and 1.0 s: the one at 1.0 s, after the 100 and before the body, counted
    the time since the check at 0.5 s and answered 408.)"""
    port, _ = plain_server
    with socket.create_connection((HOST, port), timeout=5) as sock:
        sock.sendall(
            b"POST /slow-reader?0.9 HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n"
            b"Content-Length: 10\r\n\r\n"
        )
        interim = read_interim(sock)
        assert interim.startswith(b"HTTP/1.1 100 "), interim
        time.sleep(0.3)
        sock.sendall(b"0123456789")
        response = http.client.HTTPResponse(sock, method="POST")
        response.begin()
        assert response.status == 200
        assert response.read() == b"10"


def test_a_client_silent_after_the_100_continue_gets_408(
    plain_server: tuple[int, ServerProcess],
) -> None:
    """Abuse: a client asks for ``100-continue``, gets it (the app reads at
    0.2 s), and sends nothing: 408 and closed about the 0.5 s body timeout
    after the 100 (not sooner: the time before the 100 is not its delay; it
    was closed 0.3 s after the 100; nor later: the wait is not extra time)."""
    port, _ = plain_server
    with socket.create_connection((HOST, port), timeout=5) as sock:
        sock.sendall(
            b"POST /slow-reader?0.2 HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n"
            b"Content-Length: 10\r\n\r\n"
        )
        assert read_interim(sock).startswith(b"HTTP/1.1 100 ")
        answer, took = read_until_closed(sock, TIMEOUT + SLACK)
    assert parse_response(answer, method="POST").status == 408
    assert TIMEOUT - 0.1 <= took <= TIMEOUT + SLACK


@pytest.mark.slow
def test_time_a_pipelined_head_waits_for_reading_to_resume_does_not_count(
    plain_server: tuple[int, ServerProcess],
) -> None:
    """Three pipelined requests in one send, the third's head cut short; its
    rest follows 0.1 s later. The first takes the app 1.2 s, and uvicorn
    stops reading while the second waits its turn: the rest of the third head
    sits unread in the socket meanwhile, which is not the client's delay
    (0.5 s header timeout): all three are answered 200, none 408."""
    port, _ = plain_server
    with socket.create_connection((HOST, port), timeout=5) as sock:
        sock.sendall(
            b"GET /slow-reader?1.2 HTTP/1.1\r\nHost: x\r\n\r\n"
            b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"
            b"GET / HTTP/1.1\r\nHo"
        )
        time.sleep(0.1)
        sock.sendall(b"st: x\r\nConnection: close\r\n\r\n")
        answer, _ = read_until_closed(sock, 5)
    assert answer.count(b"HTTP/1.1 200 ") == 3, answer
    assert b"408" not in answer


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
