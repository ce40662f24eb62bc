"""Issue 9's session fixes: rotation that ends the old uid (no fixation), each
request's changes its own until written (no lost writes from async renders,
none racing a rotation), data read without cost for keys not read, and values
every store can encode checked at assignment. On every store, through a Site
and through the ASGI middleware, in process with real SQLite files and a real
redis-server."""

from __future__ import annotations

import asyncio
import json
import math
import sqlite3
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import call, call_async
from conftest import json_body as body
from conftest import session_cookie as cookie
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from lapse.asgi import SessionMiddleware, get_session
from lapse.internet.task import Clock
from lapse.sessions import SessionData
from lapse.sessions.store import StoredSession
from lapse.sessions.stores.sqlite import SQLiteStore
from lapse.web.resource import Resource
from lapse.web.server import Site

# -- pages --------------------------------------------------------------------------


class Gate:
    """Pauses chosen requests until the test lets them go."""

    def __init__(self) -> None:
        self.arrived: dict[str, asyncio.Event] = {}
        self.go: dict[str, asyncio.Event] = {}

    def name(self, name: str) -> None:
        self.arrived[name] = asyncio.Event()
        self.go[name] = asyncio.Event()

    async def wait(self, name: str) -> None:
        if name in self.go:
            self.arrived[name].set()
            await self.go[name].wait()


class Page(Resource):
    """GET /?set=k&v=json&login=name&grace=s&pause=name, rendered async:
    sets a key, then (if asked) pauses, then logs in (rotates, sets "user"),
    then answers the session's uid and data."""

    isLeaf = True

    def __init__(self, gate: Gate | None = None) -> None:
        super().__init__()
        self.gate = gate or Gate()

    async def render_GET(self, request: Any) -> bytes:
        args = request.args
        session = request.getSession()
        if b"set" in args:
            session.data[args[b"set"][0].decode()] = json.loads(args[b"v"][0])
        if b"pause" in args:
            await self.gate.wait(args[b"pause"][0].decode())
        if b"login" in args:
            grace = float(args[b"grace"][0]) if b"grace" in args else None
            session.rotate(grace=grace)
            session.data["user"] = args[b"login"][0].decode()
        if b"logout" in args:
            session.expire()
        return json.dumps({"uid": session.uid, "data": dict(session.data)}).encode()


def run_sites(
    count: int,
    url: str,
    scenario: Callable[..., Awaitable[None]],
    gate: Gate | None = None,
) -> None:
    """Run ``scenario(*sites)`` with ``count`` sites on one store (for a shared
    store each is what one process would have), closing them afterwards."""

    async def main() -> None:
        page = Page(gate)
        sites = [Site(page, store=url) for _ in range(count)]
        try:
            await scenario(*sites)
        finally:
            for site in sites:
                await site._keeper.aclose()

    asyncio.run(main())


async def stored_data(site: Site, uid: str) -> dict[str, Any] | None:
    """What the store holds for ``uid``, read outside any request."""
    loaded = await site.store.load(uid)
    return None if loaded is None else loaded.decoded()


# -- 1. rotation at login ends the old uid --------------------------------------------


def test_rotation_grace_is_zero_by_default() -> None:
    """A Site's rotation_grace, and the middleware's, is 0: rotation at login ends
    the old uid at once unless a grace is asked for."""
    assert Site(Resource(), reactor=Clock())._keeper.rotation_grace == 0
    assert SessionMiddleware(Starlette(), reactor=Clock())._keeper.rotation_grace == 0


