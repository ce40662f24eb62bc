"""The access log: one line per request in the combined log format.

``127.0.0.1 - - [25/Nov/2026:22:47:53 +0000] "GET /logme HTTP/1.1" 200 0 "-" "curl/8.0"``

Written to the ``lapse.access`` logger at INFO. What the client sent is
escaped, so a request cannot forge log lines; the values of the site's
secret query arguments (a live view's ``token``) are redacted.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

from lapse.web._target import redact_query

if TYPE_CHECKING:
    from lapse.web._request import Request

__all__ = ["log_access"]

access_log = logging.getLogger("lapse.access")

_stamp_second = -1
_stamp = ""


def _timestamp(now: float) -> str:
    global _stamp_second, _stamp
    second = int(now)
    if second != _stamp_second:
        _stamp = time.strftime("%d/%b/%Y:%H:%M:%S +0000", time.gmtime(second))
        _stamp_second = second
    return _stamp


_MAX_FIELD = 2048


def _safe(value: bytes | None) -> str:
    if not value:
        return "-"
    if len(value) > _MAX_FIELD:
        value = value[:_MAX_FIELD] + b"..."
    text = value.decode("latin-1").encode("unicode_escape").decode("ascii")
    return text.replace('"', '\\"')


def _referer(request: Request) -> bytes | None:
    referer: bytes | None = request.getHeader(b"referer")
    names: frozenset[bytes] = request.site._log_redact
    if referer is None or not names:
        return referer
    return redact_query(referer, names)


def log_access(request: Request) -> None:
    """Log ``request`` if the access logger is on."""
    if not access_log.isEnabledFor(logging.INFO):
        return
    line = '%s - - [%s] "%s %s %s" %d %d "%s" "%s"' % (  # noqa: UP031 - one format, hot path
        request.getClientAddress().host or "-",
        _timestamp(time.time()),
        _safe(request.method),
        _safe(request._uri_for_log()),
        _safe(request.clientproto),
        request.code,
        request.sentLength,
        _safe(_referer(request)),
        _safe(request.getHeader(b"user-agent")),
    )
    access_log.info(line)
