"""The store contract: the lifecycle a keeper relies on (create, load,
save, expire, claim, lease, ack, events, rotation, lifetime, renew).

Part of :class:`lapse.testing.StoreContract`; see there how to run it.
"""

from __future__ import annotations

import pytest

from lapse.sessions.store import Expiry, SessionStore
from lapse.testing._clock import FakeClock, scenario

__all__ = ["LifecycleContract"]


class LifecycleContract:
    """What every store does with a session from creation to acknowledgement."""

    @scenario
    async def test_create_then_load_returns_data_and_touches(
        self, store: SessionStore, clock: FakeClock
    ) -> None:
        """A created session loads with its data, timeout and a deadline of now + timeout."""
        deadline = await store.create("u1", 5, {"n": 1, "name": "caf\u00e9"})
        assert deadline == pytest.approx(clock.now + 5)
        clock.advance(2)
        loaded = await store.load("u1")
        assert loaded is not None
        assert (loaded.uid, loaded.timeout, loaded.decoded()) == (
            "u1",
            5,
            {"n": 1, "name": "caf\u00e9"},
        )
        assert loaded.deadline == pytest.approx(clock.now + 5)

    @scenario
    async def test_loads_slide_the_deadline(self, store: SessionStore, clock: FakeClock) -> None:
        """Each load moves the deadline to now + timeout; without loads the session ends."""
        await store.create("u1", 5, {})
        for _ in range(5):
            clock.advance(4)
            assert await store.load("u1") is not None
        clock.advance(4.9)
        assert await store.exists("u1")
        clock.advance(0.2)
        assert not await store.exists("u1")
        assert await store.load("u1") is None

    @scenario
    async def test_load_past_deadline_does_not_revive(
        self, store: SessionStore, clock: FakeClock
    ) -> None:
        """A session past its deadline stays ended even though nobody claimed it yet."""
        await store.create("u1", 5, {})
        clock.advance(6)
        assert await store.load("u1") is None
        assert await store.load("u1") is None
        (expiry,) = await store.claim("me", 30, 10)
        assert (expiry.uid, expiry.cause) == ("u1", "timeout")

    @scenario
    async def test_unknown_session(self, store: SessionStore, clock: FakeClock) -> None:
        """An unknown uid loads as None, does not exist, cannot be saved or expired."""
        assert await store.load("nope") is None
        assert not await store.exists("nope")
        assert not await store.save("nope", {"a": 1}, [])
        assert not await store.expire("nope")
        assert await store.claim("me", 30, 10) == []
        assert await store.next_deadline() is None

    @scenario
    async def test_save_writes_changed_keys_only(
        self, store: SessionStore, clock: FakeClock
    ) -> None:
        """Two saves of different keys both persist; removed keys vanish; the
        deadline does not move."""
        deadline = await store.create("u1", 60, {"keep": True, "drop": 1})
        assert await store.save("u1", {"a": 1}, [])
        assert await store.save("u1", {"b": [1, 2]}, ["drop"])
        assert await store.next_deadline() == pytest.approx(deadline)
        loaded = await store.load("u1")
        assert loaded is not None
        assert loaded.decoded() == {"keep": True, "a": 1, "b": [1, 2]}

    @scenario
    async def test_save_on_ended_session_writes_nothing(
        self, store: SessionStore, clock: FakeClock
    ) -> None:
        """save() returns False once the session's deadline has passed."""
        await store.create("u1", 5, {"a": 1})
        clock.advance(5.5)
        assert not await store.save("u1", {"a": 2}, [])
        (expiry,) = await store.claim("me", 30, 10)
        assert expiry.data == {"a": 1}

    @scenario
    async def test_exists_does_not_touch(self, store: SessionStore, clock: FakeClock) -> None:
        """exists() reads without moving the deadline."""
        await store.create("u1", 5, {})
        clock.advance(4)
        assert await store.exists("u1")
        clock.advance(1.5)
        assert not await store.exists("u1")

    @scenario
    async def test_expire_makes_session_claimable_with_cause(
        self, store: SessionStore, clock: FakeClock
    ) -> None:
        """expire() ends a live session at once: it no longer loads and is claimed
        with cause "expired" and its final data."""
        await store.create("u1", 900, {"who": "ann"})
        assert await store.expire("u1")
        assert not await store.expire("u1")
        assert await store.load("u1") is None
        assert await store.next_deadline() == pytest.approx(clock.now)
        (expiry,) = await store.claim("me", 30, 10)
        assert (expiry.uid, expiry.cause, dict(expiry.data), expiry.attempt) == (
            "u1",
            "expired",
            {"who": "ann"},
            1,
        )

    @scenario
    async def test_claim_is_a_lease(self, store: SessionStore, clock: FakeClock) -> None:
        """A claimed session is not handed out again while leased; after the lease
        it is redelivered with the same delivery id and the next attempt number."""
        await store.create("u1", 5, {"x": 1})
        clock.advance(5)
        (first,) = await store.claim("a", 10, 10)
        assert await store.claim("b", 10, 10) == []
        assert await store.next_deadline() == pytest.approx(clock.now + 10)
        clock.advance(10.5)
        (again,) = await store.claim("b", 10, 10)
        assert again.delivery_id == first.delivery_id
        assert (again.attempt, again.cause, dict(again.data)) == (2, "timeout", {"x": 1})

    @scenario
    async def test_ack_forgets_and_announces(self, store: SessionStore, clock: FakeClock) -> None:
        """ack() removes the session for good and announces it once in events()."""
        _, cursor = await store.events(None)
        await store.create("u1", 5, {})
        await store.create("u2", 50, {})
        clock.advance(6)
        (expiry,) = await store.claim("a", 10, 10)
        await store.ack(expiry)
        clock.advance(20)
        assert await store.claim("a", 10, 10) == []
        ended, cursor = await store.events(cursor)
        assert ended == ["u1"]
        ended, cursor = await store.events(cursor)
        assert ended == []
        assert await store.exists("u2")

    @scenario
    async def test_events_from_none_start_now(self, store: SessionStore, clock: FakeClock) -> None:
        """events(None) returns nothing and a cursor past what was announced before."""
        await store.create("old", 1, {})
        clock.advance(2)
        for expiry in await store.claim("a", 10, 10):
            await store.ack(expiry)
        ended, cursor = await store.events(None)
        assert ended == []
        await store.create("new", 1, {})
        clock.advance(2)
        for expiry in await store.claim("a", 10, 10):
            await store.ack(expiry)
        ended, _ = await store.events(cursor)
        assert ended == ["new"]

    @scenario
    async def test_claim_respects_limit_oldest_first(
        self, store: SessionStore, clock: FakeClock
    ) -> None:
        """claim() hands out at most ``limit`` sessions, earliest deadline first."""
        for index in range(5):
            await store.create(f"u{index}", 10 + index, {})
        clock.advance(20)
        first = await store.claim("a", 30, 2)
        assert [e.uid for e in first] == ["u0", "u1"]
        rest = await store.claim("a", 30, 10)
        assert sorted(e.uid for e in rest) == ["u2", "u3", "u4"]

    @scenario
    async def test_next_deadline_is_earliest(self, store: SessionStore, clock: FakeClock) -> None:
        """next_deadline() is the earliest live deadline; after a load it may stay
        a lower bound (nothing ends before it), but never passes a real deadline."""
        start = clock.now
        await store.create("a", 30, {})
        await store.create("b", 10, {})
        assert await store.next_deadline() == pytest.approx(start + 10)
        clock.advance(5)
        await store.load("b")
        upcoming = await store.next_deadline()
        assert upcoming is not None and start + 10 - 1e-6 <= upcoming <= start + 15 + 1e-6
        clock.advance(5)
        assert await store.claim("a", 30, 10) == []  # b was touched at 5: it ends at 15

    @scenario
    async def test_rotate_moves_session_keeping_data_and_aliases_old_uid(
        self, store: SessionStore, clock: FakeClock
    ) -> None:
        """rotate() moves a live session to a new uid with its data; the old uid
        loads it (under the new uid) within the grace, and is unknown after."""
        await store.create("xy-old", 60, {"user": "ann"})
        assert await store.rotate("xy-old", "xy-new", 10)
        loaded = await store.load("xy-new")
        assert loaded is not None and (loaded.uid, loaded.decoded()) == ("xy-new", {"user": "ann"})
        clock.advance(9)
        via_alias = await store.load("xy-old")
        assert via_alias is not None and (via_alias.uid, via_alias.decoded()) == (
            "xy-new",
            {"user": "ann"},
        )
        assert not await store.exists("xy-old")
        clock.advance(1.5)
        assert await store.load("xy-old") is None
        assert await store.load("xy-new") is not None
        assert not await store.rotate("xy-old", "xy-other", 10)

    @scenario
    async def test_rotate_twice_old_uids_follow(
        self, store: SessionStore, clock: FakeClock
    ) -> None:
        """After two rotations within the grace, the first uid still names the session."""
        await store.create("ab-a", 60, {"n": 1})
        assert await store.rotate("ab-a", "ab-b", 10)
        assert await store.rotate("ab-b", "ab-c", 10)
        loaded = await store.load("ab-a")
        assert loaded is not None and loaded.uid == "ab-c"

    @scenario
    async def test_rotated_session_ends_once_under_new_uid(
        self, store: SessionStore, clock: FakeClock
    ) -> None:
        """A rotated session's end is claimed once, under its new uid, with its data."""
        await store.create("xy-old", 5, {"k": "v"})
        clock.advance(2)
        assert await store.rotate("xy-old", "xy-new", 1)
        clock.advance(5.5)  # the rotation touched it: it ends 5 s after
        claimed = await store.claim("me", 30, 10)
        assert [(e.uid, e.cause, dict(e.data)) for e in claimed] == [
            ("xy-new", "timeout", {"k": "v"})
        ]
        await store.ack(claimed[0])
        assert await store.claim("me", 30, 10) == []
        assert await store.load("xy-old") is None

    @scenario
    async def test_rotation_is_announced_as_a_pair(
        self, store: SessionStore, clock: FakeClock
    ) -> None:
        """events() reports a rotation as (old, new), in order with ends."""
        _, cursor = await store.events(None)
        await store.create("xy-old", 5, {})
        assert await store.rotate("xy-old", "xy-new", 10)
        clock.advance(6)
        (expiry,) = await store.claim("me", 30, 10)
        await store.ack(expiry)
        ended, _ = await store.events(cursor)
        assert ended == [("xy-old", "xy-new"), "xy-new"]

    @scenario
    async def test_lifetime_ends_a_constantly_touched_session(
        self, store: SessionStore, clock: FakeClock
    ) -> None:
        """A session touched every few seconds still ends at creation + lifetime,
        with cause "lifetime"; loads never set the deadline past that end."""
        start = clock.now
        await store.create("u1", 10, {"a": 1}, 25)
        for _ in range(6):
            clock.advance(4)
            loaded = await store.load("u1")
            assert loaded is not None and loaded.deadline <= start + 25 + 1e-6
        clock.advance(1.5)  # t = 25.5
        assert await store.load("u1") is None
        (expiry,) = await store.claim("me", 30, 10)
        assert (expiry.uid, expiry.cause, dict(expiry.data)) == ("u1", "lifetime", {"a": 1})

    @scenario
    async def test_idle_end_before_lifetime_is_a_timeout(
        self, store: SessionStore, clock: FakeClock
    ) -> None:
        """With a lifetime, a session left idle ends at its idle deadline, cause "timeout"."""
        await store.create("u1", 5, {}, 100)
        clock.advance(5.5)
        (expiry,) = await store.claim("me", 30, 10)
        assert (expiry.uid, expiry.cause) == ("u1", "timeout")

    @scenario
    async def test_rotation_keeps_the_absolute_end(
        self, store: SessionStore, clock: FakeClock
    ) -> None:
        """Rotating does not extend the lifetime: the new uid ends at the original
        creation + lifetime."""
        await store.create("xy-old", 10, {}, 12)
        clock.advance(8)
        assert await store.rotate("xy-old", "xy-new", 2)
        clock.advance(3)
        assert await store.load("xy-new") is not None
        clock.advance(1.5)  # t = 12.5
        assert await store.load("xy-new") is None
        (expiry,) = await store.claim("me", 30, 10)
        assert (expiry.uid, expiry.cause) == ("xy-new", "lifetime")

    @scenario
    async def test_renew_extends_the_lease_so_nobody_else_claims_it(
        self, store: SessionStore, clock: FakeClock
    ) -> None:
        """A claim renewed before its lease ends is not handed out again when the
        first lease would have run out, nor until the renewed one does; then it
        is redelivered as usual (same delivery id, next attempt)."""
        await store.create("u1", 5, {"x": 1})
        clock.advance(5)
        (first,) = await store.claim("a", 10, 10)
        clock.advance(8)
        assert await store.renew(first, "a", 10)
        clock.advance(8)  # 16 s after the claim: past the first lease
        assert await store.claim("b", 10, 10) == []
        upcoming = await store.next_deadline()
        assert upcoming == pytest.approx(clock.now + 2)
        clock.advance(2.5)
        (again,) = await store.claim("b", 10, 10)
        assert (again.delivery_id, again.attempt) == (first.delivery_id, 2)

    @scenario
    async def test_renew_only_by_the_owner_of_that_delivery(
        self, store: SessionStore, clock: FakeClock
    ) -> None:
        """renew() is False, and changes nothing, for another owner, for an
        earlier delivery of a session since claimed again, and after ack()."""
        await store.create("u1", 5, {})
        clock.advance(5)
        (first,) = await store.claim("a", 10, 10)
        assert not await store.renew(first, "b", 100)
        clock.advance(10.5)
        (second,) = await store.claim("b", 10, 10)
        assert not await store.renew(first, "a", 100)  # a's lease ran out: b has it
        assert await store.renew(second, "b", 10)
        clock.advance(10.5)
        (third,) = await store.claim("a", 10, 10)
        assert third.attempt == 3
        await store.ack(third)
        assert not await store.renew(third, "a", 10)
        assert await store.claim("a", 10, 10) == []
        assert await store.next_deadline() is None

    @scenario
    async def test_renew_of_an_unknown_expiry_is_false(
        self, store: SessionStore, clock: FakeClock
    ) -> None:
        """A made-up expiry (never claimed) cannot be renewed."""
        await store.create("u1", 5, {})
        assert not await store.renew(Expiry("u1", {}, "u1:1", 1, "timeout"), "a", 10)
        assert not await store.renew(Expiry("nope", {}, "nope:1", 1, "timeout"), "a", 10)
        assert await store.exists("u1")
