"""The live view's JSON API refuses every malformed parameter with a 400 (or
a 413) and a JSON error, on every store: never a 5xx, never a traceback."""

from __future__ import annotations

import asyncio
import itertools
import logging
from pathlib import Path

import pytest
from _liveview import csrf_of, get_json, make_site
from conftest import call, call_async

from lapse.internet.task import Clock
from lapse.web.liveview import CSRF_COOKIE, LiveView
from lapse.web.resource import Resource
from lapse.web.server import Site

# -- malformed API parameters, on every store -----------------------------------------

_prefixes = itertools.count()

HEX = "0123456789abcdef" * 2
"""32 hex digits: the shape row ids had before they were sealed (now no id)."""

MALFORMED_GETS = [
    # api/sessions?cursor=: only cursors this view gave out
    "api/sessions?cursor=garbage",
    "api/sessions?cursor=%ff",
    "api/sessions?cursor=%ff%fe%00",
    "api/sessions?cursor=%00",
    "api/sessions?cursor=:",
    "api/sessions?cursor=1:",
    "api/sessions?cursor=abc:def",
    "api/sessions?cursor=-1",
    "api/sessions?cursor=0:0",
    "api/sessions?cursor=1:%ff",
    "api/sessions?cursor=nan:x",
    "api/sessions?cursor=inf:x",
    "api/sessions?cursor=1e309:x",
    "api/sessions?cursor=99999999999999999999999999999999:x",
    "api/sessions?cursor=" + "7" * 5000,
    "api/sessions?cursor=%20",
    "api/sessions?cursor=caf%C3%A9",
    "api/sessions?cursor=YQ.0000",
    "api/sessions?cursor=YQ." + "0" * 32,
    "api/sessions?cursor=." + "0" * 32,
    # api/sessions?limit=: 1 to 500
    "api/sessions?limit=abc",
    "api/sessions?limit=-1",
    "api/sessions?limit=0",
    "api/sessions?limit=501",
    "api/sessions?limit=1e3",
    "api/sessions?limit=1.5",
    "api/sessions?limit=99999999999999999999999",
    "api/sessions?limit=" + "9" * 5000,
    "api/sessions?limit=%ff",
    "api/sessions?limit=",
    "api/sessions?limit=0x10",
    "api/sessions?limit=1_0",
    "api/sessions?limit=%D9%A3",
    "api/sessions?limit=+5",
    "api/sessions?limit=%205",
    # api/session?id=: only ids this view gave out
    "api/session?id=%ff",
    "api/session?id=%ff%fe",
    "api/session?id=",
    "api/session",
    "api/session?id=zz",
    "api/session?id=" + HEX[:31],
    "api/session?id=" + HEX + "0",
    "api/session?id=" + "g" * 32,
    "api/session?id=" + HEX.upper(),
    "api/session?id=" + "%00" * 32,
    "api/session?id=" + "a" * 10000,
    "api/session?id=caf%C3%A9" + HEX[:28],
]

MALFORMED_BODIES = [
    b"[1",
    b"[]",
    b'"' + HEX.encode() + b'"',
    b"1",
    b"null",
    b"{}",
    b'{"id": 1}',
    b'{"id": null}',
    b'{"id": ["' + HEX.encode() + b'"]}',
    b'{"id": {"id": "x"}}',
    b'{"id": NaN}',
    b'{"id": 1' + b"0" * 4000 + b"}",
    b'{"id": "zz"}',
    b'{"id": "' + HEX[:31].encode() + b'"}',
    b'{"id": "\\ud800' + HEX[:27].encode() + b'"}',
    b'{"id": "' + HEX.encode() + b'"',
    b"[" * 2000 + b"]" * 2000,
    b'{"a":' * 600 + b"1" + b"}" * 600,
    b"\xff\xfe\xfd",
    b'{"id": "\xc3\x28' + HEX[:30].encode() + b'"}',
    b"\xff\xfe" + '{"id": "x"}'.encode("utf-16-le"),
]

