"""lapse's reactor answers a Site's request in the protocol, without an ASGI task,
when nothing waits (src/lapse/internet/_http_now.py): what that path must keep of
the ASGI path, over real sockets."""

from __future__ import annotations

import asyncio
import socket
import time
from pathlib import Path
from typing import Any

import pytest
from _reactor import run_with_client
from _servers import HOST, parse_response

from lapse.internet._asyncio import AsyncioReactor
from lapse.internet.defer import Deferred
from lapse.web.resource import Resource
from lapse.web.server import NOT_DONE_YET, Request, Site


class TaskProbe(Resource):
    """Says whether its render ran inside an asyncio task, and counts sessions."""

    isLeaf = True

    def render_GET(self, request: Request) -> bytes:
        request.getSession()
        return b"task" if asyncio.current_task() is not None else b"no task"

    def render_POST(self, request: Request) -> bytes:
        return b"body=" + request.content.read() + b" args=" + repr(request.args).encode()


class Slow(Resource):
    """An async render: it waits before answering."""

    isLeaf = True

    async def render_GET(self, request: Request) -> bytes:
        await asyncio.sleep(0.05)
        return b"slow"


class Later(Resource):
    """A Deferred fired later, and a NOT_DONE_YET response written later."""

    isLeaf = True

    def render_GET(self, request: Request) -> Any:
        loop = asyncio.get_running_loop()
        if request.args.get(b"kind") == [b"stream"]:
            request.write(b"one,")
            loop.call_later(0.02, lambda: (request.write(b"two"), request.finish()))
            return NOT_DONE_YET
        later = Deferred()
        loop.call_later(0.02, later.callback, b"deferred")
        return later


class BadHeader(Resource):
    isLeaf = True

    def render_GET(self, request: Request) -> bytes:
        if request.args.get(b"kind") == [b"length"]:
            request.setHeader(b"content-length", b"99")
            return b"short"
        request.responseHeaders._raw[b"x-evil"] = [b"a\r\nset-cookie: stolen=1"]
        return b"split?"


class Boom(Resource):
    isLeaf = True

    def render_GET(self, request: Request) -> bytes:
        raise RuntimeError("boom")


def make_site(
    reactor: AsyncioReactor, store: str = "memory:", site_class: type[Site] = Site
) -> Site:
    root = Resource()
    root.putChild("probe", TaskProbe())
    root.putChild("slow", Slow())
    root.putChild("later", Later())
    root.putChild("bad", BadHeader())
    root.putChild("boom", Boom())
    return site_class(root, reactor=reactor, store=store)


def exchange(port: int, data: bytes, expect: int = 1, timeout: float = 5.0) -> bytes:
    """Send ``data`` on one connection; read until ``expect`` responses arrived or it closes."""
    with socket.create_connection((HOST, port), timeout=timeout) as sock:
        sock.sendall(data)
        received = b""
        deadline = time.monotonic() + timeout
        while received.count(b"HTTP/1.") < expect or not _complete(received, expect):
            if time.monotonic() > deadline:
                break
            chunk = sock.recv(65536)
            if not chunk:
                break
            received += chunk
        return received


def _complete(data: bytes, expect: int) -> bool:
    """Whether ``data`` holds ``expect`` whole responses (Content-Length framed)."""
    rest = data
    for _ in range(expect):
        head, sep, rest = rest.partition(b"\r\n\r\n")
        if not sep:
            return False
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value.strip())
        if len(rest) < length:
            return False
        rest = rest[length:]
    return True


def serve(reactor: AsyncioReactor, site: Site, client: Any) -> Any:
    port = reactor.listenTCP(0, site, interface=HOST).getHost().port
    return run_with_client(reactor, lambda: client(port))


GET = b"GET %b HTTP/1.1\r\nHost: x\r\n\r\n"


def test_a_synchronous_render_on_the_memory_store_runs_without_a_task(
    reactor: AsyncioReactor,
) -> None:
    """On the memory store a seed-style render runs in the protocol's callback: no task."""
    answer = serve(reactor, make_site(reactor), lambda port: exchange(port, GET % b"/probe"))
    response = parse_response(answer)
    assert response.status == 200
    assert response.body == b"no task"
    assert b"set-cookie: lapse_session=" in answer


def test_a_render_on_a_shared_store_runs_in_a_task(reactor: AsyncioReactor, tmp_path: Path) -> None:
    """A store reached through the async protocol keeps the ASGI path (a task)."""
    site = make_site(reactor, store=f"sqlite:///{tmp_path / 's.db'}")
    answer = serve(reactor, site, lambda port: exchange(port, GET % b"/probe"))
    assert parse_response(answer).body == b"task"


