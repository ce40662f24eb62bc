"""The PostgreSQL store's index of sessions by principal under abuse: the cap
across pools and processes, hostile principals, the other processes woken
when sessions are superseded or ended by principal, and the index used.

On the suite's real PostgreSQL; each test has a schema of its own. (The
contract, tests/test_store_contract.py, checks the index's behaviour.)
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from _helpers import aio
from _ports import free_port
from _redis_server import stop_process

import lapse
from lapse.sessions.store import StoreUnavailable, TooManySessions
from lapse.sessions.stores.postgres import PostgresStore
from lapse.testing import FakeClock

_schemas = itertools.count()


@pytest.fixture
def url(postgres_server: Any) -> str:
    """A store URL with a schema of this test's own."""
    return f"{postgres_server.url()}?schema=prin{os.getpid()}x{next(_schemas)}"


@asynccontextmanager
async def stores(url: str, count: int, clock: FakeClock | None) -> AsyncIterator[list[Any]]:
    """``count`` stores (a pool each, as many processes would have) on one
    set of tables, opened; closed after."""
    made = [PostgresStore.from_url(url, clock=clock) for _ in range(count)]
    try:
        for store in made:
            await store.open()
        yield made
    finally:
        for store in made:
            await store.aclose()


async def bound_and_live(store: Any, principal: str, uids: list[str]) -> list[str]:
    """The principal's sessions, checked against the live ones of ``uids``."""
    bound = sorted(info.uid for info in await store.sessions_of(principal))
    assert bound == [uid for uid in uids if await store.exists(uid)]
    return bound


@aio
async def test_fifty_logins_on_two_pools_leave_exactly_the_cap(url: str) -> None:
    """50 concurrent set_principal of one principal, limit 3, half on each of
    two stores (two pools), with loads of the same sessions in between: 3
    stay bound and live, the 47 others were superseded once each (claimed
    with cause "superseded"), and no call failed, loads included."""
    clock = FakeClock(1000.0)
    async with stores(url, 2, clock) as (a, b):
        uids = [f"login-{i:02d}" for i in range(50)]
        for uid in uids:
            await a.create(uid, 600, {"i": uid})
        calls = [
            (a if i % 2 else b).set_principal(uid, "alice", limit=3) for i, uid in enumerate(uids)
        ]
        loads = [(b if i % 2 else a).load(uid) for i, uid in enumerate(uids)]
        results = await asyncio.gather(*calls, *loads)
        superseded = [uid for result in results[:50] for uid in result]
        bound = await bound_and_live(a, "alice", uids)
        assert len(bound) == 3 and sorted(superseded + bound) == uids
        causes = {e.uid: e.cause for e in await b.claim("test", 30, 100)}
        assert causes == dict.fromkeys(superseded, "superseded")


@aio
async def test_fifty_refused_logins_on_two_pools_bind_exactly_the_cap(url: str) -> None:
    """The same with the "refuse" policy: 3 bound, 47 TooManySessions, and
    nothing ended."""
    async with stores(url, 2, FakeClock(1000.0)) as (a, b):
        uids = [f"refuse-{i:02d}" for i in range(50)]
        for uid in uids:
            await a.create(uid, 600, {})
        results = await asyncio.gather(
            *(
                (a if i % 2 else b).set_principal(uid, "bob", limit=3, refuse=True)
                for i, uid in enumerate(uids)
            ),
            return_exceptions=True,
        )
        refused = [r for r in results if isinstance(r, TooManySessions)]
        assert len(refused) == 47 and results.count([]) == 3
        assert len(await a.sessions_of("bob")) == 3
        assert [uid for uid in uids if await b.exists(uid)] == uids
        assert await a.claim("test", 30, 100) == []


_WORKER = """
import asyncio, json, sys
from lapse.sessions.stores.postgres import PostgresStore

async def main(url, uids):
    store = PostgresStore.from_url(url)
    await store.open()
    print("ready", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    results = await asyncio.gather(
        *(store.set_principal(uid, "carol", limit=3) for uid in uids), return_exceptions=True
    )
    await store.aclose()
    print(json.dumps([r if isinstance(r, list) else repr(r) for r in results]), flush=True)

asyncio.run(main(sys.argv[1], json.loads(sys.argv[2])))
"""


