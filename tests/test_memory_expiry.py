"""Expiry on the memory store: a touch arms no timer, one timer serves every session."""

from __future__ import annotations

from lapse.internet.task import Clock
from lapse.web.resource import Resource
from lapse.web.server import Session, Site


class Short(Session):
    sessionTimeout = 10


class Long(Session):
    sessionTimeout = 100


def make_site(clock: Clock, factory: type[Session] = Short) -> Site:
    site = Site(Resource(), reactor=clock)
    site.sessionFactory = factory
    return site


def test_one_timer_for_many_sessions(clock: Clock) -> None:
    """However many sessions are live, the clock holds one call: the earliest deadline."""
    site = make_site(clock)
    for _ in range(50):
        site.makeSession()
        clock.advance(0.1)
    assert len(clock.calls) == 1
    assert clock.calls[0].getTime() == 10


def test_touch_arms_no_timer(clock: Clock) -> None:
    """Touching sessions neither adds nor moves a timer: it only sets lastModified."""
    site = make_site(clock)
    sessions = [site.makeSession() for _ in range(10)]
    (timer,) = clock.calls
    clock.advance(3)
    for session in sessions:
        session.touch()
    assert clock.calls == [timer]
    assert timer.getTime() == 10


def test_touched_session_is_rescheduled_not_expired(clock: Clock) -> None:
    """When the timer finds a touched session, it checks again at the new deadline."""
    site = make_site(clock)
    session = site.makeSession()
    clock.advance(6)
    session.touch()
    clock.advance(4)  # t=10: the original deadline
    assert not session.expired
    assert clock.calls[0].getTime() == 16
    clock.advance(6)
    assert session.expired


def test_shorter_session_made_later_rearms_timer_earlier(clock: Clock) -> None:
    """A short-lived session made after a long-lived one still expires on time."""
    site = make_site(clock, Long)
    long_one = site.makeSession()
    site.sessionFactory = Short
    short_one = site.makeSession()
    assert clock.calls[0].getTime() == 10
    clock.advance(10)
    assert short_one.expired and not long_one.expired
    clock.advance(90)
    assert long_one.expired
    assert not clock.calls


def test_timeout_shortened_on_live_session_takes_effect(clock: Clock) -> None:
    """Lowering sessionTimeout on a live session and touching it moves its deadline earlier."""
    site = make_site(clock, Long)
    session = site.makeSession()
    session.sessionTimeout = 2
    session.touch()
    clock.advance(2)
    assert session.expired
    assert not clock.calls


def test_last_session_out_cancels_timer(clock: Clock) -> None:
    """When every session has been expired by hand, no call is left on the clock."""
    site = make_site(clock)
    sessions = [site.makeSession() for _ in range(5)]
    for session in sessions:
        session.expire()
    assert not clock.calls
    assert len(site.store) == 0


def test_many_sessions_expire_together(clock: Clock) -> None:
    """Sessions sharing a deadline all expire in one tick, each callback once."""
    site = make_site(clock)
    expired: list[str] = []
    for _ in range(1000):
        session = site.makeSession()
        session.notifyOnExpire(lambda uid=session.uid: expired.append(uid))
    clock.advance(10)
    assert len(expired) == len(set(expired)) == 1000
    assert not site.sessions and not clock.calls


def test_fifty_thousand_sessions_one_timer(clock: Clock) -> None:
    """A large population (50k live sessions) still holds a single timer, and
    touched sessions survive a sweep that expires the untouched ones."""
    site = make_site(clock)
    sessions = [site.makeSession() for _ in range(50_000)]
    assert len(clock.calls) == 1
    clock.advance(5)
    for session in sessions[::2]:
        session.touch()
    clock.advance(5)
    assert len(site.sessions) == 25_000
    assert all(not s.expired for s in sessions[::2])
    clock.advance(5)
    assert not site.sessions and not clock.calls