def test_old_uid_gives_a_fresh_empty_session_after_login(any_store: str) -> None:
    """Fixation: the attacker's planted uid, presented after the victim logged in
    with it, yields a fresh empty session with a uid of its own, never the
    logged-in session nor its new uid; the victim keeps the session. Also from a
    second site on the same store (another process)."""

    async def scenario(site: Site, other: Site) -> None:
        planted = body(await call_async(site))["uid"]
        login = await call_async(site, "GET", "/?login=victim", cookies=cookie(planted))
        new = body(login)["uid"]
        assert new != planted and login.cookie_value(b"lapse_session") == new.encode()
        readers = [site] if any_store == "memory:" else [site, other]
        for reader in readers:
            attacker = await call_async(reader, cookies=cookie(planted))
            got = body(attacker)
            assert got["uid"] not in (planted, new) and got["data"] == {}
            assert attacker.cookie_value(b"lapse_session") == got["uid"].encode()
        victim = body(await call_async(site, cookies=cookie(new)))
        assert victim == {"uid": new, "data": {"user": "victim"}}

    run_sites(2, any_store, scenario)


def test_request_in_flight_under_the_old_uid_never_gets_the_new_uid(any_store: str) -> None:
    """A request that loaded the session before another request rotated it (at
    login) answers without the new uid in a cookie; on a shared store its write,
    made after the rotation, is refused (409) and not in the store."""
    gate = Gate()

    async def scenario(site: Site) -> None:
        old = body(await call_async(site))["uid"]
        gate.name("slow")
        slow = asyncio.ensure_future(
            call_async(site, "GET", "/?set=cart&v=1&pause=slow", cookies=cookie(old))
        )
        await gate.arrived["slow"].wait()
        login = await call_async(site, "GET", "/?login=victim", cookies=cookie(old))
        new = body(login)["uid"]
        gate.go["slow"].set()
        answer = await slow
        assert b"lapse_session" not in answer.set_cookies
        assert new.encode() not in answer.body or answer.status == 200
        if any_store == "memory:":
            # In process the write went straight into the session object.
            assert answer.status == 200
        else:
            assert answer.status == 409
            assert await stored_data(site, new) == {"user": "victim"}

    run_sites(1, any_store, scenario, gate)


def test_grace_is_opt_in_per_rotation_and_never_hands_out_the_new_uid(any_store: str) -> None:
    """rotate(grace=s), for renewals: within the grace the old cookie still finds
    the session (no Set-Cookie with the new uid); after it, a fresh session."""

    async def scenario(site: Site) -> None:
        old = body(await call_async(site, "GET", "/?set=n&v=1"))["uid"]
        renew = await call_async(site, "GET", "/?login=ann&grace=0.4", cookies=cookie(old))
        new = body(renew)["uid"]
        assert renew.cookie_value(b"lapse_session") == new.encode()
        within = await call_async(site, cookies=cookie(old))
        assert body(within) == {"uid": new, "data": {"n": 1, "user": "ann"}}
        assert b"lapse_session" not in within.set_cookies
        await asyncio.sleep(0.6)
        after = body(await call_async(site, cookies=cookie(old)))
        assert after["uid"] not in (old, new) and after["data"] == {}

    run_sites(1, any_store, scenario)


def test_write_in_flight_follows_a_rotation_made_with_a_grace(shared_store: str) -> None:
    """A request that loaded the session before a renewal (rotate with a grace)
    writes to it after the rotation: the store follows the old uid to the new."""
    gate = Gate()

    async def scenario(site: Site, other: Site) -> None:
        old = body(await call_async(site))["uid"]
        gate.name("slow")
        slow = asyncio.ensure_future(
            call_async(other, "GET", "/?set=cart&v=[1]&pause=slow", cookies=cookie(old))
        )
        await gate.arrived["slow"].wait()
        new = body(await call_async(site, "GET", "/?login=ann&grace=30", cookies=cookie(old)))[
            "uid"
        ]
        gate.go["slow"].set()
        answer = await slow
        assert answer.status == 200 and b"lapse_session" not in answer.set_cookies
        assert await stored_data(site, new) == {"cart": [1], "user": "ann"}

    run_sites(2, shared_store, scenario, gate)


