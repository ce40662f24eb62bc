"""The resource tree: traversal by path segment, render by method.

A request for ``/a/b`` starts at the site's root resource and walks
``postpath`` one segment at a time with ``getChildWithDefault`` until the
segments run out or a resource says it ``isLeaf``. The resource it stops at
renders: ``render`` calls ``render_<METHOD>`` (``render_GET``...), HEAD falls
back to GET, and a method with no handler raises :class:`UnsupportedMethod`
(405 with ``Allow``). An unknown child is a :class:`NoResource` (404).
"""

from __future__ import annotations

import html
from typing import TYPE_CHECKING, Any

from zope.interface import Attribute, Interface, implementer

from lapse.web.error import UnsupportedMethod

if TYPE_CHECKING:
    from lapse.web._request import Request

__all__ = [
    "ErrorPage",
    "ForbiddenResource",
    "IResource",
    "NoResource",
    "Resource",
    "getChildForRequest",
]


class IResource(Interface):  # type: ignore[misc]
    """A web resource: something that has children and renders."""

    isLeaf = Attribute("True if this resource takes the rest of the path itself.")

    def getChildWithDefault(name: bytes, request: Any) -> Any:
        """The child called ``name``."""

    def putChild(path: bytes | str, child: Any) -> None:
        """Add a static child."""

    def render(request: Any) -> Any:
        """Render a response: str, bytes, NOT_DONE_YET or an awaitable of one."""


def _as_segment(path: bytes | str) -> bytes:
    if isinstance(path, bytes):
        return path
    if isinstance(path, str):
        return path.encode("utf-8")
    raise TypeError(f"a child path is str or bytes, not {type(path).__name__}")


def _allowed_methods(resource: object) -> list[bytes]:
    methods = sorted(name[len("render_") :] for name in dir(resource) if name.startswith("render_"))
    if "GET" in methods and "HEAD" not in methods:
        methods.append("HEAD")
    return [m.encode("ascii") for m in methods]


_RENDER_NAMES = {
    m: "render_" + m.decode("ascii")
    for m in (b"GET", b"HEAD", b"POST", b"PUT", b"DELETE", b"OPTIONS", b"PATCH")
}


@implementer(IResource)
class Resource:
    """A node in the resource tree. Subclass and define ``render_GET`` & co."""

    isLeaf: bool = False
    server: Any = None

    def __init__(self) -> None:
        self.children: dict[bytes, Any] = {}

    def putChild(self, path: bytes | str, child: Any) -> None:
        """Serve ``child`` at the segment ``path`` (str is encoded as UTF-8)."""
        self.children[_as_segment(path)] = child
        child.server = self.server

    def getChild(self, path: bytes, request: Request) -> Any:
        """A child that is not static: by default, none (404)."""
        return NoResource()

    def getChildWithDefault(self, path: bytes, request: Request) -> Any:
        """The static child ``path`` if there is one, else ``getChild``."""
        children = self.__dict__.get("children")
        if children is not None and path in children:
            return children[path]
        return self.getChild(path, request)

    def getChildForRequest(self, request: Request) -> Any:
        """Walk the request's ``postpath`` from here to the resource to render."""
        return getChildForRequest(self, request)

    def listStaticNames(self) -> list[bytes]:
        """The segments of the static children."""
        return list(self.__dict__.get("children", {}))

    def render(self, request: Request) -> Any:
        """Call ``render_<METHOD>``; HEAD uses GET; else :class:`UnsupportedMethod`."""
        name = _RENDER_NAMES.get(request.method)
        if name is None:
            name = "render_" + request.method.decode("ascii", "replace")
        handler = getattr(self, name, None)
        if handler is None and name == "render_HEAD":
            handler = getattr(self, "render_GET", None)
        if handler is None:
            allowed = getattr(self, "allowedMethods", None)
            raise UnsupportedMethod(allowed if allowed is not None else _allowed_methods(self))
        return handler(request)


def getChildForRequest(resource: Any, request: Request) -> Any:
    """Traverse from ``resource`` along ``request.postpath`` to a leaf."""
    postpath = request.postpath
    prepath = request.prepath
    while postpath and not resource.isLeaf:
        segment = postpath.pop(0)
        prepath.append(segment)
        resource = resource.getChildWithDefault(segment, request)
    return resource


class ErrorPage(Resource):
    """A leaf that answers every method with ``code`` and a short HTML page."""

    isLeaf = True

    def __init__(self, status: int, brief: str, detail: str) -> None:
        super().__init__()
        self.code = status
        self.brief = brief
        self.detail = detail

    def render(self, request: Request) -> bytes:
        request.setResponseCode(self.code)
        request.setHeader(b"content-type", b"text/html; charset=utf-8")
        brief = html.escape(self.brief)
        page = (
            f"<!DOCTYPE html>\n<html><head><title>{self.code} - {brief}</title></head>"
            f"<body><h1>{brief}</h1><p>{html.escape(self.detail)}</p></body></html>\n"
        )
        return page.encode("utf-8")

    def getChild(self, path: bytes, request: Request) -> Any:
        return self

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.code} {self.brief!r}>"


class NoResource(ErrorPage):
    """404: there is nothing at this path."""

    def __init__(self, message: str = "There is nothing at this address.") -> None:
        super().__init__(404, "No Such Resource", message)


class ForbiddenResource(ErrorPage):
    """403: this path may not be visited."""

    def __init__(self, message: str = "You may not visit this address.") -> None:
        super().__init__(403, "Forbidden", message)