def test_pipelined_requests_are_answered_in_order_across_both_paths(
    reactor: AsyncioReactor,
) -> None:
    """Requests sent at once, some answered at once and one by an async render,
    come back in the order they were sent (those queued behind the async one
    wait for it, and take a task)."""
    data = GET % b"/probe" + GET % b"/slow" + GET % b"/probe" + GET % b"/later?kind=d"
    answer = serve(reactor, make_site(reactor), lambda port: exchange(port, data, expect=4))
    bodies = [part.split(b"\r\n\r\n", 1)[1][:8] for part in answer.split(b"HTTP/1.1 ")[1:]]
    assert [b.split(b"HTTP")[0] for b in bodies] == [b"no task", b"slow", b"task", b"deferred"]


def test_a_deferred_and_a_streamed_response_are_finished_by_a_task(
    reactor: AsyncioReactor,
) -> None:
    """A render on the memory store that returns a Deferred or NOT_DONE_YET is
    finished later, as on the ASGI path."""

    def client(port: int) -> tuple[bytes, bytes]:
        deferred = exchange(port, GET % b"/later?kind=d")
        with socket.create_connection((HOST, port), timeout=5) as sock:
            sock.sendall(GET % b"/later?kind=stream")
            streamed = b""
            while not streamed.endswith(b"0\r\n\r\n"):
                chunk = sock.recv(65536)
                if not chunk:
                    break
                streamed += chunk
        return deferred, streamed

    deferred, streamed = serve(reactor, make_site(reactor), client)
    assert parse_response(deferred).body == b"deferred"
    assert b"transfer-encoding: chunked" in streamed
    assert b"4\r\none,\r\n3\r\ntwo\r\n0\r\n\r\n" in streamed


def test_head_gets_the_get_length_and_no_body(reactor: AsyncioReactor) -> None:
    answer = serve(
        reactor, make_site(reactor), lambda port: exchange(port, b"HEAD /probe HTTP/1.0\r\n\r\n")
    )
    head, _, body = answer.partition(b"\r\n\r\n")
    assert b"content-length: 7" in head
    assert body == b""


def test_http_1_0_and_connection_close_are_answered_then_closed(reactor: AsyncioReactor) -> None:
    """After a response that ends the connection, the server closes it (the
    read sees the end of the stream rather than timing out)."""

    def client(port: int) -> list[bytes]:
        return [
            exchange(port, b"GET /probe HTTP/1.0\r\n\r\n", expect=2),
            exchange(
                port, b"GET /probe HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", expect=2
            ),
        ]

    for answer in serve(reactor, make_site(reactor), client):
        assert answer.count(b"HTTP/1.1 200") == 1
        assert b"connection: close" in answer.lower()


def test_a_small_form_post_reaches_the_render(reactor: AsyncioReactor) -> None:
    """A body that arrived with its head is the render's ``content`` and ``args``."""
    data = (
        b"POST /probe HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-www-form-urlencoded\r\n"
        b"Content-Length: 7\r\n\r\na=1&b=2"
    )
    answer = serve(reactor, make_site(reactor), lambda port: exchange(port, data))
    body = parse_response(answer).body
    assert body.startswith(b"body=a=1&b=2 args=")
    assert b"b'a': [b'1']" in body


def test_a_large_body_arriving_in_pieces_takes_the_task_path(reactor: AsyncioReactor) -> None:
    """A 100 KiB body (more than is read unasked) still reaches the render."""
    payload = b"x" * 100_000

    def client(port: int) -> bytes:
        with socket.create_connection((HOST, port), timeout=5) as sock:
            sock.sendall(b"POST /probe HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n")
            for start in range(0, len(payload), 10_000):
                sock.sendall(payload[start : start + 10_000])
            return exchange_on(sock)

    answer = serve(reactor, make_site(reactor), client)
    assert parse_response(answer).body.startswith(b"body=" + b"x" * 100)
    assert len(parse_response(answer).body) > 100_000


def test_a_header_with_a_line_break_is_a_500_never_a_split_response(
    reactor: AsyncioReactor,
) -> None:
    answer = serve(reactor, make_site(reactor), lambda port: exchange(port, GET % b"/bad"))
    assert answer.startswith(b"HTTP/1.1 500 ")
    assert b"stolen" not in answer


def test_a_body_unlike_its_content_length_is_a_500(reactor: AsyncioReactor) -> None:
    """A response whose body is not the Content-Length it declares is never sent
    (the client would wait for bytes that never come)."""
    answer = serve(
        reactor, make_site(reactor), lambda port: exchange(port, GET % b"/bad?kind=length")
    )
    assert answer.startswith(b"HTTP/1.1 500 ")
    assert b"short" not in answer


def test_a_failing_render_is_a_500_page_and_the_connection_lives(reactor: AsyncioReactor) -> None:
    data = GET % b"/boom" + GET % b"/probe"
    answer = serve(reactor, make_site(reactor), lambda port: exchange(port, data, expect=2))
    assert answer.startswith(b"HTTP/1.1 500 ")
    assert answer.count(b"HTTP/1.1 200 ") == 1


