"""The Redis store's own client (lapse.sessions.stores.redis.client) against real
redis-servers (never a mock): pipelining, errors, reconnects, scripts,
timeouts, AUTH/SELECT and TLS.

Tests that stop, restart or freeze (SIGSTOP) a server use one of their own,
by its PID; the others share the session's ``redis_server``.
"""

from __future__ import annotations

import asyncio
import gc
import os
import signal
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from _helpers import aio
from _loops import event_loop_kind, sockets_to  # noqa: F401 (an autouse fixture)
from _redis_server import CountingTransport, RedisServer
from _tls import make_certificates

from lapse.sessions.store import StoreUnavailable
from lapse.sessions.stores.redis import RedisStore
from lapse.sessions.stores.redis.client import (
    RedisClient,
    RedisConnectionError,
    RedisError,
    RedisTimeoutError,
    ReplyError,
    Script,
)


@pytest.fixture
def own() -> Iterator[RedisServer]:
    """A redis-server of this test's own, to stop, restart or freeze."""
    with RedisServer() as running:
        yield running


def client_for(server: RedisServer, **kw: Any) -> RedisClient:
    return RedisClient("127.0.0.1", server.port, **kw)


def count_writes(client: RedisClient) -> CountingTransport:
    conn = client._conn
    assert conn is not None, "connect first"
    counting = CountingTransport(conn.transport)
    conn.transport = counting  # type: ignore[assignment]
    return counting


# -- pipelining ---------------------------------------------------------------------


@aio
async def test_concurrent_commands_go_out_in_one_write_and_each_caller_gets_its_reply(
    redis_server: RedisServer,
) -> None:
    """200 coroutines issuing a command in the same tick cost one write; Redis
    runs them in issue order (INCR numbers them 1..200) and every reply lands
    on the coroutine that asked."""
    client = client_for(redis_server)
    key = f"pipe:{uuid.uuid4().hex}"
    try:
        assert await client.execute("PING") == "PONG"
        counting = count_writes(client)

        async def ask(i: int) -> tuple[int, str]:
            number = await client.execute("INCR", key)
            echoed = await client.execute("ECHO", f"caller-{i}")
            return number, echoed

        results = await asyncio.gather(*(ask(i) for i in range(200)))
        assert [number for number, _ in results] == list(range(1, 201))
        assert [echoed for _, echoed in results] == [f"caller-{i}" for i in range(200)]
        # One write for the 200 INCRs, one for the 200 ECHOs (their callers
        # resume together when the INCR replies arrive).
        assert len(counting.writes) == 2
        assert counting.writes[0].count(b"INCR") == 200
        assert counting.writes[1].count(b"ECHO") == 200
    finally:
        await client.execute("DEL", key)
        await client.aclose()


@aio
async def test_commands_from_different_ticks_are_separate_writes(redis_server: RedisServer) -> None:
    """Pipelining never delays a command: one issued alone is written at once."""
    client = client_for(redis_server)
    try:
        await client.execute("PING")
        counting = count_writes(client)
        for i in range(3):
            assert await client.execute("ECHO", str(i)) == str(i)
        assert len(counting.writes) == 3
    finally:
        await client.aclose()


@aio
async def test_replies_decode_to_python_values(
    redis_server: RedisServer,
    event_loop_kind: str,  # noqa: F811 (the fixture)
) -> None:
    loop_module = type(asyncio.get_running_loop()).__module__
    assert loop_module.startswith("uvloop") == (event_loop_kind == "uvloop")
    client = client_for(redis_server)
    key = f"types:{uuid.uuid4().hex}"
    try:
        assert await client.execute("SET", key, "héllo ✓") == "OK"
        assert await client.execute("GET", key) == "héllo ✓"
        assert await client.execute("GET", key + ":none") is None
        assert await client.execute("STRLEN", key) == len("héllo ✓".encode())
        assert await client.execute("RPUSH", key + ":l", b"a", 2, 3.5) == 3
        assert await client.execute("LRANGE", key + ":l", 0, -1) == ["a", "2", "3.5"]
        seconds, micros = await client.execute("TIME")
        assert abs(int(seconds) + int(micros) / 1e6 - time.time()) < 5
    finally:
        await client.execute("DEL", key, key + ":l")
        await client.aclose()


# -- errors ---------------------------------------------------------------------------


