"""Sessions by principal with real processes: examples/fastapi_accounts.py
served by two uvicorn processes on one shared store (two machines' worth),
driven over loopback HTTP.

- a user on three devices across both processes: "your active sessions"
  lists the three from either process; "log out everywhere else" through
  one process signs the others out in both;
- 50 concurrent logins of one user, split over the two processes, with
  ``max_sessions_per_principal=3``: exactly 3 stay signed in.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from _servers import EXAMPLES, REPO_ROOT, Response, ServerProcess, free_port, request, wait_for_port
from conftest import store_url_for

pytestmark = pytest.mark.slow  # real processes

COOKIE = re.compile(r"lapse_session=([A-Za-z0-9_-]{24});")
DELETED = re.compile(r"lapse_session=; Path=/; Max-Age=0;")


@pytest.fixture(params=["sqlite", "redis", "redis-sharded", "redis-cluster", "postgres"])
def shared_store(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh shared store of each kind, with the Redis layouts whose
    principal index spans shards (``shards=4`` on one node; a real 6-node
    Cluster): there the cap is held by a lock, not by one script."""
    kind = request.param
    if kind == "redis-sharded":
        return store_url_for("redis", tmp_path, request) + "&shards=4"
    if kind == "redis-cluster":
        cluster = request.getfixturevalue("redis_cluster")
        return str(cluster.url(prefix=f"p{os.getpid()}x{id(request)}"))
    return store_url_for(kind, tmp_path, request)


@contextlib.contextmanager
def accounts_servers(
    store: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, count: int = 2
) -> Iterator[list[int]]:
    """``count`` processes of examples/fastapi_accounts.py on ``store``; their ports."""
    monkeypatch.setenv("LAPSE_SESSION_STORE", store)
    servers: list[ServerProcess] = []
    ports = []
    try:
        for n in range(count):
            port = free_port()
            server = ServerProcess(
                EXAMPLES / "fastapi_accounts.py",
                args=[str(port)],
                cwd=REPO_ROOT,
                stderr_path=tmp_path / f"stderr{n}",
            )
            servers.append(server.start())
            try:
                wait_for_port(port, timeout=15.0, proc=server.proc)
            except (RuntimeError, TimeoutError) as exc:
                raise RuntimeError(f"{exc}; stderr:\n{server.stderr_text()}") from exc
            ports.append(port)
        yield ports
    finally:
        for server in servers:
            server.stop()


def login(port: int, user: str = "alice", device: str = "phone") -> str:
    """Sign in as ``user`` from ``device``; the new session's uid."""
    uid = login_answer(port, user, device)
    assert uid is not None, "the login's session ended before its answer"
    return uid


def login_answer(port: int, user: str = "alice", device: str = "phone") -> str | None:
    """Sign in as ``user`` from ``device``: answered 200 with the new session's
    cookie (its uid), or with the cookie's deletion (None) when the session was
    superseded by other logins before the answer left."""
    body = json.dumps({"user": user, "password": "wonderland"}).encode()
    headers = {"Content-Type": "application/json", "User-Agent": device}
    response = request(port, "/login", method="POST", body=body, headers=headers, timeout=20)
    assert response.status == 200, response.body
    cookie = response.header("set-cookie") or ""
    match = COOKIE.match(cookie)
    if match is not None:
        return match.group(1)
    assert DELETED.match(cookie), f"a login answered without its cookie: {cookie!r}"
    return None


def sessions(port: int, uid: str) -> Response:
    return request(port, "/sessions", headers={"Cookie": f"lapse_session={uid}"})


def test_three_devices_and_log_out_everywhere_else(
    shared_store: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Three devices signed in through two processes are listed by either
    (newest first, "this one" marked, no uid shown); log out everywhere else
    through process A signs the other two out in both processes."""
    with accounts_servers(shared_store, tmp_path, monkeypatch) as (a, b):
        phone = login(a, device="phone")
        laptop = login(b, device="laptop")
        tablet = login(b, device="tablet")
        listed = json.loads(sessions(a, phone).body)
        assert [row["device"] for row in listed] == ["phone", "tablet", "laptop"]
        assert [row["this_one"] for row in listed] == [True, False, False]
        assert all(laptop not in json.dumps(row) for row in listed)
        assert len(json.loads(sessions(b, tablet).body)) == 3
        ended = request(
            a,
            "/logout-everywhere?keep_this=true",
            method="POST",
            headers={"Cookie": f"lapse_session={phone}"},
        )
        assert json.loads(ended.body) == {"ended": 2}
        for port in (a, b):
            assert sessions(port, laptop).status == 401
            assert sessions(port, tablet).status == 401
            assert sessions(port, phone).status == 200


def test_the_cap_holds_under_50_concurrent_logins_in_two_processes(
    shared_store: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """50 logins of one user at once, half through each process, with at
    most 3 sessions per user: every login is answered 200, with a session
    cookie of its own, or with the cookie's deletion if three later logins
    superseded its session before the answer left (a race the cap allows:
    its session is gone either way); exactly 3 sessions are signed in
    afterwards, all of logins answered with their cookie, as both processes
    and the listing agree."""
    with accounts_servers(shared_store, tmp_path, monkeypatch) as ports:
        with ThreadPoolExecutor(max_workers=25) as pool:
            answers = list(
                pool.map(lambda n: login_answer(ports[n % 2], device=f"device-{n}"), range(50))
            )
        uids = [uid for uid in answers if uid is not None]
        assert len(set(uids)) == len(uids) >= 3
        signed_in = [uid for uid in uids if sessions(ports[0], uid).status == 200]
        assert len(signed_in) == 3
        for port in ports:
            listed = json.loads(sessions(port, signed_in[0]).body)
            assert len(listed) == 3
