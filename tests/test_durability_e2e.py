"""Store durability end to end: real lapse server processes (uvicorn, uvloop)
on a real SQLite file or a real redis-server, stopped by PID.

- A server whose event loop is held past the store timeout by a slow page
  answers every request in flight with a 200, and logs no outage.
- The SQLite file deleted while clients write: no write is acknowledged
  into the deleted file; every write answered 200 after the deletion is
  in the store after a restart.
- A hook slower than its lease runs once across two processes.

The server program is ``_cluster.PROGRAM``; timeouts are short and real.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from _cluster import Cluster, Writer, cookie_uid, wait_until

from lapse.sessions.stores.sqlite import SQLiteStore


@pytest.fixture
def clusters(tmp_path: Path) -> Iterator[Callable[..., Cluster]]:
    """Make clusters in tmp_path; every process they started is stopped."""
    made: list[Cluster] = []

    def make(store: str, **options: Any) -> Cluster:
        options.setdefault("timeout", 60.0)
        cluster = Cluster(tmp_path, store, **options)
        made.append(cluster)
        return cluster

    yield make
    for cluster in made:
        cluster.stop()


@pytest.mark.slow
def test_a_server_holding_its_loop_past_the_store_timeout_answers_every_request(
    clusters: Callable[..., Cluster], shared_store: str, request: pytest.FixtureRequest
) -> None:
    """One page holds the server's event loop 1.5 s (past the store's 1 s
    timeout) while six clients keep writing: every request gets a 200, every
    write is in the store, and the server logs no outage."""
    cluster = clusters(shared_store)
    node = cluster.start("A")
    running = threading.Event()
    running.set()
    writers = [Writer(node, f"w{n}", running) for n in range(6)]
    for writer in writers:
        writer.start()
    time.sleep(0.5)
    held = node.get("/block?s=1.5")
    time.sleep(0.3)
    running.clear()
    for writer in writers:
        writer.join(timeout=10)
    assert held.status == 200
    for writer in writers:
        statuses = [status for _, _, _, status in writer.outcomes]
        assert statuses and set(statuses) == {200}, (
            writer.name_,
            statuses,
            node.server.stderr_text(),
        )
        stored = json.loads(node.get("/get", writer.uid).text)
        assert len(stored) == len(statuses)
    stderr = node.server.stderr_text()
    assert "unavailable" not in stderr and "Traceback" not in stderr, stderr


@pytest.mark.slow
def test_a_sqlite_file_deleted_while_clients_write_loses_no_acknowledged_write(
    clusters: Callable[..., Cluster], tmp_path: Path
) -> None:
    """The store's file is deleted while four clients write: the server
    finds out at its next store call (a request's, answered 503, or its
    expiry loop's), logs an error naming the file, and goes on with a new
    file; after a restart every write answered 200 since the deletion is in
    the store. (Writes before the deletion went with the deleted file.)"""
    db = tmp_path / "sessions.db"
    cluster = clusters("sqlite:///" + str(db))
    node = cluster.start("A")
    running = threading.Event()
    running.set()
    writers = [Writer(node, f"w{n}", running) for n in range(4)]
    for writer in writers:
        writer.start()
    time.sleep(0.5)
    os.unlink(db)
    deleted = time.monotonic()
    time.sleep(1.0)
    running.clear()
    for writer in writers:
        writer.join(timeout=10)

    after = [o for writer in writers for o in writer.outcomes if o[0] > deleted]
    acknowledged = [(uid, key) for _, uid, key, status in after if status == 200]
    refused = [key for _, _, key, status in after if status != 200]
    assert acknowledged, "no write was answered 200 after the deletion"
    stderr = node.server.stderr_text()
    node.server.stop()
    restarted = cluster.start("A again")
    by_session: dict[str, set[str]] = {}
    for uid, key in acknowledged:
        assert uid is not None
        by_session.setdefault(uid, set()).add(key)
    for uid, keys in by_session.items():
        response = restarted.get("/get", uid)
        assert response.status == 200 and cookie_uid(response) is None, response.headers
        missing = keys - set(json.loads(response.text))
        assert not missing, f"{len(missing)} acknowledged writes lost; refused: {len(refused)}"
    errors = [line for line in stderr.splitlines() if str(db) in line and "deleted" in line]
    assert errors and "Traceback" not in stderr, stderr


@pytest.mark.slow
def test_a_hook_slower_than_its_lease_runs_once_across_two_processes(
    clusters: Callable[..., Cluster], shared_store: str, tmp_path: Path
) -> None:
    """Two server processes, a lease of 1 s and a hook that takes 2.5 s: the
    hook starts once and completes once, in one process (its lease renewed
    while it ran), and the other never gets the session."""
    marker = tmp_path / "slow-hook"
    marker.touch()
    cluster = clusters(shared_store, timeout=1.0, marker=marker, lease=1.0, hold=2.5)
    a, b = cluster.start("A"), cluster.start("B")
    response = a.get("/set?k=item&v=kept")
    uid = cookie_uid(response)
    assert uid is not None

    done = wait_until(lambda: cluster.records(uid), 1.0 + 2.5 + 2.0)
    time.sleep(1.5)  # more than a lease after the hook ended
    records = cluster.records(uid, event=None)
    assert [r["event"] for r in records] == ["STARTED", "done"], (records, cluster.stderr())
    assert done and records[0]["pid"] == records[1]["pid"] in {a.pid, b.pid}
    assert {r["attempt"] for r in records} == {1}
    assert records[1]["data"] == {"item": "kept"}
    assert "Traceback" not in cluster.stderr(), cluster.stderr()


def test_the_sqlite_store_url_takes_a_timeout(tmp_path: Path) -> None:
    """``?timeout=`` sets the SQLite store's stall bound, as
    ``LAPSE_SESSION_STORE`` or ``Site(store=...)`` would pass it."""
    store = SQLiteStore.from_url(f"sqlite:///{tmp_path}/s.db?timeout=2.5&busy_timeout=1")
    assert (store.timeout, store.busy_timeout) == (2.5, 1.0)
