"""The PostgreSQL store's connections: an asyncpg pool made on first use, the
tables made (or checked) on it, every call bounded by the store's timeout and
every failure a :class:`StoreUnavailable`."""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import socket
import ssl
import zlib
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from lapse.sessions.store import StoreConfigError, StoreUnavailable
from lapse.sessions.stores._deadline import bounded
from lapse.sessions.stores._tasks import retrieved
from lapse.sessions.stores.postgres.config import PostgresConfig
from lapse.sessions.stores.postgres.schema import SCHEMA_VERSION, steps_after

__all__ = ["POOL_MIN", "Pool"]

T = TypeVar("T")

SCHEMA_TIMEOUT = 60.0
"""Seconds the first opening may take: connecting, and making or upgrading
the tables (requests meanwhile get their 503 within the store's timeout)."""

POOL_MIN = 0
"""Connections a store keeps open when idle: none after asyncpg's five idle
minutes (at most ``pool_size`` under load). asyncpg keeps a floor above
zero by reconnecting in the background, logging a traceback at each try
while the server is down: an outage would flood the log."""

_PERMANENT_STATES = frozenset({"28000", "28P01", "3D000", "3F000", "42501"})
"""SQLSTATEs that retrying cannot fix: bad credentials (28000, 28P01), no
such database (3D000) or schema (3F000), no privilege (42501)."""


def _driver() -> Any:
    try:
        return importlib.import_module("asyncpg")
    except ImportError:
        raise StoreConfigError(
            "the PostgreSQL store needs asyncpg: `pip install asyncpg` "
            "(or, from a lapse checkout, `pip install '.[postgres]'`)"
        ) from None


def _never_works(exc: BaseException) -> bool:
    """Whether a connection error will recur whatever the server does: a
    host name that does not exist, or a server that refuses the SSL that
    ``sslmode`` demands."""
    if isinstance(exc, socket.gaierror):
        return exc.errno == socket.EAI_NONAME
    return isinstance(exc, ConnectionError) and "rejected SSL upgrade" in str(exc)


async def _keep_session(conn: Any) -> None:
    """Nothing to reset when a connection goes back to the pool: the store
    sets no session state (no SET, LISTEN, cursor or session lock; an open
    transaction is rolled back by asyncpg first). asyncpg's default reset
    would cost every call a second round trip."""


