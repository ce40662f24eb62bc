"""lapse.asgi.SessionMiddleware as Starlette users write code: what
Starlette's own tests/middleware/test_session.py does, with lapse's
middleware in place of Starlette's, and ``request.session`` behaving as a
``dict`` in every way a program can see (while writing only what changed)."""

from __future__ import annotations

import asyncio
import copy
import json
import os
import pickle
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
from _asgi import fetch, set_cookies, uid_cookie
from _helpers import aio
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

import lapse
from lapse.asgi import SessionMiddleware, get_session
from lapse.internet.task import Clock

# -- Starlette's session tests, lapse's middleware ---------------------------------


def starlette_test_app(**options: Any) -> SessionMiddleware:
    """The app of Starlette's test_session.py: view, update, clear."""

    async def view_session(request: Request) -> Response:
        return JSONResponse({"session": request.session})

    async def update_session(request: Request) -> Response:
        data = await request.json()
        request.session.update(data)
        return JSONResponse({"session": request.session})

    async def clear_session(request: Request) -> Response:
        request.session.clear()
        return JSONResponse({"session": request.session})

    app = Starlette(
        routes=[
            Route("/view_session", view_session),
            Route("/update_session", update_session, methods=["POST"]),
            Route("/clear_session", clear_session, methods=["POST"]),
        ]
    )
    return SessionMiddleware(app, **options)


def client(app: Any, base: str = "http://testserver") -> httpx.AsyncClient:
    """A client that keeps cookies across requests, as Starlette's TestClient."""
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=base)


def test_starlette_session_round_trip_and_clear(any_store: str) -> None:
    """Starlette's test_session: an empty session is {}; an update is
    answered and kept (JSON responses of request.session); clear empties it;
    on every store."""

    async def scenario() -> None:
        app = starlette_test_app(store=any_store)
        try:
            async with client(app) as http:
                response = await http.get("/view_session")
                assert response.json() == {"session": {}}
                response = await http.post("/update_session", json={"some": "data"})
                assert response.json() == {"session": {"some": "data"}}
                assert "set-cookie" in response.headers
                response = await http.get("/view_session")
                assert response.json() == {"session": {"some": "data"}}
                response = await http.post("/clear_session")
                assert response.json() == {"session": {}}
                response = await http.get("/view_session")
                assert response.json() == {"session": {}}
        finally:
            await app.aclose()

    asyncio.run(scenario())


@aio
async def test_starlette_secure_session_over_https_only() -> None:
    """Starlette's test_secure_session: over https the cookie is Secure and
    the data round-trips; an http request does not send it back."""
    app = starlette_test_app(reactor=Clock())
    async with client(app, "https://testserver") as secure:
        response = await secure.post("/update_session", json={"some": "data"})
        assert response.json() == {"session": {"some": "data"}}
        (cookie,) = set_cookies(response)
        assert cookie.startswith("__Host-lapse_session=") and "Secure" in cookie
        assert (await secure.get("/view_session")).json() == {"session": {"some": "data"}}
    async with client(app) as plain:
        plain.cookies.update(secure.cookies)
        assert (await plain.get("/view_session")).json() == {"session": {}}


@aio
async def test_starlette_invalid_session_cookie_reads_empty() -> None:
    """Starlette's test_invalid_session_cookie: a forged cookie gives {}."""
    app = starlette_test_app(reactor=Clock())
    response = await fetch(app, "/view_session", cookie="lapse_session=invalid")
    assert response.json() == {"session": {}}


# -- request.session is a dict ---------------------------------------------------


def run_in_request(work: Callable[[Any], Any], store: str = "memory:") -> Any:
    """``work(request.session)`` inside one request of a session holding
    a=1, b=2, c=3 (in that order); what it returns, and the session's data
    as the next request reads it."""
    results: list[Any] = []

    async def setup(request: Request) -> Response:
        for key, value in (("a", 1), ("b", 2), ("c", 3)):
            request.session[key] = value
        return JSONResponse({})

    async def act(request: Request) -> Response:
        results.append(work(request.session))
        return JSONResponse({})

    async def show(request: Request) -> Response:
        return JSONResponse({"data": request.session, "order": list(request.session)})

    async def scenario() -> Any:
        app = SessionMiddleware(
            Starlette(routes=[Route("/setup", setup), Route("/act", act), Route("/show", show)]),
            store=store,
            reactor=Clock() if store == "memory:" else None,
        )
        try:
            cookie = f"lapse_session={uid_cookie(await fetch(app, '/setup'))}"
            await fetch(app, "/act", cookie=cookie)
            return results[0], (await fetch(app, "/show", cookie=cookie)).json()
        finally:
            await app.aclose()

    return asyncio.run(scenario())


