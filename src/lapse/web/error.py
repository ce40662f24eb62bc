"""Errors of the web layer.

- :class:`UnsupportedMethod`: a resource has no ``render_<METHOD>``; the site
  answers 405 with an ``Allow`` header.
- :class:`BadRequest`: the request cannot be served as sent (a malformed path,
  say); the site answers with its status (400 unless told otherwise).
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["BadRequest", "UnsupportedMethod"]


class UnsupportedMethod(Exception):
    """The resource does not handle the request's method."""

    def __init__(self, allowedMethods: Sequence[bytes]) -> None:
        super().__init__(allowedMethods)
        self.allowedMethods = tuple(allowedMethods)


class BadRequest(Exception):
    """The request is malformed; ``status`` is what the client is told."""

    def __init__(self, reason: str, status: int = 400) -> None:
        super().__init__(reason)
        self.reason = reason
        self.status = status
