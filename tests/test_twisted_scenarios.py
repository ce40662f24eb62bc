"""Twisted's own session tests (twisted/web/test/test_web.py), restated for lapse.

Where lapse differs on purpose the test says so: uids are str, not bytes; the
session cookie is ``lapse_session`` (``__Host-lapse_session`` when secure),
not ``TWISTED_SESSION``; and session cookies are decided when the response
headers are built, so they are checked on the response, not in
``request.cookies``.
"""

from __future__ import annotations

import base64
import logging
import os
import re
from typing import Any

import pytest
from conftest import SessionPage, call

from lapse.internet import reactor
from lapse.internet.task import Clock
from lapse.web import server
from lapse.web.resource import Resource


def auto_expiring_session(site: server.Site, cleanups: list[Any]) -> server.Session:
    session = site.makeSession()
    cleanups.append(session.expire)
    return session


class TestSite:
    """Twisted's SiteTest."""

    def test_makeSession(self) -> None:
        """makeSession creates a Session whose uid is a str of 24 URL-safe
        base64 characters (144 random bits); Twisted's is 64 hex digits."""
        site = server.Site(Resource(), reactor=Clock())
        session = site.makeSession()
        assert isinstance(session, server.Session)
        assert isinstance(session.uid, str)
        assert re.fullmatch(r"[A-Za-z0-9_-]{24}", session.uid)
        assert len(base64.urlsafe_b64decode(session.uid)) == 18

    def test_sessionUIDGeneration(self) -> None:
        """Sessions get distinct uids from the site's entropy source (os.urandom)."""
        site = server.Site(Resource(), reactor=Clock())
        assert site._entropy is os.urandom
        counter = [0]
        asked: list[int] = []

        def predictable_entropy(n: int) -> bytes:
            counter[0] += 1
            asked.append(n)
            return bytes([counter[0]]) * n

        site._entropy = predictable_entropy
        a = site.makeSession()
        b = site.makeSession()
        assert asked == [18, 18]
        assert a.uid == "AQEB" * 6
        assert b.uid == "AgIC" * 6
        assert site.counter == 2

    def test_getSessionExistent(self) -> None:
        """site.getSession returns a session made earlier, by its uid."""
        site = server.Site(Resource(), reactor=Clock())
        created = site.makeSession()
        assert site.getSession(created.uid) is created

    def test_getSessionNonExistent(self) -> None:
        """site.getSession raises KeyError for an unknown uid (str or bytes)."""
        site = server.Site(Resource(), reactor=Clock())
        for uid in ("no-such-uid", b"no-such-uid"):
            try:
                site.getSession(uid)
            except KeyError:
                pass
            else:
                raise AssertionError("getSession did not raise KeyError")


class TestSession:
    """Twisted's SessionTests: a site with one session on a Clock."""

    def setup_method(self) -> None:
        self.clock = Clock()
        self.uid = "unique"
        self.site = server.Site(Resource(), reactor=self.clock)
        self.session = server.Session(self.site, self.uid)
        self.site.sessions[self.uid] = self.session

    def test_defaultReactor(self) -> None:
        """Without a reactor argument, a Session uses its site's reactor."""
        site = server.Site(Resource(), reactor=Clock())
        session = server.Session(site, "123")
        assert session._reactor is site.reactor

    def test_siteDefaultReactor(self) -> None:
        """Without a reactor argument, a Site uses the global reactor."""
        site = server.Site(Resource())
        assert site.reactor is reactor

    def test_explicitReactor(self) -> None:
        """A Session accepts the reactor to use as a parameter."""
        site = server.Site(Resource())
        other = Clock()
        session = server.Session(site, "123", reactor=other)
        assert session._reactor is other

    def test_startCheckingExpiration(self) -> None:
        """startCheckingExpiration expires the session after sessionTimeout
        seconds without activity, not a second sooner, leaving no call behind."""
        self.session.startCheckingExpiration()
        self.clock.advance(self.session.sessionTimeout - 1)
        assert self.uid in self.site.sessions
        self.clock.advance(1)
        assert self.uid not in self.site.sessions
        assert not self.clock.calls

    def test_expire(self) -> None:
        """expire() removes the session and leaves no pending call."""
        self.session.expire()
        assert self.uid not in self.site.sessions
        assert not self.clock.calls

    def test_expireWhileChecking(self) -> None:
        """expire() works before the timeout is due, cancelling the timer."""
        self.session.startCheckingExpiration()
        self.test_expire()

    def test_notifyOnExpire(self) -> None:
        """A function registered with notifyOnExpire runs when the session expires."""
        ran = []
        self.session.notifyOnExpire(lambda: ran.append(True))
        self.session.expire()
        assert ran == [True]

    def test_touch(self) -> None:
        """touch() updates lastModified and pushes the timeout back by exactly
        sessionTimeout, before and after startCheckingExpiration."""
        self.clock.advance(3)
        self.session.touch()
        assert self.session.lastModified == 3
        self.session.startCheckingExpiration()
        self.clock.advance(self.session.sessionTimeout - 1)
        self.session.touch()
        self.clock.advance(self.session.sessionTimeout - 1)
        assert self.uid in self.site.sessions
        self.clock.advance(1)
        assert self.uid not in self.site.sessions