@pytest.mark.slow
def test_fifty_logins_in_two_processes_leave_exactly_the_cap(url: str) -> None:
    """Two real processes, released together, each binding 25 sessions of one
    principal at once with limit 3: 3 bound and live, 47 superseded once."""
    uids = [f"proc-{i:02d}" for i in range(50)]

    async def make() -> None:
        async with stores(url, 1, None) as (store,):
            for uid in uids:
                await store.create(uid, 600, {})

    asyncio.run(make())
    env = {**os.environ, "PYTHONPATH": str(Path(lapse.__file__).parents[1])}
    workers = [
        subprocess.Popen(
            [sys.executable, "-c", _WORKER, url, json.dumps(uids[half::2])],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
        )
        for half in (0, 1)
    ]
    try:
        for worker in workers:
            assert worker.stdout is not None and worker.stdout.readline().strip() == b"ready"
        for worker in workers:
            assert worker.stdin is not None
            worker.stdin.write(b"go\n")
            worker.stdin.flush()
        outputs = [worker.communicate(timeout=30)[0] for worker in workers]
    finally:
        for worker in workers:
            stop_process(worker)
    results = [result for out in outputs for result in json.loads(out)]
    assert all(isinstance(result, list) for result in results), results
    superseded = [uid for result in results for uid in result]

    async def check() -> None:
        async with stores(url, 1, None) as (store,):
            bound = await bound_and_live(store, "carol", uids)
            assert len(bound) == 3 and sorted(superseded + bound) == sorted(uids)

    asyncio.run(check())


HOSTILE = [
    "o'brien",
    "x'); DROP TABLE lapse_sessions; --",
    "back\\slash\\\\",
    '"quoted"',
    "%",
    "a%",
    "_",
    "$1",
    "{t}",
    "é" * 256,
    "w" * 255 + "%",
]


@aio
async def test_hostile_principals_are_data(url: str) -> None:
    """Quotes, backslashes, LIKE wildcards, placeholders and 256 characters
    are principals like any other: each lists and ends its own session only,
    the tables untouched."""
    async with stores(url, 1, FakeClock(1000.0)) as (store,):
        for i, name in enumerate(HOSTILE):
            await store.create(f"h{i}", 600, {})
            assert await store.set_principal(f"h{i}", name, limit=1) == []
        for i, name in enumerate(HOSTILE):
            (info,) = await store.sessions_of(name)
            assert (info.uid, info.principal) == (f"h{i}", name)
            loaded = await store.load(f"h{i}")
            assert loaded is not None and loaded.principal == name
        assert await store.expire_principal("%") == ["h4"]
        assert await store.expire_principal("x'); DROP TABLE lapse_sessions; --") == ["h1"]
        assert await store.count() == len(HOSTILE) - 2


@aio
async def test_a_nul_or_overlong_principal_is_a_clear_error_not_a_crash(url: str) -> None:
    """A principal PostgreSQL text cannot hold (NUL) or past 256 characters
    is refused with a ValueError saying why, before the database is asked;
    a NUL except_uid names no session; the store works on."""
    async with stores(url, 1, FakeClock(1000.0)) as (store,):
        await store.create("s1", 600, {})
        await store.set_principal("s1", "dave")
        for bad in ("da\x00ve", "x" * 257):
            with pytest.raises(ValueError, match="principal"):
                await store.set_principal("s1", bad)
            with pytest.raises(ValueError, match="principal"):
                await store.sessions_of(bad)
            with pytest.raises(ValueError, match="principal"):
                await store.expire_principal(bad)
        assert await store.set_principal("s\x00", "dave") is None
        assert await store.expire_principal("dave", except_uid="s1\x00") == ["s1"]


