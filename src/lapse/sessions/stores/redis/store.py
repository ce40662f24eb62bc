"""The Redis store's operations: :class:`RedisStore`, each one Lua script (from
:mod:`.scripts`) or one plain command over its own client (:mod:`.client`);
the guarantees are in :mod:`lapse.sessions.stores.redis`."""

from __future__ import annotations

import asyncio
import contextlib
import math
import socket
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from lapse.sessions.store import Expiry, StoreConfigError, StoredSession, StoreUnavailable
from lapse.sessions.stores.redis.inspection import Inspection
from lapse.sessions.stores.redis.layout import Layout, Shard
from lapse.sessions.stores.redis.news import BLOCK, News
from lapse.sessions.stores.redis.principals import Principals
from lapse.sessions.stores.redis.rounds import Rounds
from lapse.sessions.stores.redis.scripts import SOURCES
from lapse.sessions.stores.redis.slots import Commands, key_slot
from lapse.sessions.stores.redis.url import Target, parse_url
from lapse.sessions.stores.redis.values import US, encode, encoded, us

try:
    from lapse.sessions.stores.redis.client import RedisClient, RedisError, ReplyError, Script
    from lapse.sessions.stores.redis.cluster import ClusterClient
    from lapse.sessions.stores.redis.sentinel import SentinelClient, UnknownServiceError

    _IMPORT_ERROR: ImportError | None = None
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    _IMPORT_ERROR = exc

__all__ = ["RedisStore"]

_EVENTS_MAXLEN = 100_000

_PERMANENT_REPLIES = (
    "WRONGPASS",
    "NOAUTH",
    "NOPERM",
    "ERR invalid password",
    "ERR AUTH",
    "ERR DB index is out of range",
    "ERR invalid DB index",
)
"""Error replies that retrying does not mend: credentials the server refuses
(or a password it does not want), a db index it does not have."""

_PERMANENT_LOOKUPS = frozenset(
    code
    for code in (
        getattr(socket, "EAI_NONAME", None),
        getattr(socket, "EAI_NODATA", None),
        getattr(socket, "EAI_SERVICE", None),
    )
    if code is not None
)
"""Name lookup failures that say the host does not exist (not that the
resolver could not answer now: ``EAI_AGAIN`` passes)."""


def _permanent(exc: BaseException) -> bool:
    """Whether a client failure is one the store can never get past as configured."""
    if isinstance(exc, UnknownServiceError):
        return True
    if isinstance(exc, ReplyError):
        return str(exc).startswith(_PERMANENT_REPLIES)
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, socket.gaierror):
            return seen.errno in _PERMANENT_LOOKUPS
        seen = seen.__cause__
    return False


DEFAULT_CLUSTER_SHARDS = 12
"""Shards of a deployment on Redis Cluster when the URL gives no ``shards=``:
an even share on 2, 3, 4, 6 or 12 primaries (the cluster tools give primaries
equal slot ranges); each shard costs every process commands per keeper round."""


def _where(target: Target) -> str:
    """How errors name the deployment (never a password)."""
    nodes = ",".join(f"[{h}]:{p}" if ":" in h else f"{h}:{p}" for h, p in target.nodes)
    if target.kind == "cluster":
        return f"cluster {nodes}"
    if target.kind == "sentinel":
        return f"service {target.service!r} of sentinels {nodes}"
    return nodes


def _node_options(target: Target, timeout: float) -> dict[str, Any]:
    """What every client of ``target``'s data nodes is made with."""
    return {
        "username": target.username,
        "password": target.password,
        "ssl_context": target.ssl_context,
        "timeout": timeout,
    }


def _commands_for(target: Target, timeout: float) -> Commands:
    """The connection for ``target``: one node, a cluster, or a Sentinel's primary."""
    every = _node_options(target, timeout)
    every["wait_replicas"] = target.wait_replicas
    if target.kind == "sentinel":
        assert target.service is not None
        return SentinelClient(
            target.nodes,
            target.service,
            db=target.db,
            sentinel_password=target.sentinel_password,
            **every,
        )
    if target.kind == "cluster":
        return ClusterClient(target.nodes, **every)
    return RedisClient(target.host, target.port, db=target.db, tls=target.tls, **every)


