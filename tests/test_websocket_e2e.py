"""WebSockets and streams bound to sessions, end to end: real server
processes (lapse's own edge, ``reactor.listenTCP``), real stores, the
``websockets`` client over loopback."""

from __future__ import annotations

import socket
import time
from pathlib import Path
from typing import Any

import pytest
from _servers import HOST
from _ws_servers import start_node, ws_connect
from websockets.exceptions import ConnectionClosed, InvalidStatus


def closed_code(ws: Any, timeout: float) -> tuple[int | None, str, float]:
    """Wait for the server to close ``ws``: its code, reason, and when
    (time.monotonic()) the close was seen."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            ws.recv(timeout=max(0.01, deadline - time.monotonic()))
        except ConnectionClosed as closed:
            at = time.monotonic()
            received = closed.rcvd
            if received is None:
                return None, "", at
            return received.code, received.reason, at
        except TimeoutError:
            return None, "timeout", time.monotonic()


def test_edge_serves_websockets_and_shrugs_off_hostile_clients(
    tmp_path: Path, processes: list[Any]
) -> None:
    """Through lapse's edge: an echo with the session; a foreign Origin gets
    403; an oversized message closes 1009; garbage after the handshake costs
    only that connection."""
    node = start_node(tmp_path, "memory:", 10.0, processes)
    uid = node.get("/login")
    with ws_connect(node, uid) as ws:
        ws.send("hello")
        assert ws.recv(timeout=5) == "hello"
    assert node.get("/alive", uid) == uid

    with pytest.raises(InvalidStatus) as refused:
        from websockets.sync.client import connect

        connect(
            f"ws://{HOST}:{node.port}/ws",
            additional_headers={"Origin": "http://evil.example"},
            open_timeout=5,
        )
    assert refused.value.response.status_code == 403

    with ws_connect(node, uid) as ws:
        ws.send("x" * (64 * 1024 + 1))
        assert closed_code(ws, 5)[0] == 1009

    with socket.create_connection((HOST, node.port), timeout=5) as raw:
        raw.sendall(
            b"GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
            b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
            b"Sec-WebSocket-Version: 13\r\n\r\n"
        )
        head = raw.recv(4096)
        assert head.startswith(b"HTTP/1.1 101"), head
        raw.sendall(b"\xff\x00garbage, not a frame" * 50)
        rest = b""
        with pytest.raises((ConnectionError, TimeoutError)):
            while chunk := raw.recv(4096):
                rest += chunk
            raise ConnectionError("closed")
    assert node.get("/alive", uid) == uid


def test_a_page_and_an_upgrade_sent_at_once_are_answered_200_then_101(
    tmp_path: Path, processes: list[Any]
) -> None:
    """A page request and, pipelined behind it, a WebSocket handshake: the page's
    answer (held for the end of the loop's turn) goes out before the 101, and the
    socket then echoes."""
    node = start_node(tmp_path, "memory:", 10.0, processes)
    with socket.create_connection((HOST, node.port), timeout=5) as raw:
        raw.sendall(
            b"GET /alive HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
            b"GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
            b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
            b"Sec-WebSocket-Version: 13\r\n\r\n"
        )
        received = b""
        while b"HTTP/1.1 101" not in received or not received.endswith(b"\r\n\r\n"):
            chunk = raw.recv(4096)
            if not chunk:
                break
            received += chunk
        # a masked text frame "hi", then its echo (unmasked, from the server)
        raw.sendall(b"\x81\x82abcd" + bytes(c ^ k for c, k in zip(b"hi", b"ab", strict=True)))
        echo = raw.recv(4096)
    assert received.startswith(b"HTTP/1.1 200 "), received
    assert received.index(b"HTTP/1.1 200 ") < received.index(b"HTTP/1.1 101 ")
    assert echo == b"\x81\x02hi"


@pytest.mark.slow
def test_a_flood_of_messages_touches_the_session_once_per_tenth_of_its_timeout(
    tmp_path: Path, processes: list[Any]
) -> None:
    """Timeout 1 s: a client sending as fast as it can for 1.5 s (thousands
    of messages a second) touches its session at most once per 0.1 s, and
    the session lives past its timeout."""
    node = start_node(tmp_path, "memory:", 1.0, processes)
    uid = node.get("/login")
    with ws_connect(node, uid) as ws:
        started = time.monotonic()
        sent = 0
        while time.monotonic() - started < 1.5:
            for _ in range(100):
                ws.send("x")
            for _ in range(100):
                assert ws.recv(timeout=5) == "x"
            sent += 100
        elapsed = time.monotonic() - started
    touches = int(node.get("/touches"))
    print(f"{sent} messages in {elapsed:.2f} s: {touches} touches")
    assert sent / elapsed > 1000
    assert 1 <= touches <= elapsed / 0.1 + 1, (touches, elapsed)
    assert node.get("/alive", uid) == uid


@pytest.mark.slow
def test_the_edges_http_timers_do_not_cut_an_upgraded_socket(
    tmp_path: Path, processes: list[Any]
) -> None:
    """Keep-alive 0.3 s, header and body timeouts 0.5 s on the HTTP edge:
    a WebSocket silent for 1.5 s is still open and echoes (the timers are
    HTTP's; after the upgrade the socket is the session's business)."""
    node = start_node(tmp_path, "memory:", 10.0, processes, "short-limits")
    uid = node.get("/login")
    with ws_connect(node, uid) as ws:
        ws.send("before")
        assert ws.recv(timeout=5) == "before"
        time.sleep(1.5)
        ws.send("after")
        assert ws.recv(timeout=5) == "after"


def test_a_send_only_handler_ends_when_its_client_leaves(
    tmp_path: Path, processes: list[Any]
) -> None:
    """A handler that only sends sees socket.closed once the client has
    gone (its send does not raise into it) and returns; nothing is logged
    as a failure."""
    node = start_node(tmp_path, "memory:", 10.0, processes)
    with ws_connect(node, None, "/push") as ws:
        assert ws.recv(timeout=5) == "news"
        assert node.get("/pushers") == "1"
    deadline = time.monotonic() + 3
    while node.get("/pushers") != "0":
        assert time.monotonic() < deadline, "the handler still runs"
        time.sleep(0.02)
    assert "Traceback" not in node.server.stderr_text()


@pytest.mark.slow
def test_logout_in_one_process_closes_the_socket_in_another_within_half_a_second(
    shared_store: str, tmp_path: Path, processes: list[Any]
) -> None:
    """Two processes on one store; a session's socket and stream held in B;
    the session is logged out through A: B closes the socket with 1008
    "session ended" and ends the NOT_DONE_YET stream, within 0.5 s."""
    a = start_node(tmp_path, shared_store, 30.0, processes)
    b = start_node(tmp_path, shared_store, 30.0, processes)
    uid = a.get("/login")
    with socket.create_connection((HOST, b.port), timeout=5) as stream:
        stream.sendall(
            b"GET /stream HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            + f"Cookie: lapse_session={uid}\r\n\r\n".encode()
        )
        head = b""
        while b"tick;" not in head:
            head += stream.recv(4096)
        with ws_connect(b, uid) as ws:
            ws.send("ping")
            assert ws.recv(timeout=5) == "ping"
            a.get("/logout", uid)
            logged_out = time.monotonic()
            code, reason, at = closed_code(ws, 3)
        assert (code, reason) == (1008, "session ended")
        latency = at - logged_out
        assert latency < 0.5, latency
        received = b""
        while not received.endswith(b"0\r\n\r\n"):
            chunk = stream.recv(4096)
            assert chunk, received
            received += chunk
        assert time.monotonic() - logged_out < 0.5
    print(f"{shared_store.split(':')[0]}: socket closed {latency * 1000:.0f} ms after the logout")


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["redis", "postgres"])
def test_busy_socket_keeps_its_session_an_idle_one_does_not(
    kind: str, tmp_path: Path, processes: list[Any], request: pytest.FixtureRequest
) -> None:
    """Timeout 1 s, sockets in B: one sends a message every 50 ms for 3 s
    (3x the timeout) and its session lives; the other sends nothing and its
    session ends after about 1 s, its socket closed with 1008."""
    from conftest import store_url_for

    store = store_url_for(kind, tmp_path, request)
    a = start_node(tmp_path, store, 1.0, processes)
    b = start_node(tmp_path, store, 1.0, processes)
    busy_uid, idle_uid = a.get("/login"), a.get("/login")
    with ws_connect(b, busy_uid) as busy, ws_connect(b, idle_uid) as idle:
        opened = time.monotonic()
        idle_closed: tuple[int | None, str, float] | None = None
        while time.monotonic() - opened < 3.0:
            busy.send("hi")
            assert busy.recv(timeout=2) == "hi"
            if idle_closed is None:
                try:
                    idle.recv(timeout=0.05)
                except ConnectionClosed as closed:
                    assert closed.rcvd is not None
                    idle_closed = (closed.rcvd.code, closed.rcvd.reason, time.monotonic())
                except TimeoutError:
                    pass
            else:
                time.sleep(0.05)
        assert a.get("/alive", busy_uid) == busy_uid
    assert idle_closed is not None and idle_closed[:2] == (1008, "session ended")
    assert 0.9 < idle_closed[2] - opened < 2.0
    assert a.get("/alive", idle_uid) != idle_uid
