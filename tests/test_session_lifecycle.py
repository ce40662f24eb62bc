"""The session lifecycle on a fake clock: sliding expiry, expire(), callbacks."""

from __future__ import annotations

import logging

import pytest

from lapse.internet.task import Clock
from lapse.web.resource import Resource
from lapse.web.server import Session, Site


class ShortSession(Session):
    sessionTimeout = 5


@pytest.fixture
def site(clock: Clock) -> Site:
    site = Site(Resource(), reactor=clock)
    site.sessionFactory = ShortSession
    return site


def test_default_timeout_is_fifteen_minutes() -> None:
    """Session.sessionTimeout is 900 seconds unless a subclass changes it."""
    assert Session.sessionTimeout == 900


def test_subclass_timeout_is_used_by_site(site: Site, clock: Clock) -> None:
    """A Session subclass set as sessionFactory sets the lifetime of new sessions."""
    session = site.makeSession()
    assert isinstance(session, ShortSession)
    clock.advance(4.999)
    assert not session.expired
    clock.advance(0.001)
    assert session.expired


def test_touches_keep_session_alive(site: Site, clock: Clock) -> None:
    """Touching a session before each deadline keeps it alive indefinitely."""
    session = site.makeSession()
    for _ in range(100):
        clock.advance(4)
        session.touch()
    assert session.uid in site.sessions
    clock.advance(4.9)
    assert session.uid in site.sessions
    clock.advance(0.1)
    assert session.uid not in site.sessions


def test_expire_is_idempotent(site: Site) -> None:
    """Calling expire() twice runs each callback once."""
    session = site.makeSession()
    runs: list[int] = []
    session.notifyOnExpire(lambda: runs.append(1))
    session.expire()
    session.expire()
    assert runs == [1]


def test_session_leaves_site_before_callbacks_run(site: Site) -> None:
    """When a callback runs, its session is already gone from site.sessions."""
    session = site.makeSession()
    present: list[bool] = []
    session.notifyOnExpire(lambda: present.append(session.uid in site.sessions))
    session.expire()
    assert present == [False]


def test_callbacks_run_in_order_once_on_timeout(site: Site, clock: Clock) -> None:
    """On timeout every callback runs exactly once, in registration order."""
    session = site.makeSession()
    runs: list[str] = []
    for name in "abc":
        session.notifyOnExpire(lambda name=name: runs.append(name))
    clock.advance(5)
    clock.advance(100)
    assert runs == ["a", "b", "c"]


def test_expire_callbacks_list_shows_and_takes_callbacks(site: Site, clock: Clock) -> None:
    """expireCallbacks is Twisted's list: it shows a callback registered with
    notifyOnExpire, and one appended to it directly runs too, after it."""
    session = site.makeSession()
    runs: list[str] = []

    def first() -> None:
        runs.append("first")

    session.notifyOnExpire(first)
    assert session.expireCallbacks == [first]
    session.expireCallbacks.append(lambda: runs.append("appended"))
    session.notifyOnExpire(lambda: runs.append("third"))
    clock.advance(5)
    assert runs == ["first", "appended", "third"]


def test_single_callback_runs_once(site: Site, clock: Clock) -> None:
    """A session's only callback runs once, at expiry, and not again."""
    session = site.makeSession()
    runs: list[int] = []
    session.notifyOnExpire(lambda: runs.append(1))
    clock.advance(4)
    assert runs == []
    clock.advance(1)
    session.expire()
    clock.advance(100)
    assert runs == [1]


def test_raising_callback_is_isolated_and_logged(
    site: Site, caplog: pytest.LogCaptureFixture
) -> None:
    """A callback that raises does not stop the others; its traceback is logged."""
    session = site.makeSession()
    runs: list[str] = []

    def broken() -> None:
        raise RuntimeError("boom")

    session.notifyOnExpire(lambda: runs.append("before"))
    session.notifyOnExpire(broken)
    session.notifyOnExpire(lambda: runs.append("after"))
    with caplog.at_level(logging.ERROR, logger="lapse.sessions"):
        session.expire()
    assert runs == ["before", "after"]
    (record,) = [r for r in caplog.records if r.exc_info]
    assert record.exc_info is not None and record.exc_info[0] is RuntimeError
    assert session.uid not in record.getMessage()  # the full uid never reaches the log


def test_callback_may_expire_and_touch_other_sessions(site: Site, clock: Clock) -> None:
    """A callback can expire another session, touch a third and register
    callbacks, without a double expiry or a lost one."""
    a = site.makeSession()
    clock.advance(1)
    b, c = site.makeSession(), site.makeSession()
    runs: list[str] = []

    def on_a() -> None:
        runs.append("a")
        b.expire()
        c.touch()
        c.notifyOnExpire(lambda: runs.append("c2"))

    a.notifyOnExpire(on_a)
    b.notifyOnExpire(lambda: runs.append("b"))
    c.notifyOnExpire(lambda: runs.append("c"))
    clock.advance(4)
    # c was touched at t=5 by a's callback, so it lives until t=10.
    assert runs == ["a", "b"]
    assert c.uid in site.sessions
    clock.advance(5)
    assert runs == ["a", "b", "c", "c2"]
    assert not site.sessions
    assert not clock.calls


def test_callback_may_create_sessions(site: Site, clock: Clock) -> None:
    """A session made from inside an expiry callback gets its own full lifetime."""
    first = site.makeSession()
    made: list[Session] = []
    first.notifyOnExpire(lambda: made.append(site.makeSession()))
    clock.advance(5)
    (second,) = made
    clock.advance(4.9)
    assert second.uid in site.sessions
    clock.advance(0.1)
    assert second.uid not in site.sessions


def test_notify_on_expired_session_runs_at_once(site: Site) -> None:
    """Registering a callback on a session that already ended runs it at once."""
    session = site.makeSession()
    session.expire()
    runs: list[int] = []
    session.notifyOnExpire(lambda: runs.append(1))
    assert runs == [1]


def test_touch_after_expiry_does_not_revive(site: Site, clock: Clock) -> None:
    """An expired session stays expired when touched."""
    session = site.makeSession()
    session.expire()
    session.touch()
    assert session.expired
    assert session.uid not in site.sessions
    assert not clock.calls


def test_expiry_logged_at_debug(site: Site, caplog: pytest.LogCaptureFixture) -> None:
    """Session creation and expiry are logged at debug level, uid shortened."""
    with caplog.at_level(logging.DEBUG, logger="lapse.sessions"):
        session = site.makeSession()
        session.expire()
    messages = [r.getMessage() for r in caplog.records if r.levelno == logging.DEBUG]
    assert f"session {session.uid[:8]}\u2026 created" in messages
    assert f"session {session.uid[:8]}\u2026 expired" in messages
