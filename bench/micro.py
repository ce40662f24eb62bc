"""The request path measured in process: µs per request through an ASGI call, no sockets.

Steadier than loopback wrk on a shared machine: no client, no kernel, no second process.
Every case is one GET /logme driven as uvicorn would drive it (a scope, ``receive``,
``send``; the app started and stopped through ASGI lifespan), measured in ``--rounds``
rounds of ``--requests`` requests; a case's figure is the median of its rounds' µs per
request, with their spread (min-max) and its ratio to the bare ASGI app called the same way.

Cases:

- ``bare``: bench/servers/bare_asgi.py's app: 200, empty body, no sessions (the reference);
- ``site touch`` / ``site create``: the seed's page on a ``Site``, memory store, with a live
  session's cookie / without a cookie (a new session per request);
- ``site touch, logged in`` / ``site login``: the principal index's cost on the same
  ``Site``: the seed's page with the cookie of a session bound to a user (its rounds
  alternate with ``site touch``'s, so that drift hits both alike) / ``POST
  /login?user=...`` without a cookie, which makes a session, rotates it, registers the
  seed's callback and binds it (``await session.set_principal``), the user cycling over
  10,000 (bench/systems.py's login route, as a class);
- ``middleware touch`` / ``middleware create``: the same through ``SessionMiddleware``
  around a bare ASGI app that gets the session as the seed does;
- ``sqlite touch`` / ``redis touch``: a ``Site`` on SQLite (a temporary file) and on Redis
  (``--redis-url``, or a redis-server started on a free loopback port), the cookie naming a
  session of 10 keys: the session is loaded and touched, the page reads one key; and the
  same with a session of ``--keys`` keys: what a session's size costs a request that does
  not read it. Store cases run ``--requests`` / 10 requests per round (each is a round trip).

Run: ``.venv/bin/python bench/run.py micro [--requests N] [--rounds R] [--keys K]``
(or ``python -m bench.micro``; ``PYTHONPATH=other/src`` measures another checkout).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

if not __package__:  # run as a script: make the bench package importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.servers.bare_asgi import app as bare_app
from bench.systems import suite_helpers
from lapse.asgi import SessionMiddleware, get_session
from lapse.web.resource import Resource
from lapse.web.server import Site

App = Callable[[Any, Any, Any], Awaitable[None]]
"""An ASGI app, loosely typed: the bare app, a Site and the middleware all fit."""
COOKIE = b"lapse_session"
LIFESPAN_TIMEOUT = 10.0
"""Seconds an app may take to start or stop: more is an error, not a hang."""


class Logme(Resource):
    """The seed's page: get the session, register a callback on first sight."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.seen: set[str] = set()

    def render_GET(self, request: Any) -> str:
        session = request.getSession()
        if session.uid not in self.seen:
            self.seen.add(session.uid)
            session.notifyOnExpire(lambda: self.seen.discard(session.uid))
        return ""


class Login(Resource):
    """The bench's login route (bench/systems.py's ``LOGIN_ROUTE``): POST makes the
    session, rotates it, does what the seed's page does on first sight, and binds it to
    ``?user=``."""

    isLeaf = True

    def __init__(self, logme: Logme) -> None:
        super().__init__()
        self.logme = logme

    async def render_POST(self, request: Any) -> str:
        session = request.getSession()
        session.rotate()
        self.logme.render_GET(request)
        await session.set_principal(request.args[b"user"][0].decode())
        return ""


LOGIN_USERS = 10_000


def login_site() -> Site:
    """The seed's page at /logme and the login route at /login, on the memory store."""
    root = Resource()
    logme = Logme()
    root.putChild("logme", logme)
    root.putChild("login", Login(logme))
    return Site(root)


class ReadOne(Resource):
    """Reads one key of the session's data."""

    isLeaf = True

    def render_GET(self, request: Any) -> str:
        return json.dumps(request.getSession().data.get("key0"))


def logme_app() -> App:
    """A bare ASGI app doing what the seed's page does, for SessionMiddleware to wrap."""
    seen: set[str] = set()

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":  # as uvicorn expects of an app without lifespan
            raise RuntimeError(f"no {scope['type']} here")
        session = get_session(scope)
        if session.uid not in seen:
            seen.add(session.uid)
            session.notifyOnExpire(lambda: seen.discard(session.uid))
        await bare_app(scope, receive, send)

    return app


