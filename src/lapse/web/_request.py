"""The request a resource sees: Twisted's ``Request`` API over an ASGI scope.

The site fills it before render (body read, cookie sessions touched) and
sends what it holds after render, so everything here is synchronous: a seed
program's ``render_GET`` calls ``request.getSession()`` and returns a string.

Response state (code, headers, cookies, body chunks) stays in the request
until the site sends it; ``write`` after the headers have gone streams.
"""

from __future__ import annotations

import asyncio
from io import BytesIO
from typing import TYPE_CHECKING, Any
from urllib.parse import quote_from_bytes

from lapse.internet.address import IPv4Address, IPv6Address, address_for
from lapse.internet.defer import Deferred
from lapse.internet.error import ConnectionDone
from lapse.sessions import Visit
from lapse.web._cookies import format_set_cookie, parse_cookie_header, vary_on_cookie
from lapse.web._plumbing import _SECURE_SCHEMES, is_secure, session_cookie
from lapse.web._proxy import Forwarded
from lapse.web._target import SEGMENT_SAFE, parse_query, redact_query
from lapse.web.http_headers import Headers, decode_header

if TYPE_CHECKING:
    from lapse.sessions import Session
    from lapse.web._types import Scope
    from lapse.web.server import Site

__all__ = ["NOT_DONE_YET", "Request"]

NOT_DONE_YET = 1
"""Returned by a render method that will finish the request later."""

