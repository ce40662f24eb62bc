"""Putting the live view where a site serves it: in front of a site's whole
tree (:func:`mount`), or as an ASGI app of its own (:func:`liveview_app`)."""

from __future__ import annotations

from typing import Any

from lapse.web._mounted import MountedResource
from lapse.web.liveview._view import LiveView
from lapse.web.resource import Resource

__all__ = ["liveview_app", "mount"]


class _InFront(Resource):
    """The site's root with the live view in front of it, at one segment."""

    def __init__(self, root: Any, segment: bytes, view: LiveView) -> None:
        super().__init__()
        self.root = root
        self.segment = segment
        self.view = view

    def getChildWithDefault(self, path: bytes, request: Any) -> Any:
        if path == self.segment:
            return self.view
        # Not ours: give the segment back and let the real root traverse.
        request.prepath.pop()
        request.postpath.insert(0, path)
        return self.root

    def render(self, request: Any) -> Any:
        return self.root.render(request)


def mount(site: Any, segment: bytes | str, token: str | None = None) -> LiveView:
    """Serve the live view of ``site`` at ``/<segment>/``, in front of the
    site's own resource tree (which keeps every other path, even if its root
    is a leaf). What ``lapse serve --live-view`` does; returns the view."""
    raw = segment.encode("ascii") if isinstance(segment, str) else segment
    raw = raw.strip(b"/")
    if not raw or b"/" in raw or not all(32 < c < 127 for c in raw) or raw in (b".", b".."):
        raise ValueError(f"{segment!r} is not one path segment (e.g. '_lapse')")
    view = LiveView(site, token=token)
    site.resource = _InFront(site.resource, raw, view)
    return view


def liveview_app(middleware: Any, token: str | None = None) -> MountedResource:
    """The live view of ``middleware``'s sessions (a
    ``lapse.asgi.SessionMiddleware``) as an ASGI app, for a Starlette or
    FastAPI app to mount at a path of its own::

        sessions = SessionMiddleware(app, store=...)
        app.mount("/_lapse", liveview_app(sessions, token=os.environ["LIVEVIEW_TOKEN"]))

    Access is the view's: with ``token``, a bearer token (or the page's
    cookie); without it, loopback clients only. The view is ``.resource``.
    """
    return MountedResource(
        LiveView(middleware, token=token), middleware, redact=frozenset({b"token"})
    )
