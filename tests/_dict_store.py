"""A session store written from lapse's store protocol docs alone
(``lapse.sessions.store``): a plain class, no lapse base class, not the memory
store. Sessions live in a dict with their deadlines; every call is async and
answers at once. It declares ``shared = False`` (in process),
``enforces_timeout = False`` (the keeper bounds its calls) and
``holds_sessions = False`` (only the async protocol).
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from lapse.sessions import Expiry, SessionInfo, StoredSession, TooManySessions


@dataclass
class _Live:
    timeout: float
    data: dict[str, Any]
    created: float
    touched: float
    ends: float | None  # creation + lifetime
    principal: str | None = None

    def deadline(self) -> float:
        idle = self.touched + self.timeout
        return idle if self.ends is None else min(idle, self.ends)


@dataclass
class _Ended:
    data: dict[str, Any]
    cause: str
    delivery_id: str
    attempt: int = 0
    owner: str = ""
    lease_until: float = 0.0


@dataclass
class DictStore:
    """Live sessions in a dict; ended ones kept until acknowledged."""

    clock: Callable[[], float] = time.time
    url: str = "dict:"
    shared: bool = False
    enforces_timeout: bool = False
    holds_sessions: bool = False
    live: dict[str, _Live] = field(default_factory=dict)
    ended: dict[str, _Ended] = field(default_factory=dict)
    aliases: dict[str, tuple[str, float]] = field(default_factory=dict)
    announced: list[str | tuple[str, str]] = field(default_factory=list)
    scans: dict[str, list[str]] = field(default_factory=dict)
    ids: Any = field(default_factory=itertools.count)

    # -- bookkeeping -----------------------------------------------------------

    def _sweep(self) -> None:
        """Move every live session past its deadline to the ended ones."""
        now = self.clock()
        for uid, live in list(self.live.items()):
            if live.deadline() <= now:
                idle_first = live.ends is None or live.touched + live.timeout < live.ends
                self._end(uid, "timeout" if idle_first else "lifetime")

    def _end(self, uid: str, cause: str) -> None:
        live = self.live.pop(uid)
        self.ended[uid] = _Ended(live.data, cause, f"{uid}:{next(self.ids)}")

    def _resolve(self, uid: str) -> str | None:
        """The live uid ``uid`` names: itself, or the one it was rotated to
        within its grace."""
        self._sweep()
        if uid in self.live:
            return uid
        alias = self.aliases.get(uid)
        if alias is not None and alias[1] > self.clock():
            return self._resolve(alias[0])
        return None

    def _info(self, uid: str) -> SessionInfo:
        live = self.live[uid]
        return SessionInfo(
            uid, live.created, live.touched, live.deadline(), dict(live.data), live.principal
        )

    # -- the protocol ----------------------------------------------------------

    async def open(self) -> None:
        return None

    async def aclose(self) -> None:
        return None

    async def now(self) -> float:
        return self.clock()

    async def load(self, uid: str, version: int | None = None) -> StoredSession | None:
        found = self._resolve(uid)
        if found is None:
            return None
        live = self.live[found]
        live.touched = self.clock()
        return StoredSession(
            found, live.timeout, live.deadline(), dict(live.data), principal=live.principal
        )

    async def create(
        self, uid: str, timeout: float, data: Mapping[str, Any], lifetime: float | None = None
    ) -> float:
        now = self.clock()
        ends = None if lifetime is None else now + lifetime
        self.live[uid] = _Live(timeout, dict(data), now, now, ends)
        return self.live[uid].deadline()

    async def rotate(self, uid: str, new_uid: str, grace: float) -> bool:
        self._sweep()
        if uid not in self.live:
            return False
        live = self.live[new_uid] = self.live.pop(uid)
        live.touched = self.clock()
        if grace > 0:
            self.aliases[uid] = (new_uid, self.clock() + grace)
        self.announced.append((uid, new_uid))
        return True

    async def save(self, uid: str, changed: Mapping[str, Any], removed: Iterable[str]) -> bool:
        found = self._resolve(uid)
        if found is None:
            return False
        data = self.live[found].data
        data.update(changed)
        for key in removed:
            data.pop(key, None)
        return True

    async def exists(self, uid: str) -> bool:
        self._sweep()
        return uid in self.live

    async def expire(self, uid: str) -> bool:
        self._sweep()
        if uid not in self.live:
            return False
        self._end(uid, "expired")
        return True

    async def claim(self, owner: str, lease: float, limit: int) -> list[Expiry]:
        self._sweep()
        now = self.clock()
        claims: list[Expiry] = []
        for uid, ended in self.ended.items():  # oldest first: ended in order
            if len(claims) == limit:
                break
            if ended.attempt and ended.lease_until > now:
                continue
            ended.attempt += 1
            ended.owner, ended.lease_until = owner, now + lease
            claims.append(Expiry(uid, ended.data, ended.delivery_id, ended.attempt, ended.cause))
        return claims

    async def renew(self, expiry: Expiry, owner: str, lease: float) -> bool:
        ended = self.ended.get(expiry.uid)
        if (
            ended is None
            or (ended.delivery_id, ended.attempt, ended.owner)
            != (expiry.delivery_id, expiry.attempt, owner)
            or ended.lease_until <= self.clock()
        ):
            return False
        ended.lease_until = self.clock() + lease
        return True

    async def ack(self, expiry: Expiry) -> None:
        ended = self.ended.get(expiry.uid)
        if ended is not None and ended.delivery_id == expiry.delivery_id:
            del self.ended[expiry.uid]
            self.announced.append(expiry.uid)

    async def events(self, cursor: str | None) -> tuple[list[str | tuple[str, str]], str]:
        start = len(self.announced) if cursor is None else int(cursor)
        return self.announced[start:], str(len(self.announced))

    async def next_deadline(self) -> float | None:
        self._sweep()
        now = self.clock()
        times = [live.deadline() for live in self.live.values()]
        times += [e.lease_until if e.attempt else now for e in self.ended.values()]
        return min(times, default=None)

    # -- inspection --------------------------------------------------------------

    async def scan(self, cursor: str | None, limit: int) -> tuple[list[SessionInfo], str | None]:
        if limit < 1:
            raise ValueError(f"a scan limit is at least 1, not {limit!r}")
        self._sweep()
        if cursor is None:
            token, position = str(next(self.ids)), 0
            self.scans[token] = list(self.live)
        else:
            token, _, rest = cursor.partition(":")
            if token not in self.scans or not rest.isdigit():
                raise ValueError(f"not a scan cursor of this store: {cursor!r}")
            position = int(rest)
        uids = self.scans[token]
        page: list[SessionInfo] = []
        while position < len(uids) and len(page) < limit:
            if uids[position] in self.live:
                page.append(self._info(uids[position]))
            position += 1
        if position >= len(uids):
            del self.scans[token]
            return page, None
        return page, f"{token}:{position}"

    async def info(self, uid: str) -> SessionInfo | None:
        self._sweep()
        return self._info(uid) if uid in self.live else None

    async def count(self) -> int:
        self._sweep()
        return len(self.live)

    async def deadlines(self, now: float, horizon: float, buckets: int) -> list[int]:
        if not isinstance(buckets, int) or buckets < 1 or not 0 < horizon < float("inf"):
            raise ValueError("deadlines() needs buckets >= 1 and a positive finite horizon")
        self._sweep()
        width = horizon / buckets
        counts = [0] * buckets
        for live in self.live.values():
            deadline = live.deadline()
            if now < deadline <= now + horizon:
                counts[min(buckets - 1, int((deadline - now) / width))] += 1
        return counts

    # -- principals ----------------------------------------------------------------

    def _bound(self, principal: str) -> list[str]:
        self._sweep()
        return [uid for uid, live in self.live.items() if live.principal == principal]

    async def set_principal(
        self, uid: str, principal: str | None, limit: int | None = None, refuse: bool = False
    ) -> list[str] | None:
        found = self._resolve(uid)
        if found is None:
            return None
        superseded: list[str] = []
        if principal is not None and limit is not None:
            others = [other for other in self._bound(principal) if other != found]
            excess = len(others) + 1 - limit
            if excess > 0:
                if refuse:
                    raise TooManySessions(principal, limit)
                others.sort(key=lambda other: (self.live[other].touched, other))
                superseded = others[:excess]
                for victim in superseded:
                    self._end(victim, "superseded")
        self.live[found].principal = principal
        return superseded

    async def sessions_of(self, principal: str) -> list[SessionInfo]:
        uids = sorted(self._bound(principal), key=lambda uid: (-self.live[uid].touched, uid))
        return [self._info(uid) for uid in uids]

    async def expire_principal(self, principal: str, except_uid: str | None = None) -> list[str]:
        spared = None if except_uid is None else self._resolve(except_uid)
        ended = [uid for uid in self._bound(principal) if uid != spared]
        for uid in ended:
            self._end(uid, "expired")
        return ended
