"""The store contract: the index of sessions by principal (``set_principal``,
``sessions_of``, ``expire_principal``, the cap per principal).

Part of :class:`lapse.testing.StoreContract`; a store without the
:class:`~lapse.sessions.PrincipalIndex` methods skips these tests.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from lapse.sessions.store import (
    PRINCIPAL_MEMBERS,
    SessionStore,
    TooManySessions,
)
from lapse.testing._clock import FakeClock, scenario

__all__ = ["PrincipalContract"]


def _index(store: SessionStore) -> Any:
    """The store, if it keeps sessions by principal (else the test skips)."""
    if not all(callable(getattr(store, name, None)) for name in PRINCIPAL_MEMBERS):
        pytest.skip(f"{type(store).__name__} keeps no index of sessions by principal")
    return store


async def _uids_of(store: Any, principal: str) -> list[str]:
    return [info.uid for info in await store.sessions_of(principal)]


async def _claimed(store: SessionStore) -> dict[str, str]:
    """Every ended session claimed now, uid -> cause (and acknowledged)."""
    causes = {}
    for expiry in await store.claim("contract", 30, 100):
        causes[expiry.uid] = expiry.cause
        await store.ack(expiry)
    return causes


class PrincipalContract:
    """What a store's index of sessions by principal guarantees."""

    @scenario
    async def test_a_bound_session_is_listed_with_its_principal(
        self, store: SessionStore, clock: FakeClock
    ) -> None:
        """set_principal binds a session: sessions_of lists it (principal set,
        nothing touched), and load, info and scan return its principal."""
        index = _index(store)
        await store.create("u1", 60, {"n": 1})
        await store.create("u2", 60, {})
        assert await index.set_principal("u1", "alice") == []
        clock.advance(5)
        (row,) = await index.sessions_of("alice")
        assert (row.uid, row.principal, dict(row.data)) == ("u1", "alice", {"n": 1})
        assert row.deadline == pytest.approx(clock.now - 5 + 60)  # not touched
        loaded = await store.load("u1")
        assert loaded is not None and loaded.principal == "alice"
        other = await store.load("u2")
        assert other is not None and other.principal is None
        info = await store.info("u1")
        assert info is not None and info.principal == "alice"
        assert await index.sessions_of("bob") == []

    @scenario
    async def test_unknown_or_ended_sessions_cannot_be_bound(
        self, store: SessionStore, clock: FakeClock
    ) -> None:
        """set_principal on an unknown, expired or timed-out uid is None and
        binds nothing."""
        index = _index(store)
        assert await index.set_principal("nope", "alice") is None
        await store.create("u1", 60, {})
        await store.expire("u1")
        assert await index.set_principal("u1", "alice") is None
        await store.create("u2", 5, {})
        clock.advance(6)
        assert await index.set_principal("u2", "alice") is None
        assert await index.sessions_of("alice") == []

    @scenario
    async def test_unbinding_and_rebinding_move_the_session(
        self, store: SessionStore, clock: FakeClock
    ) -> None:
        """None unbinds; binding to another principal leaves the first's index;
        binding twice to one principal lists the session once."""
        index = _index(store)
        await store.create("u1", 60, {})
        await index.set_principal("u1", "alice")
        await index.set_principal("u1", "alice", limit=1)
        assert await _uids_of(index, "alice") == ["u1"]
        await index.set_principal("u1", "bob")
        assert (await _uids_of(index, "alice"), await _uids_of(index, "bob")) == ([], ["u1"])
        assert await index.set_principal("u1", None) == []
        assert await index.sessions_of("bob") == []
        loaded = await store.load("u1")
        assert loaded is not None and loaded.principal is None

    @scenario
    async def test_sessions_are_listed_most_recently_used_first(
        self, store: SessionStore, clock: FakeClock
    ) -> None:
        """sessions_of orders by last access, newest first."""
        index = _index(store)
        for uid in ("u1", "u2", "u3"):
            await store.create(uid, 60, {})
            await index.set_principal(uid, "alice")
            clock.advance(1)
        await store.load("u1")
        assert await _uids_of(index, "alice") == ["u1", "u3", "u2"]

    @scenario
    async def test_rotation_keeps_the_principal(
        self, store: SessionStore, clock: FakeClock
    ) -> None:
        """A rotated session stays bound under its new uid only; an old uid in
        its grace binds the session it names."""
        index = _index(store)
        await store.create("u1", 60, {})
        await index.set_principal("u1", "alice")
        assert await store.rotate("u1", "u1-new", 0)
        assert await _uids_of(index, "alice") == ["u1-new"]
        loaded = await store.load("u1-new")
        assert loaded is not None and loaded.principal == "alice"
        await store.create("u2", 60, {})
        assert await store.rotate("u2", "u2-new", 10)
        assert await index.set_principal("u2", "bob") == []
        assert await _uids_of(index, "bob") == ["u2-new"]

    @scenario
    async def test_ended_sessions_leave_the_index_at_their_end(
        self, store: SessionStore, clock: FakeClock
    ) -> None:
        """An expired session leaves at once; one past its deadline (idle or
        lifetime) is not listed even before it is claimed, nor after."""
        index = _index(store)
        await store.create("u1", 60, {})
        await store.create("u2", 5, {})
        await store.create("u3", 60, {}, lifetime=8)
        await store.create("u4", 60, {})
        for uid in ("u1", "u2", "u3", "u4"):
            await index.set_principal(uid, "alice")
        await store.expire("u1")
        assert sorted(await _uids_of(index, "alice")) == ["u2", "u3", "u4"]
        clock.advance(6)
        assert sorted(await _uids_of(index, "alice")) == ["u3", "u4"]
        clock.advance(3)
        assert await _uids_of(index, "alice") == ["u4"]
        assert await _claimed(store) == {"u1": "expired", "u2": "timeout", "u3": "lifetime"}
        assert await _uids_of(index, "alice") == ["u4"]

    @scenario
    async def test_expire_principal_ends_them_all_but_one(
        self, store: SessionStore, clock: FakeClock
    ) -> None:
        """expire_principal ends each live session of the principal but
        except_uid (cause "expired"), and no one else's; the uids ended."""
        index = _index(store)
        for uid in ("a1", "a2", "a3", "b1", "n1"):
            await store.create(uid, 60, {"who": uid})
        for uid in ("a1", "a2", "a3"):
            await index.set_principal(uid, "alice")
        await index.set_principal("b1", "bob")
        assert sorted(await index.expire_principal("alice", except_uid="a2")) == ["a1", "a3"]
        assert await _uids_of(index, "alice") == ["a2"]
        assert await store.exists("a2") and await store.exists("b1") and await store.exists("n1")
        assert not await store.exists("a1") and not await store.exists("a3")
        assert await _claimed(store) == {"a1": "expired", "a3": "expired"}
        assert await index.expire_principal("alice") == ["a2"]
        assert await index.expire_principal("alice") == []
        assert await index.expire_principal("nobody") == []
        assert await _uids_of(index, "bob") == ["b1"]

    @scenario
    async def test_expire_principal_spares_the_session_an_old_uid_names(
        self, store: SessionStore, clock: FakeClock
    ) -> None:
        """An except_uid rotated away within its grace spares the session it
        now names (a process whose copy still has the old uid)."""
        index = _index(store)
        for uid in ("a1", "a2"):
            await store.create(uid, 60, {})
            await index.set_principal(uid, "alice")
        assert await store.rotate("a1", "a1-new", 10)
        assert await index.expire_principal("alice", except_uid="a1") == ["a2"]
        assert await _uids_of(index, "alice") == ["a1-new"]

    @scenario
    async def test_the_cap_supersedes_the_least_recently_used(
        self, store: SessionStore, clock: FakeClock
    ) -> None:
        """With a limit, binding one more session ends the least recently used
        others (by last access, not by binding) with cause "superseded"."""
        index = _index(store)
        for uid in ("u1", "u2", "u3"):
            await store.create(uid, 60, {})
            assert await index.set_principal(uid, "alice", limit=3) == []
            clock.advance(1)
        await store.load("u1")  # u2 is now the least recently used
        await store.create("u4", 60, {})
        assert await index.set_principal("u4", "alice", limit=3) == ["u2"]
        assert sorted(await _uids_of(index, "alice")) == ["u1", "u3", "u4"]
        assert not await store.exists("u2")
        await store.create("u5", 60, {})
        assert sorted(await index.set_principal("u5", "alice", limit=1)) == ["u1", "u3", "u4"]
        assert await _uids_of(index, "alice") == ["u5"]
        assert await _claimed(store) == dict.fromkeys(("u1", "u2", "u3", "u4"), "superseded")

    @scenario
    async def test_the_cap_can_refuse_instead(self, store: SessionStore, clock: FakeClock) -> None:
        """With refuse, one login too many raises TooManySessions and changes
        nothing: the session stays live and unbound, the others bound."""
        index = _index(store)
        for uid in ("u1", "u2"):
            await store.create(uid, 60, {})
            await index.set_principal(uid, "alice", limit=2, refuse=True)
        await store.create("u3", 60, {})
        with pytest.raises(TooManySessions) as raised:
            await index.set_principal("u3", "alice", limit=2, refuse=True)
        assert (raised.value.principal, raised.value.limit) == ("alice", 2)
        assert sorted(await _uids_of(index, "alice")) == ["u1", "u2"]
        loaded = await store.load("u3")
        assert loaded is not None and loaded.principal is None
        # A session already bound is not a new login: it is let through.
        assert await index.set_principal("u1", "alice", limit=2, refuse=True) == []
        await store.expire("u2")
        assert await index.set_principal("u3", "alice", limit=2, refuse=True) == []

    @scenario
    async def test_the_cap_counts_only_live_sessions(
        self, store: SessionStore, clock: FakeClock
    ) -> None:
        """A session past its deadline, not yet claimed, does not count."""
        index = _index(store)
        await store.create("old", 5, {})
        await index.set_principal("old", "alice", limit=1)
        clock.advance(6)
        await store.create("new", 60, {})
        assert await index.set_principal("new", "alice", limit=1, refuse=True) == []
        assert await _claimed(store) == {"old": "timeout"}

    @scenario
    async def test_concurrent_logins_never_exceed_the_cap(
        self, store: SessionStore, clock: FakeClock
    ) -> None:
        """50 logins of one principal at once with a limit of 3: 3 stay bound
        and live, 47 were superseded, each once."""
        index = _index(store)
        uids = [f"c{i:02d}" for i in range(50)]
        for uid in uids:
            await store.create(uid, 60, {})
        results = await asyncio.gather(
            *(index.set_principal(uid, "alice", limit=3) for uid in uids)
        )
        superseded = [uid for result in results for uid in result]
        bound = await _uids_of(index, "alice")
        assert len(bound) == 3 and len(superseded) == 47
        assert sorted(superseded + bound) == uids
        assert [uid for uid in uids if await store.exists(uid)] == sorted(bound)

    @scenario
    async def test_principals_are_opaque_text(self, store: SessionStore, clock: FakeClock) -> None:
        """Principals with spaces, wildcards, separators, quotes and non-ASCII
        are kept apart, however alike."""
        index = _index(store)
        names = ["a", "a*", "ab", "A", "a b", "{a}", "a:b", "a'; --", "caf\u00e9", "\U0001f600"]
        for i, name in enumerate(names):
            await store.create(f"u{i}", 60, {})
            await index.set_principal(f"u{i}", name)
        for i, name in enumerate(names):
            assert await _uids_of(index, name) == [f"u{i}"], name
        assert await index.expire_principal("a*") == ["u1"]
        assert await _uids_of(index, "a") == ["u0"]
