"""``Vary: Cookie`` on every response that depends on the session cookie, so
that a shared cache never gives one visitor's page to another: from a
``Site`` and from the ASGI middleware, merged with a ``Vary`` the page set.

From a ``Site``, a response varies with the cookie when its request named
a session (it presented a session cookie: the page may show that session)
or asked for one (``getSession()``, the only way a page reaches a session).
Through the middleware, every response does: any page may read
``request.session``, and an empty one ("not logged in") is as much the
visitor's as a full one.
"""

from __future__ import annotations

from typing import Any

from _asgi import fetch, uid_cookie
from _helpers import aio
from conftest import Leaf, Response, SessionPage, call, session_cookie
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse
from starlette.responses import Response as StarletteResponse
from starlette.routing import Route

from lapse.asgi import SessionMiddleware, current_session
from lapse.internet.task import Clock
from lapse.web._cookies import vary_on_cookie
from lapse.web.resource import Resource
from lapse.web.server import Site


def vary(response: Response) -> list[bytes]:
    return [value for name, value in response.headers if name.lower() == b"vary"]


class VaryingPage(Resource):
    """A page that sets its own Vary and uses the session."""

    isLeaf = True

    def render_GET(self, request: Any) -> bytes:
        request.setHeader(b"Vary", b"Accept-Encoding")
        request.getSession()
        return b"ok"


def site_with(**children: Resource) -> Site:
    root = Resource()
    for name, child in children.items():
        root.putChild(name.encode(), child)
    return Site(root, reactor=Clock())


def test_site_varies_on_cookie_when_the_request_named_or_got_a_session() -> None:
    """Site: a page that makes a session, and any page of a request that
    presented a session cookie, say Vary: Cookie; a page without either
    does not; the page's own Vary is extended, not repeated."""
    site = site_with(session=SessionPage(), plain=Leaf(), varying=VaryingPage())
    made = call(site, path=b"/session")
    assert vary(made) == [b"Cookie"]
    uid = made.cookie_value(b"lapse_session")
    assert uid is not None
    assert vary(call(site, path=b"/plain")) == []
    assert vary(call(site, path=b"/plain", cookies=session_cookie(uid.decode()))) == [b"Cookie"]
    assert vary(call(site, path=b"/varying")) == [b"Accept-Encoding, Cookie"]


def test_vary_merge_keeps_one_cookie_token() -> None:
    """An existing Vary that names Cookie (any case) or * is kept as is; an
    empty one becomes Cookie; other headers are untouched."""
    assert vary_on_cookie([(b"Vary", b"accept, COOKIE")]) == [(b"Vary", b"accept, COOKIE")]
    assert vary_on_cookie([(b"vary", b"*")]) == [(b"vary", b"*")]
    assert vary_on_cookie([(b"x", b"1"), (b"vary", b"")]) == [(b"x", b"1"), (b"vary", b"Cookie")]
    assert vary_on_cookie([(b"x", b"1")]) == [(b"x", b"1"), (b"vary", b"Cookie")]


def middleware_app() -> SessionMiddleware:
    async def plain(request: Request) -> StarletteResponse:
        return PlainTextResponse("plain")

    async def anonymous(request: Request) -> StarletteResponse:
        who = "someone" if current_session(request) else "nobody"
        return PlainTextResponse(who, headers={"Vary": "Accept-Encoding"})

    async def reads(request: Request) -> StarletteResponse:
        return PlainTextResponse(str(request.session.get("n")))

    async def as_json(request: Request) -> StarletteResponse:
        return JSONResponse({"session": request.session})

    async def writes(request: Request) -> StarletteResponse:
        request.session["n"] = 1
        return PlainTextResponse("ok", headers={"Vary": "Cookie"})

    app = Starlette(
        routes=[
            Route("/plain", plain),
            Route("/anonymous", anonymous),
            Route("/reads", reads),
            Route("/writes", writes),
            Route("/json", as_json),
        ]
    )
    return SessionMiddleware(app, reactor=Clock())


@aio
async def test_middleware_varies_every_response_on_cookie() -> None:
    """Middleware: every response says Vary: Cookie (any page could read
    request.session, even an empty one, which json.dumps reads without a
    trace), merged with the page's own Vary, never twice."""
    app = middleware_app()
    made = await fetch(app, "/writes")
    assert made.headers.get_list("vary") == ["Cookie"]
    cookie = f"lapse_session={uid_cookie(made)}"
    assert (await fetch(app, "/plain")).headers.get_list("vary") == ["Cookie"]
    assert (await fetch(app, "/plain", cookie=cookie)).headers.get_list("vary") == ["Cookie"]
    anonymous = await fetch(app, "/anonymous")
    assert (anonymous.text, anonymous.headers.get_list("vary")) == (
        "nobody",
        ["Accept-Encoding, Cookie"],
    )
    assert (await fetch(app, "/reads")).headers.get_list("vary") == ["Cookie"]
    assert (await fetch(app, "/json")).headers.get_list("vary") == ["Cookie"]
