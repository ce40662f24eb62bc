"""A small asyncio Redis client: one auto-pipelined connection per client.

Made for the Redis session store, whose every operation is one command, so
the cost that matters is the client's own per call. Design:

- **One connection, auto-pipelined.** Commands issued by any number of
  coroutines in the same event-loop tick are encoded (RESP arrays, by
  ``hiredis.pack_command``) into one buffer and written with one
  ``transport.write`` (the flush is scheduled with ``loop.call_soon`` once a
  tick). Redis answers in order, so replies (parsed by ``hiredis.Reader``)
  are matched first in, first out to the callers' futures. A caller that gave
  up (its future was cancelled) simply has its reply dropped when it comes:
  the alignment of the others is never lost.
- **Lazy connection.** The first command connects (TCP, or TLS for
  ``tls=True``), sends ``AUTH`` and ``SELECT`` if configured, within
  ``timeout`` seconds; concurrent callers share that one attempt. A lost
  connection (the server stopped, restarted, or closed it) fails every
  pending command at once with :class:`RedisConnectionError`, and the next
  command connects again. A command that was queued on a connection that
  existed before it was issued and found that connection broken is retried
  once on a fresh connection (the case of a server that restarted between
  two calls); a command that fails on a connection made for it is not.
- **Timeouts without a timer per command.** Each connection has one
  watchdog timer: when commands have been written and nothing has come from
  the server for ``timeout`` seconds since (the first of them was written,
  or the last reply came), the connection is declared dead: closed, and
  every pending command fails with :class:`RedisTimeoutError`. Silence is
  the server's, not the event loop's: a command still waiting in the write
  buffer is not counted, and before failing the watchdog looks at the
  socket: bytes waiting there mean the server answered and the loop was too
  busy to read them yet (a loop blocked by a long render, say), so it waits
  for the loop to read them instead. Connecting is bounded the same way: a
  connection attempt whose time ran out while the loop was busy gets one
  short look more before it fails.
- **Errors.** An error reply (``-ERR ...``) is a :class:`ReplyError` for
  its caller only; the connection stays usable. Every error of this module
  is a :class:`RedisError`; none ever contains the password.
- **Scripts.** :meth:`RedisClient.evalsha` runs a :class:`Script` by its
  SHA1 (computed locally) and, if the server answers ``NOSCRIPT`` (its
  script cache was flushed, or it restarted), runs it once with ``EVAL``,
  which also caches it again.

Replies are RESP2, decoded as UTF-8: bulk strings are ``str``, integers
``int``, nil ``None``, arrays ``list``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import select
import ssl
from collections import deque
from collections.abc import AsyncGenerator, Awaitable, Callable, Coroutine, Sequence
from typing import Any, cast

import hiredis

__all__ = [
    "RedisClient",
    "RedisConnectionError",
    "RedisError",
    "RedisReplicationError",
    "RedisRoleError",
    "RedisTimeoutError",
    "ReplyError",
    "Script",
]

Arg = str | bytes | int | float

# Encodes one command as a RESP array, in C (hiredis types it too narrowly).
_pack = cast(Callable[[tuple[Arg, ...]], bytes], hiredis.pack_command)


class RedisError(Exception):
    """Any failure of a Redis command."""


class ReplyError(RedisError):
    """The server answered the command with an error (the connection is fine)."""


class RedisConnectionError(RedisError):
    """No connection could be made, or it was lost before the reply came."""


class RedisTimeoutError(RedisError):
    """The server did not answer (or accept a connection) within the timeout."""


class RedisRoleError(RedisConnectionError):
    """The server is not in the role the client requires (a replica where a
    primary is wanted): the connection was closed."""


class RedisReplicationError(RedisError):
    """The command ran on the primary, but the replicas asked for (``WAIT``)
    did not acknowledge it in time: it may be lost in a failover."""


class _ProtocolError(RedisConnectionError):
    """The server sent something that is not RESP: the connection is dropped."""


class _ConnectionLost(RedisConnectionError):
    """The connection broke (closed by the server, reset): worth one retry."""


class Script:
    """A Lua script, known by the SHA1 of its source."""

    __slots__ = ("sha", "source")

    def __init__(self, source: str) -> None:
        self.source = source
        self.sha = hashlib.sha1(source.encode()).hexdigest()

    def __repr__(self) -> str:
        return f"<Script {self.sha}>"


class _Connection(asyncio.Protocol):
    """One connection: a FIFO of pending futures, a write buffer, a watchdog."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        timeout: float,
        on_lost: Callable[[_Connection], None],
    ) -> None:
        self.loop = loop
        self.timeout = timeout
        self.on_lost = on_lost
        self.transport: asyncio.Transport | None = None
        self.reader = hiredis.Reader(
            protocolError=_ProtocolError, replyError=ReplyError, encoding="utf-8"
        )
        self.pending: deque[asyncio.Future[Any]] = deque()
        self.outgoing: list[bytes] = []
        self.flush_scheduled = False
        self.last_progress = loop.time()
        self.failed = False
        self.failure: tuple[Callable[[str], RedisError], str] = (RedisConnectionError, "")
        self.closed: asyncio.Future[None] = loop.create_future()
        self.watchdog: asyncio.TimerHandle | None = None
        self.period = timeout / 4
        self.guard = self._close_with_loop()
        self.guard_closed = False

    async def _close_with_loop(self) -> AsyncGenerator[None, None]:
        """Closes the connection when its event loop shuts down.

        Once started (in :meth:`connection_made`), this generator is known
        to the loop, whose ``shutdown_asyncgens`` (run by ``asyncio.run``
        before it closes the loop) closes it: the connection is closed while
        its loop still runs, instead of leaving an open socket to a closed
        loop (which nothing could close any more)."""
        try:
            yield
        finally:
            self.guard_closed = True
            self.fail(RedisConnectionError, "event loop shut down")

    def _step_guard(self, step: Awaitable[None]) -> None:
        # Drives the guard one step without the loop (it never awaits).
        with contextlib.suppress(StopIteration, StopAsyncIteration):
            cast(Coroutine[Any, Any, None], step).send(None)

    # -- asyncio.Protocol ------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        self.watchdog = self.loop.call_later(self.period, self._tick)
        self._step_guard(self.guard.asend(None))  # registers it with the loop

    def data_received(self, data: bytes) -> None:
        reader = self.reader
        reader.feed(data)
        self.last_progress = self.loop.time()
        pending = self.pending
        while True:
            try:
                reply = reader.gets()
            except _ProtocolError as exc:
                self.fail(RedisConnectionError, f"protocol error, connection dropped: {exc}")
                return
            except UnicodeDecodeError as exc:
                # hiredis consumed the whole reply: it is this caller's error only.
                reply = ReplyError(f"reply is not UTF-8: {exc}")
            if reply is False:
                return
            if not pending:
                self.fail(RedisConnectionError, "reply without a command, connection dropped")
                return
            self._deliver(pending.popleft(), reply)

    def _deliver(self, future: asyncio.Future[Any], reply: Any) -> None:
        """Hand ``reply`` to the caller waiting on ``future``."""
        if future.done():  # the caller gave up (cancelled): drop its reply
            return
        if type(reply) is ReplyError:
            future.set_exception(reply)
        else:
            future.set_result(reply)

    def connection_lost(self, exc: Exception | None) -> None:
        detail = f": {exc}" if exc is not None else " (closed by the server)"
        self.fail(_ConnectionLost, "connection lost" + detail)
        if not self.closed.done():
            self.closed.set_result(None)

    # -- commands --------------------------------------------------------------

    def send(self, packed: bytes) -> asyncio.Future[Any]:
        """Queue one encoded command; the future of its reply."""
        future = self.loop.create_future()
        if self.failed:
            # Lost before this command came (a server that closed it right
            # after the TLS handshake, before the caller resumed): nothing
            # would ever answer it.
            error, message = self.failure
            future.set_exception(error(message))
            return future
        self.pending.append(future)
        self.outgoing.append(packed)
        if not self.flush_scheduled:
            self.flush_scheduled = True
            self.loop.call_soon(self._flush)
        return future

    def _flush(self) -> None:
        self.flush_scheduled = False
        outgoing = self.outgoing
        if not outgoing or self.failed or self.transport is None:
            return
        if len(self.pending) == len(outgoing):
            # Nothing was waiting on the server before this write: its
            # silence starts now (not when the commands were queued, which
            # on a busy loop can be long before).
            self.last_progress = self.loop.time()
        self.outgoing = []
        try:
            self.transport.write(outgoing[0] if len(outgoing) == 1 else b"".join(outgoing))
        except Exception as exc:  # a transport closed under us
            self.fail(_ConnectionLost, f"write failed: {exc}")

    def _tick(self) -> None:
        """The watchdog: commands pending and the server silent for ``timeout``
        seconds means the connection is dead."""
        self.watchdog = None
        if self.failed:
            return
        now = self.loop.time()
        if len(self.pending) > len(self.outgoing):  # written, not all answered
            deadline = self.last_progress + self.timeout
            if now < deadline:
                self.watchdog = self.loop.call_at(deadline, self._tick)
                return
            if not self._unread():
                self.fail(RedisTimeoutError, f"no reply within {self.timeout:g}s")
                return
            # The server did answer; this timer merely ran before the busy
            # loop read the socket. Look again once it has.
        self.watchdog = self.loop.call_at(now + self.period, self._tick)

    def _unread(self) -> bool:
        """Whether the socket holds bytes (or an end) not read yet."""
        transport = self.transport
        sock = None if transport is None else transport.get_extra_info("socket")
        if sock is None:
            return False
        try:
            fd = sock.fileno()
            if hasattr(select, "poll"):
                poller = select.poll()
                poller.register(fd, select.POLLIN)
                return bool(poller.poll(0))
            return bool(select.select([fd], [], [], 0)[0])
        except (OSError, ValueError):
            return False

    def fail(self, error: Callable[[str], RedisError], message: str) -> None:
        """Close the connection; every pending command fails with ``error``."""
        if self.failed:
            return
        self.failed = True
        self.failure = (error, message)
        if self.watchdog is not None:
            self.watchdog.cancel()
            self.watchdog = None
        pending, self.pending = self.pending, deque()
        self.outgoing = []
        for future in pending:
            if not future.done():
                future.set_exception(error(message))
        if not self.guard_closed:
            # Finished now, the guard has nothing left for the loop to close
            # (nor for the garbage collector to hand to a loop maybe closed).
            self.guard_closed = True
            self._step_guard(self.guard.aclose())
        if self.transport is not None:
            self.transport.abort()
        self.on_lost(self)


