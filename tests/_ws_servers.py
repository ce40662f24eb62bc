"""A lapse server program with WebSockets and streams, for end-to-end tests.

``python program.py PORT STORE TIMEOUT [short-limits]`` serves
(``reactor.listenTCP``, so lapse's own HTTP edge) a Site on ``STORE`` whose
sessions time out after ``TIMEOUT`` seconds (``short-limits``: keep-alive
0.3 s, header and body timeouts 0.5 s):

- ``/login``: the session's uid (made if need be); ``/logout``: ends it;
- ``/alive``: the uid of the session the cookie names, or of a new one;
- ``/ws``: a WebSocket that echoes every message (64 KiB at most);
- ``/stream``: a NOT_DONE_YET response writing ``tick;`` every 50 ms;
- ``/touches``: how many times sockets' messages touched a session;
- ``/push``: a WebSocket that only sends (``news`` every 10 ms) while open;
  ``/pushers``: how many of those handlers are running.

:func:`start_node` runs one (stopped by PID through the ``processes``
fixture); :func:`ws_connect` opens a WebSocket on it with a session cookie.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from _servers import ServerProcess, free_port, request, wait_for_port, write_script
from websockets.sync.client import ClientConnection, connect

PROGRAM = r"""
import sys

from lapse.internet import reactor
from lapse.web import _live
from lapse.web.resource import Resource
from lapse.web.server import NOT_DONE_YET, Session, Site
from lapse.web.websocket import WebSocketResource

port = int(sys.argv[1])
store = sys.argv[2]
timeout = float(sys.argv[3])
short_limits = len(sys.argv) > 4 and sys.argv[4] == "short-limits"


class Short(Session):
    sessionTimeout = timeout


touches = [0]
keep_alive = _live.keep_alive


def counting_keep_alive(session, fraction):
    touched = keep_alive(session, fraction)
    touches[0] += touched
    return touched


_live.keep_alive = counting_keep_alive
import lapse.web.websocket as websocket_module  # noqa: E402

websocket_module.keep_alive = counting_keep_alive


class Echo(WebSocketResource):
    max_message_size = 64 * 1024

    async def websocket(self, request, socket):
        request.getSession()
        async for message in socket:
            await socket.send(message)


pushers = [0]


class Push(WebSocketResource):
    # Sends only (never receives), until the socket closes.

    async def websocket(self, request, socket):
        import asyncio

        pushers[0] += 1
        try:
            while not socket.closed:
                await socket.send("news")
                await asyncio.sleep(0.01)
        finally:
            pushers[0] -= 1


class Page(Resource):
    isLeaf = True

    def __init__(self, render):
        super().__init__()
        self.render_GET = render


def logout(request):
    request.getSession().expire()
    return "bye"


def stream(request):
    request.getSession()
    ended = []
    request.notifyFinish().addBoth(ended.append)

    def tick():
        if not ended:
            request.write(b"tick;")
            reactor.callLater(0.05, tick)

    tick()
    return NOT_DONE_YET


root = Resource()
root.putChild(b"ws", Echo())
root.putChild(b"login", Page(lambda request: request.getSession().uid))
root.putChild(b"alive", Page(lambda request: request.getSession().uid))
root.putChild(b"logout", Page(logout))
root.putChild(b"stream", Page(stream))
root.putChild(b"touches", Page(lambda request: str(touches[0])))
root.putChild(b"push", Push())
root.putChild(b"pushers", Page(lambda request: str(pushers[0])))
limits = {}
if short_limits:
    limits = {"keep_alive_timeout": 0.3, "header_timeout": 0.5, "body_timeout": 0.5}
site = Site(root, store=store, **limits)
site.sessionFactory = Short
reactor.listenTCP(port, site, interface="127.0.0.1")
reactor.run()
"""


@dataclass
class WsNode:
    """One server process running :data:`PROGRAM`."""

    server: ServerProcess
    port: int

    def get(self, path: str, uid: str | None = None) -> str:
        headers = {"Cookie": f"lapse_session={uid}"} if uid else None
        response = request(self.port, path, headers=headers, timeout=5.0)
        assert response.status == 200, response
        return response.text

    def stop(self) -> None:
        self.server.stop()


def start_node(
    directory: Path, store: str, timeout: float, processes: list[Any], *extra: str
) -> WsNode:
    """Start a server of :data:`PROGRAM` on a free port; wait until it listens."""
    script = write_script(directory, "ws_app.py", PROGRAM)
    port = free_port()
    server = ServerProcess(script, args=[str(port), store, str(timeout), *extra])
    server.stderr_path = directory / f"ws_app.{port}.stderr"
    server.start()
    processes.append(server)
    try:
        wait_for_port(port, timeout=15.0, proc=server.proc)
    except (RuntimeError, TimeoutError) as exc:
        raise RuntimeError(f"{exc}; stderr:\n{server.stderr_text()}") from exc
    return WsNode(server, port)


def ws_connect(node: WsNode, uid: str | None = None, path: str = "/ws") -> ClientConnection:
    """A WebSocket to ``node`` presenting session ``uid``, with the node's
    own Origin."""
    headers = {"Origin": f"http://127.0.0.1:{node.port}"}
    if uid:
        headers["Cookie"] = f"lapse_session={uid}"
    return connect(f"ws://127.0.0.1:{node.port}{path}", additional_headers=headers, open_timeout=5)
