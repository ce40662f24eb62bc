"""Sessions by principal through a Site: login binds the session
(``set_principal``), ``site.sessions_of`` lists a user's sessions,
``site.expire_principal`` logs out everywhere (or everywhere else), and
``max_sessions_per_principal`` supersedes or refuses, on every store.

Each test runs on every store kind (memory, SQLite, Redis, PostgreSQL) and
on ``tests/_dict_store.py`` (a store written from the protocol alone, so
the async keeper path is checked without a server).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from _dict_store import DictStore
from conftest import call_async, store_url_for
from conftest import json_body as body

from lapse.internet.task import Clock
from lapse.sessions import Expiry, SessionConflict, TooManySessions
from lapse.web.resource import Resource
from lapse.web.server import Session, Site


class Accounts(Resource):
    """POST /login?user=NAME rotates the session and binds it (403 if the cap
    refuses); GET /me shows it; GET /mine lists the user's sessions; GET
    /logout-all?others=1 ends them (all, or all but this one)."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.ended: list[str] = []

    async def render_POST(self, request: Any) -> bytes:
        session = request.getSession()
        session.rotate()
        session.notifyOnExpire(lambda: self.ended.append(session.uid))
        user = request.args[b"user"][0].decode()
        try:
            superseded = await session.set_principal(user)
        except TooManySessions as refused:
            request.setResponseCode(403)
            return f"already signed in on {refused.limit} devices".encode()
        return json.dumps({"uid": session.uid, "superseded": superseded}).encode()

    async def render_GET(self, request: Any) -> bytes:
        session = request.getSession()
        site = request.site
        if request.postpath == [b"me"]:
            return json.dumps({"uid": session.uid, "principal": session.principal}).encode()
        if request.postpath == [b"mine"]:
            rows = await site.sessions_of(session.principal)
            return json.dumps([[row.uid, row.principal] for row in rows]).encode()
        if request.postpath == [b"logout-all"]:
            keep = session.uid if request.args.get(b"others") else None
            ended = await site.expire_principal(session.principal, except_uid=keep)
            return json.dumps(sorted(ended)).encode()
        return b"?"


STORES = ["memory", "dict", "sqlite", "redis", "postgres"]


@pytest.fixture(params=STORES)
def make_site(
    request: pytest.FixtureRequest, tmp_path: Path
) -> Callable[..., tuple[Site, Accounts]]:
    """Makes Sites on one fresh store of each kind (two calls: two
    "processes" sharing it, for the shared stores)."""
    kind = request.param
    url = None if kind == "dict" else store_url_for(kind, tmp_path, request)
    dict_store = DictStore()

    def make(
        hook: Callable[[Expiry], Any] | None = None, *, by_hand: bool = False, **options: Any
    ) -> tuple[Site, Accounts]:
        """A site; ``by_hand``: a shared store's expiry rounds run only when
        the test runs them (``rounds``): its background loop never starts, so
        no round of its own can hold a claim mid-delivery when the test
        looks."""
        accounts = Accounts()
        store = dict_store if url is None else url
        site = Site(accounts, store=store, on_expire=hook, **options)
        if by_hand and not site._keeper.synchronous:
            site._keeper.start = lambda: None  # type: ignore[method-assign]
        return site, accounts

    return make


async def login(site: Site, user: str, cookie: str | None = None) -> tuple[int, Any]:
    cookies = None if cookie is None else {b"lapse_session": cookie.encode()}
    response = await call_async(site, "POST", f"/login?user={user}", cookies=cookies)
    if response.status != 200:
        return response.status, response.body
    return 200, body(response)


async def get(site: Site, path: str, uid: str) -> Any:
    response = await call_async(site, "GET", path, cookies={b"lapse_session": uid.encode()})
    assert response.status == 200, response.body
    return json.loads(response.body)


async def rounds(*sites: Site) -> None:
    """The keepers' expiry rounds, run by hand (each site twice: claim and
    deliver, then read the announcements)."""
    for _ in range(2):
        for site in sites:
            poll_once = getattr(site._keeper, "poll_once", None)
            if poll_once is not None:
                await poll_once()


