"""The live view's page: ``page.html`` with ``page.css`` and ``page.js``
inlined, package data read once, and the values of one answer filled in.

The page has no external resource: its style and script are inline, allowed
by a per-answer CSP nonce. ``{{page.css}}`` and ``{{page.js}}`` in
``page.html`` are replaced by those files when the page is first read;
``{{nonce}}``, ``{{csrf}}``, ``{{base}}`` and ``{{refresh}}`` are the values
of each answer, HTML-escaped (``refresh`` is a whole number of milliseconds).
"""

from __future__ import annotations

import functools
import re
import secrets
from html import escape
from importlib import resources
from typing import TYPE_CHECKING, Any

from lapse.web.liveview._access import CSRF_COOKIE, view_base
from lapse.web.liveview._api import Endpoint

if TYPE_CHECKING:
    from lapse.web.liveview._view import LiveView

__all__ = ["Page", "PageTemplate", "page_template"]

_INCLUDES = ("page.css", "page.js")
_FIELDS = frozenset({"nonce", "csrf", "base", "refresh"})
_PLACEHOLDER = re.compile(r"\{\{([a-z.]+)\}\}")


class PageTemplate:
    """A text with ``{{name}}`` fields, split once, filled per answer."""

    def __init__(self, text: str) -> None:
        parts = _PLACEHOLDER.split(text)
        names = set(parts[1::2])
        if names != _FIELDS:
            raise ValueError(f"the live view's page has fields {sorted(names)}, not {_FIELDS}")
        self._parts = parts

    def fill(self, nonce: str, csrf: str, base: str, refresh_ms: int) -> str:
        values = {
            "nonce": escape(nonce),
            "csrf": escape(csrf),
            "base": escape(base),
            "refresh": str(int(refresh_ms)),
        }
        parts = self._parts
        return "".join(part if i % 2 == 0 else values[part] for i, part in enumerate(parts))


@functools.cache
def page_template() -> PageTemplate:
    """The page, read from the package's data once."""
    folder = resources.files(__package__)
    text = folder.joinpath("page.html").read_text(encoding="utf-8")
    for name in _INCLUDES:
        text = text.replace("{{" + name + "}}", folder.joinpath(name).read_text(encoding="utf-8"))
    return PageTemplate(text)


class Page(Endpoint):
    """The page, at the view's own path (``/_lapse/``)."""

    def __init__(self, view: LiveView) -> None:
        super().__init__(view)

    def render_GET(self, request: Any) -> bytes:
        base = view_base(request.prepath[:-1])
        nonce_cookie = request.getCookie(CSRF_COOKIE.encode())
        nonce = nonce_cookie.decode("latin-1") if nonce_cookie else ""
        if not nonce or len(nonce) > 64 or not nonce.isalnum():
            nonce = secrets.token_hex(16)
            request.addCookie(
                CSRF_COOKIE,
                nonce,
                path=base,
                httpOnly=True,
                sameSite="strict",
                secure=request.isSecure() or None,
            )
        script_nonce = secrets.token_urlsafe(16)
        request.setHeader(b"content-type", b"text/html; charset=utf-8")
        request.setHeader(
            b"content-security-policy",
            (
                f"default-src 'none'; script-src 'nonce-{script_nonce}'; "
                f"style-src 'nonce-{script_nonce}'; connect-src 'self'; img-src 'self' data:; "
                "frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
            ).encode("ascii"),
        )
        page = page_template().fill(
            nonce=script_nonce,
            csrf=self.view._keys.csrf_for(nonce),
            base=base,
            refresh_ms=int(self.view.refresh_seconds * 1000),
        )
        return page.encode("utf-8")