def test_middleware_login_rotation_ends_the_old_uid(any_store: str) -> None:
    """Through the ASGI middleware too: after rotate() at login the old cookie
    gets a fresh, empty session."""

    async def login(request: Request) -> Response:
        session = get_session(request)
        session.rotate()
        session.data["user"] = "victim"
        return JSONResponse({"uid": session.uid})

    async def whoami(request: Request) -> Response:
        return JSONResponse({"uid": get_session(request).uid, "data": dict(request.session)})

    async def main() -> None:
        app = SessionMiddleware(
            Starlette(routes=[Route("/login", login), Route("/", whoami)]), store=any_store
        )
        try:
            planted = (await get(app, "/")).json()["uid"]
            new = (await get(app, "/login", planted)).json()["uid"]
            again = (await get(app, "/", planted)).json()
            assert again["uid"] not in (planted, new) and again["data"] == {}
        finally:
            await app.aclose()

    asyncio.run(main())


async def get(app: Any, path: str, uid: str | None = None) -> httpx.Response:
    """One request to an ASGI app, with the session cookie ``uid`` (no jar)."""
    headers = {} if uid is None else {"cookie": f"lapse_session={uid}"}
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        return await client.get(path, headers=headers)


# -- 6. each request's changes are its own ------------------------------------------


def test_async_render_keeps_its_write_when_another_request_arrives(shared_store: str) -> None:
    """A render that writes session.data and then awaits keeps its write when a
    request of the same session loads it meanwhile: both keys are stored, and
    neither request saw the other's unsaved change."""
    gate = Gate()

    async def scenario(site: Site) -> None:
        uid = body(await call_async(site))["uid"]
        gate.name("a")
        first = asyncio.ensure_future(
            call_async(site, "GET", "/?set=a&v=1&pause=a", cookies=cookie(uid))
        )
        await gate.arrived["a"].wait()
        second = await call_async(site, "GET", "/?set=b&v=2", cookies=cookie(uid))
        assert second.status == 200 and body(second)["data"] == {"b": 2}
        gate.go["a"].set()
        answer = await first
        assert answer.status == 200 and body(answer)["data"] == {"a": 1}
        assert await stored_data(site, uid) == {"a": 1, "b": 2}

    run_sites(1, shared_store, scenario, gate)


def test_concurrent_writers_lose_no_acknowledged_write(shared_store: str) -> None:
    """20 concurrent clients of one session, each writing its own keys through
    async renders that yield in between: every write answered 200 is in the
    store (both through one site and through two)."""

    class Writer(Resource):
        isLeaf = True

        async def render_GET(self, request: Any) -> bytes:
            key = request.args[b"k"][0].decode()
            request.getSession().data[key] = key
            await asyncio.sleep(0)
            await asyncio.sleep(0.001)
            return b"ok"

    async def main() -> None:
        sites = [Site(Writer(), store=shared_store) for _ in range(2)]
        try:
            uid = (await call_async(sites[0], "GET", "/?k=first")).cookie_value(b"lapse_session")
            assert uid is not None
            jar = {b"lapse_session": uid}

            async def client(n: int) -> list[str]:
                done = []
                for i in range(10):
                    key = f"c{n}-{i}"
                    answer = await call_async(sites[n % 2], "GET", f"/?k={key}", cookies=jar)
                    if answer.status == 200:
                        done.append(key)
                return done

            acknowledged = [
                key for keys in await asyncio.gather(*map(client, range(20))) for key in keys
            ]
            stored = await stored_data(sites[0], uid.decode())
            assert stored is not None
            assert len(acknowledged) == 200
            assert set(acknowledged) <= set(stored)
        finally:
            for site in sites:
                await site._keeper.aclose()

    asyncio.run(main())


def test_middleware_requests_keep_their_own_changes(shared_store: str) -> None:
    """The middleware on a shared store: an endpoint that writes then awaits keeps
    its write while another request of the session comes and goes."""
    arrived, go = asyncio.Event(), asyncio.Event()

    async def slow(request: Request) -> Response:
        request.session["slow"] = 1
        arrived.set()
        await go.wait()
        return JSONResponse(dict(request.session))

    async def fast(request: Request) -> Response:
        request.session["fast"] = 2
        return JSONResponse(dict(request.session))

    async def main() -> None:
        app = SessionMiddleware(
            Starlette(routes=[Route("/slow", slow), Route("/fast", fast)]), store=shared_store
        )
        try:
            first = await get(app, "/fast")
            uid = first.cookies["lapse_session"]
            pending = asyncio.ensure_future(get(app, "/slow", uid))
            await arrived.wait()
            assert (await get(app, "/fast", uid)).json() == {"fast": 2}
            go.set()
            assert (await pending).json() == {"fast": 2, "slow": 1}
            loaded = await app.store.load(uid)
            assert loaded is not None and loaded.decoded() == {"fast": 2, "slow": 1}
        finally:
            await app.aclose()

    asyncio.run(main())


