"""Several lapse server processes on one shared session store, end to end.

Every scenario runs real server subprocesses on 127.0.0.1 (free ports),
stopped by PID in teardown, on a real store: a SQLite file in ``tmp_path``
or the real redis-server of the ``redis_server`` fixture (a key prefix of
its own per test). The server program is ``_cluster.PROGRAM``; its durable
hook appends a JSON line per delivery to a file all the processes of a test
share, so the test can count deliveries. Timeouts are short and real.
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from _cluster import Cluster, Node, cookie_uid, new_session, visit, wait_until
from _redis_server import RedisServer

pytestmark = pytest.mark.slow  # real processes and real timeouts, each over a second

TIMEOUT = 1.0
"""sessionTimeout of the test program's sessions, in seconds."""

LEASE = 2.0
"""The keeper's claim lease in the crash test, in seconds."""


@pytest.fixture
def make_cluster(tmp_path: Path, shared_store: str) -> Iterator[Callable[..., Cluster]]:
    """Make a :class:`Cluster` on ``shared_store`` (unless ``store=`` is given);
    every process it started is stopped by PID at teardown."""
    made: list[Cluster] = []

    def make(**options: Any) -> Cluster:
        options.setdefault("store", shared_store)
        options.setdefault("timeout", TIMEOUT)
        cluster = Cluster(tmp_path, **options)
        made.append(cluster)
        return cluster

    yield make
    for cluster in made:
        cluster.stop()


def keep_alive(node: Node, uid: str, duration: float, every: float = 0.5) -> tuple[float, float]:
    """Visit ``/touch`` on ``node`` every ``every`` s for ``duration`` s, checking
    each time that the session is the same. The wall-clock times just before
    and just after the last visit (the deadline is between them + timeout)."""
    end = time.monotonic() + duration
    before = after = time.time()
    while True:
        before = time.time()
        assert visit(node, "/touch", uid).text == uid
        after = time.time()
        if time.monotonic() >= end:
            return before, after
        time.sleep(every)


def sleep_until(wall_time: float) -> None:
    time.sleep(max(0.0, wall_time - time.time()))


def assert_no_tracebacks(cluster: Cluster) -> None:
    assert "Traceback" not in cluster.stderr(), cluster.stderr()


# -- 1. shared sessions --------------------------------------------------------


def test_a_session_is_shared_by_processes_and_its_hook_runs_exactly_once(
    make_cluster: Callable[..., Cluster],
) -> None:
    """A session made through A is the same session through B and C (same uid,
    no new cookie), with A's data; visits to B alone keep it alive past A's
    idea of its timeout; once nobody visits, it expires and the durable hook
    runs exactly once across the three processes, cause "timeout", with the
    final data."""
    cluster = make_cluster()
    a, b, c = cluster.start("A"), cluster.start("B"), cluster.start("C")

    uid = new_session(a)
    assert visit(b, "/touch", uid).text == uid
    assert visit(a, "/set?k=color&v=blue", uid).text == uid
    assert json.loads(visit(b, "/get", uid).text) == {"color": "blue"}
    assert json.loads(visit(c, "/get", uid).text) == {"color": "blue"}

    # Only B sees the visitor, for twice the timeout: A's copy is never touched.
    keep_alive(b, uid, 2 * TIMEOUT)
    assert cluster.records(uid) == [], "the hook ran while the session was in use"
    assert visit(c, "/set?k=step&v=last", uid).text == uid
    before = time.time()
    assert json.loads(visit(b, "/get", uid).text) == {"color": "blue", "step": "last"}
    after = time.time()

    sleep_until(before + TIMEOUT - 0.2)
    assert cluster.records(uid) == [], "the hook ran before the deadline"
    sleep_until(after + TIMEOUT + 1.5)
    done = cluster.records(uid)
    assert len(done) == 1, done
    (record,) = done
    assert record["cause"] == "timeout"
    assert record["attempt"] == 1
    assert record["data"] == {"color": "blue", "step": "last"}
    assert record["pid"] in {a.pid, b.pid, c.pid}
    assert before + TIMEOUT <= record["at"] <= after + TIMEOUT + 1.0, record["at"] - (
        after + TIMEOUT
    )
    # Gone everywhere: the old cookie gets a new session from every process.
    for node in (a, b, c):
        response = node.get("/touch", uid)
        assert response.status == 200
        fresh = cookie_uid(response)
        assert fresh is not None and fresh != uid, (node.name, response.headers)
    assert len(cluster.records(uid, event=None)) == 1
    assert_no_tracebacks(cluster)


