"""Redis with Sentinel: every command goes to the primary the sentinels name.

:class:`SentinelClient` offers the store the :class:`~.slots.Commands`
interface; behind it, one :class:`~.client.RedisClient` (auto-pipelined, one
connection) to the current primary. How it finds and follows that primary:

- **Discovery.** All the sentinels are asked at once
  ``SENTINEL get-master-addr-by-name SERVICE``, each within ``timeout``; the
  first address given wins. No sentinel answering, or none knowing the
  service, is a :class:`~.client.RedisError` naming the sentinels and the
  service (never a password). Concurrent callers share one discovery.
- **Following a failover.** A task keeps a subscription to
  ``+switch-master`` on one sentinel (``PING`` on it when it is idle, to
  notice a sentinel gone silent); the message for this service switches the
  primary at once: the old connection is closed, its pending commands fail
  with :class:`~.client.RedisConnectionError` (the store answers 503, the
  caller retries). A subscription lost is made again on the next sentinel,
  and the primary asked for again, in case a switch was missed meanwhile.
- **The role, checked.** Every connection to a primary sends ``ROLE`` with
  its handshake (in the same write): a node that is not a master (an old
  primary that came back as a replica) is dropped and the sentinels are
  asked again; so is one that answers a write ``-READONLY``. The command is
  then sent once more, to the primary the sentinels name, if that is
  another node. A connection to the primary that fails makes the next call
  ask the sentinels again (at most every 0.1 s).
- **Failing fast.** No call waits for a failover to end: each fails within
  about twice ``timeout`` at worst (discovery, then the primary's
  connection, each bounded by it; a refused connection fails at once) and
  the client works again, unchanged, once a primary is elected.
- **Idle cost.** One ``PING`` every 5 s on the subscription, to one
  sentinel; the sentinels are asked only on a switch, a (re)subscription or
  a failing primary.
- **Not closed by a failover: the loss window.** Sentinel names the new
  primary (``+switch-master``) only when its failover ends; until then the
  old primary, if it is still up, accepts the writes sent to it, and they
  are lost when it is made a replica. Deploy the primaries with
  ``min-replicas-to-write 1`` to have them refused instead (see the docs).
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, cast

import hiredis

from lapse.sessions.stores._tasks import retrieved
from lapse.sessions.stores.redis.client import (
    Arg,
    RedisClient,
    RedisConnectionError,
    RedisError,
    RedisRoleError,
    RedisTimeoutError,
    ReplyError,
    Script,
)

__all__ = ["SentinelClient", "UnknownServiceError"]

_pack = cast(Callable[[tuple[Arg, ...]], bytes], hiredis.pack_command)

_REDISCOVER_EVERY = 0.1
"""Seconds between two discoveries caused by a failing primary connection."""

_IDLE_PING = 5.0
"""Seconds of silence on the subscription before a PING checks the sentinel."""

_CHANNEL = "+switch-master"


class UnknownServiceError(RedisError):
    """Sentinels answered, and none monitors a primary by that name: a
    configuration mistake that retrying does not mend."""


class SentinelClient:
    """Commands to the primary of ``service``, as ``sentinels`` name it (see
    the module). ``password``/``username`` are the primary's,
    ``sentinel_password`` the sentinels'; ``ssl_context`` (TLS) is used for
    both. Nothing touches the network until the first command."""

    def __init__(
        self,
        sentinels: Sequence[tuple[str, int]],
        service: str,
        *,
        db: int = 0,
        username: str | None = None,
        password: str | None = None,
        sentinel_password: str | None = None,
        ssl_context: ssl.SSLContext | None = None,
        timeout: float = 1.0,
        wait_replicas: int = 0,
    ) -> None:
        self._wait_replicas = wait_replicas
        if not sentinels:
            raise ValueError("at least one sentinel is needed")
        if not service:
            raise ValueError("the service name is empty")
        if not timeout > 0:
            raise ValueError(f"timeout must be positive seconds, not {timeout!r}")
        self.sentinels = [(host, int(port)) for host, port in sentinels]
        self.service = service
        self.db = db
        self.timeout = timeout
        self._username = username
        self._password = password
        self._sentinel_password = sentinel_password
        self._ssl_context = ssl_context
        self._asked = [
            RedisClient(
                host,
                port,
                password=sentinel_password,
                ssl_context=ssl_context,
                timeout=timeout,
            )
            for host, port in self.sentinels
        ]
        self._primary: RedisClient | None = None
        self._stale = False
        self._discovered_at = float("-inf")
        self._discovery: asyncio.Task[tuple[str, int]] | None = None
        self._watcher: asyncio.Task[None] | None = None
        self._announced = 0  # +switch-master messages acted on
        self.switches = 0
        """How many times the primary changed (for tests and metrics)."""
        self.discoveries = 0
        """How many times the sentinels were asked for the primary."""
        self.subscriptions = 0
        """How many times a ``+switch-master`` subscription was made."""

    def __repr__(self) -> str:
        where = ",".join(f"{host}:{port}" for host, port in self.sentinels)
        return f"<SentinelClient {self.service} via {where}>"

    @property
    def primary(self) -> tuple[str, int] | None:
        """The address of the primary in use, if one was found."""
        primary = self._primary
        return None if primary is None else (primary.host, primary.port)

    # -- the Commands interface -------------------------------------------------

    async def execute(self, *args: Arg) -> Any:
        """Run one command on the primary; its decoded reply."""
        packed = _pack(args)
        return await self._run(lambda client: client.send(packed))

    async def execute_on(self, key: str, *args: Arg) -> Any:
        """Run one command on the primary (one node holds every key)."""
        packed = _pack(args)
        return await self._run(lambda client: client.send(packed))

    async def evalsha(self, script: Script, keys: Sequence[Arg], args: Sequence[Arg]) -> Any:
        """Run ``script`` on the primary (EVALSHA; EVAL once if it lacks it)."""
        return await self._run(lambda client: client.evalsha(script, keys, args))

    async def each_primary(self, *args: Arg) -> list[Any]:
        """Run one command on the primary; its reply, in a list."""
        return [await self.execute(*args)]

    async def aclose(self) -> None:
        """Close the primary's and the sentinels' connections and stop
        following failovers. The next command starts again. Idempotent."""
        loop = asyncio.get_running_loop()
        tasks = [task for task in (self._watcher, self._discovery) if task is not None]
        self._watcher = self._discovery = None
        for task in tasks:
            if task.get_loop() is loop:
                task.cancel()
        mine = [task for task in tasks if task.get_loop() is loop]
        if mine:
            await asyncio.wait(mine)
        primary, self._primary = self._primary, None
        for client in [*self._asked, *([primary] if primary is not None else [])]:
            await client.aclose()

    # -- calls ----------------------------------------------------------------------

    async def _run(self, call: Callable[[RedisClient], Awaitable[Any]]) -> Any:
        client = await self._current()
        try:
            return await call(client)
        except RedisRoleError:
            self._forget(client)
        except ReplyError as exc:
            if not str(exc).startswith("READONLY"):
                raise
            # A primary demoted under this connection: close it, so that no
            # read is served by it either and a new one checks the role.
            self._forget(client)
            await client.aclose()
        except (RedisConnectionError, RedisTimeoutError):
            self._stale = True if self._primary is client else self._stale
            raise
        # The node is no primary (any more): the command did not run there.
        # Once more, on the primary the sentinels name now, if it is another.
        again = await self._current()
        if again is client:
            raise RedisConnectionError(
                f"{client.host}:{client.port} is not the primary of {self.service!r} "
                "and the sentinels name no other yet (failover in progress?)"
            )
        return await call(again)

    def _forget(self, client: RedisClient) -> None:
        """``client``'s node is not a primary: the next call asks the
        sentinels, whatever the time since the last discovery."""
        if self._primary is client:
            self._stale = True
            self._discovered_at = float("-inf")

    async def _current(self) -> RedisClient:
        """The client of the primary, discovered now if need be."""
        loop = asyncio.get_running_loop()
        watcher = self._watcher
        if watcher is None or watcher.done() or watcher.get_loop() is not loop:
            self._watcher = loop.create_task(self._watch())
            self._watcher.add_done_callback(retrieved)
        primary = self._primary
        if primary is not None and (
            not self._stale or loop.time() - self._discovered_at < _REDISCOVER_EVERY
        ):
            return primary
        announced = self._announced
        host, port = await self._discover()
        if self._announced != announced and self._primary is not None:
            # A +switch-master came while the sentinels were asked: it is
            # newer than their answer.
            self._stale = False
            return self._primary
        await self._switch(host, port)
        current = self._primary
        if current is None:  # closed meanwhile
            raise RedisConnectionError("client closed")
        return current

    async def _switch(self, host: str, port: int) -> None:
        """Use the primary at ``host:port`` (closing the old one's connection)."""
        old = self._primary
        self._stale = False
        if old is not None and (old.host, old.port) == (host, port):
            return
        self._primary = RedisClient(
            host,
            port,
            db=self.db,
            username=self._username,
            password=self._password,
            ssl_context=self._ssl_context,
            timeout=self.timeout,
            require_role="master",
            wait_replicas=self._wait_replicas,
        )
        if old is not None:
            self.switches += 1
            await old.aclose()

    # -- discovery ----------------------------------------------------------------

    async def _discover(self) -> tuple[str, int]:
        """The primary's address as the sentinels give it (one shared ask)."""
        loop = asyncio.get_running_loop()
        task = self._discovery
        if task is None or task.done() or task.get_loop() is not loop:
            task = self._discovery = loop.create_task(self._ask_all())
            task.add_done_callback(retrieved)
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if task.cancelled() and (current is None or not current.cancelling()):
                # The discovery was stopped by aclose(), not this caller.
                raise RedisConnectionError("client closed while asking the sentinels") from None
            raise

    async def _ask_all(self) -> tuple[str, int]:
        self.discoveries += 1
        loop = asyncio.get_running_loop()
        asks = [loop.create_task(self._ask(client)) for client in self._asked]
        failures: list[str] = []
        unknown: list[str] = []
        try:
            for next_answer in asyncio.as_completed(asks, timeout=self.timeout * 1.5):
                try:
                    where, answer = await next_answer
                except RedisError as exc:
                    failures.append(str(exc))
                    continue
                except TimeoutError:
                    failures.append(f"no answer within {self.timeout:g}s")
                    break
                if answer is None:
                    unknown.append(where)
                    continue
                self._discovered_at = loop.time()
                return answer
        finally:
            for ask in asks:
                ask.cancel()
            await asyncio.wait(asks)
        if unknown:
            raise UnknownServiceError(
                f"no sentinel knows a primary named {self.service!r} (asked {', '.join(unknown)})"
            )
        raise RedisConnectionError(
            f"no sentinel answered for {self.service!r}: {'; '.join(failures)}"
        )

    async def _ask(self, client: RedisClient) -> tuple[str, tuple[str, int] | None]:
        where = f"{client.host}:{client.port}"
        try:
            reply = await client.execute("SENTINEL", "get-master-addr-by-name", self.service)
        except RedisError as exc:
            raise RedisError(f"sentinel {where}: {exc}") from None
        if reply is None:
            return where, None
        if not (isinstance(reply, list) and len(reply) == 2 and str(reply[1]).isdigit()):
            raise RedisError(f"sentinel {where}: unexpected answer {reply!r}")
        return where, (str(reply[0]), int(reply[1]))

    # -- following failovers -----------------------------------------------------

    async def _watch(self) -> None:
        """Keep a ``+switch-master`` subscription on some sentinel, for ever."""
        index = 0
        while True:
            before = self.subscriptions
            for _ in self.sentinels:
                host, port = self.sentinels[index % len(self.sentinels)]
                index += 1
                with contextlib.suppress(OSError, RedisError, TimeoutError):
                    await self._follow(host, port)
                task = asyncio.current_task()
                if task is not None and task.cancelling():  # a cancel lost on the way
                    raise asyncio.CancelledError
            if self.subscriptions == before:  # none would answer: wait a little
                await asyncio.sleep(self.timeout)

    async def _follow(self, host: str, port: int) -> None:
        """Subscribe on one sentinel and act on its messages until the
        connection is lost (an error) or the sentinel goes silent."""
        # asyncio.timeout, not wait_for: wait_for (3.11) can lose a
        # cancellation (aclose) that comes as the connection attempt fails.
        async with asyncio.timeout(self.timeout):
            reader, writer = await asyncio.open_connection(host, port, ssl=self._ssl_context)
        try:
            parser = hiredis.Reader(encoding="utf-8")
            commands: list[tuple[Arg, ...]] = []
            if self._sentinel_password is not None:
                commands.append(("AUTH", self._sentinel_password))
            commands.append(("SUBSCRIBE", _CHANNEL))
            writer.write(b"".join(_pack(command) for command in commands))
            replies = 0
            while replies < len(commands):
                reply = await self._read(reader, parser, self.timeout)
                if isinstance(reply, hiredis.ReplyError):
                    raise RedisError(f"sentinel {host}:{port}: {reply}")
                replies += 1
            self.subscriptions += 1
            # A switch may have happened while no subscription was held (the
            # first one included: the primary may have been found before).
            self._stale = True
            self._discovered_at = float("-inf")
            waiting_pong = False
            while True:
                try:
                    message = await self._read(
                        reader, parser, self.timeout if waiting_pong else _IDLE_PING
                    )
                except TimeoutError:
                    if waiting_pong:
                        raise
                    writer.write(_pack(("PING",)))
                    waiting_pong = True
                    continue
                waiting_pong = False
                if (
                    isinstance(message, list)
                    and len(message) == 3
                    and message[0] == "message"
                    and message[1] == _CHANNEL
                ):
                    await self._switched(str(message[2]))
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                async with asyncio.timeout(self.timeout):
                    await writer.wait_closed()

    @staticmethod
    async def _read(reader: asyncio.StreamReader, parser: Any, timeout: float) -> Any:
        """The next reply on the subscription, within ``timeout``."""
        while True:
            reply = parser.gets()
            if reply is not False:
                return reply
            async with asyncio.timeout(timeout):
                data = await reader.read(65536)
            if not data:
                raise RedisConnectionError("sentinel closed the connection")
            parser.feed(data)

    async def _switched(self, payload: str) -> None:
        """A ``+switch-master`` message: ``service old-ip old-port new-ip new-port``."""
        fields = payload.split()
        if len(fields) != 5 or fields[0] != self.service or not fields[4].isdigit():
            return
        self._discovered_at = asyncio.get_running_loop().time()
        self._announced += 1
        await self._switch(fields[3], int(fields[4]))
