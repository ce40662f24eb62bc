"""Where ``lapse sessions`` finds sessions: one interface, two sources.

:class:`SessionSource` is what the commands (:mod:`lapse.cli.sessions`) use:
count, page through, find, expire, summarise. :class:`StoreSource` reads a
shared store directly (``--store``); :class:`ServerSource` goes through a
running server's live view (``--server``), which reaches any store, the
memory store included, and expires sessions in the server itself.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

from lapse import settings
from lapse.cli.common import EXIT_FAILED, CommandError, _is_memory, _shown, _shown_url, store_for
from lapse.cli.liveview_client import SERVER_THREADS, LiveViewClient
from lapse.cli.parser import SCAN_BATCH

__all__ = [
    "Row",
    "ServerSource",
    "SessionSource",
    "Stats",
    "StoreSource",
    "open_store",
    "store_url",
]

T = TypeVar("T")

MIN_PREFIX = 6
"""The shortest start of a uid that show and expire take for the whole uid."""

MEMORY_SESSIONS = (
    "the memory: store keeps its sessions inside the server process, so --store cannot "
    "reach them: go through the server's live view instead, with --server URL (e.g. "
    "--server http://127.0.0.1:8080/_lapse/ --token T, or LAPSE_LIVEVIEW_TOKEN), or run "
    "the server with a shared store (--store sqlite:///sessions.db or "
    "--store redis://host:6379/0) and point --store at it"
)

NO_STORE = (
    "no session store: give --store URL or set LAPSE_SESSION_STORE "
    "(sqlite:///path.db, redis://host:port/db or postgresql://user@host/dbname)"
)


@dataclass
class Row:
    """One live session as a source shows it."""

    uid: str
    """The whole uid (a store), or its start (a live view gives no more)."""
    age: float | None
    """Seconds since it was created (None: unknown)."""
    idle: float
    left: float
    now: float
    """When it was read (the source's clock)."""
    json: dict[str, Any]
    """The row as ``--json`` prints it."""
    id: str | None = None
    """A live view's row id (None for a store: the uid names it)."""
    data: Mapping[str, Any] | None = None
    """Its data (None: the source does not expose it)."""
    principal: str | None = None
    """The principal it is bound to (None: none)."""

    @property
    def name(self) -> str:
        """What :meth:`SessionSource.expire` takes for this session."""
        return self.uid if self.id is None else self.id


@dataclass
class Stats:
    """The live count and a histogram of the upcoming expiries."""

    identity: dict[str, Any]
    """``{"store": URL}`` or ``{"server": URL, "store": URL}``: what was asked."""
    now: float | None
    live: int
    horizon: float
    counts: list[int]
    activity: dict[str, Any] | None = None
    """A live view's counts of sessions created and ended (since start, per minute)."""
    extra: dict[str, Any] = field(default_factory=dict)
    """More fields for ``--json``."""


class SessionSource(Protocol):
    """What ``lapse sessions`` reads and ends sessions through."""

    kind: str
    """``"store"`` or ``"server"``: the key naming :attr:`url` in JSON output."""
    url: str
    where: str
    """``in URL`` or ``at URL``, for messages."""
    row_ids: bool
    """Whether sessions are named by row ids (a live view) rather than uids."""

    async def count(self) -> int: ...

    async def page(self, cursor: str | None, limit: int) -> tuple[list[Row], str | None]:
        """Up to ``limit`` live sessions after ``cursor``; the next cursor (None: the end)."""
        ...

    async def resolve(self, given: str) -> str | None:
        """The name of the live session ``given`` names (see :attr:`Row.name`),
        or None; a :class:`CommandError` if it is ambiguous."""
        ...

    async def find(self, given: str) -> Row | None: ...

    async def expire(self, names: Sequence[str]) -> list[bool]:
        """End these sessions now; whether each was live."""
        ...

    async def stats(self, horizon: int | None, buckets: int | None) -> Stats: ...

    async def sessions_of(self, user: str, limit: int) -> tuple[list[Row], int]:
        """Up to ``limit`` live sessions of the principal ``user``, most
        recently used first, and how many it has."""
        ...

    async def expire_user(self, user: str, keep: str | None) -> list[str]:
        """End every live session of ``user`` but ``keep`` (as :meth:`resolve`
        takes it); the sessions ended, as messages name them (short uids)."""
        ...

    def not_live(self, given: str) -> str: ...

    async def aclose(self) -> None: ...


# -- a shared store -------------------------------------------------------------


def store_url(option: str | None) -> tuple[str, str]:
    """The store URL ``--store`` (or ``LAPSE_SESSION_STORE``) gives, and where
    it came from as messages name it (its password hidden)."""
    env = settings.SESSION_STORE
    url = option if option is not None else env.get()
    if url is None:
        raise CommandError(NO_STORE)
    source = f"--store {_shown_url(url)}" if option is not None else f"{env.name}={_shown_url(url)}"
    return url, source


def open_store(option: str | None) -> Any:
    """The store ``--store`` (or ``LAPSE_SESSION_STORE``) names, checked."""
    url, source = store_url(option)
    if _is_memory(url):
        raise CommandError(MEMORY_SESSIONS)
    store = store_for(url, source)
    path = getattr(store, "path", None)
    if isinstance(path, str):
        try:
            found = Path(path).is_file()
        except OSError as exc:
            raise CommandError(
                f"cannot use the session store {_shown(store.url)}: {exc.strerror or exc}",
                EXIT_FAILED,
            ) from None
        if not found:
            # Opening would create an empty database: a typo, most likely.
            raise CommandError(
                f"cannot use the session store {_shown(store.url)}: no such file", EXIT_FAILED
            )
    return store


def _info_json(info: Any, now: float) -> dict[str, Any]:
    return {
        "uid": info.uid,
        "created": info.created,
        "last_access": info.last_access,
        "deadline": info.deadline,
        "age": None if info.created is None else now - info.created,
        "idle": now - info.last_access,
        "left": info.deadline - now,
        "data": dict(info.data),
        "principal": getattr(info, "principal", None),
    }


def _store_row(info: Any, now: float) -> Row:
    return Row(
        uid=info.uid,
        age=None if info.created is None else now - info.created,
        idle=now - info.last_access,
        left=info.deadline - now,
        now=now,
        json=_info_json(info, now),
        data=dict(info.data),
        principal=getattr(info, "principal", None),
    )


NO_INDEX = (
    "the session store {} keeps no index of sessions by principal (set_principal, "
    "sessions_of, expire_principal): a store of an older lapse, or one written elsewhere"
)


class StoreSource:
    """Sessions read from a shared store (SQLite, Redis) directly."""

    kind = "store"
    row_ids = False

    def __init__(self, store: Any) -> None:
        self.store = store
        self.url: str = store.url
        self.where = f"in {self.url}"

    async def count(self) -> int:
        return int(await self.store.count())

    async def page(self, cursor: str | None, limit: int) -> tuple[list[Row], str | None]:
        now = await self.store.now()
        infos, cursor = await self.store.scan(cursor, limit)
        return [_store_row(info, now) for info in infos], cursor

    async def resolve(self, given: str) -> str | None:
        """``given`` itself, or the one live uid it is the start of ('list'
        shows ``abcdefgh…``; the ellipsis may be kept)."""
        store = self.store
        if await store.info(given) is not None:
            return given
        prefix = given.removesuffix("\u2026").removesuffix("...")
        if len(prefix) < MIN_PREFIX:
            return None
        found: set[str] = set()
        cursor: str | None = None
        while True:
            page, cursor = await store.scan(cursor, SCAN_BATCH)
            found.update(info.uid for info in page if info.uid.startswith(prefix))
            if cursor is None:
                break
        if len(found) > 1:
            raise CommandError(
                f"{_shown(given)!r} is the start of {len(found)} live sessions' uids in "
                f"{self.url}: give more of it, or the whole uid ('list --full')",
                EXIT_FAILED,
            )
        return found.pop() if found else None

    async def find(self, given: str) -> Row | None:
        now = await self.store.now()
        uid = await self.resolve(given)
        info = None if uid is None else await self.store.info(uid)
        return None if info is None else _store_row(info, now)

    async def expire(self, names: Sequence[str]) -> list[bool]:
        return list(await asyncio.gather(*(self.store.expire(uid) for uid in names)))

    async def stats(self, horizon: int | None, buckets: int | None) -> Stats:
        horizon = 3600 if horizon is None else horizon
        buckets = 12 if buckets is None else buckets
        now = await self.store.now()
        live = await self.store.count()
        counts = await self.store.deadlines(now, float(horizon), buckets)
        return Stats({"store": self.url}, now, live, horizon, list(counts))

    def _index(self) -> Any:
        """The store, if it keeps sessions by principal; else a CommandError."""
        from lapse.sessions.store import PRINCIPAL_MEMBERS

        store = self.store
        if not all(callable(getattr(store, name, None)) for name in PRINCIPAL_MEMBERS):
            raise CommandError(NO_INDEX.format(self.url), EXIT_FAILED)
        return store

    async def sessions_of(self, user: str, limit: int) -> tuple[list[Row], int]:
        index = self._index()
        now = await self.store.now()
        infos = await index.sessions_of(user)
        return [_store_row(info, now) for info in infos[:limit]], len(infos)

    async def expire_user(self, user: str, keep: str | None) -> list[str]:
        from lapse.sessions import short_uid

        index = self._index()
        keep_uid = None
        if keep is not None:
            keep_uid = await self.resolve(keep)
            if keep_uid is None:
                # Not a typo to act on: ending them all would end the one to keep.
                raise CommandError(f"--except: {self.not_live(keep)}; nothing expired", EXIT_FAILED)
        ended: list[str] = await index.expire_principal(user, keep_uid)
        return [short_uid(uid) for uid in ended]

    def not_live(self, given: str) -> str:
        return (
            f"no live session {_shown(given)!r} in {self.url} (give the whole uid, as "
            f"'list --full' shows it, or at least its first {MIN_PREFIX} characters)"
        )

    async def aclose(self) -> None:
        await self.store.aclose()


# -- a server's live view -------------------------------------------------------


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) else None


