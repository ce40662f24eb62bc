"""The store contract: inspection (``scan``, ``info``, ``count``,
``deadlines``), none of which touches a session.

Part of :class:`lapse.testing.StoreContract`; see there how to run it.
"""

from __future__ import annotations

import pytest

from lapse.sessions.store import SessionInfo, SessionStore
from lapse.testing._clock import FakeClock, scenario

__all__ = ["InspectionContract", "scan_all"]


async def scan_all(store: SessionStore, limit: int) -> tuple[list[SessionInfo], int]:
    """Every page of a full scan, concatenated; and the number of pages."""
    found: list[SessionInfo] = []
    cursor: str | None = None
    pages = 0
    while True:
        page, cursor = await store.scan(cursor, limit)
        assert len(page) <= limit
        found += page
        pages += 1
        if cursor is None:
            return found, pages


class InspectionContract:
    """What every store answers about its live sessions, touching none."""

    @scenario
    async def test_info_reports_times_and_data_without_touching(
        self, store: SessionStore, clock: FakeClock
    ) -> None:
        """info gives creation, last access, deadline and data; it moves no deadline."""
        created = clock.now
        await store.create("u1", 10, {"n": 1, "name": "caf\u00e9"})
        clock.advance(3)
        assert await store.load("u1") is not None
        clock.advance(2)
        info = await store.info("u1")
        assert info is not None
        assert info.uid == "u1"
        assert info.created == pytest.approx(created)
        assert info.last_access == pytest.approx(created + 3)
        assert info.deadline == pytest.approx(created + 13)
        assert dict(info.data) == {"n": 1, "name": "caf\u00e9"}
        clock.advance(7.9)
        assert await store.info("u1") is not None  # no touch: still the old deadline
        clock.advance(0.2)
        assert await store.info("u1") is None
        assert not await store.exists("u1")

    @scenario
    async def test_info_of_unknown_expired_or_due_sessions_is_none(
        self, store: SessionStore, clock: FakeClock
    ) -> None:
        """Only live sessions have info: not unknown, expired, or past-deadline ones."""
        assert await store.info("nope") is None
        await store.create("gone", 10, {})
        await store.create("due", 1, {})
        assert await store.expire("gone")
        clock.advance(2)
        assert await store.info("gone") is None
        assert await store.info("due") is None

    @scenario
    async def test_info_deadline_is_the_absolute_end_when_earlier(
        self, store: SessionStore, clock: FakeClock
    ) -> None:
        """With a lifetime, the deadline is the absolute end once it comes first."""
        start = clock.now
        await store.create("u1", 10, {}, lifetime=15)
        clock.advance(8)
        assert await store.load("u1") is not None
        info = await store.info("u1")
        assert info is not None
        assert info.deadline == pytest.approx(start + 15)
        assert info.created == pytest.approx(start)
        assert start + 5 - 1e-6 <= info.last_access <= clock.now + 1e-6

    @scenario
    async def test_scan_pages_through_every_live_session_once(
        self, store: SessionStore, clock: FakeClock
    ) -> None:
        """A full scan in pages of ``limit`` returns each live session exactly once,
        with its data, and ends with a None cursor."""
        for i in range(25):
            await store.create(f"u{i:02d}", 60, {"i": i})
            clock.advance(0.5)
        found, pages = await scan_all(store, 10)
        assert sorted(info.uid for info in found) == [f"u{i:02d}" for i in range(25)]
        assert all(info.data == {"i": int(info.uid[1:])} for info in found)
        assert pages == 3
        first, cursor = await store.scan(None, 100)
        assert len(first) == 25 and cursor is None

    @scenario
    async def test_scan_with_equal_deadlines_pages_by_uid(
        self, store: SessionStore, clock: FakeClock
    ) -> None:
        """Sessions created at the same instant (same deadline) still page without
        repeats or gaps."""
        for i in range(30):
            await store.create(f"same{i:02d}", 60, {})
        found, _ = await scan_all(store, 7)
        assert sorted(info.uid for info in found) == [f"same{i:02d}" for i in range(30)]

    @scenario
    async def test_scan_skips_ended_sessions_and_touches_nothing(
        self, store: SessionStore, clock: FakeClock
    ) -> None:
        """Expired and past-deadline sessions are not listed; scanning moves no deadline."""
        await store.create("short", 1, {})
        await store.create("expired", 60, {})
        await store.create("live", 5, {})
        await store.expire("expired")
        clock.advance(2)
        found, _ = await scan_all(store, 10)
        assert [info.uid for info in found] == ["live"]
        clock.advance(2.9)
        await scan_all(store, 10)
        clock.advance(0.2)
        assert (await store.scan(None, 10))[0] == []

    @scenario
    async def test_a_session_touched_during_a_scan_is_not_returned_twice(
        self, store: SessionStore, clock: FakeClock
    ) -> None:
        """Touching (and expiring) sessions between pages never repeats a session."""
        for i in range(20):
            await store.create(f"u{i:02d}", 60, {})
            clock.advance(0.1)
        seen: list[str] = []
        page, cursor = await store.scan(None, 5)
        seen += [info.uid for info in page]
        for uid in seen:
            clock.advance(0.1)
            assert await store.load(uid) is not None
        while cursor is not None:
            page, cursor = await store.scan(cursor, 5)
            seen += [info.uid for info in page]
            if page:
                await store.expire(page[-1].uid)
                assert await store.load(page[0].uid) is not None
        assert len(seen) == len(set(seen))
        assert set(seen) <= {f"u{i:02d}" for i in range(20)}

    @scenario
    async def test_a_bad_scan_cursor_or_limit_is_a_value_error(
        self, store: SessionStore, clock: FakeClock
    ) -> None:
        """A cursor the store did not make, or a limit below 1, is a ValueError."""
        await store.create("u1", 60, {})
        with pytest.raises(ValueError):
            await store.scan("not a cursor", 10)
        with pytest.raises(ValueError):
            await store.scan(None, 0)

    @scenario
    async def test_count_is_the_live_sessions_now(
        self, store: SessionStore, clock: FakeClock
    ) -> None:
        """count drops with expire() and as deadlines pass, before any claim."""
        assert await store.count() == 0
        for i in range(5):
            await store.create(f"a{i}", 10, {})
        for i in range(3):
            await store.create(f"b{i}", 30, {})
        assert await store.count() == 8
        await store.expire("a0")
        assert await store.count() == 7
        clock.advance(5)
        assert await store.load("a1") is not None  # touched: ends at +15
        clock.advance(6)
        assert await store.count() == 4  # a2..a4 are due (unclaimed)
        await store.claim("me", 30, 100)
        assert await store.count() == 4

    @scenario
    async def test_deadlines_is_the_schedule_of_upcoming_expiries(
        self, store: SessionStore, clock: FakeClock
    ) -> None:
        """deadlines(now, horizon, n) counts live sessions ending in each slice of
        the coming horizon; later, ended and due ones are left out."""
        now = clock.now
        for i, timeout in enumerate([5, 15, 15, 25, 35, 35, 35, 100]):
            await store.create(f"u{i}", timeout, {})
        await store.create("gone", 25, {})
        await store.expire("gone")
        assert await store.deadlines(now, 40, 4) == [1, 2, 1, 3]
        assert await store.deadlines(now, 200, 1) == [8]
        clock.advance(10)  # u0 is due now
        assert await store.deadlines(clock.now, 30, 3) == [2, 1, 3]
        with pytest.raises(ValueError):
            await store.deadlines(now, 40, 0)
        with pytest.raises(ValueError):
            await store.deadlines(now, 0, 4)

    @scenario
    async def test_inspection_sees_rotated_sessions_under_their_new_uid(
        self, store: SessionStore, clock: FakeClock
    ) -> None:
        """After a rotation, info and scan know the new uid, not the alias."""
        start = clock.now
        await store.create("xy-old", 60, {"k": "v"})
        clock.advance(1)
        assert await store.rotate("xy-old", "xy-new", 10)
        assert await store.info("xy-old") is None
        info = await store.info("xy-new")
        assert info is not None and info.data == {"k": "v"}
        assert info.created == pytest.approx(start)
        found, _ = await scan_all(store, 10)
        assert [i.uid for i in found] == ["xy-new"]
        assert await store.count() == 1
