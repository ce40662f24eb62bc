"""The live view through the ASGI driver: access, CSRF, JSON, ending sessions."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Iterator
from typing import Any

import conftest
import pytest
from _liveview import TOKEN, csrf_of, get_json, make_site
from conftest import call, call_async

from lapse.internet.task import Clock
from lapse.sessions import Expiry
from lapse.web.liveview import AUTH_COOKIE, CSRF_COOKIE, LiveView
from lapse.web.resource import Resource
from lapse.web.server import Site


@pytest.fixture
def client_host(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """Set ``client_host[0]`` to change the client address of requests."""
    host = ["127.0.0.1"]
    original = conftest.make_scope

    def make_scope(*args: Any, **kw: Any) -> dict[str, Any]:
        scope = original(*args, **kw)
        scope["client"] = (host[0], 50000)
        return scope

    monkeypatch.setattr(conftest, "make_scope", make_scope)
    yield host


def test_loopback_only_without_token(clock: Clock, client_host: list[str]) -> None:
    site, _ = make_site(clock)
    assert call(site, "GET", "/_lapse/").status == 200
    assert call(site, "GET", "/_lapse/api/summary").status == 200
    client_host[0] = "::1"
    assert call(site, "GET", "/_lapse/api/summary").status == 200
    for outsider in ("10.1.2.3", "2001:db8::1", ""):
        client_host[0] = outsider
        assert call(site, "GET", "/_lapse/").status == 404
        assert call(site, "GET", "/_lapse/api/summary").status == 404
        assert call(site, "POST", "/_lapse/api/expire", body=b"{}").status == 404


def test_forwarded_headers_follow_the_site(clock: Clock) -> None:
    forwarded = [(b"x-forwarded-for", b"203.0.113.9")]
    site, _ = make_site(clock)
    # Not trusted: a proxied request is refused, not taken for loopback.
    assert call(site, "GET", "/_lapse/", headers=forwarded).status == 404
    trusting, _ = make_site(clock, trust_proxy_headers=True)
    assert call(trusting, "GET", "/_lapse/", headers=forwarded).status == 404
    local = [(b"x-forwarded-for", b"127.0.0.1")]
    assert call(trusting, "GET", "/_lapse/", headers=local).status == 200


@pytest.mark.parametrize(
    "host",
    [
        b"localhost",
        b"LOCALHOST:8080",
        b"app.localhost:3000",
        b"127.0.0.1",
        b"127.8.9.1:80",
        b"[::1]",
        b"[::1]:8080",
    ],
)
def test_loopback_host_names_are_accepted(clock: Clock, host: bytes) -> None:
    """Without a token, a Host naming loopback (localhost, *.localhost,
    127.0.0.0/8, [::1], with or without a port) from a loopback client is let in."""
    site, _ = make_site(clock)
    assert call(site, "GET", "/_lapse/api/summary", headers=[(b"host", host)]).status == 200


@pytest.mark.parametrize(
    "host",
    [
        b"evil.example",
        b"evil.example:8080",
        b"127.0.0.1.evil.example",
        b"localhost.evil.example",
        b"evil-localhost",
        b"0.0.0.0:8080",
        b"10.0.0.1",
        b"[2001:db8::1]",
        b"[::1",
        b"[::1]:x",
        b"localhost:",
        b"localhost:80:80",
        b"::1",
        b"",
        b"caf\xc3\xa9.example",
    ],
)
def test_other_host_names_are_refused_without_a_token(
    clock: Clock, caplog: pytest.LogCaptureFixture, host: bytes
) -> None:
    """Without a token, a request from a loopback client whose Host is not a
    loopback name (a page using DNS rebinding to make a browser on this
    machine read the view or end sessions) is refused like any other: 404,
    reading and POSTing alike; with a token the Host does not matter."""
    site, _ = make_site(clock)
    session = site.makeSession()
    rows = get_json(call(site, "GET", "/_lapse/api/sessions"))["sessions"]
    page = call(site, "GET", "/_lapse/")
    nonce, csrf = csrf_of(page)
    rebound = [(b"host", host)]
    assert call(site, "GET", "/_lapse/", headers=rebound).status == 404
    assert call(site, "GET", "/_lapse/api/sessions", headers=rebound).status == 404
    post = call(
        site,
        "POST",
        "/_lapse/api/expire",
        body=json.dumps({"id": rows[0]["id"]}).encode(),
        headers=[*rebound, (b"x-lapse-csrf", csrf)],
        cookies={CSRF_COOKIE.encode(): nonce},
    )
    assert post.status == 404 and not session.expired
    tokened, _ = make_site(clock, token=TOKEN)
    bearer = [*rebound, (b"authorization", b"Bearer " + TOKEN.encode())]
    assert call(tokened, "GET", "/_lapse/api/summary", headers=bearer).status == 200
    assert "Traceback" not in caplog.text


def test_proxied_requests_count_only_by_the_trusted_entry(clock: Clock) -> None:
    """Without a token, behind trusted proxies the client is the entry they
    added: a spoofed left-most 127.0.0.1 is no pass, nor is an entry that is
    no address (the fallback to the proxy's own loopback address does not
    count), nor proxy headers the site does not trust (X-Real-IP, Via,
    Forwarded included)."""
    one, _ = make_site(clock, trust_proxy_headers=True)
    spoofed = [(b"x-forwarded-for", b"127.0.0.1, 203.0.113.9")]
    assert call(one, "GET", "/_lapse/", headers=spoofed).status == 404
    assert call(one, "GET", "/_lapse/", headers=[(b"x-forwarded-for", b"::1")]).status == 200
    for junk in (b"unknown", b"", b"127.0.0.1, junk", b"localhost"):
        assert call(one, "GET", "/_lapse/", headers=[(b"x-forwarded-for", junk)]).status == 404
    for header in (b"forwarded", b"x-real-ip", b"via", b"x-forwarded-host"):
        marked = [(header, b"127.0.0.1")]
        assert call(one, "GET", "/_lapse/", headers=marked).status == 404
        untrusting, _ = make_site(clock)
        assert call(untrusting, "GET", "/_lapse/", headers=marked).status == 404
    two, _ = make_site(clock, trust_proxy_headers=2)
    chain = [(b"x-forwarded-for", b"203.0.113.9, 127.0.0.1, 10.0.0.2")]
    assert call(two, "GET", "/_lapse/", headers=chain).status == 200
    assert call(one, "GET", "/_lapse/", headers=chain).status == 404
    listed, _ = make_site(clock, trust_proxy_headers=["127.0.0.1"])
    through = [(b"x-forwarded-for", b"198.51.100.1, 127.0.0.1")]
    assert call(listed, "GET", "/_lapse/", headers=through).status == 404


def test_the_token_never_reaches_the_access_log(
    clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    """lapse's access log never shows the view's token: not a right one, not
    a wrong one, not spelled %74oken, not in a Referer, not on a path the view
    does not serve, not when the request fails before the view (413); other
    arguments stay readable."""
    site, _ = make_site(clock, token=TOKEN, max_body_size=16)
    wrong = "another-token-value"
    with caplog.at_level(logging.INFO, logger="lapse"):
        assert call(site, "GET", f"/_lapse/?token={TOKEN}").status == 303
        assert call(site, "GET", f"/_lapse/api/summary?a=1&token={wrong}&b=2").status == 403
        assert call(site, "GET", f"/_lapse/?%74oken={TOKEN}").status == 303
        assert call(site, "GET", f"/_lapse/?tok%65n={TOKEN}&token").status == 303
        assert call(site, "GET", f"/elsewhere?token={TOKEN}").status == 404
        big = call(site, "POST", f"/_lapse/api/expire?token={TOKEN}", body=b"{}" * 20)
        assert big.status == 413
        referer = [(b"referer", f"http://127.0.0.1/_lapse/?x=1&token={TOKEN}".encode())]
        assert call(site, "GET", "/", headers=referer).status == 200
    lines = [record.getMessage() for record in caplog.records if record.name == "lapse.access"]
    assert len(lines) == 7
    text = "\n".join(record.getMessage() for record in caplog.records)
    assert TOKEN not in text and wrong not in text
    assert '"GET /_lapse/?token=[redacted] HTTP/1.1" 303' in lines[0]
    assert "/_lapse/api/summary?a=1&token=[redacted]&b=2" in lines[1]
    assert "/_lapse/?%74oken=[redacted]" in lines[2]
    assert "/_lapse/?tok%65n=[redacted]&token=[redacted]" in lines[3]
    assert '"http://127.0.0.1/_lapse/?x=1&token=[redacted]"' in lines[6]
    entry = call(site, "GET", f"/_lapse/?token={TOKEN}")
    assert entry.header(b"referrer-policy") == b"no-referrer"


def test_token_bearer_query_and_cookie(clock: Clock, client_host: list[str]) -> None:
    site, _ = make_site(clock, token=TOKEN)
    client_host[0] = "198.51.100.7"
    assert call(site, "GET", "/_lapse/").status == 403
    # Loopback is no pass when there is a token.
    client_host[0] = "127.0.0.1"
    assert call(site, "GET", "/_lapse/api/summary").status == 403
    bearer = [(b"authorization", b"Bearer " + TOKEN.encode())]
    assert call(site, "GET", "/_lapse/api/summary", headers=bearer).status == 200
    wrong = [(b"authorization", b"Bearer nope-nope-nope")]
    assert call(site, "GET", "/_lapse/api/summary", headers=wrong).status == 403
    assert call(site, "GET", "/_lapse/?token=wrong-token").status == 403
    entry = call(site, "GET", f"/_lapse/?token={TOKEN}")
    assert entry.status == 303
    assert entry.header(b"location") == b"/_lapse/"
    cookie_header = entry.set_cookies[AUTH_COOKIE.encode()]
    assert b"HttpOnly" in cookie_header and b"SameSite=Strict" in cookie_header
    assert b"Path=/_lapse/" in cookie_header
    value = entry.cookie_value(AUTH_COOKIE.encode())
    assert value is not None and TOKEN.encode() not in value
    page = call(site, "GET", "/_lapse/", cookies={AUTH_COOKIE.encode(): value})
    assert page.status == 200
    assert b"<svg" in page.body
    forged = call(site, "GET", "/_lapse/", cookies={AUTH_COOKIE.encode(): b"x" * 64})
    assert forged.status == 403


def test_short_token_refused() -> None:
    with pytest.raises(ValueError):
        LiveView(object(), token="short")


def test_page_is_self_contained_and_safe(clock: Clock) -> None:
    site, _ = make_site(clock)
    page = call(site, "GET", "/_lapse/")
    assert page.status == 200
    body = page.body.decode()
    assert "http://" not in body.replace("http://www.w3.org/2000/svg", "")
    assert "https://" not in body
    csp = page.header(b"content-security-policy")
    assert csp is not None and b"default-src 'none'" in csp and b"frame-ancestors 'none'" in csp
    assert page.header(b"x-frame-options") == b"DENY"
    assert CSRF_COOKIE.encode() in page.set_cookies
    assert b"SameSite=Strict" in page.set_cookies[CSRF_COOKIE.encode()]
    # Without the trailing slash: redirected to the page.
    bare = call(site, "GET", "/_lapse")
    assert bare.status == 301 and bare.header(b"location") == b"/_lapse/"
    assert call(site, "GET", "/_lapse/nothing").status == 404
    assert call(site, "DELETE", "/_lapse/api/summary").status == 405


def test_viewing_creates_no_session(clock: Clock) -> None:
    site, _ = make_site(clock)
    for path in ("/_lapse/", "/_lapse/api/summary", "/_lapse/api/sessions", "/_lapse"):
        response = call(site, "GET", path)
        assert b"lapse_session" not in b"".join(response.set_cookies)
    assert site.sessions == {}
    assert site.stats.created == 0


def test_json_shapes(clock: Clock) -> None:
    site, _ = make_site(clock)
    for _ in range(3):
        session = site.makeSession()
        session.data["secret"] = "<script>alert(1)</script>"
        clock.advance(10)
    summary = get_json(call(site, "GET", "/_lapse/api/summary"))
    assert summary["live"] == 3
    assert summary["store"] == "memory:"
    assert summary["stats"]["created"] == 3
    assert set(summary["stats"]["ended"]) >= {"timeout", "expired", "lifetime", "evicted"}
    assert len(summary["stats"]["minutes"]["created"]) == 60
    assert sum(summary["stats"]["minutes"]["created"]) == 3
    assert summary["expiries"]["horizon"] == 3600
    assert summary["expiries"]["buckets"][1] == 3  # 570-590 s left: 5-10 min
    page = get_json(call(site, "GET", "/_lapse/api/sessions?limit=2"))
    assert len(page["sessions"]) == 2 and page["next"]
    rest = get_json(call(site, "GET", f"/_lapse/api/sessions?limit=2&cursor={page['next']}"))
    assert len(rest["sessions"]) == 1 and rest["next"] is None
    rows = page["sessions"] + rest["sessions"]
    uids = set(site.sessions)
    for row in rows:
        assert set(row) == {"id", "uid", "age", "idle", "left", "principal"}
        assert row["principal"] is None  # bound to no one
        assert row["uid"].endswith("\u2026") and len(row["uid"]) == 9
        assert any(uid.startswith(row["uid"][:8]) for uid in uids)
        assert row["id"] not in uids  # full uids never leave the server
        assert 0 <= row["idle"] <= 30 and 570 <= row["left"] <= 600
    body = b"".join(
        call(site, "GET", p).body for p in ("/_lapse/api/sessions", "/_lapse/api/summary")
    )
    assert b"script" not in body and b"secret" not in body
    for uid in uids:
        assert uid.encode() not in body


def test_end_a_session_runs_callbacks_and_hook(clock: Clock) -> None:
    site, hooked = make_site(clock)
    session = site.makeSession()
    other = site.makeSession()
    ended: list[str] = []
    session.notifyOnExpire(lambda: ended.append(session.uid))
    rows = get_json(call(site, "GET", "/_lapse/api/sessions"))["sessions"]
    row = next(r for r in rows if session.uid.startswith(r["uid"][:8]))
    nonce, csrf = csrf_of(call(site, "GET", "/_lapse/"))
    body = json.dumps({"id": row["id"]}).encode()
    # Without the CSRF token, or with a wrong one, or without its cookie: 403.
    assert call(site, "POST", "/_lapse/api/expire", body=body).status == 403
    bad = [(b"x-lapse-csrf", b"0" * 64)]
    cookies = {CSRF_COOKIE.encode(): nonce}
    assert (
        call(site, "POST", "/_lapse/api/expire", body=body, headers=bad, cookies=cookies).status
        == 403
    )
    good = [(b"x-lapse-csrf", csrf), (b"content-type", b"application/json")]
    assert call(site, "POST", "/_lapse/api/expire", body=body, headers=good).status == 403
    other_nonce = {CSRF_COOKIE.encode(): b"a" * 32}
    assert (
        call(
            site, "POST", "/_lapse/api/expire", body=body, headers=good, cookies=other_nonce
        ).status
        == 403
    )
    assert not session.expired
    done = call(site, "POST", "/_lapse/api/expire", body=body, headers=good, cookies=cookies)
    assert done.status == 200
    assert get_json(done) == {"expired": True, "uid": row["uid"]}
    assert session.expired and not other.expired
    assert ended == [session.uid]
    assert [(e.uid, e.cause) for e in hooked] == [(session.uid, "expired")]
    assert site.stats.ended["expired"] == 1
    # Once more: the id is spent.
    again = call(site, "POST", "/_lapse/api/expire", body=body, headers=good, cookies=cookies)
    assert again.status == 404
    junk = call(site, "POST", "/_lapse/api/expire", body=b"[1", headers=good, cookies=cookies)
    assert junk.status == 400


def test_bearer_post_needs_no_csrf(clock: Clock) -> None:
    site, hooked = make_site(clock, token=TOKEN)
    session = site.makeSession()
    bearer = [(b"authorization", b"Bearer " + TOKEN.encode())]
    rows = get_json(call(site, "GET", "/_lapse/api/sessions", headers=bearer))["sessions"]
    body = json.dumps({"id": rows[0]["id"]}).encode()
    assert call(site, "POST", "/_lapse/api/expire", body=body, headers=bearer).status == 200
    assert session.expired and hooked[0].cause == "expired"
    # A cookie-authenticated POST still needs the CSRF token.
    entry = call(site, "GET", f"/_lapse/?token={TOKEN}")
    auth = {AUTH_COOKIE.encode(): entry.cookie_value(AUTH_COOKIE.encode()) or b""}
    assert call(site, "POST", "/_lapse/api/expire", body=body, cookies=auth).status == 403


def test_one_session_by_id(clock: Clock) -> None:
    """GET api/session?id= answers the row api/sessions gave for that id, as it is
    now (behind the same access rules); 400 for an id never given out, 404 once
    the session has ended."""
    site, _ = make_site(clock, token=TOKEN)
    session = site.makeSession()
    bearer = [(b"authorization", b"Bearer " + TOKEN.encode())]
    unknown = call(site, "GET", "/_lapse/api/session?id=r" + "0" * 54, headers=bearer)
    assert unknown.status == 400 and "not a row id" in get_json(unknown)["error"]
    row = get_json(call(site, "GET", "/_lapse/api/sessions", headers=bearer))["sessions"][0]
    clock.advance(5)
    assert call(site, "GET", f"/_lapse/api/session?id={row['id']}").status == 403
    one = get_json(call(site, "GET", f"/_lapse/api/session?id={row['id']}", headers=bearer))
    assert one["session"]["id"] == row["id"] and one["session"]["uid"] == row["uid"]
    assert one["session"]["idle"] == row["idle"] + 5 and session.uid not in json.dumps(one)
    assert call(site, "DELETE", "/_lapse/api/session", headers=bearer).status == 405
    session.expire()
    gone = call(site, "GET", f"/_lapse/api/session?id={row['id']}", headers=bearer)
    assert gone.status == 404 and get_json(gone) == {"error": "no such session"}


def test_shared_store_view(shared_store: str) -> None:
    """On each shared store (SQLite, Redis, PostgreSQL) the view's summary
    counts the live sessions, lists them, and its expire ends one: the
    durable hook gets it, cause "expired"."""

    async def main() -> None:
        hooked: list[Expiry] = []
        root = Resource()
        site = Site(root, store=shared_store, on_expire=hooked.append)
        site._keeper.poll_interval = 0.01
        root.putChild(b"_lapse", LiveView(site))
        sessions = [site.makeSession() for _ in range(2)]
        await site._keeper.persist(sessions)
        site._keeper.start()
        summary = json.loads((await call_async(site, "GET", "/_lapse/api/summary")).body)
        assert summary["live"] == 2 and summary["shared"] is True
        rows = json.loads((await call_async(site, "GET", "/_lapse/api/sessions")).body)
        assert len(rows["sessions"]) == 2
        page = await call_async(site, "GET", "/_lapse/")
        nonce, csrf = csrf_of(page)
        row = rows["sessions"][0]
        response = await call_async(
            site,
            "POST",
            "/_lapse/api/expire",
            body=json.dumps({"id": row["id"]}).encode(),
            headers=[(b"x-lapse-csrf", csrf)],
            cookies={CSRF_COOKIE.encode(): nonce},
        )
        assert json.loads(response.body)["expired"] is True
        for _ in range(200):
            if hooked:
                break
            await asyncio.sleep(0.01)
        assert [e.cause for e in hooked] == ["expired"]
        assert hooked[0].uid.startswith(row["uid"][:8])
        await site._keeper.aclose()

    asyncio.run(main())


def test_mount_puts_the_view_in_front_of_a_leaf_root() -> None:
    """mount(site, "_lapse") serves the view at /_lapse/ and leaves every other
    path to the site's own root, even a leaf; a bad segment is a ValueError."""
    from conftest import Leaf, call

    from lapse.internet.task import Clock
    from lapse.web.liveview import LiveView, mount
    from lapse.web.server import Site

    site = Site(Leaf(b"the app"), reactor=Clock())
    view = mount(site, "_lapse")
    assert isinstance(view, LiveView)
    assert call(site, path=b"/").body == b"the app"
    assert call(site, path=b"/some/where").body == b"the app"
    summary = call(site, path=b"/_lapse/api/summary")
    assert summary.status == 200
    assert b'"live"' in summary.body
    for bad in ("", "/", "a/b", "..", "sp ace"):
        with pytest.raises(ValueError):
            mount(Site(Leaf(b"x"), reactor=Clock()), bad)