@aio
async def test_an_error_reply_fails_only_its_caller_and_keeps_the_connection(
    redis_server: RedisServer,
) -> None:
    client = client_for(redis_server)
    key = f"err:{uuid.uuid4().hex}"
    try:
        await client.execute("SET", key, "not a number")
        conn = client._conn
        results = await asyncio.gather(
            client.execute("ECHO", "before"),
            client.execute("INCR", key),
            client.execute("NO-SUCH-COMMAND"),
            client.execute("ECHO", "after"),
            return_exceptions=True,
        )
        assert results[0] == "before" and results[3] == "after"
        assert isinstance(results[1], ReplyError) and "not an integer" in str(results[1])
        assert isinstance(results[2], ReplyError) and "unknown command" in str(results[2])
        assert client._conn is conn  # the same connection, still in step
        assert await client.execute("GET", key) == "not a number"
    finally:
        await client.execute("DEL", key)
        await client.aclose()


@aio
async def test_a_caller_that_gave_up_has_its_reply_dropped_without_misaligning_others(
    redis_server: RedisServer,
) -> None:
    """Cancelled callers (timed out by their own asyncio.timeout) are skipped
    when their replies come: everyone else still gets their own reply."""
    client = client_for(redis_server)
    try:
        await client.execute("PING")
        tasks = [asyncio.create_task(client.execute("ECHO", str(i))) for i in range(10)]
        await asyncio.sleep(0)  # all queued, nothing answered yet
        for i in (0, 3, 4, 9):
            tasks[i].cancel()
        done = await asyncio.gather(*tasks, return_exceptions=True)
        for i, result in enumerate(done):
            if i in (0, 3, 4, 9):
                assert isinstance(result, asyncio.CancelledError)
            else:
                assert result == str(i)
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.05):
                await client.execute("BLPOP", f"nothing:{uuid.uuid4().hex}", "0.3")
        assert await client.execute("ECHO", "next") == "next"  # the BLPOP's nil is skipped
    finally:
        await client.aclose()


# -- scripts --------------------------------------------------------------------------


@aio
async def test_evalsha_survives_a_flushed_script_cache(redis_server: RedisServer) -> None:
    """EVALSHA by the locally computed SHA1; on NOSCRIPT (SCRIPT FLUSH, or a
    restarted server) the script runs with EVAL once, which caches it again."""
    client = client_for(redis_server)
    script = Script(f"-- {uuid.uuid4().hex}\nreturn {{KEYS[1], ARGV[1], #ARGV}}")
    try:
        assert await client.execute("SCRIPT", "LOAD", script.source) == script.sha
        assert await client.evalsha(script, ["k"], ["a", 2]) == ["k", "a", 2]
        await client.execute("SCRIPT", "FLUSH")
        assert await client.execute("SCRIPT", "EXISTS", script.sha) == [0]
        results = await asyncio.gather(*(client.evalsha(script, ["k"], [i]) for i in range(5)))
        assert results == [["k", str(i), 1] for i in range(5)]
        assert await client.execute("SCRIPT", "EXISTS", script.sha) == [1]
    finally:
        await client.aclose()


@aio
async def test_a_failing_script_is_a_reply_error_and_not_retried(redis_server: RedisServer) -> None:
    client = client_for(redis_server)
    script = Script(f"-- {uuid.uuid4().hex}\nreturn redis.call('INCR', KEYS[1])")
    key = f"lua:{uuid.uuid4().hex}"
    try:
        await client.execute("SET", key, "text")
        with pytest.raises(ReplyError, match="not an integer"):
            await client.evalsha(script, [key], [])
        assert await client.execute("ECHO", "fine") == "fine"
    finally:
        await client.execute("DEL", key)
        await client.aclose()


# -- lost connections -------------------------------------------------------------------


@aio
async def test_a_killed_server_fails_every_pending_command_at_once_and_a_restart_heals(
    own: RedisServer,
) -> None:
    client = client_for(own, timeout=5.0)
    try:
        await client.execute("PING")
        # Blocked on the server, and queued behind it.
        pending = [
            asyncio.create_task(client.execute("BLPOP", "never", "0")),
            asyncio.create_task(client.execute("ECHO", "queued")),
        ]
        await asyncio.sleep(0.1)
        started = time.monotonic()
        assert own.pid is not None
        os.kill(own.pid, signal.SIGKILL)
        own.stop()  # reaps it
        for task in pending:
            with pytest.raises(RedisConnectionError):
                await task
        assert time.monotonic() - started < 1.0  # at once, not after the 5 s timeout
        assert not client.connected
        with pytest.raises(RedisConnectionError, match="cannot connect"):
            await client.execute("PING")
        own.start()
        assert await client.execute("PING") == "PONG"
    finally:
        await client.aclose()


