"""The Redis store's index of sessions by principal: ``set_principal``,
``sessions_of``, ``expire_principal`` (the contract is in
:mod:`lapse.sessions.store`, "Principals").

A session's principal is the field ``_p`` of its hash (``load``, ``info``
and ``scan`` return it). Each principal has an index, a set of uids at
``{base}:p:<principal>``; it may hold more than the principal's live
sessions (ended ones, ones bound to another principal since, a rotation's
new uid added before the rotation): a member is listed or counted only if
it is live and its hash names the principal, so the index read is exact
while the set is a superset. Members that are neither are removed when the
index is next written.

- **One shard** (a single node, a Sentinel's primary): every key is on one
  node, so each operation is one script (``login.lua``, ``members.lua``,
  ``end_bound.lua``), atomic; a rotation moves the uid in the index in the
  same script.
- **Sharded** (a cluster, or ``shards=N``): a principal's sessions are in
  many shards, so no script can hold them all. The principal's index and a
  lock (``{base}:l:<principal>``) live in the principal's own shard (CRC16
  of the name, among the shards). ``set_principal`` and
  ``expire_principal`` take the lock (``SET NX PX`` with a random token, a
  lease of the store's timeout; released by compare-and-delete), then read
  each member's state in its shard, end victims there, add the session to
  the index, bind it in its shard, and release. Only a holder binds a
  session to the principal, so the count cannot grow but under the lock:
  two logins, from any processes, cannot both exceed the cap. The index is
  written only while the lock is still the holder's (``reindex.lua``); a
  killed holder's lock runs out after its lease, and the next caller waits
  for that, within twice the store's timeout, then fails with
  :class:`StoreUnavailable`. A rotation of a bound session takes the lock
  too, and adds the new uid to the index before moving the session, so a
  live bound session is never missing from it.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import secrets
from collections.abc import AsyncIterator, Iterable
from typing import TYPE_CHECKING, Any

from lapse.sessions.store import SessionInfo, StoreUnavailable, TooManySessions, check_principal
from lapse.sessions.stores.redis.layout import Shard
from lapse.sessions.stores.redis.slots import crc16
from lapse.sessions.stores.redis.values import session_info

__all__ = ["Principals"]

_FIRST_BACKOFF = 0.002
_MAX_BACKOFF = 0.05


class Principals:
    """The principal index of :class:`RedisStore
    <lapse.sessions.stores.redis.RedisStore>`, over its plumbing."""

    timeout: float
    _shards: tuple[Shard, ...]
    _where: str

    if TYPE_CHECKING:

        def _now_arg(self) -> str: ...

        def _shard(self, uid: str) -> Shard: ...

        async def _call(self, op: str, keys: list[str], args: list[str | int]) -> Any: ...

        async def _command_on(self, op: str, key: str, *args: str | int) -> Any: ...

    # -- where a principal's keys are ---------------------------------------

    def _principal_keys(self, principal: str) -> tuple[str, str]:
        """The index and lock keys of ``principal``, in its shard (the name
        follows the shard's hash tag: it is data, never a tag or pattern)."""
        shards = self._shards
        shard = shards[crc16(principal.encode()) % len(shards)]
        return f"{shard.base}:p:{principal}", f"{shard.base}:l:{principal}"

    # -- the protocol -------------------------------------------------------

    async def set_principal(
        self, uid: str, principal: str | None, limit: int | None = None, refuse: bool = False
    ) -> list[str] | None:
        """Bind the live session ``uid`` (or the one an old ``uid`` names,
        within its grace) to ``principal`` (None: unbind); with ``limit``,
        end the least recently used others bound to it (cause
        ``"superseded"``) or, with ``refuse``, raise :class:`TooManySessions`
        changing nothing. The uids ended; None if there is no such session.
        One script on one shard; on a sharded layout, under the principal's
        lock (see the module)."""
        if principal is not None:
            check_principal(principal)
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int)):
            raise TypeError(f"a session limit is an int, not {type(limit).__name__}")
        if limit is not None and limit < 1:
            raise ValueError(f"a session limit is at least 1, not {limit!r}")
        if len(self._shards) == 1:
            return await self._login_here(uid, principal, limit, refuse)
        if principal is None:
            return await self._unbind(uid)
        return await self._login_sharded(uid, principal, limit, refuse)

    async def sessions_of(self, principal: str) -> list[SessionInfo]:
        """The live sessions bound to ``principal``, most recently used
        first; none touched."""
        check_principal(principal)
        index, _ = self._principal_keys(principal)
        if len(self._shards) == 1:
            shard = self._shards[0]
            args: list[str | int] = [self._now_arg(), shard.base, principal, "1"]
            rows = _rows(await self._call("members", [shard.deadlines, index], args))
        else:
            members = await self._command_on("sessions_of", index, "SMEMBERS", index)
            rows = await self._bound_rows(principal, members, data=True)
        rows.sort(key=lambda info: (-info.last_access, info.uid))
        return rows

    async def expire_principal(self, principal: str, except_uid: str | None = None) -> list[str]:
        """End each live session of ``principal`` now, as :meth:`expire`
        does (cause ``"expired"``), but the one ``except_uid`` names (itself,
        or within its grace the session it was rotated to); the uids ended."""
        check_principal(principal)
        spare = except_uid or ""
        index, _ = self._principal_keys(principal)
        if len(self._shards) == 1:
            shard = self._shards[0]
            keys = [shard.deadlines, shard.ended, index]
            args: list[str | int] = [self._now_arg(), shard.base, principal, "", spare, "1"]
            return list(await self._call("end_bound", keys, args))
        # Under the lock, so that a login of the principal is either wholly
        # before (and its session ended) or wholly after. The ended uids
        # leave the index when their ends are acknowledged.
        async with self._locked(principal) as (_token, members):
            return await self._end_bound(principal, members, "", spare)

    # -- one shard -------------------------------------------------------------

    async def _login_here(
        self, uid: str, principal: str | None, limit: int | None, refuse: bool
    ) -> list[str] | None:
        shard = self._shards[0]
        keys = [f"{shard.base}:s:{uid}", shard.deadlines, shard.ended]
        if principal is not None:
            keys.append(self._principal_keys(principal)[0])
        args: list[str | int] = [
            self._now_arg(),
            uid,
            principal or "",
            "" if limit is None else limit,
            "1" if refuse else "",
            shard.base,
        ]
        reply = await self._call("login", keys, args)
        if reply is None:
            return None
        if reply == "refused":
            assert principal is not None and limit is not None
            raise TooManySessions(principal, limit)
        return list(reply)

    # -- sharded ----------------------------------------------------------------

    async def _unbind(self, uid: str) -> list[str] | None:
        """Unbind (no lock: it cannot raise a count); the old index loses
        the uid afterwards, best effort (until then, or if that fails, it is
        filtered out by its hash)."""
        shard = self._shard(uid)
        keys = [f"{shard.base}:s:{uid}", shard.deadlines]
        reply = await self._call("bind", keys, [self._now_arg(), uid, "", ""])
        if reply is None:
            return None
        live_uid, old = reply
        if old is not None:
            await self._forget_member(old, live_uid)
        return []

    async def _login_sharded(
        self, uid: str, principal: str, limit: int | None, refuse: bool
    ) -> list[str] | None:
        shard = self._shard(uid)
        keys = [f"{shard.base}:s:{uid}", shard.deadlines]
        index, lock = self._principal_keys(principal)
        async with self._locked(principal) as (token, members):
            peek = await self._call("bind", keys, [self._now_arg(), uid, principal, "1"])
            if peek is None:
                return None
            live_uid, old = peek
            others = [member for member in members if member != live_uid]
            rows = await self._bound_rows(principal, others)
            live = {row.uid for row in rows}
            stale = [member for member in others if member not in live]
            excess = 0 if limit is None else len(rows) + 1 - limit
            if excess > 0 and refuse:  # a session already bound counts too
                assert limit is not None
                raise TooManySessions(principal, limit)
            rows.sort(key=lambda row: (row.last_access, row.uid))
            chosen = [row.uid for row in rows[:excess]] if excess > 0 else []
            # Into the index before the binding, so a bound live session is
            # never missing from it; only while the lock is still ours. The
            # victims stay members until their end is acknowledged (if ending
            # them fails, they are live and bound, so they must stay listed).
            await self._reindex(lock, index, token, live_uid, stale)
            superseded = await self._end_bound(principal, chosen, "superseded", "")
            args: list[str | int] = [self._now_arg(), live_uid, principal, ""]
            shard = self._shard(live_uid)
            keys = [f"{shard.base}:s:{live_uid}", shard.deadlines]
            if await self._call("bind", keys, args) is None:  # ended meanwhile
                return None
        if old is not None and old != principal:
            await self._forget_member(old, live_uid)
        return superseded

    async def _rotate_bound(
        self, uid: str, new_uid: str, keys: list[str], args: list[str | int], principal: str
    ) -> bool:
        """Rotate a session bound to ``principal`` on a sharded layout: under
        the principal's lock, the new uid into its index, then the rotation
        (if the session is still bound to it: else once more, under the
        lock of the principal it is bound to now), then the old uid out."""
        for _ in range(3):
            index, lock = self._principal_keys(principal)
            async with self._locked(principal) as (token, _members):
                await self._reindex(lock, index, token, new_uid, [])
                moved = await self._call("rotate", keys, [*args[:-1], principal])
                if not isinstance(moved, list):
                    if moved:
                        await self._reindex(lock, index, token, "", [uid])
                    return bool(moved)
            principal = moved[0]
        raise StoreUnavailable(
            f"Redis session store at {self._where} unavailable (rotate): the session's "
            "principal kept changing during its rotation"
        )

    async def _forget_member(self, principal: str, uid: str) -> None:
        """Take a uid no longer bound to ``principal`` out of its index, best
        effort (a member left behind is filtered out, and removed at the next
        login)."""
        index, _ = self._principal_keys(principal)
        with contextlib.suppress(StoreUnavailable):
            await self._command_on("ack", index, "SREM", index, uid)

    @contextlib.asynccontextmanager
    async def _locked(self, principal: str) -> AsyncIterator[tuple[str, list[str]]]:
        """Hold ``principal``'s lock (a lease of the store's timeout); its
        token and the index's members. Waits, with a small random back-off,
        up to twice the timeout (a killed holder's lease runs out meanwhile);
        then :class:`StoreUnavailable`."""
        index, lock = self._principal_keys(principal)
        token = secrets.token_hex(16)
        lease_ms = max(1, round(self.timeout * 1000))
        loop = asyncio.get_running_loop()
        give_up = loop.time() + 2 * self.timeout
        delay = _FIRST_BACKOFF
        while True:
            members = await self._call("lock", [lock, index], [token, lease_ms])
            if members is not None:
                break
            if loop.time() >= give_up:
                raise StoreUnavailable(
                    f"Redis session store at {self._where} unavailable (principal lock): "
                    f"another process held the lock of a principal for over "
                    f"{2 * self.timeout:g} s"
                )
            await asyncio.sleep(delay * random.uniform(0.5, 1.5))
            delay = min(delay * 2, _MAX_BACKOFF)
        try:
            yield token, list(members)
        finally:
            with contextlib.suppress(StoreUnavailable):  # else its lease runs out
                await self._call("unlock", [lock], [token])

    async def _reindex(
        self, lock: str, index: str, token: str, add: str, remove: Iterable[str]
    ) -> None:
        """Add ``add`` to the index and remove ``remove``, if the lock is
        still ``token``'s; else :class:`StoreUnavailable` (its lease ran out
        while this call was slow: nothing is written)."""
        if not await self._call("reindex", [lock, index], [token, add, *remove]):
            raise StoreUnavailable(
                f"Redis session store at {self._where} unavailable (principal lock): "
                "the lock's lease ran out before the index was written"
            )

    def _by_shard(self, uids: Iterable[str]) -> dict[Shard, list[str]]:
        groups: dict[Shard, list[str]] = {}
        for uid in uids:
            groups.setdefault(self._shard(uid), []).append(uid)
        return groups

    async def _bound_rows(
        self, principal: str, uids: Iterable[str], data: bool = False
    ) -> list[SessionInfo]:
        """The live sessions among ``uids`` bound to ``principal`` (one
        script per shard, together); with their data if ``data`` (else only
        their times are read: a login's count costs the same whatever the
        size of the sessions)."""
        now = self._now_arg()
        whole = "1" if data else ""

        async def rows(shard: Shard, some: list[str]) -> list[SessionInfo]:
            args: list[str | int] = [now, shard.base, principal, whole, *some]
            return _rows(await self._call("members", [shard.deadlines], args))

        groups = self._by_shard(uids)
        found = await asyncio.gather(*(rows(shard, some) for shard, some in groups.items()))
        return [row for part in found for row in part]

    async def _end_bound(
        self, principal: str, uids: Iterable[str], cause: str, spare: str
    ) -> list[str]:
        """End each live session among ``uids`` bound to ``principal`` but
        the one ``spare`` names (itself, or the session it was rotated to
        within its grace); one script per shard, together; the uids ended."""
        now = self._now_arg()

        # An old uid in its grace names a session of its own shard: resolved
        # there (the only shard whose keys that script may read).
        home = self._shard(spare) if spare else None

        async def end(shard: Shard, some: list[str]) -> list[str]:
            keys = [shard.deadlines, shard.ended]
            here = "1" if shard is home else ""
            args: list[str | int] = [now, shard.base, principal, cause, spare, here, *some]
            return list(await self._call("end_bound", keys, args))

        groups = self._by_shard(uids)
        ended = await asyncio.gather(*(end(shard, some) for shard, some in groups.items()))
        return [uid for part in ended for uid in part]


def _rows(flat: list[Any]) -> list[SessionInfo]:
    """SessionInfo rows from ``members.lua``'s reply."""
    return [session_info(flat[i], flat[i + 1], flat[i + 2]) for i in range(0, len(flat), 3)]
