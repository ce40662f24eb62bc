"""Redis Cluster routing on lapse's own client: :class:`ClusterClient`.

It offers the store the :class:`~lapse.sessions.stores.redis.slots.Commands`
interface on a Redis Cluster (or a Valkey cluster):

- **The slot map** comes from the cluster (``CLUSTER SLOTS``), asked of any
  node it knows (the seeds at first) on the first call; it maps each of the
  16384 slots to its primary.
- **One auto-pipelined connection per node** (a
  :class:`~lapse.sessions.stores.redis.client.RedisClient` each): a tick's
  calls routed to one node leave in one write (routing never waits once
  the map is known). Keyed calls go to their slot's primary (``keys[0]``
  for a script), keyless ones to any primary, ``each_primary`` to all.
- **MOVED** (the slot has a new owner): the map takes the new owner at once,
  one map refresh is scheduled, and the call is sent to the new owner.
  **ASK** (the slot is migrating and the key is on the importing node):
  ``ASKING`` and the command go to that node in one write on its connection,
  so no other caller's command can come between them; the map is unchanged.
- **TRYAGAIN** (a multi-key call during a migration), **CLUSTERDOWN** and
  connection errors (a node failing over, or gone): the call is retried
  after a short back-off (10 ms, doubling, at most 200 ms), re-routed by the
  map as it is then (a refresh is scheduled on connection errors), until
  ``timeout`` seconds have passed since the call began; then the last error
  is raised (a :class:`~lapse.sessions.stores.redis.client.RedisError`).
  A call takes at most about ``timeout`` (its last try gets 50 ms more).
- **Map refreshes**: one at a time (callers that need it share it), and at
  most one per :data:`REFRESH_INTERVAL`; :attr:`ClusterClient.refreshes`
  counts them. A failover costs a handful of refreshes, not one per failed
  call.
- **Scripts**: each node client runs ``EVALSHA`` and falls back to ``EVAL``
  on ``NOSCRIPT`` (a promoted replica has an empty script cache), on the
  node the call was routed or redirected to.
- **AUTH and TLS** to every node, the ones learned from the map or a MOVED
  included; a node that leaves the map has its connection closed. Errors
  never contain the password.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import ssl
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, cast

import hiredis

from lapse.sessions.stores.redis.client import (
    Arg,
    RedisClient,
    RedisConnectionError,
    RedisError,
    RedisTimeoutError,
    ReplyError,
    Script,
)
from lapse.sessions.stores.redis.slots import SLOTS, key_slot

__all__ = ["REFRESH_INTERVAL", "ClusterClient"]

_pack = cast(Callable[[tuple[Arg, ...]], bytes], hiredis.pack_command)

Address = tuple[str, int]

REFRESH_INTERVAL = 0.1
"""Seconds between two refreshes of the slot map, at least."""

_FIRST_BACKOFF = 0.01
_MAX_BACKOFF = 0.2
_IMMEDIATE_REDIRECTS = 3
"""MOVED/ASK redirects followed at once; beyond, each waits a back-off step
(two nodes that each say the other owns a slot cannot make a busy loop)."""

_LAST_ATTEMPT = 0.05
"""Seconds a retry made at the deadline gets for its reply."""

_TAG_CACHE = 4096
"""Hash tags whose slot is remembered (the store uses one per shard)."""

_RETRIED = ("TRYAGAIN", "CLUSTERDOWN", "MASTERDOWN", "LOADING")

_Op = Callable[[RedisClient, bool], Awaitable[Any]]
"""One attempt of a call on a node; ``True``: preceded by ``ASKING``."""


class _Send:
    """An attempt that sends one encoded command (after ASKING if asked to)."""

    __slots__ = ("packed",)

    def __init__(self, packed: bytes) -> None:
        self.packed = packed

    def __call__(self, node: RedisClient, asking: bool) -> Awaitable[Any]:
        return node.send_asking(self.packed) if asking else node.send(self.packed)


class _Eval:
    """An attempt that runs a script: EVALSHA, and EVAL on that node on NOSCRIPT."""

    __slots__ = ("args", "keys", "script")

    def __init__(self, script: Script, keys: Sequence[Arg], args: Sequence[Arg]) -> None:
        self.script = script
        self.keys = keys
        self.args = args

    async def __call__(self, node: RedisClient, asking: bool) -> Any:
        send = node.send_asking if asking else node.send
        keys, args = self.keys, self.args
        try:
            return await send(_pack(("EVALSHA", self.script.sha, len(keys), *keys, *args)))
        except ReplyError as exc:
            if not str(exc).startswith("NOSCRIPT"):
                raise
        return await send(_pack(("EVAL", self.script.source, len(keys), *keys, *args)))


def _address(text: str, asked: Address) -> Address:
    """``host:port`` of a MOVED/ASK reply (an empty host: the node asked)."""
    host, _, port = text.rpartition(":")
    return (host or asked[0], int(port))


class ClusterClient:
    """The store's commands on a Redis Cluster (see the module).

    ``seeds``: addresses of some nodes (any one that answers will do).
    ``username``/``password``/``ssl_context`` are used for every node.
    ``timeout`` bounds a connection attempt, a server's silence, and each
    call's retries.
    """

    def __init__(
        self,
        seeds: Sequence[tuple[str, int]],
        *,
        username: str | None = None,
        password: str | None = None,
        ssl_context: ssl.SSLContext | None = None,
        timeout: float = 1.0,
        wait_replicas: int = 0,
    ) -> None:
        self._wait_replicas = wait_replicas
        if not seeds:
            raise ValueError("a cluster needs at least one seed node")
        if not timeout > 0:
            raise ValueError(f"timeout must be positive seconds, not {timeout!r}")
        self.seeds: list[Address] = [(host, int(port)) for host, port in seeds]
        self.timeout = timeout
        self._username = username
        self._password = password
        self._ssl_context = ssl_context
        self._nodes: dict[Address, RedisClient] = {}
        self._owners: list[Address | None] = [None] * SLOTS
        self._primaries: list[Address] = []
        self._known: set[Address] = set()
        self._unreachable: set[Address] = set()
        self._refreshing: asyncio.Task[None] | None = None
        self._last_refresh = float("-inf")
        self._closing: set[asyncio.Task[None]] = set()
        self._next_primary = 0
        self._tag_slots: dict[str, int] = {}
        self.refreshes = 0
        """How many times the slot map was read from the cluster."""

    def __repr__(self) -> str:
        seeds = ",".join(f"{host}:{port}" for host, port in self.seeds)
        return f"<ClusterClient {seeds}>"

    @property
    def primaries(self) -> list[Address]:
        """The primaries of the slot map as last read (empty before the first call)."""
        return list(self._primaries)

    def owner(self, slot: int) -> Address | None:
        """The primary that the map says owns ``slot`` (None before the first call)."""
        return self._owners[slot]

    def node(self, address: Address) -> RedisClient:
        """The client of the node at ``address`` (made on first use)."""
        node = self._nodes.get(address)
        if node is None:
            node = self._nodes[address] = RedisClient(
                address[0],
                address[1],
                username=self._username,
                password=self._password,
                ssl_context=self._ssl_context,
                timeout=self.timeout,
                wait_replicas=self._wait_replicas,
            )
        return node

    # -- the Commands interface ---------------------------------------------------

    async def execute(self, *args: Arg) -> Any:
        """A keyless command, on one primary (each call the next one)."""
        return await self._call(None, _Send(_pack(args)))

    async def execute_on(self, key: str, *args: Arg) -> Any:
        """A command whose keys all share ``key``'s slot, on that slot's primary."""
        packed = _pack(args)
        slot = self._slot(key)
        address = self._owners[slot]
        if address is not None:  # the usual case, inline: no await before the send
            start = asyncio.get_running_loop().time()
            try:
                return await self.node(address).send(packed)
            except RedisError as exc:
                return await self._slow_call(
                    slot, _Send(packed), start + self.timeout, exc, address
                )
        return await self._call(slot, _Send(packed))

    async def evalsha(self, script: Script, keys: Sequence[Arg], args: Sequence[Arg]) -> Any:
        """``script`` on the primary of ``keys[0]``'s slot (EVAL there on NOSCRIPT)."""
        if not keys:
            raise ValueError("a script on a cluster needs a key to route it by")
        first = keys[0]
        if isinstance(first, str):
            slot = self._slot(first)
        else:
            slot = key_slot(first if isinstance(first, bytes) else str(first))
        attempt = _Eval(script, keys, args)
        address = self._owners[slot]
        if address is not None:  # as in execute_on
            start = asyncio.get_running_loop().time()
            try:
                return await attempt(self.node(address), False)
            except RedisError as exc:
                return await self._slow_call(slot, attempt, start + self.timeout, exc, address)
        return await self._call(slot, attempt)

    def _slot(self, key: str) -> int:
        """``key_slot(key)``, remembered by hash tag (a deployment has few)."""
        start = key.find("{")
        if start != -1:
            end = key.find("}", start + 1)
            if end > start + 1:
                tag = key[start + 1 : end]
                slot = self._tag_slots.get(tag)
                if slot is None:
                    slot = key_slot(key)
                    if len(self._tag_slots) < _TAG_CACHE:
                        self._tag_slots[tag] = slot
                return slot
        return key_slot(key)

    async def each_primary(self, *args: Arg) -> list[Any]:
        """A command on every primary, in parallel; their replies (map order).
        Retried as a whole, within ``timeout``, while a primary fails."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout
        packed = _pack(args)
        backoff = _FIRST_BACKOFF
        while True:
            if not self._primaries:
                await self._need_map(deadline)
            replies = await asyncio.gather(
                *(self.node(address).send(packed) for address in self._primaries),
                return_exceptions=True,
            )
            errors = [reply for reply in replies if isinstance(reply, BaseException)]
            if not errors:
                return replies
            for error in errors:
                if not self._retryable(error):
                    raise error
            self._schedule_refresh()
            backoff = await self._backoff(errors[0], backoff, deadline)

    async def aclose(self) -> None:
        """Close every node's connection and forget the map; the next call
        starts again from the seeds. Idempotent."""
        refreshing, self._refreshing = self._refreshing, None
        if refreshing is not None and not refreshing.done():
            refreshing.cancel()
            if refreshing.get_loop() is asyncio.get_running_loop():
                with contextlib.suppress(asyncio.CancelledError, RedisError):
                    await refreshing
        self._owners = [None] * SLOTS
        self._primaries = []
        self._known = set()
        self._last_refresh = float("-inf")
        nodes, self._nodes = list(self._nodes.values()), {}
        closing: list[Awaitable[None]] = [node.aclose() for node in nodes]
        closing += [task for task in self._closing if task.get_loop() is asyncio.get_running_loop()]
        await asyncio.gather(*closing, return_exceptions=True)

    # -- one call: route, redirect, retry ----------------------------------------

    async def _call(self, slot: int | None, attempt: _Op) -> Any:
        """Run ``attempt`` on the node owning ``slot`` (any primary for None),
        following redirections and retrying within ``timeout``."""
        loop = asyncio.get_running_loop()
        start = loop.time()
        address = self._route(slot)
        if address is not None:  # the usual case: no await before the send
            try:
                return await attempt(self.node(address), False)
            except RedisError as exc:
                first: RedisError | None = exc
        else:
            first = None
        return await self._slow_call(slot, attempt, start + self.timeout, first, address)

    async def _slow_call(
        self,
        slot: int | None,
        attempt: _Op,
        deadline: float,
        error: RedisError | None,
        address: Address | None,
    ) -> Any:
        backoff = _FIRST_BACKOFF
        redirects = 0
        redirected: Address | None = None  # where MOVED/ASK sent this call
        asking = False
        while True:
            if error is not None:
                redirect = self._redirect(error, address)
                if redirect is not None:
                    kind, redirected = redirect
                    asking = kind == "ASK"
                    redirects += 1
                    if redirects > _IMMEDIATE_REDIRECTS:
                        backoff = await self._backoff(error, backoff, deadline)
                elif self._retryable(error):
                    if isinstance(error, RedisConnectionError) and address is not None:
                        self._unreachable.add(address)
                    self._schedule_refresh()
                    backoff = await self._backoff(error, backoff, deadline)
                    redirected, asking = None, False
                else:
                    raise error
            if redirected is None:
                address = self._route(slot)
                if address is None:
                    await self._need_map(deadline)
                    address = self._route(slot)
                    if address is None:  # a slot no node serves (not covered)
                        error = ReplyError(f"CLUSTERDOWN Hash slot {slot} not served")
                        continue
            else:
                address = redirected
            node = self.node(address)
            try:
                remaining = deadline - asyncio.get_running_loop().time()
                async with asyncio.timeout(max(remaining, _LAST_ATTEMPT)):
                    return await attempt(node, asking)
            except TimeoutError:
                error = RedisTimeoutError(
                    f"no reply from {address[0]}:{address[1]} within the {self.timeout:g}s budget"
                )
            except RedisError as exc:
                error = exc

    def _route(self, slot: int | None) -> Address | None:
        if slot is not None:
            return self._owners[slot]
        primaries = self._primaries
        if not primaries:
            return None
        self._next_primary = (self._next_primary + 1) % len(primaries)
        return primaries[self._next_primary]

    def _redirect(self, error: RedisError, asked: Address | None) -> tuple[str, Address] | None:
        """For a MOVED or ASK reply: its kind and target (MOVED updates the map)."""
        if type(error) is not ReplyError:
            return None
        text = str(error)
        if not text.startswith(("MOVED ", "ASK ")):
            return None
        try:
            kind, slot_text, target = text.split(" ")
            slot = int(slot_text)
            address = _address(target, asked or self.seeds[0])
        except ValueError:
            return None
        if kind == "MOVED" and 0 <= slot < SLOTS:
            self._owners[slot] = address
            self._known.add(address)
            self._schedule_refresh()
        return kind, address

    @staticmethod
    def _retryable(error: BaseException) -> bool:
        if isinstance(error, ReplyError):
            return str(error).startswith(_RETRIED)
        return isinstance(error, RedisError)  # connection lost, refused, timed out

    async def _backoff(self, error: BaseException, backoff: float, deadline: float) -> float:
        """Sleep ``backoff`` (at most until the deadline; ``error`` is raised
        if the deadline has passed); the next step."""
        remaining = deadline - asyncio.get_running_loop().time()
        if remaining <= 0:
            raise error
        await asyncio.sleep(min(backoff * (0.5 + random.random() / 2), remaining))
        return min(backoff * 2, _MAX_BACKOFF)

    # -- the slot map ----------------------------------------------------------------

    async def _need_map(self, deadline: float) -> None:
        """Wait (until ``deadline``) for a refresh that reads the map."""
        self._schedule_refresh(now=not self._primaries)
        refreshing = self._refreshing
        if refreshing is None:
            return
        remaining = deadline - asyncio.get_running_loop().time()
        try:
            async with asyncio.timeout(max(remaining, 0.001)):
                await asyncio.shield(refreshing)
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if refreshing.cancelled() and (current is None or not current.cancelling()):
                # The refresh was stopped by aclose(), not this caller.
                raise RedisConnectionError("client closed while reading the slot map") from None
            raise
        except TimeoutError:
            raise RedisConnectionError(
                f"no cluster node answered within {self.timeout:g}s ({self._seeds_text()})"
            ) from None

    def _schedule_refresh(self, *, now: bool = False) -> None:
        """Start a refresh of the map unless one is in flight (it waits for
        the rate limit, unless ``now``)."""
        loop = asyncio.get_running_loop()
        refreshing = self._refreshing
        if refreshing is not None and not refreshing.done() and refreshing.get_loop() is loop:
            return
        task = loop.create_task(self._refresh(now))
        self._refreshing = task
        task.add_done_callback(self._refreshed)

    def _refreshed(self, task: asyncio.Task[None]) -> None:
        if self._refreshing is task:
            self._refreshing = None
        if not task.cancelled():
            task.exception()  # retrieved: waiting callers see it through their shield

    async def _refresh(self, now: bool) -> None:
        loop = asyncio.get_running_loop()
        wait = self._last_refresh + REFRESH_INTERVAL - loop.time()
        if wait > 0 and not now:
            await asyncio.sleep(wait)
        self._last_refresh = loop.time()
        self.refreshes += 1
        errors: list[str] = []
        for address in self._candidates():
            try:
                async with asyncio.timeout(self.timeout):
                    slots = await self.node(address).execute("CLUSTER", "SLOTS")
            except (RedisError, TimeoutError) as exc:
                self._unreachable.add(address)
                errors.append(f"{address[0]}:{address[1]}: {exc or 'timed out'}")
                continue
            self._unreachable.discard(address)
            try:
                self._apply(slots, address)
            except (TypeError, ValueError, IndexError) as exc:
                errors.append(f"{address[0]}:{address[1]}: unreadable CLUSTER SLOTS: {exc}")
                continue
            return
        raise RedisConnectionError("cannot read the cluster's slot map: " + "; ".join(errors))

    def _candidates(self) -> list[Address]:
        """Nodes to ask for the map: the known ones first, seeds after,
        those that failed us lately last."""
        ordered = list(dict.fromkeys([*self._primaries, *self._known, *self.seeds]))
        return sorted(ordered, key=lambda address: address in self._unreachable)

    def _apply(self, slots: list[Any], asked: Address) -> None:
        owners: list[Address | None] = [None] * SLOTS
        primaries: dict[Address, None] = {}
        known: set[Address] = set()
        for entry in slots:
            start, end = int(entry[0]), int(entry[1])
            nodes = [(str(node[0]) or asked[0], int(node[1])) for node in entry[2:]]
            if not nodes or not 0 <= start <= end < SLOTS:
                raise ValueError(f"bad slot range {entry[:2]!r}")
            owners[start : end + 1] = [nodes[0]] * (end - start + 1)
            primaries[nodes[0]] = None
            known.update(nodes)
        self._owners = owners
        self._primaries = list(primaries)
        self._known = known
        for address in list(self._nodes):
            if address not in known:
                self._close_node(address)

    def _close_node(self, address: Address) -> None:
        node = self._nodes.pop(address)
        task = asyncio.get_running_loop().create_task(node.aclose())
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    def _seeds_text(self) -> str:
        return "seeds " + ", ".join(f"{host}:{port}" for host, port in self.seeds)