# -- 2. notifyOnExpire in another process ----------------------------------------


@pytest.mark.parametrize("claimer", ["any", "B"])
def test_notify_on_expire_runs_once_in_the_process_that_registered_it(
    make_cluster: Callable[..., Cluster], claimer: str
) -> None:
    """A callback registered through A (notifyOnExpire) runs in A, exactly
    once, within ~1 s of the deadline, though only B kept the session alive;
    also when B is the one that claimed the expiry (claimer "B": A is frozen
    with SIGSTOP over the deadline until B's hook has run)."""
    cluster = make_cluster()
    a, b = cluster.start("A"), cluster.start("B")
    uid = new_session(a)
    assert visit(a, "/notify", uid).text == uid

    keep_alive(b, uid, 2 * TIMEOUT)
    assert a.stdout_lines() == [], "A's callback ran while the session was in use"

    if claimer == "B":
        # Freeze A, then touch through B for the last time. A SQLite writer
        # frozen inside a transaction would hold the file's lock: then B's
        # visit stalls, and we thaw A, keep the session alive, and try again.
        frozen = False
        try:
            for _ in range(3):
                a.server.send_signal(signal.SIGSTOP)
                before = time.time()
                try:
                    response = b.get("/touch", uid, timeout=0.3)
                except TimeoutError:
                    response = None
                after = time.time()
                if response is not None and response.status == 200:
                    frozen = True
                    break
                a.server.send_signal(signal.SIGCONT)
                keep_alive(b, uid, 0)
            assert frozen, "could not freeze A outside a store transaction"
            assert response is not None
            assert response.text == uid and cookie_uid(response) is None
            done = wait_until(lambda: cluster.records(uid), TIMEOUT + 2.0)
        finally:
            a.server.send_signal(signal.SIGCONT)
        assert done and done[0]["pid"] == b.pid, done
    else:
        before, after = keep_alive(b, uid, 0)

    # The deadline is between before + TIMEOUT and after + TIMEOUT (wall clock).
    wall_minus_mono = time.time() - time.monotonic()
    line = a.server.wait_for_line(after + TIMEOUT + 1.0 - time.time())
    assert line is not None, f"no NOTIFY from A within 1 s of the deadline\n{cluster.stderr()}"
    assert line.text == f"NOTIFY {uid}"
    printed = line.at + wall_minus_mono
    assert printed >= before + TIMEOUT - 0.05, "A's callback ran before the deadline"
    assert printed <= after + TIMEOUT + 1.0, printed - (after + TIMEOUT)
    # Exactly once: nothing more from A, nothing at all from B.
    time.sleep(1.0)
    assert a.stdout_lines() == []
    assert b.stdout_lines() == []
    done = cluster.records(uid)
    assert len(done) == 1, done
    assert_no_tracebacks(cluster)


# -- 3. kill -9 in the middle of a hook --------------------------------------------


def test_a_hook_killed_midway_is_redelivered_by_another_process_after_the_lease(
    make_cluster: Callable[..., Cluster], tmp_path: Path
) -> None:
    """The process running a session's hook is killed (SIGKILL) in the middle
    of it; after the lease (2 s) the other process claims the session again
    and its hook completes: one completed delivery, attempt 2, the same
    delivery_id as the interrupted one, not before the lease ran out."""
    marker = tmp_path / "hang-in-hook"
    marker.touch()
    cluster = make_cluster(marker=marker, lease=LEASE)
    a, b = cluster.start("A"), cluster.start("B")
    uid = new_session(a, "/set?k=item&v=kept")

    started = wait_until(lambda: cluster.records(uid, "STARTED"), TIMEOUT + 2.0)
    assert len(started) == 1, (started, cluster.stderr())
    (first,) = started
    assert first["attempt"] == 1 and first["cause"] == "timeout"
    victim = cluster.node_by_pid(first["pid"])
    survivor = b if victim is a else a
    os.kill(victim.pid, signal.SIGKILL)
    victim.server.wait(5)
    marker.unlink()

    done = wait_until(lambda: cluster.records(uid), LEASE + 2.0)
    assert len(done) == 1, (done, cluster.stderr())
    (record,) = done
    assert record["pid"] == survivor.pid
    assert record["attempt"] == 2
    assert record["delivery_id"] == first["delivery_id"]
    assert record["cause"] == "timeout"
    assert record["data"] == {"item": "kept"}
    assert record["at"] >= first["at"] + LEASE - 0.1, "redelivered before the lease ran out"
    time.sleep(0.5)
    assert len(cluster.records(uid, event=None)) == 2  # STARTED, then done
    assert survivor.alive()
    assert_no_tracebacks(cluster)


