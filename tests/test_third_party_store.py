"""A store written from the protocol's docs alone plugs into a Site.

``tests/_dict_store.py`` is a plain class (no lapse base class, not the
memory store) holding sessions in a dict, declaring ``shared = False`` and
``holds_sessions = False``. It passes the published contract
(test_store_contract.py); here it serves the seed program (the
``ExpirationLogger`` of examples/session_endings.py, plus a page that writes
session data) through ``Site(root, store=DictStore(...))`` on a fake Clock.
"""

from __future__ import annotations

import asyncio
from typing import Any

from _dict_store import DictStore
from conftest import call_async, session_cookie

from lapse.internet.task import Clock
from lapse.sessions import Expiry, SharedKeeper
from lapse.web.resource import Resource
from lapse.web.server import Session, Site


class ShortSession(Session):
    sessionTimeout = 5


class ExpirationLogger(Resource):
    """The seed's page: a callback on each session it sees first."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.sessions: set[str] = set()
        self.expired: list[str] = []

    def render_GET(self, request: Any) -> str:
        session = request.getSession()
        if session.uid not in self.sessions:
            self.sessions.add(session.uid)
            session.notifyOnExpire(lambda uid=session.uid: self._expired(uid))
        return ""

    def _expired(self, uid: str) -> None:
        self.expired.append(uid)
        self.sessions.remove(uid)


class Counter(Resource):
    """Counts the visitor's visits in its session data."""

    isLeaf = True

    def render_GET(self, request: Any) -> str:
        data = request.getSession().data
        data["visits"] = data.get("visits", 0) + 1
        return str(data["visits"])


def test_a_store_written_from_the_docs_serves_the_seed_program() -> None:
    """On an in-process store that only implements the async protocol: the
    first request makes a session (written to the store), the second with
    its cookie finds it (200, not 500), data written persists, and after
    ``sessionTimeout`` of inactivity it ends on the fake clock: its
    notifyOnExpire callback and the durable hook each run once, with the
    final data."""

    async def scenario() -> None:
        clock = Clock()
        store = DictStore(clock=clock.seconds)
        logger = ExpirationLogger()
        root = Resource()
        root.putChild(b"logme", logger)
        root.putChild(b"count", Counter())
        hooked: list[Expiry] = []
        site = Site(root, reactor=clock, store=store, on_expire=hooked.append)
        site.sessionFactory = ShortSession
        assert isinstance(site._keeper, SharedKeeper) and not site._keeper.synchronous

        first = await call_async(site, "GET", "/logme")
        assert first.status == 200
        cookie = first.cookie_value(b"lapse_session")
        assert cookie is not None
        uid = cookie.decode()
        assert uid in store.live  # written to the store

        clock.advance(3)
        second = await call_async(site, "GET", "/logme", cookies=session_cookie(uid))
        assert second.status == 200
        assert second.cookie_value(b"lapse_session") in (None, cookie)  # the same session
        assert logger.sessions == {uid}

        for expected in (b"1", b"2"):
            clock.advance(3)
            counted = await call_async(site, "GET", "/count", cookies=session_cookie(uid))
            assert (counted.status, counted.body) == (200, expected)
        assert store.live[uid].data == {"visits": 2}

        clock.advance(4.9)  # touched 4.9 s ago, timeout 5: still live
        await site._keeper.settle()
        assert (logger.expired, hooked) == ([], [])
        clock.advance(0.2)  # the keeper's timer on the site's reactor rings
        await site._keeper.settle()
        assert logger.expired == [uid]
        assert [(e.uid, e.cause, dict(e.data)) for e in hooked] == [(uid, "timeout", {"visits": 2})]
        assert uid not in site.sessions and uid not in store.live and not store.ended

        clock.advance(60)
        await site._keeper.settle()
        assert len(logger.expired) == len(hooked) == 1  # once
        third = await call_async(site, "GET", "/logme", cookies=session_cookie(uid))
        assert third.status == 200 and third.cookie_value(b"lapse_session") not in (None, cookie)
        await site._keeper.aclose()

    asyncio.run(scenario())