class Pool:
    """An asyncpg pool for one store, made (and the schema checked) on the
    first call; each :meth:`run` is one connection's work, bounded in time."""

    def __init__(self, config: PostgresConfig, safe_url: str) -> None:
        self.config = config
        self.safe_url = safe_url
        self.driver = _driver()
        self.failures: tuple[type[BaseException], ...] = (
            TimeoutError,
            OSError,
            self.driver.PostgresError,
            self.driver.InterfaceError,
            self.driver.InternalClientError,
        )
        """What a call may raise that :meth:`translate` makes a StoreUnavailable."""
        self._pool: Any | None = None
        self._opening: asyncio.Task[Any] | None = None
        self.closed = False

    def unavailable(self, why: str, *, permanent: bool = False) -> StoreUnavailable:
        return StoreUnavailable(
            f"PostgreSQL session store {self.safe_url}: {why}", permanent=permanent
        )

    def _ssl(self) -> Any:
        mode = self.config.sslmode
        if mode == "disable":
            return False
        context = ssl.create_default_context()
        if mode == "require":
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        elif mode == "verify-ca":
            context.check_hostname = False
        return context

    def _connect_options(self) -> dict[str, Any]:
        """What every connection of the store is opened with (the pool's and
        the listener's)."""
        config = self.config
        millis = str(max(1, int(config.timeout * 1000)))
        # The server counts a statement from its first message to its last,
        # so also while this process's loop is held between them (the round
        # trips of a statement's first use): a backstop, ten times the bound.
        backstop = str(max(1, int(config.timeout * 10_000)))
        return {
            "host": config.host,
            "port": config.port,
            "user": config.user,
            "password": config.password,
            "database": config.database,
            "ssl": self._ssl(),
            # (no driver timeouts: they would count time this process's
            # loop was held; run() and connect() bound every call instead)
            "statement_cache_size": 100,
            "server_settings": {
                "statement_timeout": backstop,
                "lock_timeout": millis,
                "application_name": "lapse",
            },
        }

    async def _open(self) -> Any:
        """The pool, its tables made, checked or upgraded: within
        SCHEMA_TIMEOUT (an upgrade of a large table takes its time)."""
        async with bounded(SCHEMA_TIMEOUT):
            pool: Any = await self.driver.create_pool(
                min_size=POOL_MIN,
                max_size=self.config.pool_size,
                reset=_keep_session,
                **self._connect_options(),
            )
            try:
                async with pool.acquire() as conn:
                    await self._prepare_schema(conn)
            except BaseException:
                pool.terminate()
                raise
        return pool

    async def _prepare_schema(self, conn: Any) -> None:
        """Make the tables, or bring older ones up to date, or refuse newer
        ones: one transaction under an advisory lock of these tables."""
        schema, prefix = self.config.schema, self.config.table_prefix
        async with conn.transaction():
            # (this transaction's own limits: an upgrade may build an index
            # of a large table, and others wait here for the first to finish)
            limit = f"{int(SCHEMA_TIMEOUT * 1000)}ms"
            await conn.execute(f"SET LOCAL statement_timeout = '{limit}'")
            await conn.execute(f"SET LOCAL lock_timeout = '{limit}'")
            lock = zlib.crc32(f"lapse:{schema}.{prefix}".encode())
            await conn.execute("SELECT pg_advisory_xact_lock($1)", lock)
            found = await self.found_version(conn)
            if found > SCHEMA_VERSION:
                raise self.unavailable(
                    f"its tables ({schema}.{prefix}*) are schema version {found}, newer "
                    f"than this lapse knows ({SCHEMA_VERSION}): upgrade lapse",
                    permanent=True,
                )
            if found == SCHEMA_VERSION:
                return
            try:
                if not await conn.fetchval("SELECT 1 FROM pg_namespace WHERE nspname = $1", schema):
                    await conn.execute(f"CREATE SCHEMA IF NOT EXISTS {schema}")
                await conn.execute(steps_after(found, schema, prefix))
            except self.driver.InsufficientPrivilegeError as exc:
                raise self.unavailable(
                    f"its tables ({schema}.{prefix}*) are "
                    f"{f'schema version {found}' if found else 'not there'} and this role "
                    f"cannot {'upgrade' if found else 'create'} them ({exc}): have a role "
                    f"that can apply `lapse sessions migrate --store URL --sql`",
                    permanent=True,
                ) from exc

    async def found_version(self, conn: Any) -> int:
        """The schema version of the tables on ``conn`` (0: there are none)."""
        table = f"{self.config.schema}.{self.config.table_prefix}schema_version"
        if await conn.fetchval("SELECT to_regclass($1)", table) is None:
            return 0
        return int(await conn.fetchval(f"SELECT max(version) FROM {table}") or 0)

    async def pool(self) -> Any:
        """The pool, opened on first use by one task that callers share and
        do not cancel when they give up (so a schema upgrade slower than a
        request's bound still finishes); a failed opening is tried anew by
        the next call. Errors are the driver's."""
        if self.closed:
            raise self.unavailable("the store is closed")
        if self._pool is not None:
            return self._pool
        task = self._opening
        if task is None:
            task = self._opening = asyncio.get_running_loop().create_task(self._open())
            task.add_done_callback(retrieved)  # (every caller may give up)
        try:
            self._pool = await asyncio.shield(task)
        finally:
            if task.done() and self._opening is task:
                self._opening = None
        return self._pool

    async def run(self, work: Callable[[Any], Awaitable[T]]) -> T:
        """``work`` on a pooled connection, within the store's timeout and a
        half (the server's own statement_timeout answers first), not
        counting time this process's event loop was held (see
        stores/_deadline.py); any failure a StoreUnavailable raised from the
        driver's error.

        The connection goes back to the pool outside that bound: one whose
        work ran out of time is terminated first (its server may be frozen),
        so giving it back is immediate and no task is left failing behind."""
        pool: Any = None
        conn: Any = None
        try:
            async with bounded(self.config.timeout * 1.5):
                pool = await self.pool()
                conn = await pool.acquire()
                return await work(conn)
        except self.failures as exc:
            if conn is not None and isinstance(exc, TimeoutError):
                conn.terminate()
            if pool is not None and self._server_gone(exc):
                # Its other connections are as dead (or soon will be: a
                # shutdown ends them one by one): none is used again.
                await pool.expire_connections()
            raise self.translate(exc) from exc
        except BaseException:
            # Cancelled mid-call: where its statement stands is unknown, and
            # giving it back would wait (unbounded) for the server to confirm
            # a cancel.
            if conn is not None:
                conn.terminate()
            raise
        finally:
            if conn is not None:
                with contextlib.suppress(Exception):
                    await pool.release(conn)

    async def connect(self) -> Any:
        """A connection of its own, outside the pool (the listener's), opened
        within the store's timeout; the caller closes it."""
        if self.closed:
            raise self.unavailable("the store is closed")
        try:
            async with bounded(self.config.timeout * 1.5):
                return await self.driver.connect(**self._connect_options())
        except self.failures as exc:
            raise self.translate(exc) from exc

    def _server_gone(self, exc: BaseException) -> bool:
        """Whether ``exc`` says the connection or the server ended (not a
        statement that failed on a working one): class 08 (connection) and
        57P (shutdown) SQLSTATEs, and every error that is not the server's."""
        if isinstance(exc, TimeoutError):
            return False
        if isinstance(exc, self.driver.PostgresError):
            state = getattr(exc, "sqlstate", None) or ""
            return state.startswith(("08", "57P"))
        return True

    def translate(self, exc: BaseException) -> StoreUnavailable:
        """One of :attr:`failures` as a StoreUnavailable (``permanent`` when
        no retry can mend it)."""
        if isinstance(exc, TimeoutError):
            return self.unavailable(f"no answer within {self.config.timeout:g} s (timeout)")
        if isinstance(exc, self.driver.PostgresError):
            state = getattr(exc, "sqlstate", None)
            return self.unavailable(
                f"{type(exc).__name__}: {exc}", permanent=state in _PERMANENT_STATES
            )
        return self.unavailable(
            f"cannot reach it: {type(exc).__name__}: {exc}", permanent=_never_works(exc)
        )

    async def aclose(self) -> None:
        self.closed = True
        opening, self._opening = self._opening, None
        if opening is not None and not opening.done():
            opening.cancel()
            with contextlib.suppress(BaseException):
                await opening
            if not opening.cancelled() and opening.exception() is None:
                self._pool = self._pool or opening.result()
        pool, self._pool = self._pool, None
        if pool is not None:
            try:
                async with asyncio.timeout(self.config.timeout):
                    await pool.close()
            except (TimeoutError, OSError, self.driver.InterfaceError):
                with contextlib.suppress(Exception):
                    pool.terminate()