def http_scope(cookie: bytes | None, method: str = "GET", target: str = "/logme") -> dict[str, Any]:
    """The scope of one request; ``target``: the path, and the query after a ``?``."""
    headers = [(b"host", b"bench")]
    if cookie is not None:
        headers.append((b"cookie", COOKIE + b"=" + cookie))
    path, _, query = target.partition("?")
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": query.encode(),
        "root_path": "",
        "headers": headers,
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 8080),
    }


async def receive_empty() -> dict[str, Any]:
    return {"type": "http.request", "body": b"", "more_body": False}


async def request(
    app: App, cookie: bytes | None, method: str = "GET", target: str = "/logme"
) -> bytes | None:
    """One GET /logme (or ``method`` ``target``); the session cookie the answer sets, if
    any. Not 200: an error."""
    sent: list[dict[str, Any]] = []

    async def send(message: Any) -> None:
        sent.append(message)

    await app(http_scope(cookie, method, target), receive_empty, send)
    if sent[0]["status"] != 200:
        raise RuntimeError(f"{method} {target} answered {sent[0]['status']}")
    for name, value in sent[0]["headers"]:
        if name == b"set-cookie" and value.startswith(COOKIE + b"="):
            return bytes(value.split(b";")[0].split(b"=", 1)[1])
    return None


@contextlib.asynccontextmanager
async def serving(app: App) -> AsyncIterator[App]:
    """The app between its ASGI lifespan startup and shutdown, as a server runs it."""
    inbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    replies: asyncio.Queue[dict[str, Any]] = asyncio.Queue()

    async def send(message: Any) -> None:
        await replies.put(message)

    task = asyncio.ensure_future(app({"type": "lifespan", "state": {}}, inbox.get, send))
    await inbox.put({"type": "lifespan.startup"})
    started = await asyncio.wait_for(replies.get(), LIFESPAN_TIMEOUT)
    if started["type"] != "lifespan.startup.complete":
        raise RuntimeError(f"lifespan startup answered {started}")
    try:
        yield app
    finally:
        await inbox.put({"type": "lifespan.shutdown"})
        await asyncio.wait_for(replies.get(), LIFESPAN_TIMEOUT)
        await asyncio.wait_for(task, LIFESPAN_TIMEOUT)


@dataclass(frozen=True)
class Figure:
    case: str
    requests: int
    """Per round."""
    rounds: list[float]
    """µs per request, per round."""

    @property
    def median(self) -> float:
        return statistics.median(self.rounds)

    @property
    def spread(self) -> tuple[float, float]:
        return min(self.rounds), max(self.rounds)


async def measure(case: str, app: App, cookie: bytes | None, requests: int, rounds: int) -> Figure:
    """``rounds`` rounds of ``requests`` requests, one after another."""
    await request(app, cookie)  # warm: imports, caches, the first session
    micros = []
    for _ in range(rounds):
        started = time.perf_counter()
        for _ in range(requests):
            await request(app, cookie)
        micros.append((time.perf_counter() - started) / requests * 1e6)
    return Figure(case, requests, micros)


async def measure_logins(site: App, requests: int, rounds: int) -> Figure:
    """``rounds`` rounds of ``requests`` cookie-less logins, the user cycling."""
    n = 0

    async def login() -> None:
        nonlocal n
        n += 1
        await request(site, None, "POST", f"/login?user=bench-user-{n % LOGIN_USERS}")

    await login()
    micros = []
    for _ in range(rounds):
        started = time.perf_counter()
        for _ in range(requests):
            await login()
        micros.append((time.perf_counter() - started) / requests * 1e6)
    return Figure("site login", requests, micros)


async def touch_pair(site: App, requests: int, rounds: int) -> list[Figure]:
    """``site touch`` and ``site touch, logged in``, their rounds alternated."""
    anonymous = await request(site, None)
    logged = await request(site, None, "POST", "/login?user=bench-touch")
    if anonymous is None or logged is None:
        raise RuntimeError("the first GET or the login set no session cookie")
    figures = [Figure("site touch", requests, []), Figure("site touch, logged in", requests, [])]
    for i in range(rounds):
        pair = list(zip(figures, (anonymous, logged), strict=True))
        for figure, cookie in pair if i % 2 == 0 else reversed(pair):
            figure.rounds.extend((await measure(figure.case, site, cookie, requests, 1)).rounds)
    return figures


