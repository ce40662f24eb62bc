"""The half of a ``Site`` that answers: a render's result written, errors
made pages, the request's sessions written, and the response sent: at once,
or streamed as it is written (``NOT_DONE_YET``).

:meth:`~lapse.web.server.Site.__call__` (any ASGI server) and
:meth:`~lapse.web.server.Site._serve_now` (lapse's reactor, without a
coroutine when nothing waits) share all of it.
"""

from __future__ import annotations

import asyncio
import logging
from functools import partial
from typing import TYPE_CHECKING, Any

from lapse.sessions import SessionConflict, StoreUnavailable
from lapse.web._access import access_log, log_access
from lapse.web._live import bind, end_stream
from lapse.web._plumbing import CONFLICT, UNAVAILABLE, HTTPSessions, SessionAnswer
from lapse.web._request import _NO_SESSIONS, NOT_DONE_YET, Request
from lapse.web._types import Receive, Send
from lapse.web.error import BadRequest, UnsupportedMethod
from lapse.web.resource import ErrorPage

if TYPE_CHECKING:
    from lapse.sessions import Session

__all__ = ["SiteResponses"]

log = logging.getLogger("lapse.web")


_TEXT = (bytes, str)


class _ClientGone(Exception):
    """The client disconnected before the request was read."""


class SiteResponses(HTTPSessions):
    """What a ``Site`` does with a rendered request (module doc)."""

    max_body_size: int

    def _written(self, request: Request, resource: Any, result: Any) -> Any:
        """Write a render's ``result`` into the response: None, or
        ``NOT_DONE_YET`` (the render finishes the request later). A result
        of another type is an error (500, logged)."""
        if isinstance(result, _TEXT):  # (a tuple: ``bytes | str`` is made at each call)
            if result or not request.finished:
                request.write(result)
            return None
        if type(result) is int and result == NOT_DONE_YET:
            return NOT_DONE_YET
        log.error(
            "%r returned %r from render for %s; a render returns str, bytes or NOT_DONE_YET",
            resource,
            type(result).__name__,
            request._uri_for_log().decode("latin-1"),
        )
        self._error_page(request, 500, "The server failed to answer this request.")
        return None

    def _failed(self, request: Request, exc: Exception) -> None:
        """What reading, routing or rendering raised, made the response."""
        if isinstance(exc, BadRequest):
            self._error_page(request, exc.status, exc.reason)
        elif isinstance(exc, UnsupportedMethod):
            request._reset_response()
            request.setHeader(b"allow", b", ".join(exc.allowedMethods))
            self._error_page(
                request, 405, "This resource does not answer the method used.", reset=False
            )
        elif isinstance(exc, StoreUnavailable):
            self._answer(request, UNAVAILABLE)
        elif isinstance(exc, SessionConflict):  # (await session.set_principal() on an ended one)
            log.info("%s", exc)
            self._answer(request, CONFLICT)
        else:
            log.error(
                "error rendering %s for %r",
                request._uri_for_log().decode("latin-1"),
                request,
                exc_info=exc,
            )
            self._error_page(request, 500, "The server failed to answer this request.")

    def _error_page(
        self, request: Request, status: int, detail: str, *, reset: bool = True
    ) -> None:
        if reset:
            request._reset_response()
        brief = _REASONS.get(status, "Error")
        request.write(ErrorPage(status, brief, detail).render(request))

    def _complete(self, request: Request) -> None:
        """Finish the response; on an in-process store, write the sessions
        (synchronously: nothing can fail there)."""
        if not request.finished:
            request.finish()
        if request._presented is not _NO_SESSIONS or request._sessions is not _NO_SESSIONS:
            self._keeper.persist_now(self._used_sessions(request))

    @staticmethod
    def _whole_body(request: Request) -> bytes:
        """The body written so far, taken from the request."""
        chunks = request._chunks
        request._chunks = []
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    async def _respond(self, request: Request, result: Any, receive: Receive, send: Send) -> None:
        """Send the response: streamed for ``NOT_DONE_YET``, else whole,
        after the request's sessions are written."""
        if result is not None:  # NOT_DONE_YET
            await self._stream(request, receive, send)
            return
        if self._keeper.synchronous:
            self._complete(request)
        else:
            if not request.finished:
                request.finish()
            await self._persist(request)
        await send(request._start_message(request.sentLength))
        await send({"type": "http.response.body", "body": self._whole_body(request)})
        if access_log.isEnabledFor(logging.INFO):
            log_access(request)

    @staticmethod
    def _used_sessions(request: Request) -> list[Session]:
        """The sessions the request touched or was given, each once."""
        plain, secure = request._presented
        given_plain, given_secure = request._sessions
        if secure is None and given_secure is None:  # the usual request: one plain session
            if given_plain is None or given_plain is plain:
                return [] if plain is None else [plain]
            return [given_plain] if plain is None else [plain, given_plain]
        used = []
        for session in (plain, secure, given_plain, given_secure):
            if session is not None and session not in used:
                used.append(session)
        return used

    async def _persist(self, request: Request) -> None:
        """Write what the request changed in its sessions, before responding;
        a write that cannot be made replaces the response (503, 409)."""
        used = self._used_sessions(request)
        if used:
            answer = await self._write_visit(used, request)
            if answer is not None:
                self._answer(request, answer)

    @staticmethod
    def _answer(request: Request, answer: SessionAnswer) -> None:
        """Replace the response with ``answer`` (503, 409: the same bytes the
        middleware sends); it sets no session cookie."""
        request._reset_response()
        request._sessions = _NO_SESSIONS
        request._presented = _NO_SESSIONS
        request.setResponseCode(answer.status)
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        for name, value in answer.headers:
            request.setHeader(name, value)
        request.write(answer.body)

    async def _read_body(self, request: Request, receive: Receive) -> bytes:
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise _ClientGone
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_size:
                raise BadRequest("The request body is too large.", 413)
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    async def _stream(self, request: Request, receive: Receive, send: Send) -> None:
        """Send a ``NOT_DONE_YET`` response as it is written, until finished."""
        wakeup = request._wakeup = asyncio.Event()
        watcher = asyncio.ensure_future(self._watch_disconnect(request, receive))
        # The response ends with its session (see end_stream).
        unbind = [bind(s, partial(end_stream, request)) for s in self._used_sessions(request)]
        try:
            while True:
                if request._disconnected:
                    if getattr(request, "_session_ended", False):
                        if not request._headers_sent:
                            await send(request._start_message(None))
                        body = request._take_chunks()
                        await send({"type": "http.response.body", "body": body})
                        log_access(request)
                    return
                if not request.finished and not request._chunks:
                    await wakeup.wait()
                    wakeup.clear()
                    continue
                if not request._headers_sent:
                    written = request._chunks
                    await self._persist(request)
                    if request._chunks is not written:  # replaced by an error page
                        request.finished = True
                    length = request.sentLength if request.finished else None
                    await send(request._start_message(length))
                body = request._take_chunks()
                await send(
                    {"type": "http.response.body", "body": body, "more_body": not request.finished}
                )
                if request.finished:
                    log_access(request)
                    return
        finally:
            for each in unbind:
                each()
            watcher.cancel()

    @staticmethod
    async def _watch_disconnect(request: Request, receive: Receive) -> None:
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                request._connection_lost()
                return


_REASONS = {
    400: "Bad Request",
    404: "No Such Resource",
    405: "Method Not Allowed",
    413: "Content Too Large",
    414: "URI Too Long",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
}
