"""The seed's ``GET /logme`` on aiohttp + aiohttp-session: the bench's aiohttp peer.

Usage: python bench/servers/aiohttp_seed.py PORT [--redis URL]

Without ``--redis`` sessions live in :class:`DictStorage`, a small in-process
store written for the bench (aiohttp-session ships none: its own storages are
cookie-based, Redis and Memcached); with ``--redis URL`` in aiohttp-session's
``RedisStorage`` on a ``redis.asyncio`` client. Both use a 5 s ``max_age``.

aiohttp-session has no expiry callback, so the handler only marks the session
on first sight. To keep a visited session alive (the seed's idle timeout) it
writes ``last_visit`` on every request, as aiohttp-session's own README
example does: that marks the session changed, so it is saved again with a
fresh ``max_age`` (Redis: ``SET ... EX 5``), and it refreshes the session's
``created`` stamp, which aiohttp-session compares with ``max_age`` when it
loads a session (``session.changed()`` alone would re-save the key but leave
``created`` alone, so the data would be dropped 5 s after the first visit).

Runs on uvloop (like lapse), single process, no access log, 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from aiohttp import web
from aiohttp_session import AbstractStorage, Session, get_session, setup

MAX_AGE = 5


class DictStorage(AbstractStorage):
    """aiohttp-session's ``RedisStorage``, with an in-process dict for Redis.

    Same cookie handling and the same JSON-encoded value per session; an entry
    lives ``max_age`` seconds after its last save, like a Redis key with
    ``EX``. Entries are kept in save order (a save moves its entry to the
    end), and with one ``max_age`` for all that is also deadline order, so
    each save drops the expired entries from the front: O(1) amortised, no
    timer. A load ignores an entry past its deadline.
    """

    def __init__(
        self, *, key_factory: Callable[[], str] = lambda: uuid.uuid4().hex, **kwargs: Any
    ) -> None:
        super().__init__(**kwargs)
        self._key_factory = key_factory
        self.entries: OrderedDict[str, tuple[float, str]] = OrderedDict()

    async def load_session(self, request: web.Request) -> Session:
        cookie = self.load_cookie(request)
        if cookie is not None:
            entry = self.entries.get(cookie)
            if entry is not None and entry[0] > time.time():
                try:
                    data = self._decoder(entry[1])
                except ValueError:
                    data = None
                return Session(cookie, data=data, new=False, max_age=self.max_age)
        return Session(None, data=None, new=True, max_age=self.max_age)

    async def save_session(
        self, request: web.Request, response: web.StreamResponse, session: Session
    ) -> None:
        key = session.identity
        if key is None:
            key = self._key_factory()
            self.save_cookie(response, key, max_age=session.max_age)
        elif session.empty:
            self.save_cookie(response, "", max_age=session.max_age)
        else:
            key = str(key)
            self.save_cookie(response, key, max_age=session.max_age)
        now = time.time()
        lifetime = session.max_age if session.max_age is not None else 14 * 24 * 3600
        entries = self.entries
        entries[key] = (now + lifetime, self._encoder(self._get_session_data(session)))
        entries.move_to_end(key)
        while entries:
            first = next(iter(entries))
            if entries[first][0] > now:
                break
            del entries[first]


async def logme(request: web.Request) -> web.Response:
    session = await get_session(request)
    if "seen" not in session:  # first sight: no expiry callback in aiohttp-session
        session["seen"] = True
    session["last_visit"] = int(time.time())  # re-saved with a fresh max_age
    return web.Response()


def make_app(redis_url: str | None) -> web.Application:
    app = web.Application()
    if redis_url is None:
        setup(app, DictStorage(max_age=MAX_AGE))
    else:
        from aiohttp_session.redis_storage import RedisStorage
        from redis import asyncio as aioredis

        client = aioredis.from_url(redis_url)
        setup(app, RedisStorage(client, max_age=MAX_AGE))

        async def close_redis(app: web.Application) -> None:
            await client.aclose()

        app.on_cleanup.append(close_redis)
    app.router.add_get("/logme", logme)
    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("port", type=int)
    parser.add_argument("--redis", default=None, help="redis:// URL (default: DictStorage)")
    args = parser.parse_args()
    import uvloop

    web.run_app(
        make_app(args.redis),
        host="127.0.0.1",
        port=args.port,
        access_log=None,
        print=None,
        loop=uvloop.new_event_loop(),
    )


if __name__ == "__main__":
    main()
