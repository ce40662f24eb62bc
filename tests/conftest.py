"""Shared test helpers: drive a Site through ASGI in-process, with a fake clock."""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import pytest

from lapse.internet._asyncio import AsyncioReactor
from lapse.internet.task import Clock
from lapse.testing import FakeClock as FakeClock  # (tests import it from here)
from lapse.web.resource import Resource
from lapse.web.server import Site


@dataclass
class Response:
    """What the site sent for one request."""

    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes
    messages: list[dict[str, Any]] = field(default_factory=list)

    def header(self, name: bytes) -> bytes | None:
        values = [v for k, v in self.headers if k == name]
        return values[-1] if values else None

    @property
    def set_cookies(self) -> dict[bytes, bytes]:
        """Set-Cookie headers by cookie name: the whole header value."""
        cookies = {}
        for key, value in self.headers:
            if key == b"set-cookie":
                cookies[value.split(b"=", 1)[0]] = value
        return cookies

    def cookie_value(self, name: bytes) -> bytes | None:
        header = self.set_cookies.get(name)
        return None if header is None else header.split(b";")[0].split(b"=", 1)[1]


def make_scope(
    method: str = "GET",
    path: bytes = b"/",
    headers: Iterable[tuple[bytes, bytes]] = (),
    scheme: str = "http",
    query: bytes = b"",
    client: tuple[str, int] = ("127.0.0.1", 50000),
    host: bytes | None = b"127.0.0.1:8080",
    http_version: str = "1.1",
) -> dict[str, Any]:
    """An HTTP scope; with a ``Host`` header (``host``) unless the headers
    have one or ``host`` is None."""
    all_headers = [(k.lower(), v) for k, v in headers]
    if host is not None and not any(k == b"host" for k, _ in all_headers):
        all_headers.insert(0, (b"host", host))
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": http_version,
        "method": method,
        "scheme": scheme,
        "path": unquote(path.decode("latin-1")),
        "raw_path": path,
        "query_string": query,
        "root_path": "",
        "headers": all_headers,
        "client": client,
        "server": ("127.0.0.1", 8080),
    }


async def call_async(
    site: Site,
    method: str = "GET",
    path: bytes | str = b"/",
    *,
    headers: Iterable[tuple[bytes, bytes]] = (),
    body: bytes = b"",
    scheme: str = "http",
    cookies: dict[bytes, bytes] | None = None,
    client: tuple[str, int] = ("127.0.0.1", 50000),
    host: bytes | None = b"127.0.0.1:8080",
    http_version: str = "1.1",
) -> Response:
    """Run one request through ``site`` as an ASGI server would, from ``client``
    (with a ``Host`` header unless ``host`` is None)."""
    raw = path.encode("latin-1") if isinstance(path, str) else path
    target, _, query = raw.partition(b"?")
    all_headers = list(headers)
    if cookies:
        all_headers.append((b"cookie", b"; ".join(k + b"=" + v for k, v in cookies.items())))
    if body and not any(k.lower() == b"content-length" for k, _ in all_headers):
        all_headers.append((b"content-length", str(len(body)).encode()))
    scope = make_scope(
        method,
        target,
        all_headers,
        scheme,
        query,
        client=client,
        host=host,
        http_version=http_version,
    )
    incoming: list[dict[str, Any]] = [{"type": "http.request", "body": body, "more_body": False}]
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        if incoming:
            return incoming.pop(0)
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await site(scope, receive, send)
    start = next(m for m in sent if m["type"] == "http.response.start")
    body_out = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return Response(start["status"], list(start["headers"]), body_out, sent)


def call(site: Site, method: str = "GET", path: bytes | str = b"/", **kw: Any) -> Response:
    """Synchronous :func:`call_async`."""
    return asyncio.run(call_async(site, method, path, **kw))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Run the tests marked ``slow`` first, spread over the xdist workers.

    ``--dist worksteal`` hands worker k the k-th contiguous share of this
    list (sized as below); each share starts with every n-th slow test, so
    the long tests start at once on every worker and the run ends on quick
    ones. Without xdist: slow tests first. The order is otherwise kept.
    """
    slow = [item for item in items if item.get_closest_marker("slow") is not None]
    if not slow:
        return
    quick = [item for item in items if item.get_closest_marker("slow") is None]
    workers = max(1, int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")))
    ordered: list[pytest.Item] = []
    left = len(items)
    for k in range(workers):
        size = left // (workers - k)  # what worksteal sends worker k
        share = slow[k::workers]
        take = max(0, size - len(share))
        ordered += share + quick[:take]
        quick = quick[take:]
        left -= size
    items[:] = ordered + quick


@pytest.fixture(scope="module")
def edge_script(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The HTTP-edge test server program (``_edge.APP``) in a temporary directory."""
    from _edge import APP
    from _servers import write_script

    return write_script(tmp_path_factory.mktemp("edge"), "edge_app.py", APP)