def _secure_site() -> server.Site:
    return server.Site(SessionPage(), reactor=Clock())


class _Probe(Resource):
    """Runs a function on the request during render."""

    isLeaf = True

    def __init__(self, probe: Any) -> None:
        super().__init__()
        self.probe = probe

    def render_GET(self, request: Any) -> bytes:
        self.probe(request)
        return b""


class TestRequestSessions:
    """Twisted's RequestTests about sessions, driven through the Site."""

    def test_sessionDifferentFromSecureSession(self) -> None:
        """On a secure request, the secure session and the plain one
        (forceNotSecure) are different sessions under different cookies."""
        seen: dict[str, Any] = {}

        def probe(request: Any) -> None:
            seen["secure"] = request.getSession()
            seen["plain"] = request.getSession(forceNotSecure=True)

        site = server.Site(_Probe(probe), reactor=Clock())
        response = call(site, scheme="https")
        assert seen["secure"].uid != seen["plain"].uid
        assert response.cookie_value(b"__Host-lapse_session") == seen["secure"].uid.encode()
        assert response.cookie_value(b"lapse_session") == seen["plain"].uid.encode()
        assert b"Secure" in response.set_cookies[b"__Host-lapse_session"]
        assert b"Secure" not in response.set_cookies[b"lapse_session"]

    def test_sessionAttribute(self) -> None:
        """request.session is None until getSession; on a secure request it is
        the secure session, not the one forceNotSecure gave."""
        seen: dict[str, Any] = {}

        def probe(request: Any) -> None:
            seen["before"] = request.session
            seen["plain"] = request.getSession(forceNotSecure=True)
            seen["after_plain"] = request.session
            seen["secure"] = request.getSession()
            seen["after_secure"] = request.session

        call(server.Site(_Probe(probe), reactor=Clock()), scheme="https")
        assert seen["before"] is None
        assert seen["after_plain"] is None
        assert seen["secure"] is not seen["plain"]
        assert seen["after_secure"] is seen["secure"]

    def test_sessionCaching(self) -> None:
        """getSession makes the session once per request: two calls, one session."""
        seen: list[Any] = []
        site = server.Site(_Probe(lambda r: seen.extend([r.getSession(), r.getSession()])))
        site.reactor = Clock()
        call(site)
        assert seen[0] is seen[1]
        assert len(site.sessions) == 1

    def test_retrieveExistingSession(self) -> None:
        """getSession returns the existing session named by the request's cookie."""
        site = server.Site(_Probe(lambda r: seen.append(r.getSession())), reactor=Clock())
        seen: list[Any] = []
        mine = server.Session(site, "special-id")
        site.sessions[mine.uid] = mine
        response = call(site, cookies={b"lapse_session": b"special-id"})
        assert seen == [mine]
        assert b"lapse_session" not in response.set_cookies

    def test_retrieveNonExistentSession(self) -> None:
        """A cookie naming no session gets a new session with a new uid and cookie."""
        seen: list[Any] = []
        site = server.Site(_Probe(lambda r: seen.append(r.getSession())), reactor=Clock())
        response = call(site, cookies={b"lapse_session": b"does-not-exist"})
        (session,) = seen
        assert session.uid != "does-not-exist"
        assert response.cookie_value(b"lapse_session") == session.uid.encode()

    def test_getSessionExpired(self) -> None:
        """getSession returns a new session when the previous one expired
        during the same request."""
        clock = Clock()
        seen: list[Any] = []

        def probe(request: Any) -> None:
            first = request.getSession()
            clock.advance(first.sessionTimeout)
            seen.extend([first, request.getSession()])

        site = server.Site(_Probe(probe), reactor=clock)
        response = call(site)
        first, second = seen
        assert first is not second
        assert first.uid != second.uid
        assert first.expired and not second.expired
        assert response.cookie_value(b"lapse_session") == second.uid.encode()