HUGE_BODIES = [
    b"[" * 50000 + b"]" * 50000,
    b'{"id": "' + HEX.encode() + b'", "pad": "' + b"x" * 20000 + b'"}',
    b"x" * 100000,
]


@pytest.fixture(params=["memory", "sqlite", "redis"])
def view_store(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A store URL of each kind, empty."""
    if request.param == "memory":
        return "memory:"
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'view.db'}"
    server = request.getfixturevalue("redis_server")
    return f"{server.url}?prefix=liveview{next(_prefixes)}"


def test_malformed_api_parameters_are_400_on_every_store(
    view_store: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Every malformed parameter of the JSON API (bad, foreign or non-UTF-8
    cursors, a limit that is not 1 to 500, ids the view did not give out,
    POST bodies that are not a JSON object with a string id: not JSON, not
    UTF-8, nested 2000 deep) is a 400 with a JSON error, on every store; a
    body over 4 KiB (nested 50,000 deep, padded) a 413; never a 5xx, never a
    traceback in the log. Well-formed requests still answer 200."""
    assert len(MALFORMED_GETS) + len(MALFORMED_BODIES) + len(HUGE_BODIES) >= 60

    async def main() -> None:
        root = Resource()
        memory = view_store == "memory:"
        site = Site(root, reactor=Clock() if memory else None, store=view_store)
        root.putChild(b"_lapse", LiveView(site))
        root.putChild(b"_other", LiveView(site))
        sessions = [site.makeSession() for _ in range(3)]
        if not memory:
            await site._keeper.persist(sessions)
        try:
            first = await call_async(site, "GET", "/_lapse/api/sessions?limit=1")
            assert first.status == 200
            cursor = get_json(first)["next"]
            again = await call_async(site, "GET", f"/_lapse/api/sessions?limit=2&cursor={cursor}")
            assert again.status == 200 and len(get_json(again)["sessions"]) == 2
            foreign = get_json(await call_async(site, "GET", "/_other/api/sessions?limit=1"))
            nonce, csrf = csrf_of(await call_async(site, "GET", "/_lapse/"))
            gets = [*MALFORMED_GETS, f"api/sessions?cursor={foreign['next']}"]
            for path in gets:
                response = await call_async(site, "GET", "/_lapse/" + path)
                assert response.status == 400, (path, response.status, response.body[:200])
                assert isinstance(get_json(response)["error"], str)
            for body, status in [(b, 400) for b in MALFORMED_BODIES] + [
                (b, 413) for b in HUGE_BODIES
            ]:
                response = await call_async(
                    site,
                    "POST",
                    "/_lapse/api/expire",
                    body=body,
                    headers=[(b"x-lapse-csrf", csrf), (b"content-type", b"application/json")],
                    cookies={CSRF_COOKIE.encode(): nonce},
                )
                assert response.status == status, (body[:60], response.status, response.body)
                assert isinstance(get_json(response)["error"], str)
            # An id this view gave out still answers.
            row_id = get_json(first)["sessions"][0]["id"]
            known = await call_async(site, "GET", f"/_lapse/api/session?id={row_id}")
            assert known.status == 200
            assert all(not s.expired for s in sessions)
        finally:
            if not memory:
                await site._keeper.aclose()

    with caplog.at_level(logging.DEBUG, logger="lapse"):
        asyncio.run(main())
    assert not [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]
    assert "Traceback" not in caplog.text


def test_a_cursor_of_a_scan_the_store_dropped_is_400(clock: Clock) -> None:
    """A cursor this view gave out, of a memory-store scan since dropped (only
    the last few scans stay open), is a 400 saying to start again, not a 500."""
    site, _ = make_site(clock)
    for _ in range(3):
        site.makeSession()
    old = get_json(call(site, "GET", "/_lapse/api/sessions?limit=1"))["next"]
    for _ in range(100):
        call(site, "GET", "/_lapse/api/sessions?limit=1")
    stale = call(site, "GET", f"/_lapse/api/sessions?cursor={old}")
    assert stale.status == 400 and "start again" in get_json(stale)["error"]