class RedisStore(Rounds, Inspection, Principals):
    """Sessions in Redis, shared by every process that uses the same URL.

    Construction only checks the URL (no network): a malformed one is a
    :class:`StoreConfigError`. The connection is made by :meth:`open` or the
    first operation. ``url`` is the URL with its password replaced by ``***``,
    safe to log.
    """

    shared = True
    enforces_timeout = True
    """The client fails every pending call once the server has been silent
    for ``timeout`` seconds (one watchdog per connection)."""
    holds_sessions = False
    """It keeps records, not this process's ``Session`` objects."""

    def __init__(
        self,
        url: str,
        *,
        clock: Callable[[], float] | None = None,
        prefix: str = "lapse",
        timeout: float = 1.0,
        shards: int | None = None,
    ) -> None:
        target = parse_url(url)
        if _IMPORT_ERROR is not None:
            raise StoreConfigError(
                "the Redis session store needs the hiredis package: `pip install hiredis` "
                "(or, from a lapse checkout, `pip install '.[redis]'`)"
            ) from _IMPORT_ERROR
        if not isinstance(timeout, int | float) or not (0 < timeout < math.inf):
            raise StoreConfigError(f"the Redis timeout must be positive seconds, not {timeout!r}")
        prefix = target.prefix or prefix
        if not isinstance(prefix, str) or not prefix:
            raise StoreConfigError(f"the Redis key prefix must be a non-empty string: {prefix!r}")
        self.url = target.redacted
        self.prefix = prefix
        self.timeout = float(timeout)
        self.clock = clock
        self._target = target
        self._where = _where(target)
        self._client = _commands_for(target, self.timeout)
        cluster = target.kind == "cluster"
        if shards is None:
            shards = target.shards
        if shards is None:
            shards = DEFAULT_CLUSTER_SHARDS if cluster else 1
        try:
            self._layout = Layout(prefix, shards, tagged=cluster)
        except ValueError as exc:
            raise StoreConfigError(f"bad Redis shard count: {exc}") from None
        self._shards = self._layout.shards
        self._layout_checked = False
        self._down: set[str] = set()
        self._scripts = {name: Script(source) for name, source in SOURCES.items()}
        self._load_script = self._scripts["load"]
        self._news = News(self._shards, self._node_of, self._blocking_client)

    @classmethod
    def from_url(cls, url: str, clock: Callable[[], float] | None = None) -> RedisStore:
        """The store for ``url`` (``?prefix=`` sets the key prefix)."""
        return cls(url, clock=clock)

    def __repr__(self) -> str:
        return f"<RedisStore {self.url} prefix={self.prefix!r} shards={self.shard_count}>"

    @property
    def shard_count(self) -> int:
        """How many shards this deployment's sessions are spread over."""
        return len(self._shards)

    # -- plumbing -----------------------------------------------------------

    def _scrub(self, text: str) -> str:
        for password in (self._target.password, self._target.sentinel_password):
            if password:
                text = text.replace(password, "***")
        return text

    def _unavailable(self, op: str, exc: Exception) -> StoreUnavailable:
        """The :class:`StoreUnavailable` for a client failure (raise it ``from exc``);
        permanent if it is one that retrying does not mend (see :func:`_permanent`)."""
        detail = self._scrub(str(exc)) or "timed out"
        return StoreUnavailable(
            f"Redis session store at {self._where} unavailable ({op}): "
            f"{type(exc).__name__}: {detail}",
            permanent=_permanent(exc),
        )

    def _now_arg(self) -> str:
        return "" if self.clock is None else str(us(self.clock(), "clock()"))

    def _shard(self, uid: str) -> Shard:
        return self._layout.shard_of(uid)

    async def _call(self, op: str, keys: list[str], args: list[str | int]) -> Any:
        """Script ``op`` on the node holding ``keys`` (all of one shard)."""
        if not self._layout_checked:
            await self._check_layout()
        try:
            return await self._client.evalsha(self._scripts[op], keys, args)
        except (RedisError, OSError) as exc:
            raise self._unavailable(op, exc) from exc

    async def _command(self, op: str, *args: str | int) -> Any:
        """A command with no key (``TIME``)."""
        try:
            return await self._client.execute(*args)
        except (RedisError, OSError) as exc:
            raise self._unavailable(op, exc) from exc

    async def _command_on(self, op: str, key: str, *args: str | int) -> Any:
        """A command on ``key`` (and keys of its shard)."""
        if not self._layout_checked:
            await self._check_layout()
        try:
            return await self._client.execute_on(key, *args)
        except (RedisError, OSError) as exc:
            raise self._unavailable(op, exc) from exc

    async def _check_layout(self) -> None:
        """Check (once) that the deployment's stored shard count is this
        store's, storing it if none is: a process started with another count
        would look for sessions in the wrong shards; a permanent
        :class:`StoreUnavailable` says so."""
        layout = self._layout
        keys = [layout.meta_key]
        # The one-shard layout's keys span slots: only a single node (or a
        # Sentinel's primary) can hold them, and be asked about them.
        if layout.tagged and self._target.kind != "cluster":
            base = self.prefix
            keys += [f"{base}:deadlines", f"{base}:leases", f"{base}:ended"]
        try:
            stored = await self._client.evalsha(self._scripts["shards"], keys, [layout.count])
        except (RedisError, OSError) as exc:
            raise self._unavailable("open", exc) from exc
        if isinstance(stored, list):
            raise StoreUnavailable(
                f"Redis session store at {self._where} holds sessions of lapse's one-shard "
                f"layout ({stored[0]} exists) but this process was started with "
                f"shards={layout.count}: start it without shards= (or with shards=1)",
                permanent=True,
            )
        if int(stored) != layout.count:
            raise StoreUnavailable(
                f"Redis session store at {self._where} (prefix {self.prefix!r}) is "
                f"deployed with shards={stored} but this process was started with "
                f"shards={layout.count}: every process of a deployment must use the "
                f"same count (the stored one is at {layout.meta_key})",
                permanent=True,
            )
        self._layout_checked = True

    # -- the protocol -------------------------------------------------------

    async def open(self) -> None:
        """Connect, check the deployment's shard count (see
        :meth:`_check_layout`) and load the scripts on every primary (one
        pipelined round trip each). Idempotent."""
        await self._check_layout()

        async def load(script: Script) -> None:
            try:
                await self._client.each_primary("SCRIPT", "LOAD", script.source)
            except (RedisError, OSError) as exc:
                raise self._unavailable("open", exc) from exc

        await asyncio.gather(*(load(script) for script in self._scripts.values()))

    async def aclose(self) -> None:
        """Close the connections (those of :meth:`wait_for_news` too).
        Idempotent; never raises a client error. The store stays usable: the
        next operation connects again."""
        with contextlib.suppress(RedisError, OSError):
            await self._news.aclose()
        with contextlib.suppress(RedisError, OSError):
            await self._client.aclose()

    async def wait_for_news(self, seconds: float) -> bool:
        """Sleep at most ``seconds`` (a process with nothing to do until its
        next deadline); True if woken sooner by another process's news (an
        end announced, a rotation, a session ended by hand, or one made that
        ends before every other of its shard), by a connection of the
        blocking reads made again (the server may hold other sessions than
        this process knows), or, while they cannot read, every
        :data:`~.news.DEAF_RETRY` seconds (see :mod:`.news`). It reads the news after
        where the last :meth:`events` stopped."""
        if self._news.marks is None:  # (no events() read yet: from now on)
            with contextlib.suppress(StoreUnavailable):
                await self.events(None)
        return await self._news.wait(seconds)

    def _node_of(self, shard: Shard) -> tuple[str, int] | None:
        """The node that holds ``shard`` now, as the store's connection routes it."""
        client = self._client
        if isinstance(client, ClusterClient):
            return client.owner(key_slot(shard.events))
        if isinstance(client, SentinelClient):
            return client.primary
        target = self._target
        return (target.host, target.port)

    def _blocking_client(self, address: tuple[str, int]) -> RedisClient:
        """A client of its own for :meth:`wait_for_news`'s blocking reads at ``address``."""
        target = self._target
        return RedisClient(
            address[0],
            address[1],
            db=target.db,
            tls=target.tls,
            require_role="master" if target.kind == "sentinel" else None,
            patience=BLOCK,
            **_node_options(target, self.timeout),
        )

    async def now(self) -> float:
        """The store's time: ``clock()`` if given, else the server's ``TIME``."""
        if self.clock is not None:
            return self.clock()
        seconds, micros = await self._command("now", "TIME")
        return int(seconds) + int(micros) / US

    async def load(self, uid: str, version: int | None = None) -> StoredSession | None:
        """Touch (deadline = now + timeout) and read a live session in one
        script; None if unknown or past its deadline (never revived). Its
        data as JSON texts, or none (``unchanged``) if still at ``version``."""
        # The hot path (one call per request): no helper coroutine in between.
        if not self._layout_checked:
            await self._check_layout()
        clock = self.clock
        now = "" if clock is None else str(us(clock(), "clock()"))
        shard = self._layout.shard_of(uid)
        try:
            reply = await self._client.evalsha(
                self._load_script,
                (f"{shard.base}:s:{uid}", shard.deadlines),
                (now, uid, "" if version is None else version),
            )
        except (RedisError, OSError) as exc:
            raise self._unavailable("load", exc) from exc
        if not reply:
            return None
        deadline, timeout, flat, moved, current, principal = reply
        if moved:  # loaded through an alias: the session's uid now
            uid = moved
        stored = StoredSession(
            uid, int(timeout) / US, int(deadline) / US, version=int(current), principal=principal
        )
        if flat is None:
            stored.unchanged = True
        else:
            stored.encoded = encoded(flat)
        return stored

    async def create(
        self, uid: str, timeout: float, data: Mapping[str, Any], lifetime: float | None = None
    ) -> float:
        """Store a new live session (replacing any live one of that uid);
        its deadline, now + ``timeout`` (or now + ``lifetime``, its absolute
        end, if that is earlier)."""
        args: list[str | int] = [
            self._now_arg(),
            uid,
            us(timeout, "timeout"),
            "" if lifetime is None else us(lifetime, "lifetime"),
        ]
        for key, value in data.items():
            args += ["d:" + key, encode(value)]
        shard = self._shard(uid)
        keys = [f"{shard.base}:s:{uid}", shard.deadlines, shard.ended, shard.events]
        return int(await self._call("create", keys, args)) / US

    async def rotate(self, uid: str, new_uid: str, grace: float) -> bool:
        """Move the live session ``uid`` (hash and deadline) to ``new_uid``
        and touch it, in one script; ``uid`` stays an alias of it for
        ``grace`` seconds; the rotation is announced in the events stream.
        False if ``uid`` was not live. A session bound to a principal stays
        bound, under its new uid (on a sharded layout, under the principal's
        lock: see :meth:`_rotate_bound`)."""
        shard = self._shard(uid)
        if self._shard(new_uid) is not shard:
            raise ValueError(
                f"a rotated uid stays in its shard: {new_uid[:2]!r}... is not in the shard "
                f"of {uid[:2]!r}... (lapse keeps a uid's first two characters on rotation)"
            )
        base = shard.base
        keys = [f"{base}:s:{uid}", f"{base}:s:{new_uid}", shard.deadlines, f"{base}:a:{uid}"]
        keys.append(shard.events)
        args: list[str | int] = [
            self._now_arg(),
            uid,
            new_uid,
            max(0, us(grace, "grace")),
            _EVENTS_MAXLEN,
            "1" if len(self._shards) == 1 else "",
            "",
        ]
        moved = await self._call("rotate", keys, args)
        if isinstance(moved, list):  # bound, on a sharded layout: under its lock
            return await self._rotate_bound(uid, new_uid, keys, args, moved[0])
        return bool(moved)

    async def save(
        self, uid: str, changed: Mapping[str, Any], removed: Iterable[str]
    ) -> bool | int:
        """Write the changed keys, then delete the removed ones (a key in
        both ends up deleted), in the live session ``uid`` (or the one an old
        ``uid`` was rotated to, within its grace); the data's new version.
        The deadline does not move. False, with nothing written, if there is
        no such session."""
        args: list[str | int] = [self._now_arg(), uid, len(changed)]
        for key, value in changed.items():
            args += ["d:" + key, encode(value)]
        args += ["d:" + key for key in removed]
        shard = self._shard(uid)
        keys = [f"{shard.base}:s:{uid}", shard.deadlines]
        version = int(await self._call("save", keys, args))
        return version if version else False

    async def exists(self, uid: str) -> bool:
        """Whether ``uid`` is live (deadline in the future); no touch."""
        keys = [self._shard(uid).deadlines]
        return bool(await self._call("exists", keys, [self._now_arg(), uid]))

    async def expire(self, uid: str) -> bool:
        """End a live session now, with cause ``"expired"``; claimable at once."""
        shard = self._shard(uid)
        keys = [shard.deadlines, shard.ended, shard.events]
        return bool(await self._call("expire", keys, [self._now_arg(), uid]))

    async def renew(self, expiry: Expiry, owner: str, lease: float) -> bool:
        """Move the claim's lease end to now + ``lease`` (server time), if
        ``owner`` still holds this delivery (same delivery id and attempt);
        False, changing nothing, if not. One script."""
        shard = self._shard(expiry.uid)
        keys = [f"{shard.base}:c:{expiry.uid}", shard.leases]
        args: list[str | int] = [
            self._now_arg(),
            expiry.uid,
            expiry.delivery_id,
            str(expiry.attempt),
            owner,
            us(lease, "lease"),
        ]
        return bool(await self._call("renew", keys, args))

    async def ack(self, expiry: Expiry) -> None:
        """Forget the session and append its uid to the events stream, if
        ``expiry.delivery_id`` is still its delivery (else nothing); the uid
        leaves its principal's index (on a sharded layout, best effort, one
        command more: a member left behind is filtered out on reading)."""
        uid = expiry.uid
        shard = self._shard(uid)
        base = shard.base
        keys = [f"{base}:s:{uid}", f"{base}:c:{uid}", shard.leases, shard.deadlines, shard.events]
        here = "1" if len(self._shards) == 1 else ""
        bound = await self._call("ack", keys, [uid, expiry.delivery_id, _EVENTS_MAXLEN, here])
        if isinstance(bound, str):  # its principal's index is in another shard
            await self._forget_member(bound, uid)