class _Broken(server.Session):
    """A Session subclass whose ending raises, after ending."""

    def _end(self) -> None:
        super()._end()
        raise RuntimeError("a subclass that raises while ending")


def _one_broken_and_three(
    site: server.Site, ran: list[str]
) -> tuple[server.Session, list[server.Session]]:
    """A broken session and three others made on ``site``, all checked from
    now; the others' callbacks append their uid to ``ran``."""
    first = _Broken(site, "broken-session-uid")
    site.sessions[first.uid] = first
    first.startCheckingExpiration()
    others = [site.makeSession() for _ in range(3)]
    for other in others:
        other.notifyOnExpire(lambda uid=other.uid: ran.append(uid))
    return first, others


class TestTwistedCompatibility:
    """What Twisted programs and Twisted's own tests do that lapse must take."""

    def test_site_takes_request_factory_as_twisted_does(self) -> None:
        """Site(resource, requestFactory=...) and Site(resource, Factory) are
        accepted, and the factory makes the site's requests."""

        class MyRequest(server.Request):
            pass

        seen: list[Any] = []
        by_name = server.Site(_Probe(seen.append), requestFactory=MyRequest, reactor=Clock())
        by_position = server.Site(_Probe(seen.append), MyRequest)
        assert by_name.requestFactory is MyRequest
        assert by_position.requestFactory is MyRequest
        assert by_position.reactor is reactor
        call(by_name)
        assert type(seen[0]) is MyRequest

    def test_bytes_uid_session_repr_and_expire_with_debug_logging(
        self, caplog: pytest.LogCaptureFixture
    ) -> None:
        """A session made by hand with a bytes uid, as Twisted's tests do, has
        a repr and expires, with DEBUG logging on, running its callbacks."""
        caplog.set_level(logging.DEBUG, logger="lapse.sessions")
        site = server.Site(Resource(), reactor=Clock())
        session = server.Session(site, b"bytes-uid")  # type: ignore[arg-type]
        site.sessions[b"bytes-uid"] = session  # type: ignore[index]
        assert "bytes-ui" in repr(session)
        ran: list[str] = []
        session.notifyOnExpire(lambda: ran.append("called"))
        session.expire()
        assert ran == ["called"]
        assert session.expired

    def test_expiry_batch_ends_every_session_though_one_raises(
        self, caplog: pytest.LogCaptureFixture
    ) -> None:
        """When several sessions end at the same time and ending one raises,
        the others' callbacks and the expiry hook still run in that batch, not
        at the next expiry; the failure is logged."""
        caplog.set_level(logging.DEBUG, logger="lapse.sessions")
        clock = Clock()
        hooked: list[str] = []
        site = server.Site(
            Resource(), reactor=clock, on_expire=lambda expiry: hooked.append(expiry.uid)
        )

        ran: list[str] = []
        first, others = _one_broken_and_three(site, ran)
        clock.advance(first.sessionTimeout)
        assert sorted(ran) == sorted(s.uid for s in others)
        assert sorted(hooked) == sorted([first.uid] + [s.uid for s in others])
        assert "broken-s" in caplog.text and "RuntimeError" in caplog.text

    def test_without_a_hook_a_batch_of_ends_runs_every_callback_though_one_raises(
        self, caplog: pytest.LogCaptureFixture
    ) -> None:
        """With no expiry hook the memory store ends sessions without claims
        (no Expiry, delivery id or lease): still every session of the batch
        ends, its callbacks run, each is counted once by cause, and the one
        that raised is logged; none is left for a later round."""
        caplog.set_level(logging.DEBUG, logger="lapse.sessions")
        clock = Clock()
        site = server.Site(Resource(), reactor=clock)

        ran: list[str] = []
        first, others = _one_broken_and_three(site, ran)
        by_hand = site.makeSession()
        by_hand.notifyOnExpire(lambda: ran.append("by hand"))
        by_hand.expire()
        assert ran == ["by hand"]
        clock.advance(first.sessionTimeout)
        assert sorted(ran) == sorted(["by hand"] + [s.uid for s in others])
        assert first.expired and all(s.expired for s in others)
        assert site.sessions == {}
        assert site.stats.ended["timeout"] == 4 and site.stats.ended["expired"] == 1
        assert "broken-s" in caplog.text and "RuntimeError" in caplog.text
        assert site._keeper._memory._ended == {}