@aio
async def test_a_restart_between_two_calls_is_invisible(own: RedisServer) -> None:
    """The connection left over from before the restart is broken; a command
    queued on it is retried once on a new connection."""
    client = client_for(own)
    try:
        await client.execute("SET", "k", "v")
        own.stop()
        own.start()  # the loop has not run: the client has not noticed yet
        assert client.connected
        results = await asyncio.gather(*(client.execute("ECHO", str(i)) for i in range(20)))
        assert results == [str(i) for i in range(20)]
        assert await client.execute("GET", "k") is None  # a new, empty server
    finally:
        await client.aclose()


@aio
async def test_nobody_listening_fails_fast_with_a_connection_error() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    client = RedisClient("127.0.0.1", port)
    started = time.monotonic()
    with pytest.raises(RedisConnectionError, match="cannot connect"):
        await client.execute("PING")
    assert time.monotonic() - started < 0.5
    assert not client.connected


@aio
async def test_aclose_fails_pending_commands_and_the_client_reconnects_after(
    redis_server: RedisServer,
) -> None:
    client = client_for(redis_server)
    await client.execute("PING")
    blocked = asyncio.create_task(client.execute("BLPOP", f"never:{uuid.uuid4().hex}", "0"))
    await asyncio.sleep(0.05)
    await client.aclose()
    with pytest.raises(RedisConnectionError):
        await blocked
    await client.aclose()
    assert await client.execute("ECHO", "again") == "again"
    await client.aclose()


def test_a_client_moves_to_a_new_event_loop(redis_server: RedisServer) -> None:
    """A connection made in a finished event loop is dropped, not reused, and
    was closed when that loop shut down: no socket is left open (warnings are
    errors: an unclosed transport or socket would fail this test)."""
    client = client_for(redis_server)
    assert asyncio.run(client.execute("ECHO", "one")) == "one"
    assert asyncio.run(client.execute("ECHO", "two")) == "two"

    async def close() -> None:
        await client.aclose()

    asyncio.run(close())
    gc.collect()  # an unclosed transport or socket reports itself here


@aio
async def test_aclose_while_connecting_closes_that_connection_and_fails_its_callers(
    own: RedisServer,
) -> None:
    """aclose() during a connect (here: the AUTH of a server that is frozen)
    stops the attempt and closes its socket before it returns: the process
    holds no more open files than before, and the waiting caller gets a
    RedisConnectionError, not a hang until the timeout."""
    client = client_for(own, password="pw", timeout=30)
    freeze(own)
    try:
        waiting = asyncio.create_task(client.execute("PING"))
        for _ in range(100):  # until the TCP connection is made (the kernel accepts it)
            await asyncio.sleep(0.01)
            if sockets_to(own.port):
                break
        assert sockets_to(own.port) == 1
        await client.aclose()
        assert sockets_to(own.port) == 0
        with pytest.raises(RedisConnectionError):
            await asyncio.wait_for(waiting, 5)
    finally:
        thaw(own)


# -- timeouts ---------------------------------------------------------------------------


def freeze(server: RedisServer) -> None:
    assert server.pid is not None
    os.kill(server.pid, signal.SIGSTOP)


def thaw(server: RedisServer) -> None:
    assert server.pid is not None
    os.kill(server.pid, signal.SIGCONT)


@aio
async def test_a_frozen_server_times_out_every_pending_command_and_the_client_recovers(
    own: RedisServer,
) -> None:
    """With the server stopped (SIGSTOP), pending commands all fail after
    ``timeout`` (one watchdog per connection, not a timer per command); once
    it runs again, the next command gets a new connection and works."""
    client = client_for(own, timeout=0.3)
    try:
        await client.execute("PING")
        freeze(own)
        try:
            started = time.monotonic()
            results = await asyncio.gather(
                *(client.execute("ECHO", str(i)) for i in range(5)), return_exceptions=True
            )
            elapsed = time.monotonic() - started
            assert all(isinstance(r, RedisTimeoutError) for r in results), results
            assert 0.29 < elapsed < 0.8, elapsed
            assert not client.connected
        finally:
            thaw(own)
        assert await client.execute("ECHO", "back") == "back"
    finally:
        await client.aclose()


@aio
async def test_a_frozen_server_makes_store_loads_unavailable_then_they_work_again(
    own: RedisServer,
) -> None:
    store = RedisStore(own.url, timeout=0.3, prefix="frozen")
    try:
        await store.create("u1", 60, {"a": 1})
        freeze(own)
        try:
            started = time.monotonic()
            results = await asyncio.gather(
                *(store.load("u1") for _ in range(10)), return_exceptions=True
            )
            assert time.monotonic() - started < 0.8
            for result in results:
                assert isinstance(result, StoreUnavailable), result
                assert f"127.0.0.1:{own.port}" in str(result) and "(load)" in str(result)
                assert isinstance(result.__cause__, RedisTimeoutError)
        finally:
            thaw(own)
        loaded = await store.load("u1")
        assert loaded is not None and loaded.decoded() == {"a": 1}
    finally:
        await store.aclose()


