"""One connection of lapse's Redis client: RESP over asyncio, auto-pipelined.

:class:`_Connection` is an :class:`asyncio.Protocol` holding a FIFO of the
futures of commands sent and not yet answered, the commands of this
event-loop tick not yet written (one ``transport.write`` per tick), and the
watchdog that declares the server dead after ``timeout`` seconds of silence
while commands are pending (see :mod:`.client` for the whole design).
:class:`_WaitingConnection` ends every write with ``WAIT`` (the store's
``wait_replicas``). The errors of the client are defined here too.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import select
from collections import deque
from collections.abc import AsyncGenerator, Awaitable, Callable, Coroutine
from typing import Any, cast

import hiredis

__all__ = [
    "Arg",
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
        patience: float = 0.0,
    ) -> None:
        self.loop = loop
        self.timeout = timeout
        self.patience = patience
        """Seconds of silence allowed beyond ``timeout`` (a connection that
        waits in blocking commands: ``XREAD BLOCK`` answers that late)."""
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
            deadline = self.last_progress + self.timeout + self.patience
            if now < deadline:
                self.watchdog = self.loop.call_at(deadline, self._tick)
                return
            if not self._unread():
                silence = self.timeout + self.patience
                self.fail(RedisTimeoutError, f"no reply within {silence:g}s")
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