def test_request_session_is_a_dict_to_json_and_isinstance() -> None:
    """isinstance(request.session, dict); json.dumps (C and pure-Python
    encoders), repr, == and != with dicts and with itself read it as the dict
    it holds."""

    def check(session: Any) -> Any:
        return (
            isinstance(session, dict),
            json.dumps(session),
            json.dumps(session, indent=1),
            repr(session),
            session == {"a": 1, "b": 2, "c": 3},
            {"a": 1, "b": 2, "c": 3} == session,  # noqa: SIM300 - the reflected ==
            session != {"a": 1},
            session == session,
            dict(session),
            {**session},
            sorted(session.items()),
        )

    got, _ = run_in_request(check)
    assert got == (
        True,
        '{"a": 1, "b": 2, "c": 3}',
        '{\n "a": 1,\n "b": 2,\n "c": 3\n}',
        "{'a': 1, 'b': 2, 'c': 3}",
        True,
        True,
        True,
        True,
        {"a": 1, "b": 2, "c": 3},
        {"a": 1, "b": 2, "c": 3},
        [("a", 1), ("b", 2), ("c", 3)],
    )


def test_popitem_removes_the_newest_key_and_saves_that() -> None:
    """popitem() takes the last key inserted, as a dict does, and the next
    request sees exactly that key gone."""
    got, shown = run_in_request(lambda session: (session.popitem(), session.popitem()))
    assert got == (("c", 3), ("b", 2))
    assert shown == {"data": {"a": 1}, "order": ["a"]}


def test_or_and_in_place_or_merge_as_dict_does() -> None:
    """`session | d` and `d | session` are plain dicts; `session |= d` (a
    mapping or pairs) writes through the session and is saved."""

    def merge(session: Any) -> Any:
        left = session | {"c": 30, "d": 4}
        right = {"c": 30, "d": 4} | session
        session |= {"d": 4}
        session |= [("e", 5)]
        return (type(left), left, right, session is session)

    got, shown = run_in_request(merge)
    assert got == (
        dict,
        {"a": 1, "b": 2, "c": 30, "d": 4},
        {"c": 3, "d": 4, "a": 1, "b": 2},
        True,
    )
    assert shown["data"] == {"a": 1, "b": 2, "c": 3, "d": 4, "e": 5}


def test_dict_methods_behave_and_persist() -> None:
    """setdefault, update (mapping, pairs, keywords), pop (with and without
    default), copy (a detached plain dict), fromkeys, copy.copy, deepcopy and
    pickle give what a dict gives; a re-added key goes last; changes persist."""

    def work(session: Any) -> Any:
        snapshot = session.copy()
        snapshot["zzz"] = 0  # changes no session
        out = (
            session.setdefault("a", 100),
            session.setdefault("n", [1]),
            session.pop("b"),
            session.pop("missing", "dflt"),
            type(snapshot),
            type(session).fromkeys(["x"], 0),
            copy.copy(session),
            copy.deepcopy(session),
            pickle.loads(pickle.dumps(session)),
        )
        session.update({"u": 1}, v=2)
        session.update([("w", 3)])
        del session["a"]
        session["a"] = "again"
        return out

    got, shown = run_in_request(work)
    data = {"a": 1, "c": 3, "n": [1]}
    assert got == (1, [1], 2, "dflt", dict, {"x": 0}, data, data, data)
    assert type(got[6]) is dict and type(got[8]) is dict
    assert shown["order"] == ["c", "n", "u", "v", "w", "a"]
    assert shown["data"] == {"c": 3, "n": [1], "u": 1, "v": 2, "w": 3, "a": "again"}


def test_errors_are_a_dicts() -> None:
    """pop of a missing key, popitem of an empty session, a bad update
    sequence raise what a dict raises (and a missing session reads empty)."""
    seen: list[Any] = []

    async def endpoint(request: Request) -> Response:
        session = request.session
        for attempt in (
            lambda: session.pop("nope"),
            session.popitem,
            lambda: session.update([("a", 1, 2)]),
            lambda: session.update([1]),
            lambda: session["nope"],
        ):
            try:
                attempt()
            except (KeyError, ValueError, TypeError) as exc:
                seen.append((type(exc), str(exc)))
        seen.append(json.dumps(session))
        return JSONResponse({})

    asyncio.run(
        fetch(SessionMiddleware(Starlette(routes=[Route("/", endpoint)]), reactor=Clock()), "/")
    )
    assert seen == [
        (KeyError, "'nope'"),
        (KeyError, "'popitem(): dictionary is empty'"),
        (ValueError, "dictionary update sequence element #0 has length 3; 2 is required"),
        (TypeError, "cannot convert dictionary update sequence element #0 to a sequence"),
        (KeyError, "'nope'"),
        "{}",
    ]