@aio
@pytest.mark.slow
async def test_the_timeout_counts_the_server_s_silence_while_commands_wait_not_idle_time(
    redis_server: RedisServer,
) -> None:
    """An idle connection is never timed out, however long it idles; a
    command that takes less than ``timeout`` (a BLPOP held 0.3 s of 0.6)
    right after a long idle spell is answered on the same connection.

    redis-server ends a BLPOP by its own clock, and once, on a loaded
    machine, answered one after 0.19 s of 0.3: such a try shows nothing
    about the server's silence, so the idle spell and the BLPOP are tried
    again (at most three times) until one was held 0.25 s or more."""
    client = client_for(redis_server, timeout=0.6)
    try:
        await client.execute("PING")
        conn = client._conn
        held = []
        for _ in range(3):
            await asyncio.sleep(0.8)  # idle longer than the timeout
            started = time.monotonic()
            assert await client.execute("BLPOP", f"nothing:{uuid.uuid4().hex}", "0.3") is None
            held.append(time.monotonic() - started)
            assert client._conn is conn
            if held[-1] >= 0.25:
                break
        assert held[-1] >= 0.25, held
    finally:
        await client.aclose()


class _StallingProtocol(asyncio.Protocol):
    """A protocol whose data_received holds the event loop (as a slow
    callback of any other connection would), ``seconds`` per call."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def data_received(self, data: bytes) -> None:
        time.sleep(self.seconds)


@aio
async def test_commands_queued_before_the_loop_was_blocked_are_not_timed_out_by_it(
    redis_server: RedisServer,
) -> None:
    """Commands issued just before the event loop is held (a long render)
    for longer than the timeout, and written only after it, are answered:
    the server's silence counts from the write, not from the queueing."""
    client = client_for(redis_server, timeout=0.3)
    try:
        await client.execute("PING")
        conn = client._conn
        waiting = [asyncio.ensure_future(client.execute("ECHO", str(i))) for i in range(5)]
        await asyncio.sleep(0)  # queued: the write is scheduled, not done
        time.sleep(0.6)  # the loop is held twice the timeout
        assert await asyncio.gather(*waiting) == [str(i) for i in range(5)]
        assert client._conn is conn
    finally:
        await client.aclose()


@aio
async def test_a_reply_that_came_while_the_loop_was_held_is_read_not_timed_out(
    redis_server: RedisServer,
) -> None:
    """A command the server answers within the timeout (a BLPOP held 0.3 s
    of 0.5) while another connection's callback holds the loop past that
    timeout: the watchdog, running before the loop has read the socket,
    finds the reply waiting there and lets it be read instead of failing."""
    client = client_for(redis_server, timeout=0.5)
    loop = asyncio.get_running_loop()
    near, far = socket.socketpair()
    transport, _ = await loop.create_connection(lambda: _StallingProtocol(0.6), sock=near)
    try:
        await client.execute("PING")
        conn = client._conn
        waiting = asyncio.ensure_future(client.execute("BLPOP", f"none:{uuid.uuid4().hex}", "0.3"))
        await asyncio.sleep(0.05)  # written
        # From 0.15 s to 0.75 s the loop is held in an I/O callback; the
        # reply arrives at 0.3 s, the watchdog is due at 0.5 s.
        loop.call_later(0.1, far.send, b"x")
        assert await waiting is None
        assert client._conn is conn
    finally:
        transport.close()
        far.close()
        await client.aclose()


@aio
async def test_a_frozen_server_still_times_out_when_the_loop_was_held_too(own: RedisServer) -> None:
    """The watchdog forgives only what the server did send: with the server
    frozen (SIGSTOP) and the loop held past the timeout, pending commands
    still fail, as soon as the loop runs again."""
    client = client_for(own, timeout=0.3)
    loop = asyncio.get_running_loop()
    near, far = socket.socketpair()
    transport, _ = await loop.create_connection(lambda: _StallingProtocol(0.6), sock=near)
    try:
        await client.execute("PING")
        freeze(own)
        try:
            started = time.monotonic()
            waiting = asyncio.ensure_future(client.execute("PING"))
            await asyncio.sleep(0.05)
            loop.call_later(0.05, far.send, b"x")
            with pytest.raises(RedisTimeoutError):
                await waiting
            assert time.monotonic() - started < 1.2
        finally:
            thaw(own)
        assert await client.execute("ECHO", "back") == "back"
    finally:
        transport.close()
        far.close()
        await client.aclose()