# -- 7. writes racing a rotation ------------------------------------------------------


def test_write_racing_a_rotation_in_another_process_is_refused(shared_store: str) -> None:
    """A request on one site loaded the session; another site (process) rotates it
    at login and commits; the first request's write is answered 409, not 200,
    and is in no session of the store."""
    gate = Gate()

    async def scenario(site: Site, other: Site) -> None:
        old = body(await call_async(site))["uid"]
        gate.name("slow")
        slow = asyncio.ensure_future(
            call_async(site, "GET", "/?set=cart&v=[1]&pause=slow", cookies=cookie(old))
        )
        await gate.arrived["slow"].wait()
        new = body(await call_async(other, "GET", "/?login=ann", cookies=cookie(old)))["uid"]
        gate.go["slow"].set()
        answer = await slow
        assert answer.status == 409 and b"lapse_session" not in answer.set_cookies
        assert await stored_data(site, new) == {"user": "ann"}
        assert await stored_data(site, old) is None

    run_sites(2, shared_store, scenario, gate)


def test_write_racing_a_logout_is_refused(shared_store: str) -> None:
    """A request writing to a session that another request logged out meanwhile
    answers 409 (its write is not in the store), in the same process or not."""
    gate = Gate()

    async def scenario(site: Site, other: Site) -> None:
        for logout_site in (site, other):
            uid = body(await call_async(site))["uid"]
            gate.name("slow")
            slow = asyncio.ensure_future(
                call_async(site, "GET", "/?set=x&v=1&pause=slow", cookies=cookie(uid))
            )
            await gate.arrived["slow"].wait()
            assert (
                await call_async(logout_site, "GET", "/?logout=1", cookies=cookie(uid))
            ).status == 200
            gate.go["slow"].set()
            answer = await slow
            assert answer.status == 409
            assert await stored_data(site, uid) is None

    run_sites(2, shared_store, scenario, gate)


def test_failed_rotation_write_leaves_the_old_cookie_working(tmp_path: Path) -> None:
    """A login whose rotation cannot be written (the store fails) answers 503 and
    undoes the rotation in the process: the client's old cookie still names its
    session, and nothing of the failed request is written later."""
    url = f"sqlite:///{tmp_path}/s.db"

    async def main() -> None:
        site = Site(Page(), store=url)
        try:
            old = body(await call_async(site, "GET", "/?set=n&v=1"))["uid"]
            store = site.store
            assert isinstance(store, SQLiteStore)
            real_rotate = store.rotate

            async def failing_rotate(*args: Any) -> bool:
                from lapse.sessions import StoreUnavailable

                raise StoreUnavailable("the disk is on fire")

            store.rotate = failing_rotate  # type: ignore[method-assign]
            failed = await call_async(site, "GET", "/?login=ann", cookies=cookie(old))
            assert failed.status == 503 and b"lapse_session" not in failed.set_cookies
            store.rotate = real_rotate  # type: ignore[method-assign]
            again = await call_async(site, "GET", "/?set=m&v=2", cookies=cookie(old))
            assert body(again) == {"uid": old, "data": {"n": 1, "m": 2}}
            assert await stored_data(site, old) == {"n": 1, "m": 2}
        finally:
            await site._keeper.aclose()

    asyncio.run(main())


# -- 8. a request's cost does not grow with data it does not read --------------------


