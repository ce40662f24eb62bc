"""The Redis store's operations: :class:`RedisStore`, each one Lua script (from
:mod:`.scripts`) or one plain command over its own client (:mod:`.client`);
the guarantees are in :mod:`lapse.sessions.stores.redis`."""

from __future__ import annotations

import asyncio
import contextlib
import math
import re
import socket
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from lapse.sessions.store import Event, Expiry, StoreConfigError, StoredSession, StoreUnavailable
from lapse.sessions.stores.redis.inspection import Inspection
from lapse.sessions.stores.redis.scripts import SOURCES
from lapse.sessions.stores.redis.url import parse_url
from lapse.sessions.stores.redis.values import US, decoded, encode, encoded, field, us

try:
    from lapse.sessions.stores.redis.client import RedisClient, RedisError, ReplyError, Script

    _IMPORT_ERROR: ImportError | None = None
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    _IMPORT_ERROR = exc

__all__ = ["RedisStore"]

_EVENTS_MAXLEN = 100_000
_EVENTS_BATCH = 1000
_CURSOR = re.compile(r"\d+(-\d+)?")

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
    if isinstance(exc, ReplyError):
        return str(exc).startswith(_PERMANENT_REPLIES)
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, socket.gaierror):
            return seen.errno in _PERMANENT_LOOKUPS
        seen = seen.__cause__
    return False


