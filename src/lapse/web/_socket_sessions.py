"""WebSockets under :class:`~lapse.asgi.SessionMiddleware`: the session as
for HTTP (``websocket.session``, ``get_session(websocket)``), bound to the
socket.

- The handshake: ``Origin`` checked (403 for another site's page, unless in
  ``allowed_origins``); the session the cookie names loaded and touched.
- The accept: what the app did to the session is written first (a new
  session's cookie goes on the accept's headers); if it cannot be, the
  handshake is refused (503, or 409) instead.
- While open: changes the app made are written before each message it
  sends and before each receive (only when there are some); a failed write
  closes the socket (1013 store unavailable, 1011 the session changed under
  it). A rotation the process knows of is followed: the socket's writes go
  to the new uid. A message received touches
  the session (at most once per ``touch_fraction`` of its timeout).
- The session's end closes the socket: 1008 "session ended"; the app's
  ``receive`` returns ``websocket.disconnect`` with that code.
- At the close: the last changes are written (a failure is logged).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from lapse.sessions import SessionConflict, StoreUnavailable, current_visit
from lapse.web._live import SocketLink, SocketSessions, follow_rotations
from lapse.web._plumbing import CONFLICT, UNAVAILABLE
from lapse.web._session_mapping import MiddlewareVisit
from lapse.web._types import Message, Receive, Scope, Send
from lapse.web.websocket import origin_allowed, refuse, refuse_for_sessions

if TYPE_CHECKING:
    from lapse.asgi import SessionMiddleware

__all__ = ["serve_websocket"]

log = logging.getLogger("lapse.asgi")


def _origin_and_host(scope: Scope) -> tuple[bytes | None, bytes | None]:
    origin = host = None
    for name, value in scope["headers"]:
        if name == b"origin":
            origin = value
        elif name == b"host":
            host = value
    return origin, host


async def serve_websocket(
    middleware: SessionMiddleware, scope: Scope, receive: Receive, send: Send, scope_key: str
) -> None:
    """Serve a websocket scope through ``middleware`` (see the module doc)."""
    if not middleware._enter_loop():
        await send({"type": "websocket.close", "code": 1011})
        return
    secure, uid = middleware._read_headers(scope)
    origin, host = _origin_and_host(scope)
    if not origin_allowed(origin, host, middleware.allowed_origins):
        log.info("WebSocket refused: Origin %r is not this site's", origin)
        await refuse(scope, send, 403, "This origin may not open WebSockets here.")
        return
    visit = MiddlewareVisit(middleware, secure)
    visiting = current_visit.set(visit)
    try:
        if uid is not None:
            await visit.load_presented(uid)  # (unreachable: the handshake gets 503)
        scope[scope_key] = visit
        scope["session"] = visit.mapping
        await _run(middleware, visit, scope, receive, send)
    finally:
        current_visit.reset(visiting)


async def _run(
    middleware: SessionMiddleware,
    visit: MiddlewareVisit,
    scope: Scope,
    receive: Receive,
    send: Send,
) -> None:
    keeper = middleware._keeper
    sessions = SocketSessions(middleware.touch_fraction)
    link = SocketLink(receive, send, sessions.message)

    async def write() -> int | None:
        """Write the visit's changes; None, or the close code for a failure."""
        if keeper.synchronous:
            keeper.persist_now(visit.used)
            return None
        follow_rotations(visit)
        answer = await middleware._write_visit(visit.used, visit)
        if answer is None:
            return None
        return 1013 if answer is UNAVAILABLE else 1011

    async def sync() -> None:
        if link.accepted and not link.closed and visit.pending():
            failed = await write()
            if failed is not None:
                link.end(failed, "sessions unavailable" if failed == 1013 else "session changed")

    async def app_send(message: Message) -> None:
        kind = message["type"]
        if kind == "websocket.accept" and not link.accepted and not link.closed:
            if visit.failed:
                await _refuse(503)
                return
            if visit.used:
                failed = await write()
                if failed is not None:
                    await _refuse(503 if failed == 1013 else 409)
                    return
                cookies = visit.cookie_headers()
                if cookies:
                    message = {**message, "headers": [*message.get("headers", ()), *cookies]}
            session = visit.current
            if session is not None:
                sessions.add(session, link.end)
        elif kind == "websocket.send":
            await sync()
        await link.send(message)

    async def _refuse(status: int) -> None:
        link.closed = True
        await refuse_for_sessions(scope, send, UNAVAILABLE if status == 503 else CONFLICT)

    async def app_receive() -> Message:
        await sync()
        return await link.receive()

    try:
        await middleware.app(scope, app_receive, app_send)
    except StoreUnavailable:
        if not visit.failed:
            raise
        if link.accepted:
            link.end(1013, "sessions unavailable")
        elif not link.closed:
            await _refuse(503)
    finally:
        sessions.release()
        visit.mapping._release()
        await link.aclose()
        late = visit.pending() if link.accepted and link.ended_by is None else None
        if late:
            if keeper.synchronous:
                keeper.persist_now(visit.used)
            else:
                follow_rotations(visit)
                try:
                    await keeper.persist(late, visit)
                except (StoreUnavailable, SessionConflict) as exc:
                    log.warning("session changes made over a WebSocket were not saved: %s", exc)
