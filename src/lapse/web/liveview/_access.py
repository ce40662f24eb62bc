"""Who may look at the live view, decided once per request for the whole view.

With a token: ``Authorization: Bearer <token>`` ("bearer") or the view's
own cookie, an HMAC of the token ("cookie"); a ``?token=`` query is traded
for that cookie and a redirect. Without a token: loopback clients only
("loopback"), as ``request.getClientAddress()`` says, under a loopback
``Host`` (against DNS rebinding), and not through proxies the site does not
trust to name the client. Refused: 403 with a token, 404 without.

A change (a POST) authenticated by cookie or loopback must also carry the
``X-Lapse-CSRF`` header: the HMAC of the nonce in the view's SameSite=Strict
CSRF cookie, which the page embeds.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
from typing import Any

from lapse.web.liveview._keys import Keys
from lapse.web.resource import Resource

__all__ = [
    "AUTH_COOKIE",
    "CSRF_COOKIE",
    "CSRF_HEADER",
    "Access",
    "Refusal",
    "granted",
    "view_base",
]

AUTH_COOKIE = "lapse_liveview"
CSRF_COOKIE = "lapse_liveview_csrf"
CSRF_HEADER = b"x-lapse-csrf"

_PROXY_MARKS = (
    b"x-forwarded-for",
    b"forwarded",
    b"x-real-ip",
    b"x-forwarded-host",
    b"x-forwarded-proto",
    b"via",
)
"""Headers that say a request came through a proxy."""

_GRANTED = "_lapse_liveview_access"
"""The request attribute holding how the view let the request in."""


def _loopback_host(header: bytes | None) -> bool:
    """Whether a ``Host`` header names this machine's loopback: ``localhost``,
    a name under ``.localhost``, an address in 127.0.0.0/8 or ``[::1]``, with
    or without a port. No header at all passes: browsers always send one."""
    if header is None:
        return True
    text = header.decode("latin-1").strip().lower()
    if text.startswith("["):
        name, bracket, rest = text[1:].partition("]")
        if not bracket or (rest and not (rest[:1] == ":" and rest[1:].isdigit())):
            return False
    else:
        name, colon, port = text.partition(":")
        if colon and not port.isdigit():
            return False
    if name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def view_base(prepath: list[bytes]) -> str:
    """The view's URL path (ending in ``/``) from the segments that lead to it."""
    return "/" + "/".join(p.decode("utf-8", "replace") for p in prepath) + "/"


def granted(request: Any) -> str:
    """How the view let ``request`` in: "bearer", "cookie" or "loopback"."""
    how: str = getattr(request, _GRANTED)
    return how


def secure_headers(request: Any) -> None:
    """The headers of every answer the view gives a request it let in."""
    request.setHeader(b"cache-control", b"no-store")
    request.setHeader(b"x-content-type-options", b"nosniff")
    request.setHeader(b"x-frame-options", b"DENY")
    request.setHeader(b"referrer-policy", b"no-referrer")


class Access:
    """The access rules of one view: its token (or none) and its keys."""

    def __init__(self, token: str | None, keys: Keys) -> None:
        if token is not None and len(token) < 8:
            raise ValueError("a live view token is a secret of at least 8 characters")
        self.token = token
        self.keys = keys
        self.auth_value = (
            None
            if token is None
            else hmac.new(token.encode(), b"lapse-liveview", hashlib.sha256).hexdigest()
        )

    def how(self, request: Any) -> str | None:
        """How ``request`` may look: "bearer", "cookie", "loopback" or None."""
        token = self.token
        if token is None:
            if not _loopback_host(request.getHeader(b"host")):
                return None  # DNS rebinding: a page of another name, resolved to us
            if any(request.getHeader(name) is not None for name in _PROXY_MARKS):
                # Proxied: only the client the site's trusted proxies name counts
                # (a proxy on this machine would otherwise make everyone local).
                said = request._forwarded()
                if said is None or said.client is None:
                    return None
            try:
                host = ipaddress.ip_address(request.getClientAddress().host)
            except ValueError:
                return None
            return "loopback" if host.is_loopback else None
        authorization = request.getHeader(b"authorization") or b""
        scheme, _, presented = authorization.partition(b" ")
        if scheme.lower() == b"bearer" and hmac.compare_digest(
            presented.strip(), token.encode("utf-8")
        ):
            return "bearer"
        cookie = request.getCookie(AUTH_COOKIE.encode())
        assert self.auth_value is not None
        if cookie is not None and hmac.compare_digest(cookie, self.auth_value.encode()):
            return "cookie"
        return None

    def admit(self, request: Any, base: str) -> Resource | None:
        """None if ``request`` may look at the view at ``base`` (recorded for
        :func:`granted`, with the view's headers set); else the
        :class:`Refusal` that answers it."""
        how = self.how(request)
        if how is None:
            return Refusal(self, base)
        setattr(request, _GRANTED, how)
        secure_headers(request)
        return None

    def csrf_ok(self, request: Any) -> bool:
        """Whether ``request`` carries the CSRF token of its CSRF cookie."""
        nonce = request.getCookie(CSRF_COOKIE.encode())
        presented = request.getHeader(CSRF_HEADER)
        if not nonce or not presented:
            return False
        expected = self.keys.csrf_for(nonce.decode("latin-1"))
        return hmac.compare_digest(presented, expected.encode())


class Refusal(Resource):
    """The answer to a request the view does not let in, whatever its path
    and method: the cookie and a redirect for the right ``?token=``, else
    403 (a view with a token) or 404 (a loopback-only view)."""

    isLeaf = True

    def __init__(self, access: Access, base: str) -> None:
        super().__init__()
        self.access = access
        self.base = base

    def render(self, request: Any) -> bytes:
        token = self.access.token
        query_token = request.args.get(b"token", [None])[0] if token else None
        if query_token is not None and hmac.compare_digest(
            query_token, token.encode("utf-8") if token else b""
        ):
            assert self.access.auth_value is not None
            request.addCookie(
                AUTH_COOKIE,
                self.access.auth_value,
                path=self.base,
                httpOnly=True,
                sameSite="strict",
                secure=request.isSecure() or None,
            )
            request.setResponseCode(303)
            request.setHeader(b"location", self.base.encode("utf-8"))
            request.setHeader(b"cache-control", b"no-store")
            request.setHeader(b"referrer-policy", b"no-referrer")
            return b""
        request.setResponseCode(404 if token is None else 403)
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        request.setHeader(b"cache-control", b"no-store")
        return b"Not found.\n" if token is None else b"Forbidden.\n"
