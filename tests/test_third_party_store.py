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


class Logout(Resource):
    isLeaf = True

    def render_GET(self, request: Any) -> str:
        request.getSession().expire()
        return "bye"


def test_a_logout_on_an_in_process_store_reaches_the_hook_without_waiting() -> None:
    """A session ended by hand on a protocol-only in-process store wakes the
    keeper's timer at once (not at the next deadline it knew): the async hook
    runs as soon as the background work settles, with cause "expired",
    without the clock moving; no call is left on the clock after."""
    hooked: list[Expiry] = []

    async def hook(expiry: Expiry) -> None:
        await asyncio.sleep(0)
        hooked.append(expiry)

    async def scenario() -> None:
        clock = Clock()
        root = Resource()
        root.putChild(b"count", Counter())
        root.putChild(b"logout", Logout())
        site = Site(root, reactor=clock, store=DictStore(clock=clock.seconds), on_expire=hook)
        uid = (await call_async(site, "GET", "/count")).cookie_value(b"lapse_session")
        assert uid is not None
        await site._keeper.settle()  # its first round: asleep until the session's deadline
        assert [call.getTime() for call in clock.calls] == [900]
        await call_async(site, "GET", "/logout", cookies=session_cookie(uid.decode()))
        clock.advance(0)
        await site._keeper.settle()
        assert [(e.uid, e.cause, dict(e.data)) for e in hooked] == [
            (uid.decode(), "expired", {"visits": 1})
        ]
        assert not clock.calls
        await site._keeper.aclose()

    asyncio.run(scenario())


def test_what_a_store_declares_chooses_the_keeper_and_is_checked() -> None:
    """The keeper is chosen by the store's declared capabilities, not its
    type; a store object missing a declaration is refused at construction,
    naming it; max_sessions on a store that does not hold sessions is a
    StoreConfigError."""
    from lapse.sessions import LocalKeeper, StoreConfigError
    from lapse.sessions.stores.memory import MemoryStore

    clock = Clock()
    assert isinstance(Site(Resource(), reactor=clock, store=MemoryStore())._keeper, LocalKeeper)
    assert isinstance(Site(Resource(), reactor=clock, store=DictStore())._keeper, SharedKeeper)

    class Undeclared:
        def __init__(self) -> None:
            self.inner = DictStore()

        def __getattr__(self, name: str) -> Any:
            if name in ("enforces_timeout", "holds_sessions"):
                raise AttributeError(name)
            return getattr(self.inner, name)

    try:
        Site(Resource(), reactor=clock, store=Undeclared())
    except StoreConfigError as exc:
        assert "it has no enforces_timeout, holds_sessions" in str(exc)
    else:
        raise AssertionError("a store without its declarations was accepted")
    try:
        Site(Resource(), reactor=clock, store=DictStore(), max_sessions=10)
    except StoreConfigError as exc:
        assert "dict:" in str(exc) and "max_sessions" in str(exc)
    else:
        raise AssertionError("max_sessions was accepted on a store that keeps no cap")


def test_importing_lapse_does_not_import_lapse_testing() -> None:
    """lapse.testing imports pytest: the package itself never imports it."""
    import subprocess
    import sys

    code = (
        "import sys, lapse, lapse.web.server, lapse.asgi, lapse.sessions; "
        "assert 'lapse.testing' not in sys.modules and 'pytest' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