@aio
async def test_session_changes_made_elsewhere_show_in_request_session() -> None:
    """The dict follows the session: data written through get_session(), a
    session made by get_session(), and a logout by session.expire() show in
    request.session, to json.dumps too (which reads the dict's storage)."""
    seen: list[str] = []

    async def endpoint(request: Request) -> Response:
        session = request.session
        seen.append(json.dumps(session))
        get_session(request).data["made"] = 1
        seen.append(json.dumps(session))
        get_session(request).expire()
        seen.append(json.dumps(session))
        return JSONResponse({"session": session})

    app = SessionMiddleware(Starlette(routes=[Route("/", endpoint)]), reactor=Clock())
    response = await fetch(app, "/")
    assert seen == ["{}", '{"made": 1}', "{}"]
    assert response.json() == {"session": {}}


def test_only_changed_keys_are_written(shared_store: str) -> None:
    """Two requests of one session in flight at once, each changing its own
    key through request.session (|=, setdefault, popitem): both changes are
    kept, so each request wrote only its own keys."""

    async def scenario() -> None:
        gate = asyncio.Event()

        async def setup(request: Request) -> Response:
            request.session.update(a=1, b=2)
            return JSONResponse({})

        async def first(request: Request) -> Response:
            session = request.session
            session |= {"x": 1}
            await gate.wait()
            return JSONResponse({})

        async def second(request: Request) -> Response:
            request.session.setdefault("y", 2)
            request.session.popitem()  # y, the newest
            request.session.pop("b")
            gate.set()
            return JSONResponse({})

        async def show(request: Request) -> Response:
            return JSONResponse(request.session)

        app = SessionMiddleware(
            Starlette(
                routes=[
                    Route("/setup", setup),
                    Route("/first", first),
                    Route("/second", second),
                    Route("/show", show),
                ]
            ),
            store=shared_store,
        )
        try:
            cookie = f"lapse_session={uid_cookie(await fetch(app, '/setup'))}"
            await asyncio.gather(
                fetch(app, "/first", cookie=cookie), fetch(app, "/second", cookie=cookie)
            )
            assert (await fetch(app, "/show", cookie=cookie)).json() == {"a": 1, "x": 1}
        finally:
            await app.aclose()

    asyncio.run(scenario())


# -- no set-up inside the event loop ---------------------------------------------

FIRST_REQUEST_SCRIPT = """
import asyncio, os, sys, threading
import httpx
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route
from lapse.asgi import SessionMiddleware

async def home(request):
    request.session["n"] = 1
    return PlainTextResponse("ok")

app = Starlette(routes=[Route("/", home)])
app.add_middleware(SessionMiddleware, store=sys.argv[1])
loop_thread = threading.get_ident()
cwd_calls = []
real_getcwd = os.getcwd

def spy_getcwd():
    if threading.get_ident() == loop_thread:
        cwd_calls.append(1)
    return real_getcwd()

async def main():
    before = set(sys.modules)
    os.getcwd = spy_getcwd
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        status = (await client.get("/")).status_code
    os.getcwd = real_getcwd
    new = sorted(m for m in set(sys.modules) - before if m.split(".")[0] in WATCHED)
    print(status, new, len(cwd_calls))
    await app.middleware_stack.app.aclose()

WATCHED = {"lapse", "uvicorn", "sqlite3", "hiredis", "httptools", "asyncpg"}
asyncio.run(main())
"""


def test_first_request_imports_nothing_and_resolves_no_path(any_store: str, tmp_path: Path) -> None:
    """Starlette makes its middleware inside the event loop, at the first
    request: making it there imports no module (not uvicorn through the
    default reactor, not a store's client) and, for an SQLite store given
    by absolute path, asks the OS for no working directory."""
    script = tmp_path / "first.py"
    script.write_text(FIRST_REQUEST_SCRIPT)
    done = subprocess.run(
        [sys.executable, str(script), any_store],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(Path(lapse.__file__).parents[1])},
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split("\n")[0] == "200 [] 0"