def test_load_with_the_current_version_returns_no_data(shared_store: str) -> None:
    """Store contract (SQLite, Redis, PostgreSQL): load() given the data's version returns no
    data (unchanged) until a save makes a new version; load through an alias
    does the same."""

    async def scenario(site: Site) -> None:
        store = site.store
        await store.create("u1", 60, {"k": 1})
        first = await store.load("u1")
        assert first is not None and first.version == 1 and first.decoded() == {"k": 1}
        same = await store.load("u1", first.version)
        assert same is not None and same.unchanged and same.decoded() == {}
        version = await store.save("u1", {"k": 2}, [])
        assert version == 2
        changed = await store.load("u1", first.version)
        assert changed is not None and not changed.unchanged and changed.decoded() == {"k": 2}
        assert await store.rotate("u1", "u2", 30)
        via_alias = await store.load("u1", 2)
        assert via_alias is not None and via_alias.uid == "u2" and via_alias.unchanged

    run_sites(1, shared_store, scenario)


def test_requests_read_unchanged_data_without_fetching_it(
    shared_store: str, request: pytest.FixtureRequest
) -> None:
    """A Site on a shared store: after the first request, loads of a session whose
    data did not change fetch none of it, also after this process's own writes;
    a write by another process makes the next load fetch it."""
    results: list[StoredSession | None] = []

    async def scenario(site: Site, other: Site) -> None:
        store = site.store
        real_load = store.load

        async def recording_load(uid: str, version: int | None = None) -> Any:
            result = await real_load(uid, version)
            results.append(result)
            return result

        store.load = recording_load  # type: ignore[method-assign]
        big = {f"key{i}": i for i in range(2000)}
        uid = body(await call_async(site))["uid"]
        await other.store.save(uid, big, [])
        await call_async(site, cookies=cookie(uid))  # fetches the 2,000 keys
        assert results[-1] is not None and len(results[-1].decoded()) == 2000
        for _ in range(3):
            await call_async(site, cookies=cookie(uid))
            assert results[-1] is not None and results[-1].unchanged
        written = await call_async(site, "GET", "/?set=k&v=1", cookies=cookie(uid))
        assert written.status == 200
        assert body(await call_async(site, cookies=cookie(uid)))["data"]["k"] == 1
        assert results[-1] is not None and results[-1].unchanged  # its own write: known
        await other.store.save(uid, {"k": 2}, [])
        assert body(await call_async(site, cookies=cookie(uid)))["data"]["k"] == 2
        assert results[-1] is not None and not results[-1].unchanged

    run_sites(2, shared_store, scenario)


def test_session_data_decodes_only_the_keys_read() -> None:
    """SessionData on a base of JSON texts decodes a key when it is read, not
    before; iteration, len and membership need no decoding; a bad text that is
    never read costs nothing."""
    data = SessionData(base={"a": "1", "b": "[2]", "never": "{not json"}, version=3)
    assert len(data) == 3 and "never" in data and set(data) == {"a", "b", "never"}
    assert data["a"] == 1 and data._values == {"a": 1}
    data["c"] = 3
    del data["b"]
    assert len(data) == 3 and set(data) == {"a", "never", "c"} and "b" not in data
    with pytest.raises(KeyError):
        data["b"]
    changed, removed = data.take_changes()
    assert changed == {"c": 3} and removed == {"b"}


def test_sqlite_version_2_file_is_upgraded_to_data_versions(tmp_path: Path) -> None:
    """A file of schema version 2 gets the data version column in place; its
    sessions load (as version 0) and then count saves."""
    db = tmp_path / "v2.db"

    async def make_v2() -> None:
        store = SQLiteStore(str(db))
        await store.open()
        await store.create("u1", 60, {"k": "v"})
        await store.aclose()

    asyncio.run(make_v2())
    conn = sqlite3.connect(db)
    conn.executescript(
        """
        CREATE TABLE s2 AS SELECT uid, timeout, deadline, ended, cause, delivery_id, attempt,
            lease_owner, lease_until, created, ends_at FROM sessions;
        DROP TABLE sessions;
        ALTER TABLE s2 RENAME TO sessions;
        PRAGMA user_version = 2;
        """
    )
    conn.close()

    async def upgraded() -> None:
        store = SQLiteStore(str(db))
        try:
            loaded = await store.load("u1")
            assert loaded is not None and loaded.version == 0 and loaded.decoded() == {"k": "v"}
            assert await store.save("u1", {"k": "w"}, []) == 1
        finally:
            await store.aclose()

    asyncio.run(upgraded())
    conn = sqlite3.connect(db)
    assert conn.execute("PRAGMA user_version").fetchone() == (4,)
    conn.close()


