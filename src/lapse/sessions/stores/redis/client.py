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
import ssl
from collections.abc import Sequence
from typing import Any

from lapse.sessions.stores._tasks import retrieved
from lapse.sessions.stores.redis.connection import (
    Arg,
    RedisConnectionError,
    RedisError,
    RedisReplicationError,
    RedisRoleError,
    RedisTimeoutError,
    ReplyError,
    Script,
    _Connection,
    _ConnectionLost,
    _pack,
    _WaitingConnection,
)

__all__ = [
    "Arg",
    "RedisClient",
    "RedisConnectionError",
    "RedisError",
    "RedisReplicationError",
    "RedisRoleError",
    "RedisTimeoutError",
    "ReplyError",
    "Script",
]

_ASKING = _pack(("ASKING",))


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
    the connection fails with :class:`RedisRoleError`. ``patience``: seconds
    of the server's silence allowed beyond ``timeout`` while commands are
    pending (a client for blocking commands: ``XREAD BLOCK``); such a client
    never sends a command again on a new connection (see :meth:`send`): its
    caller must know that the connection was lost.
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
        patience: float = 0.0,
    ) -> None:
        if not timeout > 0:
            raise ValueError(f"timeout must be positive seconds, not {timeout!r}")
        if not isinstance(wait_replicas, int) or wait_replicas < 0:
            raise ValueError(f"wait_replicas is a count >= 0, not {wait_replicas!r}")
        self._wait_replicas = wait_replicas
        self.patience = patience
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
            # once more, on a new connection (unless blocking: see __init__).
            if self.patience:
                raise
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
        asking.add_done_callback(retrieved)  # an error there fails `reply` too
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
        return _Connection(loop, self.timeout, self._lost, self.patience)

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
