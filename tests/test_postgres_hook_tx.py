"""The expiry hook inside the application's transaction, on PostgreSQL:
exactly once across a crash.

Two real lapse processes on one PostgreSQL database; their hook writes a row
to the application's own table ``ended_sessions``. The process running the
hook is killed with SIGKILL in the middle of it; the other delivers the
session again once the lease runs out (same ``delivery_id``, attempt 2).

- ``plain``: the hook's write commits on its own (autocommit), as any hook
  written without the store's help: the killed attempt's row stays, so the
  table ends with two rows for one session (at least once).
- ``transaction``: the write and ``store.acknowledge(conn, expiry)`` share
  one transaction (the README's example): the killed attempt's transaction
  is rolled back by the server, so the table ends with exactly one row.
"""

from __future__ import annotations

import itertools
import os
import signal
from pathlib import Path
from typing import Any

import pytest
from _cluster import hook_records, wait_until
from _examples import run_example, session_cookie
from _servers import ServerProcess, free_port, request, wait_for_port

_databases = itertools.count()

PROGRAM = r"""
import asyncio
import json
import os
import sys
import time

import asyncpg

from lapse.internet import reactor
from lapse.sessions.stores.postgres import PostgresStore
from lapse.web.resource import Resource
from lapse.web.server import Session, Site

port, url, mode, hook_path, marker = sys.argv[1:6]
database = url.partition("?")[0]
store = PostgresStore.from_url(url)
pool = None


class ShortSession(Session):
    sessionTimeout = 1.0


def append(record):
    with open(hook_path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())


async def pause(expiry):
    if os.path.exists(marker):
        record = {"uid": expiry.uid, "delivery_id": expiry.delivery_id}
        append({**record, "attempt": expiry.attempt, "pid": os.getpid(), "event": "STARTED"})
        await asyncio.sleep(30)


async def on_expire(expiry):
    global pool
    if pool is None:
        pool = await asyncpg.create_pool(database, min_size=1, max_size=2)
    async with pool.acquire() as conn:
        row = (expiry.delivery_id, expiry.uid, expiry.attempt, os.getpid())
        insert = "INSERT INTO ended_sessions VALUES ($1, $2, $3, $4)"
        if mode == "transaction":
            async with conn.transaction():
                await conn.execute(insert, *row)
                await pause(expiry)
                await store.acknowledge(conn, expiry)
        else:
            await conn.execute(insert, *row)
            await pause(expiry)
    record = {"uid": expiry.uid, "delivery_id": expiry.delivery_id, "attempt": expiry.attempt}
    append({**record, "pid": os.getpid(), "event": "done"})


class Touch(Resource):
    isLeaf = True

    def render_GET(self, request):
        return request.getSession().uid


root = Resource()
root.putChild(b"touch", Touch())
site = Site(root, store=store, on_expire=on_expire)
site.sessionFactory = ShortSession
site._keeper.lease = 1.0
reactor.listenTCP(int(port), site, interface="127.0.0.1")
reactor.run()
"""


@pytest.mark.parametrize(("mode", "rows"), [("plain", 2), ("transaction", 1)])
def test_a_hook_killed_mid_way_writes_once_only_inside_the_transaction(
    mode: str, rows: int, postgres_server: Any, tmp_path: Path
) -> None:
    """SIGKILL of the process in the middle of its hook: the other process
    delivers the session again (same delivery_id, attempt 2); the
    application's table holds the killed attempt's row too when the hook
    wrote on its own (two rows), and only the second delivery's when the
    write and the acknowledgement shared a transaction (exactly one)."""
    name = f"hooktx{next(_databases)}_{os.getpid()}"
    url = postgres_server.create_database(name)
    postgres_server.psql(
        "CREATE TABLE ended_sessions (delivery_id text, uid text, attempt int, pid int)", name
    )
    script = tmp_path / "hook_node.py"
    script.write_text(PROGRAM, encoding="utf-8")
    hook_file, marker = tmp_path / "hook.jsonl", tmp_path / "hold"
    marker.touch()
    nodes: list[tuple[ServerProcess, int]] = []
    try:
        for n in range(2):
            port = free_port()
            args = [str(port), url, mode, str(hook_file), str(marker)]
            server = ServerProcess(script, args=args, stderr_path=tmp_path / f"node{n}.stderr")
            server.start()
            nodes.append((server, port))
            wait_for_port(port, timeout=15.0, proc=server.proc)
        assert request(nodes[0][1], "/touch").status == 200
        started = wait_until(lambda: hook_records(hook_file, event="STARTED"), 10.0)
        assert len(started) == 1, [s.stderr_text() for s, _ in nodes]
        (first,) = started
        assert first["attempt"] == 1
        marker.unlink()
        os.kill(first["pid"], signal.SIGKILL)
        done = wait_until(lambda: hook_records(hook_file), 10.0)
        assert len(done) == 1, [s.stderr_text() for s, _ in nodes]
        (second,) = done
        assert second["pid"] != first["pid"]
        assert (second["delivery_id"], second["attempt"]) == (first["delivery_id"], 2)
        table = postgres_server.psql("SELECT delivery_id, attempt FROM ended_sessions", name)
        written = [line.split("|") for line in table.splitlines()]
        assert len(written) == rows, written
        assert {delivery for delivery, _ in written} == {first["delivery_id"]}
        assert [attempt for _, attempt in written if attempt == "2"] == ["2"]
    finally:
        for server, _ in nodes:
            server.stop()


def test_the_readme_example_records_each_ended_session_once(
    postgres_server: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """examples/postgres_hook.py (the README's example) on a real database:
    two visits, the session ends after its 5 s, and the application's table
    holds one row with the visit count; the session is gone from the store."""
    name = f"example{next(_databases)}_{os.getpid()}"
    url = postgres_server.create_database(name)
    monkeypatch.setenv("LAPSE_SESSION_STORE", url)
    with run_example("postgres_hook.py", tmp_path) as (server, port):
        first = request(port, "/")
        uid = session_cookie(first)
        second = request(port, "/", headers={"Cookie": f"lapse_session={uid}"})
        assert (first.text, second.text) == ("visits: 1", "visits: 2")
        line = server.wait_for_line(10.0)
        assert line is not None, server.stderr_text()
        assert line.text == f"Session {uid} ended after 2 visits."
    rows = postgres_server.psql("SELECT uid, visits FROM ended_sessions", name)
    assert rows == f"{uid}|2"
    assert postgres_server.psql("SELECT count(*) FROM lapse_sessions", name) == "0"