# -- 4. every server down across a deadline -----------------------------------------


def test_a_session_that_ends_while_every_server_is_down_is_delivered_after_restart(
    make_cluster: Callable[..., Cluster],
) -> None:
    """A session's deadline passes while no server runs; a server started
    afterwards on the same store runs its hook within 1.5 s of listening."""
    cluster = make_cluster()
    first = cluster.start("first")
    uid = new_session(first, "/set?k=cart&v=3")
    touched = time.time()
    first.server.stop()
    assert not first.alive()

    sleep_until(touched + 2.0)
    assert cluster.records(uid) == [], "a stopped server ran the hook"
    spawned = time.time()
    cluster.start("second")
    listening = time.time()

    done = wait_until(lambda: cluster.records(uid), 1.5 + 0.5)
    assert len(done) == 1, (done, cluster.stderr())
    (record,) = done
    assert record["cause"] == "timeout"
    assert record["data"] == {"cart": "3"}
    delay = record["at"] - listening
    assert delay <= 1.5, (
        f"delivered {delay:.2f} s after listening ({record['at'] - spawned:.2f} s after spawn)"
    )
    assert_no_tracebacks(cluster)


# -- 5. sessions survive a restart ----------------------------------------------


def test_a_session_and_its_data_survive_a_restart_of_the_only_server(
    make_cluster: Callable[..., Cluster], shared_store: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the store chosen by LAPSE_SESSION_STORE, a session made before a
    SIGTERM restart is the same session after it: same uid, no new cookie,
    data intact; and the restart did not end it (no hook)."""
    monkeypatch.setenv("LAPSE_SESSION_STORE", shared_store)
    cluster = make_cluster(store="-", timeout=60.0)
    before = cluster.start("before")
    uid = new_session(before, "/set?k=name&v=ada")
    visit(before, "/set?k=lang&v=en", uid)
    before.server.stop()
    assert not before.alive()

    after = cluster.start("after")
    assert json.loads(visit(after, "/get", uid).text) == {"lang": "en", "name": "ada"}
    assert visit(after, "/touch", uid).text == uid
    assert cluster.records(uid, event=None) == []
    assert_no_tracebacks(cluster)


# -- 6. an unreachable store --------------------------------------------------------


@pytest.mark.parametrize("outage", ["never-up", "stopped-mid-test"])
def test_an_unreachable_redis_gets_quick_503s_one_log_line_and_recovery(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, outage: str
) -> None:
    """While Redis is unreachable (never started, or stopped after a first
    request), GET /touch answers 503 with Retry-After and a short page within
    1 s, and the outage is logged once for 10 requests, not once each; when
    Redis comes back on the same port, the same process answers 200 again."""
    monkeypatch.setenv("LAPSE_LOG_LEVEL", "INFO")
    redis = RedisServer()
    cluster = Cluster(tmp_path, f"{redis.url}?prefix=outage", TIMEOUT * 30)
    try:
        if outage == "stopped-mid-test":
            redis.start()
        node = cluster.start("A")
        uid = None
        if outage == "stopped-mid-test":
            uid = new_session(node)
            redis.stop()

        retry_after = []
        for _ in range(10):
            started = time.monotonic()
            response = node.get("/touch", uid)
            elapsed = time.monotonic() - started
            assert response.status == 503, (response.status, response.text)
            assert elapsed < 1.0, f"503 took {elapsed:.2f} s"
            retry_after.append(response.header("retry-after"))
            assert 0 < len(response.body) < 1024, response.body
            assert cookie_uid(response) is None
        time.sleep(0.3)
        outage_lines = [
            line for line in node.server.stderr_text().splitlines() if "unavailable" in line
        ]
        assert len(outage_lines) == 1, outage_lines

        redis.start()
        response = node.get("/touch", uid)
        assert response.status == 200, (response.status, response.text, node.server.stderr_text())
        assert node.alive()
        assert_no_tracebacks(cluster)
        # Checked last, so that a failure here means everything else held.
        assert all(retry_after), f"503s without Retry-After: {retry_after}"
    finally:
        cluster.stop()
        redis.close()