def test_login_binds_the_session_and_lists_it(
    make_site: Callable[..., tuple[Site, Accounts]],
) -> None:
    """After set_principal the session knows its principal, on the next
    request too, and sessions_of lists each of the user's devices once,
    most recently used first."""

    async def scenario() -> None:
        site, _ = make_site()
        try:
            _, first = await login(site, "alice")
            _, second = await login(site, "alice")
            _, other = await login(site, "bob")
            assert (await get(site, "/me", first["uid"]))["principal"] == "alice"
            mine = await get(site, "/mine", first["uid"])
            assert mine == [[first["uid"], "alice"], [second["uid"], "alice"]]
            assert await get(site, "/mine", other["uid"]) == [[other["uid"], "bob"]]
        finally:
            await site._keeper.aclose()

    asyncio.run(scenario())


def test_log_out_everywhere_else_ends_the_other_devices(
    make_site: Callable[..., tuple[Site, Accounts]],
) -> None:
    """expire_principal(except_uid=this one) ends the user's other sessions
    in every process (callbacks where they were made, the hook once each,
    cause "expired"); this one and other users' stay."""
    hooked: list[Expiry] = []

    async def scenario() -> None:
        a, accounts_a = make_site(hooked.append, by_hand=True)
        b, accounts_b = (
            make_site(hooked.append, by_hand=True) if not a._keeper.synchronous else (a, accounts_a)
        )
        try:
            if b is not a:
                await b._keeper.poll_once()  # b reads announcements from now on
            _, phone = await login(a, "alice")
            _, laptop = await login(b, "alice")
            _, tablet = await login(b, "alice")
            _, bob = await login(a, "bob")
            ended = await get(a, "/logout-all?others=1", phone["uid"])
            assert ended == sorted([laptop["uid"], tablet["uid"]])
            await rounds(a, b)
            # Each copy's callbacks ran where the device logged in.
            assert sorted(accounts_b.ended) == sorted([laptop["uid"], tablet["uid"]])
            assert sorted(e.uid for e in hooked) == sorted([laptop["uid"], tablet["uid"]])
            assert {e.cause for e in hooked} == {"expired"}
            assert laptop["uid"] not in b.sessions and tablet["uid"] not in b.sessions
            assert await get(a, "/mine", phone["uid"]) == [[phone["uid"], "alice"]]
            assert await get(a, "/mine", bob["uid"]) == [[bob["uid"], "bob"]]
            gone = await call_async(
                b, "GET", "/me", cookies={b"lapse_session": laptop["uid"].encode()}
            )
            assert body(gone)["principal"] is None  # a fresh, anonymous session
            assert await get(a, "/logout-all", phone["uid"]) == [phone["uid"]]
        finally:
            await a._keeper.aclose()
            if b is not a:
                await b._keeper.aclose()

    asyncio.run(scenario())


def test_one_login_too_many_supersedes_the_least_recently_used(
    make_site: Callable[..., tuple[Site, Accounts]],
) -> None:
    """With max_sessions_per_principal=2, a third login ends the device used
    least recently (its callbacks run, the hook says "superseded")."""
    hooked: list[Expiry] = []

    async def scenario() -> None:
        site, accounts = make_site(hooked.append, by_hand=True, max_sessions_per_principal=2)
        try:
            _, first = await login(site, "alice")
            _, second = await login(site, "alice")
            await get(site, "/me", first["uid"])  # second is now the least recent
            status, third = await login(site, "alice")
            assert status == 200 and third["superseded"] == [second["uid"]]
            await rounds(site)
            assert [(e.uid, e.cause) for e in hooked] == [(second["uid"], "superseded")]
            assert accounts.ended == [second["uid"]]
            mine = await get(site, "/mine", third["uid"])
            assert sorted(row[0] for row in mine) == sorted([first["uid"], third["uid"]])
        finally:
            await site._keeper.aclose()

    asyncio.run(scenario())