class RedisStore(Inspection):
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
        self._where = f"{target.host}:{target.port}"
        self._client = RedisClient(
            target.host,
            target.port,
            db=target.db,
            username=target.username,
            password=target.password,
            tls=target.tls,
            timeout=self.timeout,
        )
        self._scripts = {name: Script(source) for name, source in SOURCES.items()}
        self._load_script = self._scripts["load"]
        self._k_deadlines = f"{prefix}:deadlines"
        self._k_ended = f"{prefix}:ended"
        self._k_leases = f"{prefix}:leases"
        self._k_seq = f"{prefix}:seq"
        self._k_events = f"{prefix}:events"

    @classmethod
    def from_url(cls, url: str, clock: Callable[[], float] | None = None) -> RedisStore:
        """The store for ``url`` (``?prefix=`` sets the key prefix)."""
        return cls(url, clock=clock)

    def __repr__(self) -> str:
        return f"<RedisStore {self.url} prefix={self.prefix!r}>"

    # -- plumbing -----------------------------------------------------------

    def _scrub(self, text: str) -> str:
        password = self._target.password
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

    def _key(self, uid: str) -> str:
        return f"{self.prefix}:s:{uid}"

    async def _call(self, op: str, keys: list[str], args: list[str | int]) -> Any:
        try:
            return await self._client.evalsha(self._scripts[op], keys, args)
        except (RedisError, OSError) as exc:
            raise self._unavailable(op, exc) from exc

    async def _command(self, op: str, *args: str | int) -> Any:
        try:
            return await self._client.execute(*args)
        except (RedisError, OSError) as exc:
            raise self._unavailable(op, exc) from exc

    # -- the protocol -------------------------------------------------------

    async def open(self) -> None:
        """Connect and load the scripts (one pipelined round trip). Idempotent."""
        loads = [self._command("open", "SCRIPT", "LOAD", s.source) for s in self._scripts.values()]
        await asyncio.gather(*loads)

    async def aclose(self) -> None:
        """Close the connection. Idempotent; never raises a client error.
        The store stays usable: the next operation connects again."""
        with contextlib.suppress(RedisError, OSError):
            await self._client.aclose()

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
        clock = self.clock
        now = "" if clock is None else str(us(clock(), "clock()"))
        try:
            reply = await self._client.evalsha(
                self._load_script,
                (f"{self.prefix}:s:{uid}", self._k_deadlines),
                (now, uid, "" if version is None else version),
            )
        except (RedisError, OSError) as exc:
            raise self._unavailable("load", exc) from exc
        if not reply:
            return None
        deadline, timeout, flat, moved, current = reply
        if moved:  # loaded through an alias: the session's uid now
            uid = moved
        stored = StoredSession(uid, int(timeout) / US, int(deadline) / US, version=int(current))
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
        keys = [self._key(uid), self._k_deadlines, self._k_ended]
        return int(await self._call("create", keys, args)) / US

    async def rotate(self, uid: str, new_uid: str, grace: float) -> bool:
        """Move the live session ``uid`` (hash and deadline) to ``new_uid``
        and touch it, in one script; ``uid`` stays an alias of it for
        ``grace`` seconds; the rotation is announced in the events stream.
        False if ``uid`` was not live."""
        keys = [
            self._key(uid),
            self._key(new_uid),
            self._k_deadlines,
            f"{self.prefix}:a:{uid}",
            self._k_events,
        ]
        args: list[str | int] = [
            self._now_arg(),
            uid,
            new_uid,
            max(0, us(grace, "grace")),
            _EVENTS_MAXLEN,
        ]
        return bool(await self._call("rotate", keys, args))

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
        version = int(await self._call("save", [self._key(uid), self._k_deadlines], args))
        return version if version else False

    async def exists(self, uid: str) -> bool:
        """Whether ``uid`` is live (deadline in the future); no touch."""
        return bool(await self._call("exists", [self._k_deadlines], [self._now_arg(), uid]))

    async def expire(self, uid: str) -> bool:
        """End a live session now, with cause ``"expired"``; claimable at once."""
        keys = [self._k_deadlines, self._k_ended]
        return bool(await self._call("expire", keys, [self._now_arg(), uid]))

    async def claim(self, owner: str, lease: float, limit: int) -> list[Expiry]:
        """Atomically lease up to ``limit`` ended sessions, oldest first (by
        when each became claimable): live ones past their deadline (cause
        ``"timeout"``), ones ended by :meth:`expire` (``"expired"``), and
        leased ones whose lease ran out (same delivery id, attempt + 1).
        Each comes with its final data."""
        if limit <= 0:
            return []
        keys = [self._k_deadlines, self._k_ended, self._k_leases, self._k_seq]
        args: list[str | int] = [
            self._now_arg(),
            self.prefix,
            owner,
            us(lease, "lease"),
            int(limit),
        ]
        reply = await self._call("claim", keys, args)
        return [
            Expiry(uid, decoded(flat), delivery_id, int(attempt), cause)
            for uid, delivery_id, attempt, cause, flat in reply
        ]

    async def renew(self, expiry: Expiry, owner: str, lease: float) -> bool:
        """Move the claim's lease end to now + ``lease`` (server time), if
        ``owner`` still holds this delivery (same delivery id and attempt);
        False, changing nothing, if not. One script."""
        keys = [f"{self.prefix}:c:{expiry.uid}", self._k_leases]
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
        ``expiry.delivery_id`` is still its delivery (else nothing)."""
        uid = expiry.uid
        keys = [
            self._key(uid),
            f"{self.prefix}:c:{uid}",
            self._k_leases,
            self._k_deadlines,
            self._k_events,
        ]
        await self._call("ack", keys, [uid, expiry.delivery_id, _EVENTS_MAXLEN])

    async def events(self, cursor: str | None) -> tuple[list[Event], str]:
        """Uids acked after ``cursor`` (a stream id; at most 1000 a call;
        ``(old, new)`` pairs for rotations), and the new cursor. ``None``:
        no uids, and the stream's last id (or ``"0-0"``), to read from now
        on."""
        if cursor is not None and not _CURSOR.fullmatch(cursor):
            raise ValueError(f"not a Redis events cursor: {cursor!r}")
        if cursor is None:
            last = await self._command("events", "XREVRANGE", self._k_events, "+", "-", "COUNT", 1)
            return [], str(last[0][0]) if last else "0-0"
        entries = await self._command(
            "events", "XRANGE", self._k_events, "(" + cursor, "+", "COUNT", _EVENTS_BATCH
        )
        entries = entries or []
        found: list[Event] = []
        for _, flat in entries:
            uid = field(flat, "uid") if flat else None
            if uid is not None:
                to = field(flat, "to")
                found.append(uid if to is None else (uid, to))
        return found, str(entries[-1][0]) if entries else cursor

    async def next_deadline(self) -> float | None:
        """The earliest of: the live sessions' deadlines (possibly past, if
        due but unclaimed), the leases' ends, and now if a session ended by
        :meth:`expire` awaits a claim. None if there is nothing."""
        keys = [self._k_deadlines, self._k_leases, self._k_ended]
        reply = await self._call("next_deadline", keys, [self._now_arg()])
        return None if reply is None else int(reply) / US