_ASKING = _pack(("ASKING",))


def _ignore_result(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()  # retrieved: never "exception was never retrieved"


class _WaitingConnection(_Connection):
    """A connection whose every write (once :meth:`start_waiting` is called,
    after the handshake) ends with ``WAIT replicas ms``: the replies of the
    commands in that write reach their callers only once the server says
    that many replicas have every write before it; else each of those
    callers gets a :class:`RedisReplicationError`. One more command per
    write, no more round trips; each write's answers come later by the
    replication's delay."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        timeout: float,
        on_lost: Callable[[_Connection], None],
        replicas: int,
    ) -> None:
        super().__init__(loop, timeout, on_lost)
        self.replicas = replicas
        # Half the silence the watchdog allows: a WAIT that runs out answers
        # (fewer replicas) well before the connection is declared dead.
        self.wait_ms = max(1, int(timeout * 500))
        self.wait_packed = _pack(("WAIT", replicas, self.wait_ms))
        self.waiting = False
        self.markers: set[asyncio.Future[Any]] = set()
        self.held: list[tuple[asyncio.Future[Any], Any]] = []

    def start_waiting(self) -> None:
        self.waiting = True

    def _flush(self) -> None:
        if self.waiting and self.outgoing and not self.failed and self.transport is not None:
            marker = self.loop.create_future()
            self.markers.add(marker)
            self.pending.append(marker)
            self.outgoing.append(self.wait_packed)
        super()._flush()

    def _deliver(self, future: asyncio.Future[Any], reply: Any) -> None:
        if future not in self.markers:
            if self.markers:  # a WAIT is behind it: hold the reply until it answers
                self.held.append((future, reply))
            else:
                super()._deliver(future, reply)
            return
        self.markers.discard(future)
        held, self.held = self.held, []
        if type(reply) is int and reply >= self.replicas:
            for waiting, answer in held:
                super()._deliver(waiting, answer)
            return
        found = f"{reply} replicas" if type(reply) is int else f"an error ({reply})"
        why = (
            f"not acknowledged by {self.replicas} replica(s) within {self.wait_ms} ms "
            f"(WAIT answered {found}): written on the primary, it may be lost in a failover"
        )
        for waiting, _ in held:
            if not waiting.done():
                waiting.set_exception(RedisReplicationError(why))

    def fail(self, error: Callable[[str], RedisError], message: str) -> None:
        if not self.failed:
            for marker in self.markers:
                marker.cancel()  # nobody awaits it
            self.markers.clear()
            held, self.held = self.held, []
            for waiting, _ in held:
                if not waiting.done():
                    waiting.set_exception(error(message))
        super().fail(error, message)


_LAST_LOOK = 0.05
"""Seconds a connection attempt gets past its timeout, for a busy loop to
notice that it was made (see :meth:`RedisClient._within_timeout`)."""


def _drop_late_connection(
    connecting: asyncio.Task[tuple[asyncio.BaseTransport, _Connection]],
) -> None:
    """Close a connection made after its caller had given up on it."""
    if not connecting.cancelled() and connecting.exception() is None:
        connecting.result()[1].fail(RedisConnectionError, "connected after the timeout")


class RedisClient:
    """An asyncio Redis client on one auto-pipelined connection (see the module).

    Nothing touches the network until the first command. ``timeout`` bounds
    connecting (with the ``AUTH``/``SELECT`` handshake) and the server's
    silence while commands are pending. TLS: ``ssl_context`` (see
    :class:`~lapse.sessions.stores.redis.url.TLSOptions`), or ``tls=True``
    for the default context (the system's CAs, hostname checked). With
    ``require_role`` (say ``"master"``), ``ROLE`` is sent with the handshake
    (the same write) and a server in another role (a replica) is dropped:
    the connection fails with :class:`RedisRoleError`.
    """

    def __init__(
        self,
        host: str,
        port: int = 6379,
        *,
        db: int = 0,
        username: str | None = None,
        password: str | None = None,
        tls: bool = False,
        ssl_context: ssl.SSLContext | None = None,
        timeout: float = 1.0,
        require_role: str | None = None,
        wait_replicas: int = 0,
    ) -> None:
        if not timeout > 0:
            raise ValueError(f"timeout must be positive seconds, not {timeout!r}")
        if not isinstance(wait_replicas, int) or wait_replicas < 0:
            raise ValueError(f"wait_replicas is a count >= 0, not {wait_replicas!r}")
        self._wait_replicas = wait_replicas
        self.host = host
        self.port = port
        self.db = db
        self.timeout = timeout
        self._username = username
        self._password = password
        self._tls = tls
        self._ssl_context = ssl_context
        self._require_role = require_role
        self._conn: _Connection | None = None
        self._connecting: asyncio.Task[_Connection] | None = None
        self._generation = 0

    def __repr__(self) -> str:
        return f"<RedisClient {self.host}:{self.port}/{self.db}>"

    @property
    def connected(self) -> bool:
        """Whether a connection is open now."""
        return self._conn is not None

    # -- commands ----------------------------------------------------------------

    async def execute(self, *args: Arg) -> Any:
        """Run one command (``execute("GET", key)``); its decoded reply."""
        return await self.send(_pack(args))

    async def execute_on(self, key: str, *args: Arg) -> Any:
        """Run one command (one node holds every key: ``key`` routes nothing)."""
        return await self.send(_pack(args))

    async def each_primary(self, *args: Arg) -> list[Any]:
        """Run one command on the one node; its reply, in a list."""
        return [await self.send(_pack(args))]

    async def send(self, packed: bytes) -> Any:
        """Run one command already encoded as a RESP array; its decoded reply."""
        conn = self._conn
        if conn is None or conn.loop is not asyncio.get_running_loop():
            return await (await self._connect()).send(packed)
        try:
            return await conn.send(packed)
        except _ConnectionLost:
            # It was queued on a connection that was already there, and that
            # connection broke (a server restart between two calls, say):
            # once more, on a new connection.
            pass
        return await (await self._connect()).send(packed)

    async def send_asking(self, packed: bytes) -> Any:
        """``ASKING`` then one encoded command, adjacent in one write on one
        connection (no other caller's command can come between them, as
        a Redis Cluster's ASK redirection needs); the command's reply."""
        conn = self._conn
        if conn is None or conn.loop is not asyncio.get_running_loop():
            return await self._send_pair(await self._connect(), packed)
        try:
            return await self._send_pair(conn, packed)
        except _ConnectionLost:
            pass  # as in send(): once more, on a new connection
        return await self._send_pair(await self._connect(), packed)

    @staticmethod
    async def _send_pair(conn: _Connection, packed: bytes) -> Any:
        asking = conn.send(_ASKING)  # nothing can run between these two sends
        reply = conn.send(packed)
        asking.add_done_callback(_ignore_result)  # an error there fails `reply` too
        return await reply

    async def evalsha(self, script: Script, keys: Sequence[Arg], args: Sequence[Arg]) -> Any:
        """Run ``script`` (EVALSHA; EVAL once if the server lost it)."""
        try:
            return await self.send(_pack(("EVALSHA", script.sha, len(keys), *keys, *args)))
        except ReplyError as exc:
            if not str(exc).startswith("NOSCRIPT"):
                raise
        return await self.send(_pack(("EVAL", script.source, len(keys), *keys, *args)))

    # -- the connection ---------------------------------------------------------

    async def _connect(self) -> _Connection:
        """The current connection, made now if there is none (one attempt
        shared by all the callers that need it)."""
        loop = asyncio.get_running_loop()
        conn = self._conn
        if conn is not None:
            if conn.loop is loop:
                return conn
            self._drop(conn)  # made in another (finished) event loop
        task = self._connecting
        if task is None or task.get_loop() is not loop:
            task = self._connecting = loop.create_task(self._open(self._generation))
            task.add_done_callback(self._connected)
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if task.cancelled() and (current is None or not current.cancelling()):
                # The attempt was stopped by aclose(), not this caller.
                raise RedisConnectionError("client closed while connecting") from None
            raise

    def _connected(self, task: asyncio.Task[_Connection]) -> None:
        if self._connecting is task:
            self._connecting = None
        if not task.cancelled():
            task.exception()  # seen: its callers may all have given up on it

    async def _open(self, generation: int) -> _Connection:
        loop = asyncio.get_running_loop()
        context = self._ssl_context
        if context is None and self._tls:
            context = ssl.create_default_context()
        connecting = loop.create_task(
            loop.create_connection(
                self._make_connection,
                self.host,
                self.port,
                ssl=context,
            )
        )
        conn: _Connection | None = None
        replies: list[asyncio.Future[Any]] = []
        try:
            _, conn = await self._within_timeout(connecting)
            # The handshake's replies are bounded by the connection's watchdog.
            replies = [conn.send(_pack(command)) for command in self._handshake()]
            role: Any = None  # the last reply: ROLE's, when a role is required
            for reply in replies:
                role = await reply
            if self._require_role is not None and (
                not isinstance(role, list) or not role or role[0] != self._require_role
            ):
                found = role[0] if isinstance(role, list) and role else role
                raise RedisRoleError(
                    f"{self.host}:{self.port} is in role {found!r}, not {self._require_role!r}"
                )
        except TimeoutError as exc:
            raise RedisTimeoutError(f"no connection within {self.timeout:g}s") from exc
        except OSError as exc:
            raise RedisConnectionError(f"cannot connect: {exc}") from exc
        except BaseException:
            if conn is not None:
                conn.fail(RedisConnectionError, "handshake failed")
                for reply in replies:  # those after the one that failed: seen
                    if reply.done() and not reply.cancelled():
                        reply.exception()
                await asyncio.wait([conn.closed])  # its socket closed, not soon
            raise
        if generation != self._generation or conn.failed:
            conn.fail(RedisConnectionError, "client closed")
            raise RedisConnectionError("client closed while connecting")
        if isinstance(conn, _WaitingConnection):
            conn.start_waiting()
        self._conn = conn
        return conn

    async def _within_timeout(
        self, connecting: asyncio.Task[tuple[asyncio.BaseTransport, _Connection]]
    ) -> tuple[asyncio.BaseTransport, _Connection]:
        """The connection ``connecting`` makes, within ``timeout``; else
        TimeoutError. When the time is up, one short look more: the timer
        may have run on a loop too busy to notice the connection was made."""
        try:
            done, _ = await asyncio.wait((connecting,), timeout=self.timeout)
            if not done:
                done, _ = await asyncio.wait((connecting,), timeout=_LAST_LOOK)
        except BaseException:
            connecting.cancel()
            connecting.add_done_callback(_drop_late_connection)
            # The socket is closed only once the cancelled attempt ends:
            # wait for it (aclose() relies on it), unless cancelled again.
            await asyncio.wait((connecting,))
            raise
        if not done:
            connecting.cancel()
            connecting.add_done_callback(_drop_late_connection)
            raise TimeoutError
        return connecting.result()

    def _make_connection(self) -> _Connection:
        loop = asyncio.get_running_loop()
        if self._wait_replicas:
            return _WaitingConnection(loop, self.timeout, self._lost, self._wait_replicas)
        return _Connection(loop, self.timeout, self._lost)

    def _handshake(self) -> list[tuple[Arg, ...]]:
        commands: list[tuple[Arg, ...]] = []
        if self._password is not None:
            if self._username:
                commands.append(("AUTH", self._username, self._password))
            else:
                commands.append(("AUTH", self._password))
        if self.db:
            commands.append(("SELECT", self.db))
        if self._require_role is not None:
            commands.append(("ROLE",))
        return commands

    def _lost(self, conn: _Connection) -> None:
        if self._conn is conn:
            self._conn = None

    def _drop(self, conn: _Connection) -> None:
        self._conn = None
        try:
            conn.fail(RedisConnectionError, "connection closed by the client")
        except RuntimeError:  # its event loop is closed: nothing left to do
            conn.failed = True

    async def aclose(self) -> None:
        """Close the connection (pending commands fail). The client stays
        usable: the next command connects again. Idempotent."""
        self._generation += 1
        connecting, self._connecting = self._connecting, None
        if connecting is not None and connecting.get_loop() is asyncio.get_running_loop():
            # A connection being made now would stay open until its attempt
            # ends (up to the timeout), or for ever if the loop closes first:
            # stop it, and wait until its socket is closed.
            connecting.cancel()
            await asyncio.wait([connecting])
        conn, self._conn = self._conn, None
        if conn is None:
            return
        if conn.loop is not asyncio.get_running_loop():
            self._drop(conn)
            return
        conn.fail(RedisConnectionError, "connection closed by the client")
        if not conn.closed.done():
            await asyncio.wait([conn.closed], timeout=self.timeout)
