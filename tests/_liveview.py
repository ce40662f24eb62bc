"""The live view on a Site driven in process, for the live view's tests."""

from __future__ import annotations

import json
from typing import Any

from conftest import Response, SessionPage

from lapse.internet.task import Clock
from lapse.sessions import Expiry, Session
from lapse.web.liveview import CSRF_COOKIE, LiveView
from lapse.web.resource import Resource
from lapse.web.server import Site

TOKEN = "s3cret-token-for-tests"


class Short(Session):
    sessionTimeout = 600


def make_site(clock: Clock, token: str | None = None, **kw: Any) -> tuple[Site, list[Expiry]]:
    hooked: list[Expiry] = []
    root = Resource()
    site = Site(root, reactor=clock, on_expire=hooked.append, **kw)
    site.sessionFactory = Short
    root.putChild(b"", SessionPage())
    root.putChild(b"_lapse", LiveView(site, token=token))
    return site, hooked


def get_json(response: Response) -> Any:
    assert response.header(b"content-type") == b"application/json", response.body
    return json.loads(response.body)


def csrf_of(page: Response) -> tuple[bytes, bytes]:
    nonce = page.cookie_value(CSRF_COOKIE.encode())
    assert nonce is not None
    marker = b'name="lapse-csrf" content="'
    start = page.body.index(marker) + len(marker)
    return nonce, page.body[start : page.body.index(b'"', start)]