async def memory_cases(requests: int, rounds: int) -> list[Figure]:
    figures = [await measure("bare", bare_app, b"0" * 64, requests, rounds)]
    async with serving(login_site()) as site:
        touch, logged = await touch_pair(site, requests, rounds)
        figures += [touch, logged]
        figures.append(await measure("site create", site, None, requests, rounds))
        figures.append(await measure_logins(site, requests, rounds))
    async with serving(SessionMiddleware(logme_app())) as wrapped:
        cookie = await request(wrapped, None)
        figures.append(await measure("middleware touch", wrapped, cookie, requests, rounds))
        figures.append(await measure("middleware create", wrapped, None, requests, rounds))
    return figures


async def store_case(case: str, url: str, keys: int, requests: int, rounds: int) -> Figure:
    """Touch through a ``Site`` on a shared store, the session holding ``keys`` keys."""
    site = Site(ReadOne(), store=url)
    async with serving(site):
        cookie = await request(site, None)
        if cookie is None:
            raise RuntimeError(f"{case}: the first request set no session cookie")
        data = {f"key{i}": {"i": i, "x": "y" * 16} for i in range(keys)}
        await site.store.save(cookie.decode(), data, [])
        return await measure(case, site, cookie, requests, rounds)


@contextlib.contextmanager
def redis_url(given: str | None) -> Iterator[str]:
    if given is not None:
        yield given
        return
    with suite_helpers().RedisServer() as server:
        yield server.url


def store_url(base: str, name: str) -> str:
    return f"{base}{'&' if '?' in base else '?'}prefix={name}"


async def store_cases(tmp: Path, redis: str, keys: int, requests: int, rounds: int) -> list[Figure]:
    figures = []
    for store, make_url in (
        ("sqlite", lambda name: f"sqlite:///{tmp}/{name}.db"),
        ("redis", lambda name: store_url(redis, name)),
    ):
        for n in (10, keys):
            name = f"micro-{store}-{n}"
            figures.append(await store_case(f"{store} touch, {n:,} keys", make_url(name), n,
                                            requests, rounds))  # fmt: skip
    return figures


def table(figures: list[Figure]) -> list[str]:
    """The Markdown table: µs/request (median of the rounds), min-max, ratio to bare."""
    bare = next((f.median for f in figures if f.case == "bare"), None)
    lines = [
        "| case | µs/request (median) | min-max of rounds | vs bare ASGI app | requests x rounds |",
        "|---|---:|---:|---:|---:|",
    ]
    for f in figures:
        low, high = f.spread
        versus = f"{f.median / bare:.1f}x" if bare else "—"
        lines.append(
            f"| {f.case} | {f.median:,.1f} | {low:,.1f}-{high:,.1f} | {versus} "
            f"| {f.requests:,} x {len(f.rounds)} |"
        )
    return lines


def parse_options(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="bench/run.py micro",
        description="µs per request of lapse's request path, in process (bench/README.md).",
    )
    parser.add_argument("--requests", type=int, default=5000,
                        help="requests per round, memory cases (5000; stores: 1/10)")  # fmt: skip
    parser.add_argument("--rounds", type=int, default=5, help="rounds per case (5)")
    parser.add_argument("--keys", type=int, default=10_000,
                        help="keys of the large session of the store cases (10000)")  # fmt: skip
    parser.add_argument("--no-stores", action="store_true", help="skip SQLite and Redis")
    parser.add_argument("--redis-url", default=None,
                        help="an idle redis-server to use (default: start one)")  # fmt: skip
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    options = parser.parse_args(argv)
    if options.requests < 10 or options.rounds < 1 or options.keys < 10:
        parser.error("need --requests >= 10, --rounds >= 1, --keys >= 10")
    return options


def main(argv: list[str] | None = None) -> int:
    options = parse_options(argv)
    figures = asyncio.run(memory_cases(options.requests, options.rounds))
    if not options.no_stores:
        few = options.requests // 10
        with (
            tempfile.TemporaryDirectory(prefix="bench-micro-") as tmp,
            redis_url(options.redis_url) as redis,
        ):
            figures += asyncio.run(store_cases(Path(tmp), redis, options.keys, few,
                                               options.rounds))  # fmt: skip
    print("\n".join(table(figures)))
    if options.json is not None:
        options.json.parent.mkdir(parents=True, exist_ok=True)
        rows = [dict(asdict(f), median=f.median) for f in figures]
        options.json.write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
