"""lapse server processes on a real PostgreSQL, end to end.

Real lapse processes (the seed program unchanged, and ``_cluster.PROGRAM``
with its durable hook writing one JSON line per delivery) on the suite's own
PostgreSQL (tests/_postgres.py), over real loopback sockets:

1. the seed program on ``LAPSE_SESSION_STORE=postgresql://...``: a session
   survives a restart of the server; two processes share its sessions and
   each runs its notifyOnExpire callback once;
2. the database stopped (and started again) while two processes serve
   writers: quick 503s with Retry-After, one log line per process, service
   back by itself, no acknowledged write lost;
3. fifty concurrent requests of one session, each writing its own key,
   through two processes: none lost;
4. hostile cookies and data on a PostgreSQL-backed site.

The hook's once-across-processes delivery, its redelivery after a ``kill -9``
mid-hook (same delivery_id, attempt 2), the catch-up after every server was
down and a restart of the only server are the ``[postgres]`` cases of
tests/test_multiprocess.py. Tests that stop the database start one of their
own; the others use the session's ``postgres_server`` (a schema each).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import quote

import pytest
from _cluster import Cluster, Writer, cookie_uid, new_session, visit, wait_until
from _examples import two_seeds_share_one_session
from _postgres import PostgresServer
from _servers import parse_response, raw_exchange
from conftest import SessionPage, call_async

from lapse.web.server import Site

pytestmark = pytest.mark.slow  # real processes, real timeouts

STORE_TIMEOUT = 0.5
"""The store's ``?timeout=`` in the outage test: a call gives up after 1.5x."""

_schemas = itertools.count()


def schema_url(server: PostgresServer, **options: str) -> str:
    """The test server's URL with a schema of its own (made on first use)."""
    query = {"schema": f"e2e{os.getpid()}x{next(_schemas)}", **options}
    return server.url() + "?" + "&".join(f"{k}={v}" for k, v in query.items())


def assert_clean(*clusters: Cluster) -> None:
    for each in clusters:
        text = each.stderr()
        assert "Traceback" not in text, text


# -- 1. the seed program ------------------------------------------------------------


def test_a_seed_session_survives_a_restart_of_its_server(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, postgres_server: PostgresServer
) -> None:
    """examples/session_endings.py unchanged on LAPSE_SESSION_STORE=postgresql://:
    a session made before the server is stopped (SIGTERM) is the same session
    in the server started after it (200, no new cookie): stopping did not end
    it, and its timeout (5 s) still runs from the last visit: the new process
    prints its expiry once."""
    monkeypatch.setenv("LAPSE_SESSION_STORE", schema_url(postgres_server))
    two_seeds_share_one_session(tmp_path)


# -- 2. the database stopped while requests run -------------------------------------


