"""``LiveView``: the root of the view's resources, and the one gate to them.

Twisted-style traversal: the view's children are the page (``""``) and
``api`` (whose children are the JSON API). Every path under the view first
passes the view's :meth:`LiveView.getChildWithDefault`, which decides access
once for the whole subtree (:mod:`._access`); the bare path (``/_lapse``)
renders the view itself, behind the same gate, as a redirect to the page.
"""

from __future__ import annotations

import secrets
from typing import Any

from lapse.web.liveview._access import Access, view_base
from lapse.web.liveview._api import NOT_FOUND, Api
from lapse.web.liveview._keys import Keys, _shared_secret
from lapse.web.liveview._page import Page
from lapse.web.resource import Resource

__all__ = ["LiveView"]


class LiveView(Resource):
    """The live view of ``site``'s sessions (a ``Site`` or a
    ``lapse.asgi.SessionMiddleware``); see :mod:`lapse.web.liveview`.

    Row ids, cursors and CSRF tokens are sealed under a secret: the one in
    ``LAPSE_LIVEVIEW_SECRET`` (hex, at least 32 bytes; what every worker of
    one server shares), else a random one of this view. A malformed
    ``LAPSE_LIVEVIEW_SECRET``, or a token under 8 characters, is a ValueError.
    """

    refresh_seconds = 3

    def __init__(self, site: Any, token: str | None = None) -> None:
        super().__init__()
        self._keys = Keys(_shared_secret() or secrets.token_bytes(32))
        self._access = Access(token, self._keys)
        self.site = site
        self.token = token
        self.putChild(b"", Page(self))
        self.putChild(b"api", Api(self))
        # The token in a query (?token=) never reaches the site's logs.
        site._log_redact = frozenset(getattr(site, "_log_redact", frozenset()) | {b"token"})

    def getChildWithDefault(self, path: bytes, request: Any) -> Any:
        # The one access check of every path under the view (``path`` is
        # already the last segment of ``request.prepath``).
        refusal = self._access.admit(request, view_base(request.prepath[:-1]))
        if refusal is not None:
            return refusal
        return super().getChildWithDefault(path, request)

    def getChild(self, path: bytes, request: Any) -> Any:
        return NOT_FOUND

    def render(self, request: Any) -> Any:
        """The view's path without its slash: a redirect to the page."""
        base = view_base(request.prepath)
        refusal = self._access.admit(request, base)
        if refusal is not None:
            return refusal.render(request)
        request.setResponseCode(301)
        request.setHeader(b"location", base.encode("utf-8"))
        return b""
