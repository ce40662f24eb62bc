"""A lapse resource served as an ASGI app of its own, to mount in another
framework's app (``app.mount("/_lapse", ...)`` in Starlette or FastAPI): how
the live view and the metrics reach the apps that use the ASGI middleware.

The resource is served by a :class:`~lapse.web.server.Site` of its own (no
sessions of its own: a ``memory:`` store that is never used, whatever
``LAPSE_SESSION_STORE`` says), under the mount point the framework gives in
the scope's ``root_path``, so the resource sees the path it is served at.
"""

from __future__ import annotations

from typing import Any

from lapse.web._host import SessionHost
from lapse.web._types import Receive, Scope, Send
from lapse.web.resource import Resource
from lapse.web.server import Site

__all__ = ["MountedResource"]


def _mount_depth(scope: Scope) -> int:
    """How many leading path segments are the mount point's: those of
    ``root_path`` when ``path`` includes it (as the ASGI spec and Starlette
    have it), else none (a framework that strips it)."""
    root: str = scope.get("root_path", "")
    if not root or not scope["path"].startswith(root):
        return 0
    return len([segment for segment in root.split("/") if segment])


class _Under(Resource):
    """Leads through the mount point's segments to ``target``."""

    def __init__(self, target: Resource) -> None:
        super().__init__()
        self.target = target

    def getChildWithDefault(self, path: bytes, request: Any) -> Any:
        if len(request.prepath) <= _mount_depth(request._scope):
            return self
        request.prepath.pop()
        request.postpath.insert(0, path)
        return self.target

    def render(self, request: Any) -> Any:
        return self.target.render(request)


class MountedResource:
    """An ASGI app serving ``resource`` for the sessions of ``host`` (the
    middleware or site whose sessions it shows): its reactor, and its
    setting for believing proxies (the live view reads the client through
    them). ``redact``: query parameters the access log must not show."""

    def __init__(
        self, resource: Resource, host: SessionHost, *, redact: frozenset[bytes] = frozenset()
    ) -> None:
        self.resource = resource
        self.site = Site(
            _Under(resource),
            reactor=host.reactor,
            store="memory:",
            cookie_name="lapse_mounted_unused",
            trust_proxy_headers=host.trust_proxy_headers,
        )
        self.site._log_redact = redact

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.site(scope, receive, send)

    def __repr__(self) -> str:
        return f"<MountedResource {self.resource!r}>"
