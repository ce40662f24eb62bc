"""The live view and principals: every row shows its session's principal
(as JSON text, never markup), ``api/sessions?user=`` lists one principal's
sessions through the store's index, and ``POST api/expire-user`` ends them
all as logouts, behind the same access and CSRF rules as ``api/expire``."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest
from _liveview import TOKEN, get_json, make_site
from _no_index_store import NoIndexStore
from _principal_views import INJECTION, bind, post_as_page
from conftest import call, call_async
from fastapi import FastAPI
from fastapi import Request as FastAPIRequest

from lapse.asgi import SessionMiddleware, get_session
from lapse.internet.task import Clock
from lapse.sessions import Expiry
from lapse.web.liveview import CSRF_COOKIE, LiveView, liveview_app
from lapse.web.resource import Resource
from lapse.web.server import Site

BEARER = [(b"authorization", b"Bearer " + TOKEN.encode())]


def test_rows_carry_the_principal_and_user_lists_one_principal(clock: Clock) -> None:
    """api/sessions and api/session give each row's principal (None when
    unbound); ?user=NAME gives only that principal's live sessions, most
    recently used first, with their count in "live", cut at limit."""
    site, _ = make_site(clock)
    ann = [site.makeSession() for _ in range(3)]
    bob, nobody = site.makeSession(), site.makeSession()
    for session in ann:
        bind(session, "ann")
    bind(bob, "bob")
    clock.advance(10)
    ann[1].touch()  # the most recently used of ann's
    rows = get_json(call(site, "GET", "/_lapse/api/sessions"))["sessions"]
    assert sorted(str(row["principal"]) for row in rows) == ["None", "ann", "ann", "ann", "bob"]
    listing = get_json(call(site, "GET", "/_lapse/api/sessions?user=ann"))
    assert listing["user"] == "ann" and listing["live"] == 3 and listing["next"] is None
    assert [row["principal"] for row in listing["sessions"]] == ["ann"] * 3
    assert ann[1].uid.startswith(listing["sessions"][0]["uid"][:8])
    one = get_json(call(site, "GET", "/_lapse/api/sessions?user=ann&limit=1"))
    assert one["live"] == 3 and len(one["sessions"]) == 1
    row = get_json(call(site, "GET", f"/_lapse/api/session?id={one['sessions'][0]['id']}"))
    assert row["session"]["principal"] == "ann"
    none = get_json(call(site, "GET", "/_lapse/api/sessions?user=carol"))
    assert none["live"] == 0 and none["sessions"] == []
    assert not nobody.expired and nobody.principal is None


def test_a_markup_principal_is_json_text_never_markup(clock: Clock) -> None:
    """A principal full of markup comes back whole once the JSON is read,
    but no '<', '>' or '&' appears in the answer's bytes (a reader that
    sniffs sees no markup); the page itself carries no principal."""
    site, _ = make_site(clock)
    bind(site.makeSession(), INJECTION)
    for path in ("/_lapse/api/sessions", "/_lapse/api/sessions?user=" + _quoted(INJECTION)):
        answer = call(site, "GET", path)
        assert answer.status == 200
        assert not set(answer.body.decode()) & set("<>&"), answer.body
        assert [row["principal"] for row in get_json(answer)["sessions"]] == [INJECTION]
    page = call(site, "GET", "/_lapse/").body
    assert b"onerror" not in page and b"alert(2)" not in page


def _quoted(text: str) -> str:
    from urllib.parse import quote

    return quote(text, safe="")


@pytest.mark.parametrize(
    ("query", "error"),
    [
        ("user=", "1 to 256"),
        ("user=" + "a" * 257, "1 to 256"),
        ("user=a%01b", "control characters"),
        ("user=%ff%fe", "not UTF-8"),
        ("user=ann&cursor=abc", "cursor does not go with user"),
    ],
)
def test_a_bad_user_filter_is_a_400_saying_why(clock: Clock, query: str, error: str) -> None:
    """?user= that no store would take as a principal (empty, over 256
    characters, control characters, not UTF-8), or with a cursor, is a JSON
    400 naming the problem, never a 500."""
    site, _ = make_site(clock)
    answer = call(site, "GET", "/_lapse/api/sessions?" + query)
    assert answer.status == 400 and error in get_json(answer)["error"]


def test_expire_user_ends_every_session_of_the_user_as_logouts(clock: Clock) -> None:
    """POST api/expire-user {"user"} ends each live session of that principal
    (callbacks run, the durable hook gets cause "expired") and no other; the
    answer gives their count and short uids; once more, none is left."""
    site, hooked = make_site(clock)
    ann = [site.makeSession() for _ in range(3)]
    bob = site.makeSession()
    called: list[str] = []
    for session in ann:
        bind(session, "ann")
        session.notifyOnExpire(lambda s=session: called.append(s.uid))
    bind(bob, "bob")
    done = post_as_page(site, "/_lapse/api/expire-user", {"user": "ann"})
    assert done.status == 200
    answer = get_json(done)
    assert answer["user"] == "ann" and answer["expired"] == 3
    assert sorted(answer["uids"]) == sorted(s.uid[:8] + "\u2026" for s in ann)
    assert all(s.expired for s in ann) and not bob.expired
    assert sorted(called) == sorted(s.uid for s in ann)
    assert sorted((e.uid, e.cause) for e in hooked) == sorted((s.uid, "expired") for s in ann)
    assert site.stats.ended["expired"] == 3
    again = get_json(post_as_page(site, "/_lapse/api/expire-user", {"user": "ann"}))
    assert again["expired"] == 0 and again["uids"] == []


def test_expire_user_except_keeps_that_session(clock: Clock) -> None:
    """With "except": a row id, every other session of the user ends and that
    one stays; an except id the view never gave out is a 400 that ends nothing."""
    site, _ = make_site(clock)
    kept, other = site.makeSession(), site.makeSession()
    bind(kept, "ann")
    bind(other, "ann")
    rows = get_json(call(site, "GET", "/_lapse/api/sessions?user=ann"))["sessions"]
    kept_row = next(r for r in rows if kept.uid.startswith(r["uid"][:8]))
    bad = post_as_page(site, "/_lapse/api/expire-user", {"user": "ann", "except": "r" + "0" * 54})
    assert bad.status == 400 and "except" in get_json(bad)["error"]
    assert not kept.expired and not other.expired
    body = {"user": "ann", "except": kept_row["id"]}
    answer = get_json(post_as_page(site, "/_lapse/api/expire-user", body))
    assert answer["expired"] == 1 and other.expired and not kept.expired


def test_expire_user_keeps_the_access_and_csrf_rules(clock: Clock) -> None:
    """expire-user is refused like expire: without the CSRF header, with a
    wrong one, with a header but no CSRF cookie (a cross-site form or fetch):
    403, nothing ended; from a client not on loopback (no token): 404; with a
    token, a cookie-authenticated POST still needs the CSRF pair, a bearer
    one does not; GET is a 405."""
    site, _ = make_site(clock)
    session = site.makeSession()
    bind(session, "ann")
    body = json.dumps({"user": "ann"}).encode()
    path = "/_lapse/api/expire-user"
    assert call(site, "POST", path, body=body).status == 403
    nonce = {CSRF_COOKIE.encode(): b"a" * 32}
    wrong = [(b"x-lapse-csrf", b"0" * 64)]
    assert call(site, "POST", path, body=body, headers=wrong, cookies=nonce).status == 403
    assert call(site, "POST", path, body=body, headers=wrong).status == 403
    outsider = call(site, "POST", path, body=body, headers=[(b"x-forwarded-for", b"203.0.113.9")])
    assert outsider.status == 404
    assert call(site, "GET", path).status == 405
    assert not session.expired
    tokened, _ = make_site(clock, token=TOKEN)
    guarded = tokened.makeSession()
    bind(guarded, "ann")
    assert call(tokened, "POST", path, body=body).status == 403
    assert call(tokened, "GET", "/_lapse/api/sessions?user=ann").status == 403
    assert not guarded.expired
    assert call(tokened, "POST", path, body=body, headers=BEARER).status == 200
    assert guarded.expired


@pytest.mark.parametrize(
    ("body", "status"),
    [
        (b"[1", 400),
        (b"{}", 400),
        (b'{"user": 7}', 400),
        (b'{"user": "ann", "except": 7}', 400),
        (b'{"user": ""}', 400),
        (b'{"user": "a\\u0000"}', 400),
        (b'{"user": "\\ud800"}', 400),
        (b'{"user": "' + b"a" * 5000 + b'"}', 413),
    ],
)
def test_expire_user_bad_bodies_are_4xx(clock: Clock, body: bytes, status: int) -> None:
    """A body that is not {"user": principal[, "except": row id]} (not JSON,
    no user, not a string, not a principal: empty, control characters, a
    lone surrogate) is a JSON 400; over 4 KiB a 413; never a 500."""
    from _liveview import csrf_of

    site, _ = make_site(clock)
    nonce, csrf = csrf_of(call(site, "GET", "/_lapse/"))
    answer = call(
        site,
        "POST",
        "/_lapse/api/expire-user",
        body=body,
        headers=[(b"x-lapse-csrf", csrf)],
        cookies={CSRF_COOKIE.encode(): nonce},
    )
    assert answer.status == status and "error" in get_json(answer)


def test_a_store_without_the_index_is_a_501_saying_so() -> None:
    """On a store that keeps no index of principals, ?user= and expire-user
    are a JSON 501 naming the missing index; the rows still list, with
    principal None."""

    async def main() -> None:
        root = Resource()
        site = Site(root, store=NoIndexStore(), reactor=Clock())
        root.putChild(b"_lapse", LiveView(site, token=TOKEN))
        await site._keeper.persist([site.makeSession()])
        rows = await call_async(site, "GET", "/_lapse/api/sessions", headers=BEARER)
        assert [row["principal"] for row in json.loads(rows.body)["sessions"]] == [None]
        listing = await call_async(site, "GET", "/_lapse/api/sessions?user=ann", headers=BEARER)
        assert listing.status == 501 and "no index" in json.loads(listing.body)["error"]
        body = json.dumps({"user": "ann"}).encode()
        ended = await call_async(site, "POST", "/_lapse/api/expire-user", body=body, headers=BEARER)
        assert ended.status == 501 and "no index" in json.loads(ended.body)["error"]
        await site._keeper.aclose()

    asyncio.run(main())


def test_shared_store_expire_user_ends_another_process_sessions(shared_store: str) -> None:
    """On each shared store (SQLite, Redis, PostgreSQL), expire-user in one
    Site's view ends the user's sessions made by another Site on the same
    store (two processes' worth): that Site's callbacks run when it reads
    the store's announcements, and the durable hook runs once per session,
    cause "expired"; the other user's session stays."""

    async def main() -> None:
        hooked: list[Expiry] = []
        root = Resource()
        viewer = Site(root, store=shared_store, on_expire=hooked.append)
        root.putChild(b"_lapse", LiveView(viewer, token=TOKEN))
        holder = Site(Resource(), store=shared_store, on_expire=hooked.append)
        for site in (viewer, holder):
            site._keeper.poll_interval = 0.01
        try:
            sessions = [holder.makeSession() for _ in range(3)]
            await holder._keeper.persist(sessions)
            for session in sessions[:2]:
                await session.set_principal("ann")
            await sessions[2].set_principal("bob")
            called: list[str] = []
            for session in sessions:
                session.notifyOnExpire(lambda s=session: called.append(s.uid))
            viewer._keeper.start()
            holder._keeper.start()
            listing = await call_async(
                viewer, "GET", "/_lapse/api/sessions?user=ann", headers=BEARER
            )
            assert json.loads(listing.body)["live"] == 2
            body = json.dumps({"user": "ann"}).encode()
            ended = await call_async(
                viewer, "POST", "/_lapse/api/expire-user", body=body, headers=BEARER
            )
            assert json.loads(ended.body)["expired"] == 2
            ann = sorted(s.uid for s in sessions[:2])
            for _ in range(300):
                if sorted(called) == ann and len(hooked) == 2:
                    break
                await asyncio.sleep(0.01)
            assert sorted(called) == ann
            assert sorted((e.uid, e.cause) for e in hooked) == [(uid, "expired") for uid in ann]
            assert not sessions[2].expired
        finally:
            for site in (viewer, holder):
                await site._keeper.aclose()

    asyncio.run(main())


def test_the_view_of_a_fastapi_middleware_lists_and_ends_a_users_sessions() -> None:
    """Mounted in a FastAPI app (liveview_app over SessionMiddleware), the
    view lists a user's sessions by ?user= and expire-user ends them through
    the middleware's expire_principal: their callbacks run, the other
    user's session stays."""
    ended: list[str] = []
    app = FastAPI()

    @app.get("/login")
    async def login(request: FastAPIRequest) -> str:
        user = request.query_params["user"]
        session = get_session(request)
        await session.set_principal(user)
        session.notifyOnExpire(lambda: ended.append(user))
        return user

    sessions = SessionMiddleware(app, reactor=Clock())
    app.mount("/_lapse", liveview_app(sessions, token=TOKEN))
    bearer = dict(BEARER)

    async def main() -> None:
        transport = httpx.ASGITransport(app=sessions)
        for user in ("ann", "ann", "bob"):
            async with httpx.AsyncClient(transport=transport, base_url="http://t") as visitor:
                assert (await visitor.get("/login", params={"user": user})).status_code == 200
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as operator:
            listing = await operator.get("/_lapse/api/sessions?user=ann", headers=bearer)
            assert listing.json()["live"] == 2
            done = await operator.post(
                "/_lapse/api/expire-user", json={"user": "ann"}, headers=bearer
            )
            assert done.status_code == 200 and done.json()["expired"] == 2
            rows = (await operator.get("/_lapse/api/sessions", headers=bearer)).json()
            assert [row["principal"] for row in rows["sessions"]] == ["bob"]
        assert ended == ["ann", "ann"]

    asyncio.run(main())
