"""Sessions through the Site: cookies, sliding expiry, logout, secure sessions."""

from __future__ import annotations

import re
from typing import Any

import pytest
from conftest import Leaf, SessionPage, call

from lapse.internet.task import Clock
from lapse.web.resource import Resource
from lapse.web.server import Session, Site


class ShortSession(Session):
    sessionTimeout = 5


def tree() -> Resource:
    root = Resource()
    root.putChild("who", SessionPage())
    root.putChild("plain", Leaf(b"no session here"))
    root.putChild("logout", Logout())
    return root


class Logout(Resource):
    isLeaf = True

    def render_GET(self, request: Any) -> bytes:
        request.getSession().expire()
        return b"bye"


@pytest.fixture
def site(clock: Clock) -> Site:
    site = Site(tree(), reactor=clock)
    site.sessionFactory = ShortSession
    return site


def uid_of(site: Site, **kw: Any) -> str:
    return call(site, "GET", "/who", **kw).body.decode()


def test_new_visitor_gets_session_cookie_with_safe_attributes(site: Site) -> None:
    """A first visit creates a session; its cookie is Path=/, HttpOnly, SameSite=Lax,
    and not Secure over plain HTTP."""
    response = call(site, "GET", "/who")
    cookie = response.set_cookies[b"lapse_session"]
    attributes = [part.strip() for part in cookie.split(b";")[1:]]
    assert attributes == [b"Path=/", b"HttpOnly", b"SameSite=Lax"]
    assert response.cookie_value(b"lapse_session") == response.body
    assert response.body.decode() in site.sessions


def test_visits_with_cookie_keep_the_same_session(site: Site) -> None:
    """A visitor presenting its cookie gets the same session and no new cookie."""
    first = call(site, "GET", "/who")
    cookie = {b"lapse_session": first.body}
    second = call(site, "GET", "/who", cookies=cookie)
    assert second.body == first.body
    assert b"lapse_session" not in second.set_cookies


def test_every_request_presenting_cookie_touches_session(site: Site, clock: Clock) -> None:
    """Sliding expiry: a request that presents the cookie touches the session
    even if the page it asks for never calls getSession()."""
    uid = uid_of(site)
    for _ in range(10):
        clock.advance(4)
        call(site, "GET", "/plain", cookies={b"lapse_session": uid.encode()})
    assert uid in site.sessions
    clock.advance(5)
    assert uid not in site.sessions


def test_request_for_unknown_page_still_touches_session(site: Site, clock: Clock) -> None:
    """Even a 404 visit by a known visitor counts as activity."""
    uid = uid_of(site)
    clock.advance(4)
    assert call(site, "GET", "/nowhere", cookies={b"lapse_session": uid.encode()}).status == 404
    clock.advance(4)
    assert uid in site.sessions


def test_expired_cookie_gets_fresh_session(site: Site, clock: Clock) -> None:
    """After expiry, the old cookie is not adopted: a fresh session with a new uid."""
    uid = uid_of(site)
    clock.advance(5)
    response = call(site, "GET", "/who", cookies={b"lapse_session": uid.encode()})
    assert response.body.decode() != uid
    assert response.cookie_value(b"lapse_session") == response.body


@pytest.mark.parametrize(
    "value",
    [
        b"",
        b"not-a-session",
        b"0" * 64,
        b"A" * 24,
        b"*" * 24,
        b'"' + b"a" * 24,
        b"x" * 5000,
        b"\xff\xfe\x00",
    ],
)
def test_malformed_or_unknown_cookie_never_adopted(site: Site, value: bytes) -> None:
    """A cookie value that names no live session is ignored: the visitor gets a
    fresh session whose uid is 24 URL-safe base64 characters, never the value sent."""
    response = call(site, "GET", "/who", headers=[(b"cookie", b"lapse_session=" + value)])
    assert response.status == 200
    uid = response.body
    assert uid != value
    assert re.fullmatch(rb"[A-Za-z0-9_-]{24}", uid)
    assert response.cookie_value(b"lapse_session") == uid