def test_the_refuse_policy_lets_the_app_answer(
    make_site: Callable[..., tuple[Site, Accounts]],
) -> None:
    """With principal_policy="refuse", one login too many raises
    TooManySessions in the app (here a 403 of its own); nothing changes."""

    async def scenario() -> None:
        site, _ = make_site(max_sessions_per_principal=1, principal_policy="refuse")
        try:
            _, first = await login(site, "alice")
            status, answer = await login(site, "alice")
            assert (status, answer) == (403, b"already signed in on 1 devices")
            assert await get(site, "/mine", first["uid"]) == [[first["uid"], "alice"]]
        finally:
            await site._keeper.aclose()

    asyncio.run(scenario())


def test_bad_principals_and_options_are_refused_clearly(clock: Clock) -> None:
    """A principal that is not a short printable str, a cap that is not a
    positive int, a policy not known: clear errors, nothing stored."""
    with pytest.raises(ValueError, match="max_sessions_per_principal"):
        Site(Accounts(), reactor=clock, max_sessions_per_principal=0)
    with pytest.raises(ValueError, match="principal_policy"):
        Site(Accounts(), reactor=clock, principal_policy="lru")
    site = Site(Accounts(), reactor=clock)
    session = site.makeSession()

    async def scenario() -> None:
        for bad, error in ((b"alice", TypeError), ("", ValueError), ("a\x00b", ValueError)):
            with pytest.raises(error):
                await session.set_principal(bad)  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="256"):
            await session.set_principal("x" * 257)
        with pytest.raises(AttributeError, match="set_principal"):
            session.principal = "alice"  # type: ignore[misc]
        assert await site.sessions_of("alice") == []
        session.expire()
        with pytest.raises(SessionConflict):
            await session.set_principal("alice")

    asyncio.run(scenario())


def test_a_store_without_an_index_says_so(clock: Clock) -> None:
    """A third-party store without the principal methods: a TypeError naming
    it, not an AttributeError from deep inside."""

    class Bare(DictStore):
        set_principal = None  # type: ignore[assignment]

    site = Site(Accounts(), reactor=clock, store=Bare())

    async def scenario() -> None:
        with pytest.raises(TypeError, match="keeps no index of sessions by principal"):
            await site.sessions_of("alice")

    asyncio.run(scenario())


def test_memory_store_ends_superseded_sessions_at_once(clock: Clock) -> None:
    """On the memory store the superseded session's callbacks run inside
    the login call: no round, no clock advance."""
    site = Site(Accounts(), reactor=clock, max_sessions_per_principal=1)
    first, second = site.makeSession(), site.makeSession()
    ended: list[str] = []
    first.notifyOnExpire(lambda: ended.append("first"))

    async def scenario() -> None:
        assert await first.set_principal("alice") == []
        assert await second.set_principal("alice") == [first.uid]
        assert ended == ["first"] and first.expired and not second.expired
        assert second.principal == "alice"
        assert [row.uid for row in await site.sessions_of("alice")] == [second.uid]

    asyncio.run(scenario())


def test_rotation_after_login_keeps_the_principal(clock: Clock) -> None:
    """A session rotated after set_principal stays bound, under its new uid."""
    site = Site(Accounts(), reactor=clock)
    session: Session = site.makeSession()

    async def scenario() -> None:
        await session.set_principal("alice")
        old = session.uid
        new = session.rotate()
        assert new != old and session.principal == "alice"
        assert [row.uid for row in await site.sessions_of("alice")] == [new]

    asyncio.run(scenario())


def test_binding_a_session_ended_meanwhile_answers_409(clock: Clock) -> None:
    """A render that binds a session another request ended gets the site's
    409 (its SessionConflict), not a 500."""

    class Late(Resource):
        isLeaf = True

        async def render_GET(self, request: Any) -> bytes:
            session = request.getSession()
            session.expire()
            await session.set_principal("alice")
            return b"bound"

    site = Site(Late(), reactor=clock)
    response = asyncio.run(call_async(site, "GET", "/"))
    assert response.status == 409
