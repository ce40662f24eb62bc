"""The HTTP session plumbing a Site and the ASGI middleware share.

Both own sessions over HTTP the same way; each only adapts this to its own
request model (a Twisted ``Request``; an ASGI scope and ``request.session``).
The Site's header scan joins the ``Cookie`` headers itself, in the one pass
its limits need. Here:

- which session uids a request presents: its ``Cookie`` headers, joined
  (:func:`join_cookie_headers`), searched for the plain and the secure session
  cookie (:meth:`HTTPSessions._cookie_uids`);
- whether the request is secure: TLS, or a trusted proxy that says so
  (:func:`is_secure`);
- the ``Set-Cookie`` a session needs (:func:`session_cookie`): its cookie if
  this request made or rotated it, a deletion if it ended, nothing if the
  request presented it;
- writing what the request did (:meth:`HTTPSessions._write_visit`), and the
  answers that replace its response when that cannot be done
  (:data:`UNAVAILABLE`, 503; :data:`CONFLICT`, 409): short plain text, the
  same bytes from either;
- the lifespan: the start-up check and the keeper's start at startup, its
  close at shutdown (:meth:`HTTPSessions._serve_lifespan`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, NamedTuple

from lapse.internet._answers import text_response
from lapse.sessions import SessionConflict, StoreUnavailable
from lapse.web._cookies import format_delete_cookie, format_session_cookie
from lapse.web._host import SessionHost, cookie_uid
from lapse.web._types import Message, Receive, Scope, Send

if TYPE_CHECKING:
    from lapse.sessions import Session, Visit
    from lapse.web._proxy import Forwarded

__all__ = [
    "CONFLICT",
    "UNAVAILABLE",
    "HTTPSessions",
    "SessionAnswer",
    "is_secure",
    "join_cookie_headers",
    "session_cookie",
    "unwritten",
]

session_log = logging.getLogger("lapse.sessions")

_SECURE_SCHEMES = frozenset({"https", "wss"})


class SessionAnswer(NamedTuple):
    """A short plain-text answer that replaces a response when the request's
    sessions cannot be had. It sets no cookie, and varies with the cookie
    (another visitor's request to the same URL may be answered otherwise)."""

    status: int
    body: bytes
    headers: tuple[tuple[bytes, bytes], ...]

    def start(self) -> Message:
        """Its ``http.response.start`` message."""
        return text_response(self.status, self.body, *self.headers)

    async def send(self, send: Send) -> None:
        """Send it whole."""
        await send(self.start())
        await send({"type": "http.response.body", "body": self.body})


_VARY_COOKIE = (b"vary", b"Cookie")

UNAVAILABLE = SessionAnswer(
    503,
    b"Sessions are unavailable for a moment; try again.\n",
    ((b"retry-after", b"1"), _VARY_COOKIE),
)
"""The session store cannot be reached (to load, or to write, a session)."""

CONFLICT = SessionAnswer(
    409,
    b"Your session changed while this request ran; nothing was saved. Try again.\n",
    (_VARY_COOKIE,),
)
"""What the request changed in its session cannot be written: another
request rotated or ended the session meanwhile."""


def join_cookie_headers(headers: Iterable[tuple[bytes, bytes]]) -> bytes | None:
    """The request's ``Cookie`` headers as one (``; `` between them), or None."""
    joined: bytes | None = None
    for name, value in headers:
        if name == b"cookie":
            joined = value if joined is None else joined + b"; " + value
    return joined


def is_secure(scope: Scope, forwarded: Callable[[], Forwarded | None]) -> bool:
    """Whether the request came over TLS, or through proxies the host trusts
    that say it did (``forwarded()``, only called when it is needed)."""
    if scope.get("scheme") in _SECURE_SCHEMES:
        return True
    said = forwarded()
    return said is not None and said.secure is True


def session_cookie(
    name: bytes, session: Session, presented: Session | None, visit: Visit, secure: bool
) -> bytes | None:
    """The ``Set-Cookie`` value a response needs for ``session``, the one the
    request has under the cookie ``name`` (``presented``: the one its cookie
    named, if any): a deletion if it has ended; its cookie if the request
    made it or rotated it; else none.

    A session the cookie named keeps its cookie even if another request has
    rotated it since, or it was found under an old uid in its grace: a new
    uid goes only to the request that made it.
    """
    if session._expired:
        return format_delete_cookie(name, secure=secure)
    rotated = visit._rotated  # (Visit._rotated_here, without its call: every request's path)
    if session is not presented or (rotated is not None and session in rotated):
        return format_session_cookie(name, session.uid, secure=secure)
    return None


def unwritten(visit: Visit, sessions: Iterable[Session]) -> list[Session]:
    """Those of ``sessions`` with changes ``visit`` has not written yet: made
    and not created, or data changed (in the visit's own view of it, if it
    has one)."""
    views = visit._views or {}
    found = []
    for session in sessions:
        entry = views.get(session)
        data = session._data if entry is None else entry[0]
        if session._needs_create or (data is not None and data.dirty):
            found.append(session)
    return found


class HTTPSessions(SessionHost):
    """A session host over HTTP: what :class:`~lapse.web.server.Site` and
    :class:`~lapse.asgi.SessionMiddleware` do alike."""

    def _cookie_uids(self, cookie_header: bytes, secure: bool) -> list[str | None]:
        """The uids a request's cookies name, [plain, secure] (the secure
        cookie is only read from a secure request), or [] if none.

        As :func:`~lapse.web._cookies.parse_cookie_header` reads them: the
        first cookie of the name, stripped and unquoted; an empty or
        oversized value is none.
        """
        plain_finder, secure_finder = self._cookie_finders
        plain = cookie_uid(plain_finder(cookie_header))
        secure_uid = cookie_uid(secure_finder(cookie_header)) if secure else None
        if plain is None and secure_uid is None:
            return []
        return [plain, secure_uid]

    def _proxy_says(self, scope: Scope) -> Forwarded | None:
        """What the trusted proxies in front say of the request (None if the
        host trusts none, or the peer is not one of them)."""
        trust = self._proxy_trust
        if trust is None:
            return None
        peer = scope.get("client")
        return trust.read(peer[0] if peer else None, scope["headers"])

    async def _write_visit(self, sessions: list[Session], visit: Visit) -> SessionAnswer | None:
        """Write what a request did to its ``sessions`` (on a shared store,
        before its response starts). None, or the answer that replaces its
        response: :data:`UNAVAILABLE` if the store cannot take the write,
        :data:`CONFLICT` if the session changed under the request."""
        try:
            await self._keeper.persist(sessions, visit)
        except StoreUnavailable:
            return UNAVAILABLE
        except SessionConflict as exc:
            session_log.info("%s", exc)
            return CONFLICT
        return None

    async def _start_sessions(self) -> str | None:
        """Lifespan startup: None once the sessions are started, else the
        one line saying why they never can be (see :meth:`check_start`)."""
        problem = await self.check_start()
        if problem is None:
            self._keeper.start()
        return problem

    async def _serve_lifespan(self, receive: Receive, send: Send, started: bool = False) -> None:
        """Serve the ASGI lifespan for the sessions: start them at startup
        (or fail it, saying why), close them at shutdown. ``started``: the
        startup was received, and the sessions started, already."""
        if started:
            await send({"type": "lifespan.startup.complete"})
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                problem = await self._start_sessions()
                if problem is not None:
                    await send({"type": "lifespan.startup.failed", "message": problem})
                    return
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self._keeper.aclose()
                await send({"type": "lifespan.shutdown.complete"})
                return