# -- 13. values every store can encode, checked at assignment ------------------------


BAD_VALUES: list[tuple[str, Any, type[Exception]]] = [
    ("lone surrogate", "\ud800", ValueError),
    ("nested lone surrogate", {"a": ["ok", "\udfff"]}, ValueError),
    ("surrogate in a nested key", {"\ud83d": 1}, ValueError),
    ("NaN", math.nan, ValueError),
    ("infinity", [math.inf], ValueError),
    ("a set", {1, 2}, TypeError),
    ("bytes", b"raw", TypeError),
]


def deeply_nested(depth: int) -> Any:
    value: Any = 0
    for _ in range(depth):
        value = [value]
    return value


@pytest.mark.parametrize(("what", "value", "error"), BAD_VALUES, ids=[b[0] for b in BAD_VALUES])
def test_values_no_store_can_hold_are_refused_at_assignment(
    what: str, value: Any, error: type[Exception]
) -> None:
    """Assigning a value some store cannot encode raises at once, naming the key,
    and leaves the data unchanged (nothing for a save to choke on)."""
    data = SessionData()
    data["fine"] = "caf\u00e9 \U0001f600 \u2028 \x00"
    with pytest.raises(error, match="'bad'"):
        data["bad"] = value
    assert "bad" not in data and data.take_changes() == (
        {"fine": "caf\u00e9 \U0001f600 \u2028 \x00"},
        set(),
    )


def test_too_deep_and_lone_surrogate_keys_are_refused() -> None:
    """Nesting deeper than JSON encoding can go is a ValueError, and so is a key
    that is not valid Unicode; neither crashes with anything else."""
    data = SessionData()
    with pytest.raises(ValueError, match="'deep'"):
        data["deep"] = deeply_nested(100_000)
    with pytest.raises(ValueError, match="not valid Unicode"):
        data["\ud800"] = 1
    assert len(data) == 0


def test_client_json_with_lone_surrogates_never_reaches_the_store(any_store: str) -> None:
    """A render storing client JSON that holds a lone surrogate fails at the
    assignment (it can answer 400 itself); the session's other data is saved and
    the store keeps working."""

    class Echo(Resource):
        isLeaf = True

        def render_POST(self, request: Any) -> bytes:
            session = request.getSession()
            session.data["before"] = 1
            try:
                session.data["note"] = json.loads(request.content.read())
            except ValueError:
                request.setResponseCode(400)
                return b"bad note"
            return b"ok"

        def render_GET(self, request: Any) -> bytes:
            return json.dumps(dict(request.getSession().data)).encode()

    async def main() -> None:
        site = Site(Echo(), store=any_store)
        try:
            bad = await call_async(site, "POST", "/", body=b'{"x": "\\ud800"}')
            assert bad.status == 400
            uid = bad.cookie_value(b"lapse_session")
            assert uid is not None
            good = await call_async(site, "GET", "/", cookies={b"lapse_session": uid})
            assert good.status == 200 and json.loads(good.body) == {"before": 1}
        finally:
            await site._keeper.aclose()

    asyncio.run(main())


def test_memory_store_refuses_the_same_values(clock: Clock) -> None:
    """The memory store refuses what SQLite and Redis could not hold, so a program
    moved from memory: to a shared store behaves the same."""
    site = Site(Resource(), reactor=clock)
    session = site.makeSession()
    with pytest.raises(ValueError):
        session.data["x"] = "\udc80"
    assert call(site).status == 404  # the site still serves
