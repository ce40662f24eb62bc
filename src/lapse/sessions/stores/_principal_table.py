"""The memory store's index of live records by principal.

A record's ``_principal`` says whom it is bound to, and a dict of principal
-> its records (by identity, so a rotation changes nothing here) lists them.
A record leaves it when it ends, by any cause. A record past its deadline
but not yet collected is neither listed nor counted.
"""

from __future__ import annotations

from collections.abc import Callable

from lapse.sessions.store import SessionInfo, TooManySessions
from lapse.sessions.stores._timetable import _GONE, Record, Timetable, _deadline

__all__ = ["PrincipalTable"]


class PrincipalTable(Timetable):
    """A timetable whose records may be bound to principals."""

    def __init__(self, clock: Callable[[], float]) -> None:
        super().__init__(clock)
        # principal -> {id(record): record} of the live records bound to it.
        self._principals: dict[str, dict[int, Record]] = {}

    @staticmethod
    def _info(record: Record) -> SessionInfo:
        values = record._peek_values()
        return SessionInfo(
            record.uid,
            record._created,
            record._lastModified,
            _deadline(record),
            {} if values is None else dict(values),
            record._principal,
        )

    def _end(self, record: Record, cause: str) -> None:
        super()._end(record, cause)
        if record._principal is not None:
            self._unindex(record)

    # -- principals -------------------------------------------------------

    def _unindex(self, record: Record) -> None:
        principal = record._principal
        if principal is None:
            return
        bound = self._principals.get(principal)
        if bound is not None:
            bound.pop(id(record), None)
            if not bound:
                del self._principals[principal]

    def _bound_to(self, principal: str) -> list[Record]:
        """The live records bound to ``principal`` (in no order)."""
        bound = self._principals.get(principal)
        if not bound:
            return []
        now = self.clock()
        return [record for record in bound.values() if self._get(record.uid, now) is record]

    def set_principal_now(
        self, uid: str, principal: str | None, limit: int | None = None, refuse: bool = False
    ) -> list[str] | None:
        """Bind the live session ``uid`` (or the one an old uid in its grace
        names) to ``principal``; see :meth:`bind_record_now`."""
        now = self.clock()
        record = self._get(uid, now)
        if record is None and self._aliases:
            record = self._alias(uid, now)
        return None if record is None else self.bind_record_now(record, principal, limit, refuse)

    def bind_record_now(
        self, record: Record, principal: str | None, limit: int | None = None, refuse: bool = False
    ) -> list[str] | None:
        """Bind the live ``record`` to ``principal`` (None: unbind), with at
        most ``limit`` live records bound to it after: the least recently
        used others end (``"superseded"``; their uids returned), or, with
        ``refuse``, :class:`TooManySessions`. None if the store is not
        checking ``record``."""
        state = record._state
        if state is None or state is _GONE:
            return None
        superseded: list[str] = []
        if principal is not None and limit is not None:
            others = [other for other in self._bound_to(principal) if other is not record]
            excess = len(others) + 1 - limit
            if excess > 0:
                if refuse:
                    raise TooManySessions(principal, limit)
                others.sort(key=lambda other: (other._lastModified, other.uid))
                for victim in others[:excess]:
                    superseded.append(victim.uid)
                    self._end(victim, "superseded")
        self._unindex(record)
        record._principal = principal
        if principal is not None:
            self._principals.setdefault(principal, {})[id(record)] = record
        return superseded

    def sessions_of_now(self, principal: str) -> list[SessionInfo]:
        records = self._bound_to(principal)
        records.sort(key=lambda record: (-record._lastModified, record.uid))
        return [self._info(record) for record in records]

    def expire_principal_now(self, principal: str, except_uid: str | None = None) -> list[str]:
        spared = None
        if except_uid is not None:
            now = self.clock()
            spared = self._get(except_uid, now)
            if spared is None and self._aliases:
                spared = self._alias(except_uid, now)
        ended = []
        for record in self._bound_to(principal):
            if record is not spared:
                ended.append(record.uid)
                self._end(record, "expired")
        return ended
