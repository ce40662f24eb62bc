"""The loads of one event-loop tick go to PostgreSQL as one statement
(postgres/batch.py), each still a touch with its own answer. On the suite's
real PostgreSQL; each test has a schema of its own."""

from __future__ import annotations

import asyncio
import itertools
import random
from typing import Any

import pytest
from _ports import free_port

from lapse.sessions.store import StoreUnavailable
from lapse.sessions.stores.postgres import PostgresStore

_schemas = itertools.count()


@pytest.fixture
def url(postgres_server: Any) -> str:
    return f"{postgres_server.url()}?schema=batch{next(_schemas)}"


def test_twenty_loads_of_one_tick_are_one_statement_each_answered(url: str) -> None:
    """Twenty loads asked together: one statement; each gets its own
    session's data, touched (a later deadline), and an unknown uid None."""

    async def scenario() -> None:
        store = PostgresStore.from_url(url)
        try:
            deadlines = [await store.create(f"uid-{n:02d}", 60, {"n": n}) for n in range(20)]
            await asyncio.sleep(0.01)
            before = store._loads.statements
            answers = await asyncio.gather(
                *(store.load(f"uid-{n:02d}") for n in range(20)), store.load("nobody")
            )
            assert store._loads.statements == before + 1
            assert answers[-1] is None
            for n, answer in enumerate(answers[:-1]):
                assert answer is not None and answer.uid == f"uid-{n:02d}"
                assert answer.decoded() == {"n": n}
                assert answer.deadline > deadlines[n]
        finally:
            await store.aclose()

    asyncio.run(scenario())


def test_loads_of_one_session_in_one_tick_each_get_what_they_need(url: str) -> None:
    """Concurrent loads of one session, one holding the current version and
    one holding none, and the old uid of a rotation with the new one: each
    answer is right for its caller (unchanged for the one that holds the
    data; the data for the other; the old uid followed to the new one)."""

    async def scenario() -> None:
        store = PostgresStore.from_url(url)
        try:
            await store.create("ab-same", 60, {"a": 1})
            version = await store.save("ab-same", {"b": 2}, ())
            await store.create("cd-old", 60, {"c": 3})
            assert await store.rotate("cd-old", "cd-new", 10.0)
            holder, fresh, old, new = await asyncio.gather(
                store.load("ab-same", version),
                store.load("ab-same"),
                store.load("cd-old"),
                store.load("cd-new"),
            )
            assert holder is not None and holder.unchanged and holder.version == version
            assert fresh is not None and fresh.decoded() == {"a": 1, "b": 2}
            assert old is not None and new is not None
            assert old.uid == new.uid == "cd-new" and old.decoded() == {"c": 3}
        finally:
            await store.aclose()

    asyncio.run(scenario())


def test_batches_of_four_processes_at_once_all_answer(url: str) -> None:
    """Four stores (four processes' worth) load the same thirty sessions in
    shuffled orders, again and again, so their statements touch the same
    rows at the same time: every load answers, none fails. (The statement
    locks its rows in uid order, so two of them cannot wait on each other
    in a circle; this test could not make PostgreSQL choose a plan that
    deadlocks without that order, so it checks the answers only.)"""

    async def scenario() -> None:
        stores = [PostgresStore.from_url(url) for _ in range(4)]
        uids = [f"uid-{n:02d}" for n in range(30)]
        try:
            for uid in uids:
                await stores[0].create(uid, 60, {})

            async def waves(store: PostgresStore, seed: int) -> int:
                shuffle = random.Random(seed).shuffle
                done = 0
                for _ in range(30):
                    order = list(uids)
                    shuffle(order)
                    answers = await asyncio.gather(*(store.load(uid) for uid in order))
                    done += sum(answer is not None for answer in answers)
                return done

            totals = await asyncio.gather(*(waves(store, n) for n, store in enumerate(stores)))
            assert totals == [900] * 4
        finally:
            for store in stores:
                await store.aclose()

    asyncio.run(scenario())


def test_a_failed_statement_fails_each_of_its_loads_with_an_error_of_its_own() -> None:
    """No server: the three loads of one tick each raise StoreUnavailable,
    three distinct errors (one raised in many tasks would share its
    traceback between them)."""

    async def scenario() -> None:
        store = PostgresStore.from_url(f"postgresql://u@127.0.0.1:{free_port()}/db?timeout=0.5")
        try:
            outcomes = await asyncio.gather(
                *(store.load(uid) for uid in ("a", "b", "c")), return_exceptions=True
            )
        finally:
            await store.aclose()
        assert all(isinstance(error, StoreUnavailable) for error in outcomes)
        assert len({id(error) for error in outcomes}) == 3

    asyncio.run(scenario())


def test_creates_of_one_tick_are_one_statement_and_a_uid_twice_still_works(url: str) -> None:
    """Twenty creates together: one statement, each answered with its own
    deadline (its lifetime applied); the same uid twice in one tick (which
    one statement cannot write) goes one by one, the last create winning."""

    async def scenario() -> None:
        store = PostgresStore.from_url(url)
        try:
            before = store._creates.statements
            deadlines = await asyncio.gather(
                *(
                    store.create(f"new-{n:02d}", 60 + n, {"n": n}, 30 if n == 0 else None)
                    for n in range(20)
                )
            )
            assert store._creates.statements == before + 1
            now = await store.now()
            assert now + 29 < deadlines[0] <= now + 30
            assert all(now + 60 + n - 1 < deadlines[n] <= now + 60 + n for n in range(1, 20))
            assert await store.count() == 20
            first, second = await asyncio.gather(
                store.create("twice", 60, {"v": 1}), store.create("twice", 90, {"v": 2})
            )
            assert second > first
            loaded = await store.load("twice")
            assert loaded is not None and loaded.decoded() == {"v": 2}
        finally:
            await store.aclose()

    asyncio.run(scenario())


def test_acknowledgements_of_one_tick_are_one_statement_each_announced(url: str) -> None:
    """Twenty claimed sessions acknowledged together: one statement; every
    one is forgotten and its end announced once."""

    async def scenario() -> None:
        store = PostgresStore.from_url(url)
        try:
            for n in range(20):
                await store.create(f"ending-{n:02d}", 0.01, {})
            _, cursor = await store.events(None)
            await asyncio.sleep(0.05)
            claimed = await store.claim("me", 30, 100)
            assert len(claimed) == 20
            before = store._acks.statements
            await asyncio.gather(*(store.ack(expiry) for expiry in claimed))
            assert store._acks.statements == before + 1
            events, _ = await store.events(cursor)
            assert sorted(events) == sorted(expiry.uid for expiry in claimed)  # type: ignore[type-var]
            assert await store.next_deadline() is None
        finally:
            await store.aclose()

    asyncio.run(scenario())