def test_the_database_stopped_under_load_gives_quick_503s_and_loses_no_write(
    tmp_path: Path, processes: list[Cluster], request: pytest.FixtureRequest
) -> None:
    """Two processes, four clients writing a new key per request, and the
    database stopped (fast shutdown) for 1.5 s, then started again on the
    same port: every answer is a 200 or a 503 with Retry-After, each within
    two store calls' bound (a request loads, then saves: 2 x 1.5 x timeout)
    plus 0.3 s; each process logs the outage once, not per request, and its
    end once; each
    client gets 200s again by itself within 3 s of the start; every write
    answered 200, before, during or after, is in the store afterwards."""
    with PostgresServer() as database:
        cluster = Cluster(tmp_path, schema_url(database, timeout=str(STORE_TIMEOUT)), 60.0)
        processes.append(cluster)
        a, b = cluster.start("A"), cluster.start("B")
        running = threading.Event()
        running.set()
        writers = [Writer(node, f"w{n}", running) for n, node in enumerate([a, b, a, b])]
        for writer in writers:
            writer.start()
        try:
            time.sleep(0.5)
            stopped = time.monotonic()
            database.stop()
            time.sleep(1.5)
            database.start()
            started = time.monotonic()
            back = wait_until(
                lambda: all(
                    any(x.status == 200 and x.sent > started for x in w.answers) for w in writers
                ),
                3.0,
            )
            time.sleep(0.3)
        finally:
            running.clear()
            for writer in writers:
                writer.join(timeout=10)
        assert back, ([w.answers[-3:] for w in writers], cluster.stderr())

        answers = [x for w in writers for x in w.answers]
        assert {x.status for x in answers} <= {200, 503}, cluster.stderr()[-3000:]
        refused = [x for x in answers if x.status == 503]
        assert refused, "no request met the outage"
        assert all(x.retry_after for x in refused), "a 503 without Retry-After"
        worst = max(x.elapsed for x in answers)
        assert worst <= 2 * 1.5 * STORE_TIMEOUT + 0.3, worst
        assert all(x.sent + x.elapsed >= stopped for x in refused), "a 503 before the stop"
        for node in (a, b):
            # "unavailable", then "reachable again": once each.
            lines = [
                "down" if "unavailable" in line else "up"
                for line in node.server.stderr_text().splitlines()
                if "unavailable" in line or "reachable again" in line
            ]
            assert lines == ["down", "up"], (node.name, lines)
        assert a.alive() and b.alive()

        acknowledged: dict[str, set[str]] = {}
        for writer in writers:
            for x in writer.answers:
                if x.status == 200:
                    assert x.uid is not None
                    acknowledged.setdefault(x.uid, set()).add(x.key)
        for uid, keys in acknowledged.items():
            stored = json.loads(visit(b, "/get", uid).text)
            assert not keys - set(stored), f"{len(keys - set(stored))} acknowledged writes lost"
        first_back = min(
            x.sent + x.elapsed for x in answers if x.status == 200 and x.sent > started
        )
        assert_clean(cluster)
        print(
            f"outage: {len(answers)} answers, {len(answers) - len(refused)} x 200, "
            f"{len(refused)} x 503, slowest {worst:.3f} s; first 200 "
            f"{first_back - started:.2f} s after the database started"
        )


# -- 3. concurrent requests of one session ------------------------------------------


def test_fifty_concurrent_writes_of_one_session_through_two_processes_all_persist(
    tmp_path: Path, postgres_server: PostgresServer, processes: list[Cluster]
) -> None:
    """Fifty requests of ONE session, ten at a time on connections of their
    own, alternating between two processes, each setting a different key:
    all are 200, and the session holds all fifty keys afterwards (each save
    writes only its own key: none overwrites another's)."""
    cluster = Cluster(tmp_path, schema_url(postgres_server), 60.0)
    processes.append(cluster)
    nodes = [cluster.start("A"), cluster.start("B")]
    uid = new_session(nodes[0], "/set?k=base&v=0")

    def write(i: int) -> int:
        return nodes[i % 2].get(f"/set?k=c{i}&v={i}", uid, timeout=10.0).status

    with ThreadPoolExecutor(max_workers=10) as pool:
        statuses = list(pool.map(write, range(50)))
    assert statuses == [200] * 50, statuses
    for node in nodes:
        stored = json.loads(visit(node, "/get", uid).text)
        assert stored == {"base": "0", **{f"c{i}": str(i) for i in range(50)}}
    assert_clean(cluster)


# -- 4. hostile input -------------------------------------------------------------------


@pytest.mark.parametrize(
    "cookie",
    [
        "x",
        "A" * 4096,
        "' OR '1'='1",
        "AAAAAAAAAAAAAAAAAAAAAAA'",
        "';DROP TABLE lapse_sessions;--",
        "AAAAAAAAAA--DROP_TABLE_x",
        "%00" * 8,
    ],
    ids=["short", "4KB", "or-1", "quote-24", "drop", "drop-shaped-uid", "escaped-nul"],
)
def test_a_hostile_cookie_on_a_postgres_site_is_a_fresh_session(
    tmp_path: Path, postgres_server: PostgresServer, processes: list[Cluster], cookie: str
) -> None:
    """A cookie that is no live uid (too short, 4 KB, SQL text, a well-formed
    uid spelling SQL) gets a new session, 200, never a 500; the new session
    works and the store's tables are intact."""
    url = schema_url(postgres_server)
    cluster = Cluster(tmp_path, url, 30.0)
    processes.append(cluster)
    node = cluster.start("A")
    response = node.get("/touch", cookie)
    assert response.status == 200, (response.status, response.text, cluster.stderr())
    fresh = cookie_uid(response)
    assert fresh is not None and fresh != cookie
    assert visit(node, "/touch", fresh).text == fresh
    schema = url.rsplit("schema=", 1)[1]
    assert postgres_server.psql(f"SELECT count(*) FROM {schema}.lapse_sessions") == "1"
    assert_clean(cluster)


