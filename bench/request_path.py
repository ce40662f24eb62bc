"""The request path measured in process: µs per request through a Site's ASGI
call, without sockets (steadier than loopback wrk on a shared machine).

Scenarios:

- ``touch``: the seed's ``/logme`` presenting a live session's cookie (memory
  store);
- ``create``: the same without a cookie (a new session each request);
- ``size``: a touch that reads one key of a session holding ``--keys`` keys,
  on SQLite and on Redis (a redis-server on a free loopback port, started and
  stopped here), next to the same with 10 keys: what a session's size costs a
  request that does not read it.

Run: ``.venv/bin/python bench/request_path.py [--requests N] [--keys K]``
(``PYTHONPATH=other/src`` measures another checkout the same way).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from lapse.web.resource import Resource
from lapse.web.server import Site

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))


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


class ReadOne(Resource):
    """Reads one key of the session's data."""

    isLeaf = True

    def render_GET(self, request: Any) -> str:
        return json.dumps(request.getSession().data.get("key0"))


def scope(cookie: bytes | None) -> dict[str, Any]:
    headers = [(b"host", b"bench")]
    if cookie is not None:
        headers.append((b"cookie", b"lapse_session=" + cookie))
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": "/logme",
        "raw_path": b"/logme",
        "query_string": b"",
        "root_path": "",
        "headers": headers,
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 8080),
    }


async def receive() -> dict[str, Any]:
    return {"type": "http.request", "body": b"", "more_body": False}


async def one(site: Site, cookie: bytes | None) -> bytes | None:
    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await site(scope(cookie), receive, send)
    for name, value in sent[0]["headers"]:
        if name == b"set-cookie":
            return bytes(value.split(b";")[0].split(b"=", 1)[1])
    return None


async def per_request(site: Site, cookie: bytes | None, requests: int) -> float:
    """Median over 5 rounds of µs per request."""
    rounds = []
    for _ in range(5):
        started = time.perf_counter()
        for _ in range(requests):
            await one(site, cookie)
        rounds.append((time.perf_counter() - started) / requests * 1e6)
    return statistics.median(rounds)


async def memory_paths(requests: int) -> dict[str, float]:
    site = Site(Logme())
    cookie = await one(site, None)
    touch = await per_request(site, cookie, requests)
    create = await per_request(site, None, requests)
    await site._keeper.aclose()
    return {"touch": touch, "create": create}


async def size_cost(url: str, keys: int, requests: int) -> float:
    site = Site(ReadOne(), store=url)
    try:
        cookie = await one(site, None)
        assert cookie is not None
        await site.store.save(
            cookie.decode(), {f"key{i}": {"i": i, "x": "y" * 16} for i in range(keys)}, []
        )
        return await per_request(site, cookie, requests)
    finally:
        await site._keeper.aclose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=5000)
    parser.add_argument("--keys", type=int, default=10_000)
    options = parser.parse_args()
    print(f"memory store, {options.requests} requests x 5 rounds (median):")
    for name, micros in asyncio.run(memory_paths(options.requests)).items():
        print(f"  {name:7} {micros:7.1f} µs/request")

    from _redis_server import RedisServer

    few = max(1, options.requests // 10)
    with tempfile.TemporaryDirectory() as tmp, RedisServer() as redis:
        for name, url in (
            ("sqlite", f"sqlite:///{tmp}/bench.db"),
            ("redis", f"{redis.url}?prefix=bench"),
        ):
            small = asyncio.run(size_cost(url, 10, few))
            large = asyncio.run(size_cost(url.replace("bench", "bench2"), options.keys, few))
            print(
                f"{name}: reading one key, session of 10 keys {small:.0f} µs/request, "
                f"of {options.keys} keys {large:.0f} µs/request ({large / small:.2f}x)"
            )


if __name__ == "__main__":
    main()
