"""Helpers for multi-process tests: several lapse servers on one session store.

- :data:`PROGRAM`: the server program (written to a temp dir by the tests).
  ``python program.py PORT STORE TIMEOUT HOOKFILE [MARKER [LEASE [HOLD]]]``:

  - ``STORE`` is a store URL, or ``-`` to let ``LAPSE_SESSION_STORE`` choose;
  - ``TIMEOUT`` is the session class's ``sessionTimeout`` (seconds);
  - ``HOOKFILE`` is where the durable hook appends one JSON line per
    delivery (``event`` is ``"done"``; ``at`` is the wall-clock time), shared
    by every process of a test;
  - ``MARKER`` (or ``-``): while that file exists, the hook appends a
    ``"STARTED"`` line and then sleeps ``HOLD`` s (default 30: to be killed
    mid-hook);
  - ``LEASE``: the keeper's claim lease in seconds (default 30).

  Pages: ``/touch`` (the session's uid), ``/set?k=K&v=V`` (``data[K] = V``),
  ``/get`` (``dict(session.data)`` as JSON), ``/notify`` (registers
  ``notifyOnExpire``, which prints ``NOTIFY <uid>`` on stdout), ``/block?s=S``
  (holds the event loop S seconds in a render, as a slow page would),
  ``/refreshes`` (how many times a Redis Cluster store read the slot map;
  -1 on other stores).
- :class:`Cluster`: starts nodes (one process each, on a free port), stops
  them all by PID in teardown.
- :func:`hook_records`: the lines of the hook file, parsed.
- :func:`new_session`, :func:`visit`: make a session through a node, and
  visit one (asserting it is the same session).
- :class:`Writer`: a client thread that keeps one session and sets a new key
  per request, recording every answer.
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from _servers import Response, ServerProcess, free_port, request, wait_for_port

PROGRAM = r"""
import asyncio
import json
import os
import sys
import time

from lapse.internet import reactor
from lapse.web.resource import Resource
from lapse.web.server import Session, Site

port = int(sys.argv[1])
store = None if sys.argv[2] == "-" else sys.argv[2]
timeout = float(sys.argv[3])
hook_path = sys.argv[4]
marker = sys.argv[5] if len(sys.argv) > 5 and sys.argv[5] != "-" else None
lease = float(sys.argv[6]) if len(sys.argv) > 6 and sys.argv[6] != "-" else None
hold = float(sys.argv[7]) if len(sys.argv) > 7 else 30.0


class ShortSession(Session):
    sessionTimeout = timeout


def append(record):
    with open(hook_path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())


async def hook(expiry):
    record = {
        "uid": expiry.uid,
        "delivery_id": expiry.delivery_id,
        "attempt": expiry.attempt,
        "cause": expiry.cause,
        "data": dict(expiry.data),
        "pid": os.getpid(),
        "at": time.time(),
    }
    if marker is not None and os.path.exists(marker):
        append({**record, "event": "STARTED"})
        await asyncio.sleep(hold)
    append({**record, "event": "done"})


def arg(request, name):
    return request.args[name.encode()][0].decode()


class Touch(Resource):
    isLeaf = True

    def render_GET(self, request):
        return request.getSession().uid


class Set(Resource):
    isLeaf = True

    def render_GET(self, request):
        session = request.getSession()
        session.data[arg(request, "k")] = arg(request, "v")
        return session.uid


class Get(Resource):
    isLeaf = True

    def render_GET(self, request):
        return json.dumps(dict(request.getSession().data), sort_keys=True)


class Notify(Resource):
    isLeaf = True

    def render_GET(self, request):
        session = request.getSession()
        uid = session.uid
        session.notifyOnExpire(lambda: print("NOTIFY", uid, flush=True))
        return uid


class Refreshes(Resource):
    isLeaf = True

    def render_GET(self, request):
        client = getattr(site._keeper.store, "_client", None)
        return str(getattr(client, "refreshes", -1))


class Block(Resource):
    isLeaf = True

    def render_GET(self, request):
        time.sleep(float(arg(request, "s")))
        return "held"


root = Resource()
root.putChild(b"block", Block())
root.putChild(b"touch", Touch())
root.putChild(b"set", Set())
root.putChild(b"get", Get())
root.putChild(b"notify", Notify())
root.putChild(b"refreshes", Refreshes())

site = Site(root, store=store, on_expire=hook)
site.sessionFactory = ShortSession
if lease is not None:
    site._keeper.lease = lease