@aio
async def test_a_connection_made_while_the_loop_was_held_is_used_not_timed_out(
    redis_server: RedisServer,
) -> None:
    """The first command connects; the loop is held past the timeout while
    the (loopback) connection completes: the command is answered on it."""
    client = client_for(redis_server, timeout=0.3)
    try:
        waiting = asyncio.ensure_future(client.execute("PING"))
        for _ in range(3):
            await asyncio.sleep(0)  # connecting
        time.sleep(0.6)
        assert await waiting == "PONG"
    finally:
        await client.aclose()


@aio
async def test_a_connection_lost_between_connecting_and_the_first_command_fails_it_at_once(
    redis_server: RedisServer,
) -> None:
    """A server may close a connection right after accepting it (one that
    requires client certificates does so just after the TLS handshake): when
    that is seen after the connection was made but before the waiting
    command was queued on it, the command fails with the connection's error
    instead of waiting forever on a connection nothing will answer."""
    client = client_for(redis_server, timeout=0.5)
    made = client._open

    async def made_then_lost(generation: int) -> Any:
        conn = await made(generation)
        conn.fail(RedisConnectionError, "connection lost: certificate required")
        return conn

    client._open = made_then_lost  # type: ignore[method-assign]
    try:
        with pytest.raises(RedisConnectionError, match="certificate required"):
            await asyncio.wait_for(client.execute("PING"), 2)
    finally:
        await client.aclose()


# -- AUTH, SELECT, TLS ----------------------------------------------------------------


@aio
async def test_auth_with_user_and_password_and_select_come_first_on_each_connection() -> None:
    password = "pw-" + uuid.uuid4().hex
    with RedisServer(args=["--requirepass", password]) as locked:
        admin = client_for(locked, password=password)
        await admin.execute("ACL", "SETUSER", "alice", "on", ">alice-pw", "~*", "+@all")
        alice = client_for(locked, username="alice", password="alice-pw", db=3)
        wrong = client_for(locked, username="alice", password="nope")
        anonymous = client_for(locked)
        try:
            assert await alice.execute("ACL", "WHOAMI") == "alice"
            await alice.execute("SET", "where", "db3")
            await admin.execute("SELECT", 3)
            assert await admin.execute("GET", "where") == "db3"
            await alice.aclose()  # a new connection authenticates and selects again
            assert await alice.execute("GET", "where") == "db3"
            with pytest.raises(ReplyError, match="WRONGPASS"):
                await wrong.execute("PING")
            assert "nope" not in repr(wrong)
            with pytest.raises(ReplyError, match="NOAUTH"):
                await anonymous.execute("PING")
        finally:
            for each in (admin, alice, wrong, anonymous):
                await each.aclose()


def test_rediss_urls_speak_tls_and_verify_the_server(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """rediss:// connects with TLS, verifying the certificate against the
    default CAs (here SSL_CERT_FILE names a test CA); a server whose
    certificate is not trusted is unavailable."""
    make_certificates(tmp_path)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        tls_port = probe.getsockname()[1]
    args = [
        "--tls-port", str(tls_port),
        "--tls-cert-file", str(tmp_path / "server.crt"),
        "--tls-key-file", str(tmp_path / "server.key"),
        "--tls-ca-cert-file", str(tmp_path / "ca.crt"),
        "--tls-auth-clients", "no",
    ]  # fmt: skip

    async def scenario(store: RedisStore) -> None:
        try:
            await store.create("u1", 60, {"tls": True})
            loaded = await store.load("u1")
            assert loaded is not None and loaded.decoded() == {"tls": True}
        finally:
            await store.aclose()

    with RedisServer(args=args):
        url = f"rediss://127.0.0.1:{tls_port}/0"
        with pytest.raises(StoreUnavailable, match="CERTIFICATE_VERIFY_FAILED"):
            asyncio.run(scenario(RedisStore(url, prefix="tls")))
        monkeypatch.setenv("SSL_CERT_FILE", str(tmp_path / "ca.crt"))
        asyncio.run(scenario(RedisStore(url, prefix="tls")))


def test_every_client_error_is_a_redis_error() -> None:
    for error in (ReplyError, RedisConnectionError, RedisTimeoutError):
        assert issubclass(error, RedisError)
    with pytest.raises(ValueError):
        RedisClient("h", timeout=0)