@aio
async def test_a_new_session_over_an_old_uid_is_bound_to_no_one(url: str) -> None:
    """create() replacing a row of the same uid (its hook acknowledged or
    not) starts unbound: the old principal does not carry over."""
    async with stores(url, 1, FakeClock(1000.0)) as (store,):
        await store.create("same", 600, {})
        await store.set_principal("same", "erin")
        await store.expire("same")
        await store.create("same", 600, {})
        loaded = await store.load("same")
        assert loaded is not None and loaded.principal is None
        assert await store.sessions_of("erin") == []


@aio
async def test_one_tick_of_loads_is_one_statement_with_each_principal(url: str) -> None:
    """Loads of bound and unbound sessions in one event-loop turn are still
    one statement, each answer with its own principal."""
    async with stores(url, 1, FakeClock(1000.0)) as (store,):
        for i in range(6):
            await store.create(f"t{i}", 600, {"i": i})
            if i % 2:
                await store.set_principal(f"t{i}", f"p{i}")
        before = store._loads.statements
        loaded = await asyncio.gather(*(store.load(f"t{i}") for i in range(6)))
        assert store._loads.statements == before + 1
        assert [each.principal for each in loaded] == [None, "p1", None, "p3", None, "p5"]


@aio
async def test_superseding_and_logging_out_everywhere_wake_the_other_processes(url: str) -> None:
    """A session superseded by the cap, and sessions ended by expire_principal,
    wake a process asleep in wait_for_news at once (the NOTIFY expire()
    sends), so its keeper claims them and runs their callbacks."""
    async with stores(url, 2, None) as (a, b):
        for uid in ("w1", "w2", "w3"):
            await a.create(uid, 600, {})
        await a.set_principal("w1", "fay")
        assert await b.wait_for_news(5.0) is True  # (its LISTEN is new)
        assert await b.wait_for_news(0.05) is False
        for act in (
            lambda: a.set_principal("w2", "fay", limit=1),
            lambda: a.expire_principal("fay", except_uid="w3"),
        ):
            asleep = asyncio.ensure_future(b.wait_for_news(5.0))
            await asyncio.sleep(0.05)
            started = time.monotonic()
            assert await act()
            assert await asleep is True
            assert time.monotonic() - started < 1.0
        causes = {e.uid: e.cause for e in await b.claim("test", 30, 10)}
        assert causes == {"w1": "superseded", "w2": "expired"}


@aio
async def test_sessions_of_reads_the_principal_index(url: str, postgres_server: Any) -> None:
    """With thousands of sessions, most anonymous, EXPLAIN of sessions_of
    shows an index scan of sessions_principal, not of the whole table."""
    async with stores(url, 1, FakeClock(1000.0)) as (store,):
        await asyncio.gather(*(store.create(f"e{i:05d}", 600, {}) for i in range(4000)))
        for i in range(0, 4000, 20):
            await store.set_principal(f"e{i:05d}", f"user{i % 50}")
        schema = url.rpartition("schema=")[2]
        postgres_server.psql(f"ANALYZE {schema}.lapse_sessions")
        plan = await store._pool.run(
            lambda conn: conn.fetch("EXPLAIN " + store.sql.sessions_of, None, "user0")
        )
        text = "\n".join(row[0] for row in plan)
        assert "lapse_sessions_principal" in text, text
        assert len(await store.sessions_of("user0")) == 40


@aio
async def test_an_unreachable_store_is_store_unavailable(postgres_server: Any) -> None:
    """Each principal call on a server that is not there fails with
    StoreUnavailable (the site's 503), not the driver's error."""
    closed = f"postgresql://postgres@127.0.0.1:{free_port()}/db?timeout=0.3"
    store = PostgresStore.from_url(closed)
    try:
        with pytest.raises(StoreUnavailable):
            await store.set_principal("u", "gus", limit=1)
        with pytest.raises(StoreUnavailable):
            await store.sessions_of("gus")
        with pytest.raises(StoreUnavailable):
            await store.expire_principal("gus")
    finally:
        await store.aclose()
