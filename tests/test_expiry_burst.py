"""A burst of session ends on the memory store is spread over turns of the event
loop: each ring of the keeper's timer ends a bounded number of sessions, in
deadline order, and none is served once past its deadline."""

from __future__ import annotations

import itertools

import pytest

from lapse.internet.task import Clock
from lapse.sessions._local import ENDS_PER_TURN
from lapse.sessions.stores.memory import MemoryStore
from lapse.web.resource import Resource
from lapse.web.server import Session, Site

BURST = 50_000


class Short(Session):
    sessionTimeout = 5


def site_with_burst(clock: Clock, count: int = BURST) -> tuple[Site, list[Session], list[str]]:
    """A site whose ``count`` sessions were all made at t=0 (so all end at t=5),
    each with a callback that records its uid when it runs."""
    site = Site(Resource(), reactor=clock)
    site.sessionFactory = Short
    ended: list[str] = []
    sessions = []
    for _ in range(count):
        session = site.makeSession()
        session.notifyOnExpire(lambda uid=session.uid: ended.append(uid))
        sessions.append(session)
    return site, sessions, ended


def store_with(count: int, apart: float) -> tuple[MemoryStore, list[float]]:
    """A memory store on a settable clock (``now[0]``) holding sessions
    ``s0``, ``s1``... of a 5 s timeout, made ``apart`` seconds apart from t=0."""
    now = [0.0]
    store = MemoryStore(clock=lambda: now[0])
    for n in range(count):
        now[0] = n * apart
        store.create_now(f"s{n}", 5, {})
    return store, now


def ring(clock: Clock) -> None:
    """Run the one call due now on the clock: one turn of the keeper's timer."""
    (call,) = [c for c in clock.calls if c.getTime() <= clock.seconds()]
    clock.calls.remove(call)
    call.called = True
    call.func(*call.args, **call.kw)