@pytest.fixture
def reactor() -> Iterator[AsyncioReactor]:
    """A fresh real reactor (see tests/_reactor.py); afterwards its ports are
    closed and its loop too."""
    fresh = AsyncioReactor()
    try:
        yield fresh
    finally:
        assert not fresh.running
        for port in list(fresh._ports):
            port.stopListening()
        loop = fresh._loop
        if loop is not None and not loop.is_closed():
            loop.close()
        asyncio.set_event_loop(None)


@pytest.fixture
def clock() -> Clock:
    return Clock()


class Leaf(Resource):
    """A page that renders a fixed body and records the requests it saw."""

    isLeaf = True

    def __init__(self, body: bytes | str = b"ok") -> None:
        super().__init__()
        self.body = body
        self.requests: list[Any] = []

    def render_GET(self, request: Any) -> bytes | str:
        self.requests.append(request)
        return self.body


class SessionPage(Resource):
    """A page that returns the uid of the visitor's session."""

    isLeaf = True

    def render_GET(self, request: Any) -> str:
        return str(request.getSession().uid)


@pytest.fixture
def caplog_debug(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    caplog.set_level(logging.DEBUG, logger="lapse")
    yield caplog


_prefixes = itertools.count()


def store_url_for(kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> str:
    """A fresh store URL of ``kind`` ("memory", "sqlite", "redis",
    "postgres"): a file in ``tmp_path``, the test Redis under a key prefix of
    its own, or the test PostgreSQL in a schema of its own (the store makes
    it on first use: faster than a database each)."""
    if kind == "memory":
        return "memory:"
    if kind == "sqlite":
        return f"sqlite:///{tmp_path}/sessions.db"
    if kind == "postgres":
        postgres = request.getfixturevalue("postgres_server")
        return f"{postgres.url()}?schema=t{next(_prefixes)}x{os.getpid()}"
    server = request.getfixturevalue("redis_server")
    return f"{server.url}?prefix=t{next(_prefixes)}x{id(request)}"


@pytest.fixture(params=["sqlite", "redis", "postgres"])
def shared_store(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The URL of a fresh shared store of each kind (SQLite, Redis, PostgreSQL)."""
    return store_url_for(request.param, tmp_path, request)


@pytest.fixture(params=["memory", "sqlite", "redis", "postgres"])
def any_store(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The URL of a fresh store of each kind (memory, SQLite, Redis, PostgreSQL)."""
    return store_url_for(request.param, tmp_path, request)


def json_body(response: Any) -> dict[str, Any]:
    """A response's body, read as a JSON object."""
    result: dict[str, Any] = json.loads(response.body)
    return result


def session_cookie(uid: str) -> dict[bytes, bytes]:
    """The cookies of a request presenting session ``uid``."""
    return {b"lapse_session": uid.encode()}


@pytest.fixture
def processes() -> Iterator[list[Any]]:
    """Collects what a test starts and must stop (each with a ``stop()``:
    tests/_cluster.py's ``Cluster`` of server processes, stopped by PID);
    stops them all after the test, whatever its outcome."""
    made: list[Any] = []
    yield made
    for each in made:
        each.stop()


@pytest.fixture(scope="session")
def redis_server() -> Iterator[Any]:
    """A real redis-server on a free loopback port, for the whole test run."""
    from _redis_server import RedisServer

    with RedisServer() as server:
        yield server


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[Any]:
    """A real PostgreSQL server on a free loopback port, for the whole test
    run of one worker; tests make databases of their own on it
    (``create_database``). Tests that stop or kill it start their own."""
    from _postgres import PostgresServer

    with PostgresServer() as server:
        yield server


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[Any]:
    """A real 6-node Redis Cluster (3 primaries, 3 replicas) on free loopback
    ports, for the whole test run of one worker; tests keep to key prefixes
    of their own. Tests that kill, fail over or migrate start their own."""
    from _redis_cluster import RedisCluster

    with RedisCluster(node_timeout_ms=5000) as cluster:
        yield cluster