class OwnCall(Site):
    """A Site subclass that changes ``__call__``: it must be served through it."""

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            await send({"type": "http.response.start", "status": 203, "headers": []})
            await send({"type": "http.response.body", "body": b"mine"})
            return
        await super().__call__(scope, receive, send)


def test_a_site_subclass_with_its_own_call_is_served_through_it(reactor: AsyncioReactor) -> None:
    site = make_site(reactor, site_class=OwnCall)
    answer = serve(reactor, site, lambda port: exchange(port, GET % b"/probe"))
    assert answer.startswith(b"HTTP/1.1 203 ")


@pytest.mark.parametrize("count", [2000])
def test_many_pipelined_requests_in_one_read_are_all_answered(
    reactor: AsyncioReactor, count: int
) -> None:
    """Thousands of requests in one write: each answered once, in order, with no
    recursion however long the queue behind an async one."""
    data = GET % b"/slow" + (GET % b"/probe") * count
    answer = serve(reactor, make_site(reactor), lambda port: exchange(port, data, expect=count + 1))
    assert answer.count(b"HTTP/1.1 200 ") == count + 1
    assert answer.index(b"slow") < answer.index(b"\r\n\r\ntask")


class Echo(Resource):
    """Answers with the path and query it was asked, and a header naming them."""

    isLeaf = True

    def render_GET(self, request: Request) -> bytes:
        said = request.uri
        request.setHeader(b"x-asked", said)
        if request.args.get(b"s"):
            request.getSession()
        return said


def test_a_flood_of_distinct_urls_is_answered_right_and_the_caches_stay_bounded(
    reactor: AsyncioReactor,
) -> None:
    """A client asking 600 different targets (each answered with its own
    header, 200 of them with a new session's cookie) gets each one's own
    answer, and what the protocol remembers of targets and header blocks
    stays bounded; no header or block with a Set-Cookie is kept (a
    session's uid would be)."""
    from lapse.internet import _http_now

    root = Resource()
    root.putChild("echo", Echo())
    site = Site(root, reactor=reactor)
    targets = [b"/echo/%d?q=%%41%d%b" % (i, i, b"" if i % 3 else b"&s=1") for i in range(600)]

    def client(port: int) -> list[bytes]:
        with socket.create_connection((HOST, port), timeout=5) as sock:
            answers = []
            for target in targets:
                sock.sendall(GET % target)
                answers.append(exchange_on(sock))
            return answers

    answers = serve(reactor, site, client)
    for target, answer in zip(targets, answers, strict=True):
        response = parse_response(answer)
        assert response.body == target
        assert f"x-asked: {target.decode()}" in answer.decode().lower()
        assert (b"set-cookie: lapse_session=" in answer) == target.endswith(b"&s=1")
    assert len(_http_now._targets) <= _http_now._TARGETS_MAX
    assert len(_http_now._blocks) <= _http_now._BLOCKS_MAX
    assert all(b"set-cookie" not in line for line, *_ in _http_now._blocks.values())
    assert all(name.lower() != b"set-cookie" for name, _ in _http_now._checked)


def exchange_on(sock: socket.socket) -> bytes:
    """One whole response read from ``sock``."""
    received = b""
    while not _complete(received, 1):
        chunk = sock.recv(65536)
        if not chunk:
            break
        received += chunk
    return received


def test_a_client_that_half_closes_after_its_request_still_gets_the_answer(
    reactor: AsyncioReactor,
) -> None:
    """A request, then the client's end of stream in the same moment (as ``nc``
    sends): the response held for the end of the loop's turn is written before
    the server closes (never lost to the close that follows an end of stream)."""

    def client(port: int) -> bytes:
        with socket.create_connection((HOST, port), timeout=5) as sock:
            sock.sendall(GET % b"/probe")
            sock.shutdown(socket.SHUT_WR)
            received = b""
            while chunk := sock.recv(65536):
                received += chunk
            return received

    answer = serve(reactor, make_site(reactor), client)
    assert parse_response(answer).body == b"no task"


def test_an_answer_and_a_malformed_request_behind_it_come_back_200_then_400(
    reactor: AsyncioReactor,
) -> None:
    """A good request and garbage in one send: the good one's answer (held for
    the end of the turn) is not overtaken by the 400, nor lost to its close."""
    data = GET % b"/probe" + b"NOT HTTP AT ALL\r\n\r\n"
    answer = serve(reactor, make_site(reactor), lambda port: exchange(port, data, expect=2))
    assert answer.startswith(b"HTTP/1.1 200 ")
    assert b"no task" in answer
    assert answer.index(b"no task") < answer.index(b"HTTP/1.1 400 ")
