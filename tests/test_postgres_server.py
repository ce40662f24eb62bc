"""tests/_postgres.py: the real PostgreSQL server the tests start for themselves
(a fresh data directory, a free loopback port, an unprivileged user, stopped
by PID)."""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any

import pytest
from _postgres import PostgresServer


def _alive(pid: int) -> bool:
    """Whether process ``pid`` exists and is not a zombie."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _uid_of(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Uid:"):
            return int(line.split()[1])
    raise AssertionError(f"no Uid line for {pid}")


def _refused(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return False
    except OSError:
        return True


def _non_loopback_address() -> str | None:
    """An IPv4 address of this machine that is not loopback, if it has one."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        try:
            sock.connect(("192.0.2.123", 9))  # no packet sent: only picks a route
        except OSError:
            return None
        address = str(sock.getsockname()[0])
    return None if address.startswith("127.") or address == "0.0.0.0" else address


def test_server_answers_sql_as_an_unprivileged_user(postgres_server: Any) -> None:
    """The session server answers queries; it runs as a non-root user and
    its data directory is that user's."""
    assert postgres_server.psql("SELECT 40 + 2") == "42"
    assert postgres_server.url("x") == f"postgresql://postgres@127.0.0.1:{postgres_server.port}/x"
    uid = _uid_of(postgres_server.pid)
    assert uid != 0
    assert postgres_server.data_dir.stat().st_uid == uid


def test_create_database_returns_its_url_and_rejects_odd_names(postgres_server: Any) -> None:
    """create_database makes a database the URL names; a name that is not a
    plain identifier is refused before reaching SQL."""
    url = postgres_server.create_database("helper_db_one")
    assert url.endswith(f":{postgres_server.port}/helper_db_one")
    postgres_server.psql("CREATE TABLE t (x int); INSERT INTO t VALUES (7)", "helper_db_one")
    assert postgres_server.psql("SELECT x FROM t", "helper_db_one") == "7"
    with pytest.raises(ValueError, match="identifier"):
        postgres_server.create_database('x"; DROP DATABASE postgres; --')


def test_password_role_needs_its_password(postgres_server: Any) -> None:
    """The password role is refused without a password and with a wrong one,
    let in with the right one; the superuser needs none (trust on loopback)."""
    server = postgres_server
    user = server.password_user
    missing = server.run_psql("SELECT 1", user=user)
    assert missing.returncode != 0 and "no password supplied" in missing.stderr
    wrong = server.run_psql("SELECT 1", user=user, password="not-it")
    assert wrong.returncode != 0 and "password authentication failed" in wrong.stderr
    right = server.run_psql("SELECT current_user", user=user, password=server.password)
    assert (right.returncode, right.stdout.strip()) == (0, user)
    assert f"{user}:{server.password}@" in server.url(user=user)


def test_listens_on_loopback_only_with_its_socket_in_its_own_directory(
    postgres_server: Any,
) -> None:
    """listen_addresses is 127.0.0.1 (a connection to another address of the
    machine is refused) and the unix socket is in the server's temp dir."""
    server = postgres_server
    assert server.psql("SHOW listen_addresses") == "127.0.0.1"
    assert server.psql("SHOW unix_socket_directories") == str(server.socket_dir)
    assert list(server.socket_dir.glob(".s.PGSQL.*"))
    assert not _refused("127.0.0.1", server.port)
    other = _non_loopback_address()
    if other is None:
        pytest.skip("this machine has no non-loopback IPv4 address to try")
    assert _refused(other, server.port)


@pytest.mark.slow
def test_second_server_runs_beside_the_first_on_another_port(postgres_server: Any) -> None:
    """Two servers at once: different ports, different data."""
    with PostgresServer() as second:
        assert second.port != postgres_server.port
        second.psql("CREATE TABLE only_here (x int)")
        assert second.psql("SELECT to_regclass('only_here') IS NOT NULL") == "t"
        assert postgres_server.psql("SELECT to_regclass('only_here') IS NOT NULL") == "f"


@pytest.mark.slow
def test_stop_then_start_keeps_data_and_port() -> None:
    """stop() ends the server (its port refuses), start() brings it back on
    the same port with the committed rows."""
    with PostgresServer() as server:
        server.psql("CREATE TABLE kept (x int); INSERT INTO kept VALUES (1), (2)")
        port, pid = server.port, server.pid
        assert pid is not None
        server.stop()
        assert server.pid is None and not _alive(pid)
        assert _refused("127.0.0.1", port)
        server.start()
        assert server.port == port and server.pid != pid
        assert server.psql("SELECT sum(x) FROM kept") == "3"


@pytest.mark.slow
def test_kill_then_start_recovers_committed_rows() -> None:
    """kill() (SIGKILL of the server and its backends, even with a client
    connected) leaves no process; start() recovers every committed row."""
    with PostgresServer() as server:
        server.psql("CREATE TABLE crash (x int)")
        for value in range(5):
            server.psql(f"INSERT INTO crash VALUES ({value})")
        pid = server.pid
        assert pid is not None
        client = socket.create_connection(("127.0.0.1", server.port))  # a backend to kill
        try:
            server.kill()
            assert not _alive(pid)
            assert server.processes() == []
        finally:
            client.close()
        server.start()
        assert server.psql("SELECT count(*), sum(x) FROM crash") == "5|10"
        assert "database system was interrupted" in server.log


@pytest.mark.slow
def test_close_leaves_no_process_and_no_directory() -> None:
    """After close() (also after a failed test) neither the postmaster nor
    any backend of it runs, and the temporary directory is gone."""
    with pytest.raises(RuntimeError, match="the test failed"), PostgresServer() as server:
        pid = server.pid
        assert pid is not None
        workers = server.processes()
        assert pid in workers and len(workers) > 1  # checkpointer, walwriter...
        root = server.data_dir.parent
        raise RuntimeError("the test failed")
    assert [worker for worker in workers if _alive(worker)] == []
    assert not root.exists()


def test_port_in_use_fails_clearly_and_cleans_up(postgres_server: Any) -> None:
    """A server told to use a port another server holds fails with postgres's
    own log in the error, and leaves no process or directory behind."""
    server = PostgresServer(port=postgres_server.port)
    root = server.data_dir.parent
    with pytest.raises(RuntimeError, match=r"(?s)exited.*could not (create|bind)"), server:
        pass  # pragma: no cover
    assert server.pid is None
    assert not root.exists()
    assert postgres_server.psql("SELECT 1") == "1"
    assert os.path.isdir(postgres_server.data_dir)