@pytest.mark.parametrize(
    "value",
    [b"\x00\x00AAAAAAAAAAAAAAAAAAAAAA", b"\xff\xfe\x80AAAAAAAAAAAAAAAAAAAAA", b"A\x00' OR 1=1 --"],
    ids=["nul", "not-utf8", "nul-sql"],
)
def test_a_cookie_with_nul_or_non_utf8_bytes_gets_a_clear_answer(
    tmp_path: Path, postgres_server: PostgresServer, processes: list[Cluster], value: bytes
) -> None:
    """A Cookie header carrying NUL or bytes that are not UTF-8 (sent raw: no
    client library sends them) is refused by the HTTP layer (400) or gets a
    fresh session (200): never a 500, and the process keeps serving."""
    cluster = Cluster(tmp_path, schema_url(postgres_server), 30.0)
    processes.append(cluster)
    node = cluster.start("A")
    raw = (
        b"GET /touch HTTP/1.1\r\nHost: 127.0.0.1\r\nCookie: lapse_session="
        + value
        + b"\r\nConnection: close\r\n\r\n"
    )
    response = parse_response(raw_exchange(node.port, raw, half_close=False))
    assert response.status in (200, 400), (response.status, response.text, cluster.stderr())
    if response.status == 200:
        fresh = cookie_uid(response)
        assert fresh is not None and fresh.encode() != value
    assert node.alive()
    new_session(node)
    assert_clean(cluster)


@pytest.mark.parametrize(
    "value",
    [b"\x00" * 24, b"A\x00' OR 1=1 --"],
    ids=["nul-24", "nul-sql"],
)
def test_a_cookie_postgres_cannot_hold_is_a_fresh_session_not_an_outage(
    postgres_server: PostgresServer,
    caplog: pytest.LogCaptureFixture,
    request: pytest.FixtureRequest,
    value: bytes,
) -> None:
    """Over ASGI from a server that lets NUL through (uvicorn's parser
    refuses it: 400), a cookie with a NUL, which PostgreSQL text cannot
    hold, names no session: a fresh one, 200, and nothing logged: a client
    cannot make the store look down."""

    async def scenario() -> None:
        site = Site(SessionPage(), store=schema_url(postgres_server))
        try:
            response = await call_async(site, cookies={b"lapse_session": value})
            assert response.status == 200, (response.status, response.body)
            fresh = response.cookie_value(b"lapse_session")
            assert fresh is not None and fresh != value
            assert (await call_async(site, cookies={b"lapse_session": fresh})).body == fresh
        finally:
            await site._keeper.aclose()

    with caplog.at_level(logging.WARNING, logger="lapse"):
        asyncio.run(scenario())
    assert [r.getMessage() for r in caplog.records] == []


def test_hostile_session_data_round_trips_through_postgres(
    tmp_path: Path, postgres_server: PostgresServer, processes: list[Cluster]
) -> None:
    """Keys and values a JSON column must not mangle (SQL text, quotes, a NUL
    that jsonb cannot hold, the private-use character the store escapes it
    with, a backslash before u0000) are written by one process and read back
    by another exactly as set."""
    cluster = Cluster(tmp_path, schema_url(postgres_server), 30.0)
    processes.append(cluster)
    a, b = cluster.start("A"), cluster.start("B")
    written = {
        "'; DROP TABLE lapse_sessions; --": "x' OR '1'='1",
        "nul\x00key": "a\x00b",
        "pua\ue000\ue002": "\ue000\ue001",
        "slash": "\\u0000 and \\\x00",
    }
    uid = new_session(a)
    for key, value in written.items():
        visit(a, f"/set?k={quote(key)}&v={quote(value)}", uid)
    assert json.loads(visit(b, "/get", uid).text) == written
    assert_clean(cluster)