def test_garbled_cookie_header_is_survived(site: Site) -> None:
    """A Cookie header that is not name=value pairs is read leniently."""
    uid = uid_of(site).encode()
    header = b";;; =x; junk; lapse_session=" + uid + b"; ==="
    response = call(site, "GET", "/who", headers=[(b"cookie", header)])
    assert response.status == 200
    assert response.body == uid


def test_logout_expires_session_and_clears_cookie(site: Site) -> None:
    """Expiring the session in a request makes the response delete the cookie."""
    uid = uid_of(site)
    response = call(site, "GET", "/logout", cookies={b"lapse_session": uid.encode()})
    assert uid not in site.sessions
    cookie = response.set_cookies[b"lapse_session"]
    assert cookie.startswith(b"lapse_session=;")
    assert b"Max-Age=0" in cookie and b"Path=/" in cookie
    after = call(site, "GET", "/who", cookies={b"lapse_session": uid.encode()})
    assert after.body.decode() != uid


def test_secure_request_uses_host_prefixed_secure_cookie(site: Site) -> None:
    """On a secure request the session cookie is __Host-lapse_session, with Secure."""
    response = call(site, "GET", "/who", scheme="https")
    cookie = response.set_cookies[b"__Host-lapse_session"]
    assert b"; Secure" in cookie and b"Path=/" in cookie
    assert b"lapse_session" not in response.set_cookies


def test_secure_cookie_ignored_on_plain_request(site: Site) -> None:
    """A secure session's cookie sent over plain HTTP is not honoured."""
    uid = call(site, "GET", "/who", scheme="https").body
    plain = call(site, "GET", "/who", cookies={b"__Host-lapse_session": uid})
    assert plain.body != uid


def test_cookie_name_is_configurable(clock: Clock) -> None:
    """Site(cookie_name=...) names the session cookies."""
    site = Site(tree(), reactor=clock, cookie_name="sid")
    response = call(site, "GET", "/who")
    assert response.cookie_value(b"sid") == response.body
    assert site.secure_cookie_name == "__Host-sid"
    again = call(site, "GET", "/who", cookies={b"sid": response.body})
    assert again.body == response.body


@pytest.mark.parametrize("name", ["", "a b", "a;b", "caf\u00e9", 'x"'])
def test_unusable_cookie_name_is_refused(name: str) -> None:
    """A cookie name that cannot go in a header is a ValueError at construction."""
    with pytest.raises(ValueError, match="cookie name"):
        Site(Resource(), cookie_name=name)


class SecurityProbe(Resource):
    isLeaf = True

    def render_GET(self, request: Any) -> str:
        return f"{request.isSecure()} {request.getClientAddress().host}"


def test_forwarded_headers_ignored_unless_trusted(clock: Clock) -> None:
    """X-Forwarded-Proto/For change nothing unless the site trusts proxy headers."""
    headers = [(b"x-forwarded-proto", b"https"), (b"x-forwarded-for", b"203.0.113.9")]
    untrusting = Site(SecurityProbe(), reactor=clock)
    assert call(untrusting, headers=headers).body == b"False 127.0.0.1"
    trusting = Site(SecurityProbe(), reactor=clock, trust_proxy_headers=True)
    assert call(trusting, headers=headers).body == b"True 203.0.113.9"
    assert call(trusting).body == b"False 127.0.0.1"


def test_trusted_forwarded_https_gets_secure_session(clock: Clock) -> None:
    """Behind a trusted TLS proxy, sessions are secure ones with Secure cookies."""
    site = Site(tree(), reactor=clock, trust_proxy_headers=True)
    response = call(site, "GET", "/who", headers=[(b"x-forwarded-proto", b"https")])
    assert b"Secure" in response.set_cookies[b"__Host-lapse_session"]


def test_session_interface_argument_returns_component(site: Site) -> None:
    """getSession(IFoo) returns the session's component for IFoo."""
    from zope.interface import Interface

    class IThing(Interface):
        pass

    thing = object()

    class Page(Resource):
        isLeaf = True

        def render_GET(self, request: Any) -> bytes:
            request.getSession().setComponent(IThing, thing)
            assert request.getSession(IThing) is thing
            return b"yes"

    site.resource = Page()
    assert call(site).body == b"yes"