def _server_row(row: dict[str, Any], now: float) -> Row:
    return Row(
        uid=str(row.get("uid")),
        age=_number(row.get("age")),
        idle=_number(row.get("idle")) or 0.0,
        left=_number(row.get("left")) or 0.0,
        now=now,
        json=row,
        id=str(row.get("id")),
        principal=principal if isinstance(principal := row.get("principal"), str) else None,
    )


class ServerSource:
    """Sessions seen through a running server's live view (its JSON API).

    The client is blocking (urllib): each call runs in a thread, the POSTs
    of ``expire`` :data:`SERVER_THREADS` at a time."""

    kind = "server"
    row_ids = True

    def __init__(self, view: LiveViewClient) -> None:
        self.view = view
        self.url = view.base
        self.where = f"at {self.url}"
        self._pool = ThreadPoolExecutor(SERVER_THREADS)

    async def _call(self, func: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._pool, func, *args)

    async def count(self) -> int:
        summary = await self._call(self.view.summary)
        live = summary.get("live")
        return live if isinstance(live, int) else 0

    async def page(self, cursor: str | None, limit: int) -> tuple[list[Row], str | None]:
        rows, cursor = await self._call(self.view.page, cursor, limit)
        now = time.time()
        return [_server_row(row, now) for row in rows], cursor

    async def resolve(self, given: str) -> str | None:
        return given  # the server resolves row ids

    async def find(self, given: str) -> Row | None:
        row = await self._call(self.view.session, given)
        if row is None:
            return None
        now = _number(row.get("now"))
        return _server_row(row, time.time() if now is None else now)

    async def expire(self, names: Sequence[str]) -> list[bool]:
        return list(await asyncio.gather(*(self._call(self.view.expire, n) for n in names)))

    async def stats(self, horizon: int | None, buckets: int | None) -> Stats:
        if horizon is not None or buckets is not None:
            raise CommandError(
                "--horizon and --buckets go with --store: the live view's histogram is fixed "
                "(one hour in 5-minute slices)"
            )
        summary = await self._call(self.view.summary)
        expiries = summary.get("expiries") or {}
        counts = [int(n) for n in expiries.get("buckets") or []]
        activity = summary.get("stats") or {}
        minutes = activity.get("minutes") or {}
        return Stats(
            {"server": self.url, "store": summary.get("store")},
            summary.get("now"),
            int(summary.get("live") or 0),
            float(expiries.get("horizon") or 3600),
            counts,
            activity=activity,
            extra={
                "created": activity.get("created"),
                "ended": activity.get("ended"),
                "per_minute": minutes,
            },
        )

    async def sessions_of(self, user: str, limit: int) -> tuple[list[Row], int]:
        rows, live = await self._call(self.view.user_sessions, user, limit)
        now = time.time()
        return [_server_row(row, now) for row in rows], live

    async def expire_user(self, user: str, keep: str | None) -> list[str]:
        return await self._call(self.view.expire_user, user, keep)

    def not_live(self, given: str) -> str:
        return (
            f"no live session with ID {given!r} at {self.url} (IDs are those 'list --server' shows)"
        )

    async def aclose(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