reactor.listenTCP(port, site, interface="127.0.0.1")
reactor.run()
"""

COOKIE = re.compile(r"lapse_session=([A-Za-z0-9_-]{24});")


def cookie_uid(response: Response) -> str | None:
    """The uid of the ``lapse_session`` cookie the response sets, if any."""
    cookies = response.header_all("set-cookie")
    assert len(cookies) <= 1, cookies
    if not cookies:
        return None
    match = COOKIE.match(cookies[0])
    assert match is not None, cookies[0]
    return match.group(1)


def with_cookie(uid: str) -> dict[str, str]:
    return {"Cookie": f"lapse_session={uid}"}


@dataclass
class Node:
    """One server process of a cluster."""

    name: str
    server: ServerProcess
    port: int

    @property
    def pid(self) -> int:
        return self.server.pid

    def get(self, path: str, uid: str | None = None, timeout: float = 5.0) -> Response:
        """GET ``path``, presenting the session ``uid`` if given."""
        return request(self.port, path, headers=with_cookie(uid) if uid else None, timeout=timeout)

    def alive(self) -> bool:
        return self.server.proc is not None and self.server.proc.poll() is None

    def stdout_lines(self, wait: float = 0.0) -> list[tuple[str, float]]:
        """Every stdout line read so far (text, monotonic time read), waiting
        up to ``wait`` seconds for the first one."""
        found = []
        line = self.server.wait_for_line(wait)
        while line is not None:
            found.append((line.text, line.at))
            line = self.server.wait_for_line(0)
        return found


def new_session(node: Node, path: str = "/touch") -> str:
    """Create a session through ``node``; its uid (from the cookie)."""
    response = node.get(path)
    assert response.status == 200, response.text
    uid = cookie_uid(response)
    assert uid is not None, response.headers
    return uid


def visit(node: Node, path: str, uid: str) -> Any:
    """GET ``path`` on ``node`` with the session ``uid``; assert the session is
    the same one (200, no new cookie); the response."""
    response = node.get(path, uid)
    assert response.status == 200, (node.name, response.status, response.text)
    assert cookie_uid(response) is None, (node.name, path, response.headers)
    return response


@dataclass
class Cluster:
    """Server processes of one test, on one store; all stopped in :meth:`stop`."""

    directory: Path
    store: str
    timeout: float
    marker: Path | None = None
    lease: float | None = None
    hold: float | None = None
    nodes: list[Node] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.script = self.directory / "lapse_node.py"
        self.script.write_text(PROGRAM, encoding="utf-8")
        self.hook_file = self.directory / "hook.jsonl"

    def start(self, name: str) -> Node:
        """Start one more server process and wait until it listens."""
        port = free_port()
        args = [str(port), self.store, str(self.timeout), str(self.hook_file)]
        if self.marker is not None or self.lease is not None or self.hold is not None:
            args.append(str(self.marker) if self.marker is not None else "-")
        if self.lease is not None or self.hold is not None:
            args.append(str(self.lease) if self.lease is not None else "-")
        if self.hold is not None:
            args.append(str(self.hold))
        stderr = self.directory / f"{name}-{len(self.nodes)}.stderr"
        server = ServerProcess(self.script, args=args, stderr_path=stderr)
        node = Node(name, server, port)
        self.nodes.append(node)
        server.start()
        try:
            wait_for_port(port, timeout=15.0, proc=server.proc)
        except (RuntimeError, TimeoutError) as exc:
            raise RuntimeError(f"{name}: {exc}; stderr:\n{server.stderr_text()}") from exc
        return node

    def node_by_pid(self, pid: int) -> Node:
        return next(node for node in self.nodes if node.pid == pid)

    def records(self, uid: str | None = None, event: str | None = "done") -> list[dict[str, Any]]:
        return hook_records(self.hook_file, uid, event)

    def stderr(self) -> str:
        return "\n".join(f"--- {n.name} ---\n{n.server.stderr_text()}" for n in self.nodes)

    def stop(self) -> None:
        for node in self.nodes:
            node.server.stop()


def hook_records(
    path: Path, uid: str | None = None, event: str | None = "done"
) -> list[dict[str, Any]]:
    """The hook file's lines (for ``uid``, of kind ``event``; None: all)."""
    if not path.exists():
        return []
    records = [json.loads(line) for line in path.read_text("utf-8").splitlines() if line]
    return [
        r
        for r in records
        if (uid is None or r["uid"] == uid) and (event is None or r["event"] == event)
    ]


def wait_until(condition: Callable[[], Any], timeout: float, interval: float = 0.02) -> Any:
    """Poll ``condition`` until it returns something truthy; that value, or
    the last falsy one after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value or time.monotonic() >= deadline:
            return value
        time.sleep(interval)


@dataclass
class Answer:
    """One answer a :class:`Writer` got."""

    sent: float
    """time.monotonic() when sent"""
    elapsed: float
    status: int
    retry_after: str | None
    uid: str | None
    """the session the answer names (200), else None"""
    key: str


class Writer(threading.Thread):
    """A client that keeps one session and sets a new key per request
    (``/set?k=NAME-i&v=i``), for as long as ``running`` is set; it follows a
    new session cookie. ``outcomes``: (when sent, the session the answer
    names, key, status); ``answers``: the same with timings and Retry-After."""

    def __init__(self, node: Node, name: str, running: threading.Event) -> None:
        super().__init__(daemon=True)
        self.node, self.name_, self.running = node, name, running
        self.uid: str | None = None
        self.outcomes: list[tuple[float, str | None, str, int]] = []
        self.answers: list[Answer] = []

    def run(self) -> None:
        i = 0
        while self.running.is_set():
            key = f"{self.name_}-{i}"
            sent = time.monotonic()
            response = self.node.get(f"/set?k={key}&v={i}", self.uid)
            elapsed = time.monotonic() - sent
            named = None
            if response.status == 200:
                self.uid = cookie_uid(response) or self.uid
                named = response.text
            self.outcomes.append((sent, named, key, response.status))
            retry = response.header("retry-after")
            self.answers.append(Answer(sent, elapsed, response.status, retry, named, key))
            i += 1
