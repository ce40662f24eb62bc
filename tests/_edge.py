"""The HTTP-edge tests' server program and the helpers they share.

:data:`APP` runs, as ``python APP PORT KIND SETTINGS``, a lapse ``Site``
(KIND ``site``: ``Site(Page(), **SETTINGS)``) or a plain ASGI app under
``HTTPLimits(**SETTINGS)`` (KIND ``plain``), with ``reactor.listenTCP``;
:func:`serve` runs it on a free port. The conftest fixture ``edge_script``
writes it to a temporary directory once per test module.
"""

from __future__ import annotations

import json
import select
import socket
import time
from pathlib import Path
from typing import Any

from _servers import HOST, Response, free_port, request, running_server

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


def serve(script: Path, kind: str, **settings: Any) -> Any:
    """Run the test server (``kind`` "site" or "plain") with ``settings``."""
    port = free_port()
    return running_server(script, port, args=[str(port), kind, json.dumps(settings)])


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