@pytest.mark.slow
def test_burst_of_ends_is_bounded_per_ring_and_keeps_order(clock: Clock) -> None:
    """50,000 sessions coming due in one instant end ENDS_PER_TURN per ring of the
    timer (the work a turn of the loop does for them is bounded), every callback
    runs, once, in the order the sessions were made (their deadline order)."""
    site, sessions, ended = site_with_burst(clock)
    clock.rightNow = 5.0  # time passes; the timer has not rung yet
    rings = 0
    while clock.calls:
        before = len(ended)
        ring(clock)
        rings += 1
        assert 0 < len(ended) - before <= ENDS_PER_TURN
    assert rings == -(-BURST // ENDS_PER_TURN)
    assert ended == [s.uid for s in sessions]
    assert not site.sessions
    assert not clock.calls  # nothing left: no timer


def test_due_session_not_yet_ended_is_not_served(clock: Clock) -> None:
    """While a burst is being ended, a request presenting a session whose deadline
    has passed does not get it (a new session instead), though its callbacks have
    not run yet; it ends in its turn, callbacks once."""
    site, sessions, ended = site_with_burst(clock, 3 * ENDS_PER_TURN)
    clock.rightNow = 5.0
    ring(clock)
    last = sessions[-1]
    assert not last.expired and last.uid in site.sessions  # not ended yet
    keeper = site._keeper
    assert keeper.load_now(last.uid) is None  # but never served
    while clock.calls:
        ring(clock)
    assert last.expired
    assert ended.count(last.uid) == 1


def test_advance_past_a_burst_ends_it_all(clock: Clock) -> None:
    """On a fake Clock, advancing past the deadline of a burst ends all of it inside
    that advance (the timer's next rings are due at once), as before the bound."""
    site, sessions, ended = site_with_burst(clock, 10 * ENDS_PER_TURN + 1)
    clock.advance(5)
    assert ended == [s.uid for s in sessions]
    assert not site.sessions and not clock.calls


def test_claim_ends_at_most_limit_due_sessions() -> None:
    """The memory store's claim ends (and claims) at most ``limit`` of the sessions
    due, the earliest deadlines first; the rest stay due, not loadable, and the next
    claims take them in order."""
    store, now = store_with(10, 0.01)
    now[0] = 10.0
    first = store.claim_now("me", 30, 4)
    assert [e.uid for e in first] == ["s0", "s1", "s2", "s3"]
    assert store.load_now("s9") is None  # due, not ended yet: not served
    assert len(store) == 6
    second = store.claim_now("me", 30, 4)
    assert [e.uid for e in second] == ["s4", "s5", "s6", "s7"]
    assert [e.uid for e in store.claim_now("me", 30, 4)] == ["s8", "s9"]


def test_inline_drain_ends_every_due_session(clock: Clock) -> None:
    """A drain called inline (by an expiry by hand, an eviction, a principal's
    sessions superseded: the request's own work) is not bounded: every due
    session's callbacks have run when it returns."""
    site, sessions, ended = site_with_burst(clock, 2 * ENDS_PER_TURN)
    clock.rightNow = 5.0
    site._keeper.drain()
    assert ended == [s.uid for s in sessions]


def test_burst_of_touched_sessions_is_moved_a_bounded_number_per_ring(clock: Clock) -> None:
    """Sessions made together and all touched since reach the front of their queue
    together: each ring of the timer moves at most ENDS_PER_TURN of them to their
    later deadline (none ends early), and past those deadlines they end in deadline
    order, ENDS_PER_TURN per ring."""
    site, sessions, ended = site_with_burst(clock, 3 * ENDS_PER_TURN + 5)
    clock.advance(1)
    for session in sessions:
        clock.rightNow += 0.001  # (without running the timer)
        session.touch()  # deadline now 6.001, 6.002...
    store = site._keeper._memory
    clock.rightNow = 5.0  # the first deadline: the timer is due
    moved = [len(store._heap)]
    while any(c.getTime() <= clock.seconds() for c in clock.calls):
        ring(clock)
        moved.append(len(store._heap))
    steps = [b - a for a, b in itertools.pairwise(moved)]
    assert max(steps) <= ENDS_PER_TURN
    assert moved[-1] == len(sessions) and not ended
    clock.rightNow = 7.0
    while clock.calls:
        before = len(ended)
        ring(clock)
        assert len(ended) - before <= ENDS_PER_TURN
    assert ended == [s.uid for s in sessions]


def test_a_run_of_due_sessions_in_one_queue_stops_at_a_touched_one() -> None:
    """Ten sessions of one timeout made 10 ms apart: the third touched at
    0.2 s (deadline 5.2 s), the fifth at 1 s (6 s), the seventh ended by
    hand. A claim at 5.5 s ends the due ones in deadline order: the run of
    untouched ones at the front of the queue is ended without searching
    again for each, and stops at a touched one, which moves to its later
    deadline (so the third ends last, not in its place in the queue; the
    ended one is not ended twice). The fifth ends at 6 s."""
    store, now = store_with(10, 0.01)
    now[0] = 0.2
    assert store.load_now("s2") is not None  # deadline 5.2
    now[0] = 1.0
    assert store.load_now("s4") is not None  # deadline 6.0
    store.expire_now("s6")
    assert [e.uid for e in store.claim_now("me", 30, 1)] == ["s6"]  # (its own end)
    now[0] = 5.5
    claimed = [e.uid for e in store.claim_now("me", 30, 100)]
    assert claimed == ["s0", "s1", "s3", "s5", "s7", "s8", "s9", "s2"]
    assert len(store) == 1
    now[0] = 6.0
    assert [e.uid for e in store.claim_now("me", 30, 100)] == ["s4"]
    assert len(store) == 0


def test_a_run_of_due_sessions_keeps_to_the_limit_and_deadline_order_across_claims() -> None:
    """Three hundred sessions of one timeout, all due: claims of 128 end
    128, 128 and 44 of them, in the order they were made; the store's
    counts stay right."""
    store, now = store_with(300, 0.001)
    uids = [f"s{n}" for n in range(300)]
    now[0] = 10.0
    batches = [[e.uid for e in store.claim_now("me", 30, 128)] for _ in range(4)]
    assert [len(b) for b in batches] == [128, 128, 44, 0]
    assert [uid for batch in batches for uid in batch] == uids
    assert len(store) == 0


def test_a_burst_ended_without_a_hook_is_counted_once_per_session(clock: Clock) -> None:
    """The keeper counts a batch of ends by cause at once: after a burst of
    3 * ENDS_PER_TURN + 7 timeouts and one session ended by hand, the
    site's stats say so, and the minute ring holds the same total."""
    count = 3 * ENDS_PER_TURN + 7
    site, sessions, ended = site_with_burst(clock, count + 1)
    sessions[-1].expire()
    clock.advance(5)
    assert len(ended) == count + 1
    stats = site.stats
    assert stats.ended.get("timeout") == count
    assert sum(stats.ended.values()) == count + 1
    assert sum(stats._ended_ring) == count + 1