_PLAIN, _SECURE = 0, 1
_PLAIN_SLOT: tuple[tuple[int, bool], ...] = ((_PLAIN, False),)
_BOTH_SLOTS: tuple[tuple[int, bool], ...] = ((_PLAIN, False), (_SECURE, True))
_NO_BODY_STATUSES = frozenset({204, 304})
_METHODS = {
    m: m.encode("ascii") for m in ("GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "PATCH")
}
_NO_SESSIONS: tuple[None, None] = (None, None)
"""A request's sessions before it has any (lists are made on first use)."""
_UNREAD = Forwarded(None, None)
"""A request's ``_proxy_said`` before its proxy headers are read."""
_PROTOCOLS = {v: b"HTTP/" + v.encode("ascii") for v in ("1.0", "1.1", "2")}
_DEFAULT_CONTENT_TYPE = (b"content-type", b"text/html; charset=utf-8")
_ZERO_LENGTH = (b"content-length", b"0")
_BINARY = (bytes, bytearray, memoryview)
_VARY_COOKIE = (b"vary", b"Cookie")


class Request(Visit):
    """One HTTP request and the response being built for it."""

    # Defaults most requests never change live on the class, so a request
    # costs only what it uses: instance attributes appear when written.
    code = 200
    code_message = b""
    finished = False
    startedWriting = False
    sentLength = 0
    _headers_sent = False
    _disconnected = False
    _wakeup: asyncio.Event | None = None
    _finish_notices: list[Deferred] | None = None
    _body_expected = False
    _cookie_header: bytes | None = None
    _received_cookies: dict[bytes, bytes] | None = None
    _args: dict[bytes, list[bytes]] | None = None
    _secure: bool | None = None
    _proxy_said: Forwarded | None = _UNREAD
    _response_headers: Headers | None = None
    _cookies: list[bytes] | None = None
    _content: BytesIO | None = None
    # Sessions by security, (plain, secure): those named by the request's
    # cookies (touched before render), and those getSession() handed out.
    _presented: list[Session | None] | tuple[None, None] = _NO_SESSIONS
    _sessions: list[Session | None] | tuple[None, None] = _NO_SESSIONS
    # The uids the request's session cookies named, (plain, secure).
    _presented_uids: list[str | None] | tuple[None, None] = _NO_SESSIONS
    # Why the sessions its cookies named could not be loaded (the store
    # is unreachable): getSession() raises it, and the site answers 503.
    _store_failure: Exception | None = None

    def __init__(self, site: Site, scope: Scope) -> None:
        self.site = site
        self._scope = scope
        method: str = scope["method"]
        self.method = _METHODS.get(method) or method.encode("ascii", "replace")
        raw_path: bytes = scope.get("raw_path") or scope["path"].encode("utf-8")
        query: bytes = scope.get("query_string", b"")
        self.path = raw_path
        self.uri = raw_path + b"?" + query if query else raw_path
        version: str = scope.get("http_version", "1.1")
        self.clientproto = _PROTOCOLS.get(version) or b"HTTP/" + version.encode("ascii")
        self.prepath: list[bytes] = []
        self.postpath: list[bytes] = []
        self.sitepath: list[bytes] = []
        self._chunks: list[bytes] = []

    @property
    def responseHeaders(self) -> Headers:
        """The response's headers, as a :class:`Headers`."""
        headers = self._response_headers
        if headers is None:
            headers = self._response_headers = Headers()
        return headers

    @responseHeaders.setter
    def responseHeaders(self, headers: Headers) -> None:
        self._response_headers = headers

    @property
    def cookies(self) -> list[bytes]:
        """The ``Set-Cookie`` values the response will carry (``addCookie``)."""
        cookies = self._cookies
        if cookies is None:
            cookies = self._cookies = []
        return cookies

    @cookies.setter
    def cookies(self, cookies: list[bytes]) -> None:
        self._cookies = cookies

    @property
    def content(self) -> BytesIO:
        """The request body, as a file."""
        content = self._content
        if content is None:
            content = self._content = BytesIO()
        return content

    @content.setter
    def content(self, content: BytesIO) -> None:
        self._content = content

    # -- what was asked ---------------------------------------------------

    @property
    def args(self) -> dict[bytes, list[bytes]]:
        """Query arguments, and form fields of a urlencoded body (bytes)."""
        if self._args is None:
            args = parse_query(self._scope.get("query_string", b""))
            ctype = self.getHeader(b"content-type") or b""
            if ctype.split(b";")[0].strip().lower() == b"application/x-www-form-urlencoded":
                form = parse_query(self.content.getvalue())
                for key, values in form.items():
                    args.setdefault(key, []).extend(values)
            self._args = args
        return self._args

    @property
    def requestHeaders(self) -> Headers:
        """The request's headers as a :class:`Headers`."""
        return Headers(self._scope["headers"])

    def getHeader(self, key: bytes | str) -> Any:
        """The last value of header ``key``: bytes for a bytes key, str for str."""
        if isinstance(key, bytes):
            name = key.lower()
        else:
            try:
                name = key.lower().encode("latin-1")
            except UnicodeEncodeError:
                return None  # no header has that name
        found: bytes | None = None
        for header, value in self._scope["headers"]:
            if header == name:
                found = value
        if found is None or isinstance(key, bytes):
            return found
        return decode_header(found)

    def getAllHeaders(self) -> dict[bytes, bytes]:
        """Every request header, the last value of each name."""
        return dict(self._scope["headers"])

    @property
    def received_cookies(self) -> dict[bytes, bytes]:
        """The cookies the client sent."""
        if self._received_cookies is None:
            header = self._cookie_header
            self._received_cookies = parse_cookie_header(header) if header else {}
        return self._received_cookies

    def getCookie(self, key: bytes | str) -> Any:
        """The value of cookie ``key`` the client sent, or None."""
        name = key if isinstance(key, bytes) else key.encode("utf-8")
        value = self.received_cookies.get(name)
        if value is None or isinstance(key, bytes):
            return value
        return decode_header(value)

    def isSecure(self) -> bool:
        """Whether the request came over TLS (or, if the site trusts it, a TLS proxy)."""
        secure = self._secure
        if secure is None:
            if self._scope.get("scheme") in _SECURE_SCHEMES:
                secure = True
            elif self.site._proxy_trust is None:
                secure = False  # (is_secure's answer, without its two calls)
            else:
                secure = is_secure(self._scope, self._forwarded)
            self._secure = secure
        return secure

    def _forwarded(self) -> Forwarded | None:
        """What the site's trusted proxies say of this request (read once);
        None if the site trusts no proxy headers, or not from this peer."""
        said = self._proxy_said
        if said is _UNREAD:
            site = self.site
            said = None if site._proxy_trust is None else site._proxy_says(self._scope)
            self._proxy_said = said
        return said

    def getClientAddress(self) -> IPv4Address | IPv6Address:
        """The client's address: the socket peer, or what the site's trusted
        proxies put in ``X-Forwarded-For`` (see ``trust_proxy_headers``)."""
        said = self._forwarded()
        if said is not None and said.client is not None:
            return address_for(said.client, 0)
        client = self._scope.get("client") or ("", 0)
        return address_for(client[0], client[1])

    def _uri_for_log(self) -> bytes:
        """The URI as logs show it: the values of the site's secret query
        arguments (a live view's ``token``) redacted."""
        names: frozenset[bytes] = self.site._log_redact
        return redact_query(self.uri, names) if names else self.uri

    def getClientIP(self) -> str:
        """The client's IP address as a string."""
        return self.getClientAddress().host

    def getHost(self) -> IPv4Address | IPv6Address:
        """The server address the request came in on."""
        server = self._scope.get("server") or ("", 0)
        return address_for(server[0], server[1] or 0)

    def getRequestHostname(self) -> bytes:
        """The host the client asked for, without the port."""
        host: bytes | None = self.getHeader(b"host")
        if not host:
            return self.getHost().host.encode("ascii")
        if host.startswith(b"["):
            return host.split(b"]")[0] + b"]"
        return host.rsplit(b":", 1)[0] if host.count(b":") == 1 else host

    def prePathURL(self) -> bytes:
        """The absolute URL of the resource being rendered."""
        scheme = b"https" if self.isSecure() else b"http"
        host = self.getHeader(b"host") or self.getRequestHostname()
        path = b"/".join(quote_from_bytes(p, SEGMENT_SAFE).encode("ascii") for p in self.prepath)
        return scheme + b"://" + host + b"/" + path

    # -- sessions ---------------------------------------------------------

    def getSession(self, sessionInterface: Any = None, forceNotSecure: bool = False) -> Any:
        """This visitor's session: the one its cookie names, else a new one.

        A secure request gets a session of its own, under the site's secure
        cookie; ``forceNotSecure`` asks for the plain one. The same session
        comes back for every call in a request, unless it expired meanwhile.
        With ``sessionInterface``, the session's component for it.
        :class:`~lapse.sessions.StoreUnavailable` if the store could not be
        reached to load the session the cookie names (the site answers 503).
        """
        slot = _SECURE if not forceNotSecure and self.isSecure() else _PLAIN
        session = self._sessions[slot]
        if session is None or session._expired:
            if self._store_failure is not None:
                raise self._store_failure
            session = self._presented[slot]
            if session is None or session._expired:
                session = self.site.makeSession()
            sessions = list(self._sessions)
            sessions[slot] = session
            self._sessions = sessions
        if sessionInterface is not None:
            return session.getComponent(sessionInterface)
        return session

    @property
    def session(self) -> Session | None:
        """The session ``getSession()`` gave for this request's security, if any."""
        session = self._sessions[_SECURE if self.isSecure() else _PLAIN]
        if session is not None and session._expired:
            return None
        return session

    def _session_cookies(self) -> list[bytes]:
        given = self._sessions
        presented = self._presented
        headers: list[bytes] = []
        if given is _NO_SESSIONS and presented is _NO_SESSIONS:
            return headers
        if given[_SECURE] is None and presented[_SECURE] is None:
            slots = _PLAIN_SLOT  # the usual request: a plain session only
        else:
            slots = _BOTH_SLOTS
        for slot, secure in slots:
            session = given[slot] or presented[slot]
            if session is None:
                continue
            name = self.site._cookie_names[slot]
            cookie = session_cookie(name, session, presented[slot], self, secure)
            if cookie is not None:
                headers.append(cookie)
        return headers

    # -- the response -----------------------------------------------------

    def setResponseCode(self, code: int, message: bytes | None = None) -> None:
        """Set the response status."""
        if not isinstance(code, int) or not 100 <= code <= 999:
            raise TypeError(f"a status code is an int from 100 to 999, not {code!r}")
        self.code = code
        if message is not None:
            self.code_message = message

    def setHeader(self, name: bytes | str, value: bytes | str) -> None:
        """Set response header ``name`` to ``value``, replacing earlier values."""
        self.responseHeaders.setRawHeaders(name, [value])

    def addCookie(
        self,
        k: bytes | str,
        v: bytes | str,
        expires: bytes | str | None = None,
        domain: bytes | str | None = None,
        path: bytes | str | None = None,
        max_age: int | str | bytes | None = None,
        comment: bytes | str | None = None,
        secure: bool | None = None,
        httpOnly: bool = False,
        sameSite: str | None = None,
    ) -> None:
        """Send a ``Set-Cookie`` header with the response."""
        self.cookies.append(
            format_set_cookie(
                k,
                v,
                expires=expires,
                domain=domain,
                path=path,
                max_age=max_age,
                comment=comment,
                secure=secure,
                http_only=httpOnly,
                same_site=sameSite,
            )
        )

    def redirect(self, url: bytes | str) -> None:
        """Answer 302 Found, pointing at ``url``."""
        self.setResponseCode(302)
        self.setHeader(b"location", url)

    def write(self, data: bytes | str) -> None:
        """Add ``data`` (str is sent as UTF-8) to the response body."""
        if self.finished:
            raise RuntimeError("Request.write called after Request.finish")
        if self._disconnected:
            return
        if isinstance(data, str):
            data = data.encode("utf-8")
        elif not isinstance(data, _BINARY):
            raise TypeError(f"write takes str or bytes, not {type(data).__name__}")
        self.startedWriting = True
        if data:
            self.sentLength += len(data)
            if self.method != b"HEAD":
                self._chunks.append(bytes(data))
            if self._wakeup is not None:
                self._wakeup.set()

    def finish(self) -> None:
        """End the response."""
        if self._disconnected:
            raise RuntimeError(
                "Request.finish called after the connection was lost; "
                "use Request.notifyFinish to know when that happens"
            )
        if self.finished:
            raise RuntimeError("Request.finish called twice")
        self.finished = True
        if self._wakeup is not None:
            self._wakeup.set()
        notices, self._finish_notices = self._finish_notices, None
        for notice in notices or ():
            notice.callback(None)

    def notifyFinish(self) -> Deferred:
        """A Deferred that fires when the response is finished, or fails with
        :class:`~lapse.internet.error.ConnectionDone` if the client goes first."""
        notice = Deferred()
        if self.finished:
            notice.callback(None)
        elif self._disconnected:
            notice.errback(ConnectionDone("the client closed the connection"))
        elif self._finish_notices is None:
            self._finish_notices = [notice]
        else:
            self._finish_notices.append(notice)
        return notice

    def _connection_lost(self, why: str = "the client closed the connection") -> None:
        """The response can go no further (``why``): later writes are
        dropped, ``notifyFinish()`` fails with ``ConnectionDone(why)``."""
        if self.finished or self._disconnected:
            return
        self._disconnected = True
        if self._wakeup is not None:
            self._wakeup.set()
        notices, self._finish_notices = self._finish_notices, None
        for notice in notices or ():
            notice.errback(ConnectionDone(why))

    def _take_chunks(self) -> bytes:
        chunks, self._chunks = self._chunks, []
        return b"".join(chunks)

    def _reset_response(self) -> None:
        """Forget the response built so far (before an error page)."""
        self._response_headers = None
        self._cookies = None
        self._chunks = []
        self.sentLength = 0
        self.finished = False

    def _start_message(self, content_length: int | None) -> dict[str, Any]:
        """The ASGI message that starts the response."""
        code, headers = self._response_head(content_length)
        return {"type": "http.response.start", "status": code, "headers": headers}

    def _response_head(self, content_length: int | None) -> tuple[int, list[tuple[bytes, bytes]]]:
        """The response's status and headers (``content_length``: the body's,
        None while it streams); from now on, the headers are sent."""
        own = self._response_headers
        if own is None:
            headers: list[tuple[bytes, bytes]] = [_DEFAULT_CONTENT_TYPE]
            has_length = False
        else:
            headers = list(own.items())
            if not own.hasHeader(b"content-type"):
                headers.append(_DEFAULT_CONTENT_TYPE)
            has_length = own.hasHeader(b"content-length")
        code = self.code
        if code in _NO_BODY_STATUSES or code < 200:
            pass
        elif content_length is not None and not has_length:
            headers.append(
                (b"content-length", str(content_length).encode("ascii"))
                if content_length
                else _ZERO_LENGTH
            )
        if self._cookies:
            for cookie in self._cookies:
                headers.append((b"set-cookie", cookie))
        for cookie in self._session_cookies():
            headers.append((b"set-cookie", cookie))
        if self._presented_uids is not _NO_SESSIONS or self._sessions is not _NO_SESSIONS:
            # It named a session or asked for one: the page may show it.
            if own is None or not own.hasHeader(b"vary"):
                headers.append(_VARY_COOKIE)  # (the usual case: no Vary to merge)
            else:
                headers = vary_on_cookie(headers)
        self._headers_sent = True
        return code, headers

    def __repr__(self) -> str:
        uri = self._uri_for_log().decode("latin-1")
        return f"<Request {self.method.decode('latin-1')} {uri} {self.code}>"
