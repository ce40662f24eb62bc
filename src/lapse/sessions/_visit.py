"""A visit: what one request does with sessions, found by the code it calls.

A request (a ``Site``'s :class:`~lapse.web.server.Request`, or the ASGI
middleware's visit) makes itself the *current visit* while it runs: a
context variable, so each request (an asyncio task of its own) sees its own,
and so do the tasks it starts and the threads it hands work to (they run in
a copy of its context). Through it:

- **on a shared store, a request's changes are its own until written.**
  ``session.data`` in a request is that request's view of the session's data,
  made when the request loaded the session; a concurrent request of the same
  session neither sees nor replaces the changes of another, and each writes
  only its own (to the uid it loaded the session under);
- **a rotation or a logout knows the request that made it.** Only the
  response of the request that rotated a session carries its new uid; a
  request that loaded the session under a uid that another request has since
  rotated away (or ended) writes nothing to it (see the keeper).

Outside any request (an expiry callback, a background task), there is no
visit: ``session.data`` is the process's own copy.
"""

from __future__ import annotations

from contextvars import ContextVar
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from lapse.sessions._data import SessionData
    from lapse.sessions._session import Session

__all__ = ["Visit", "current_visit"]


class Visit:
    """A request's session bookkeeping (a base class: its attributes are made
    on first use, so a request that does none of this pays nothing)."""

    _views: dict[Session, tuple[SessionData, str]] | None = None
    """Shared stores: each loaded session's data view, and the uid to write
    its changes to (the uid it was loaded under, or its new one once this
    request rotated it)."""
    _rotated: set[Session] | None = None
    """The sessions this request rotated."""
    _ended: set[Session] | None = None
    """The sessions this request ended (``expire()``)."""

    def _add_view(self, session: Session, view: SessionData, uid: str) -> None:
        views = self._views
        if views is None:
            views = self._views = {}
        views[session] = (view, uid)

    def _note_rotation(self, session: Session) -> None:
        rotated = self._rotated
        if rotated is None:
            rotated = self._rotated = set()
        rotated.add(session)
        views = self._views
        if views is not None and session in views:
            views[session] = (views[session][0], session.uid)

    def _note_end(self, session: Session) -> None:
        ended = self._ended
        if ended is None:
            ended = self._ended = set()
        ended.add(session)

    def _rotated_here(self, session: Session) -> bool:
        rotated = self._rotated
        return rotated is not None and session in rotated


current_visit: ContextVar[Visit | None] = ContextVar("lapse_visit", default=None)
"""The visit of the request this code runs for, if any."""
