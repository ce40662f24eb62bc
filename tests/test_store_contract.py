"""One contract, every store: lapse's published store contract
(:class:`lapse.testing.StoreContract`) run on the memory store, SQLite (a real
file), Redis and PostgreSQL (real servers) and a store written from the protocol's
docs alone (``tests/_dict_store.py``).

Time is a fake clock handed to each store, so nothing sleeps.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import pytest
from _dict_store import DictStore

from lapse.sessions.stores.memory import MemoryStore
from lapse.sessions.stores.postgres import PostgresStore
from lapse.sessions.stores.redis import RedisStore
from lapse.sessions.stores.sqlite import SQLiteStore
from lapse.testing import FakeClock, StoreContract

_prefixes = itertools.count()


class TestMemoryStore(StoreContract):
    @pytest.fixture
    def store(self, store_clock: FakeClock) -> MemoryStore:
        return MemoryStore(store_clock)


class TestSQLiteStore(StoreContract):
    @pytest.fixture
    def store(self, store_clock: FakeClock, tmp_path: Path) -> SQLiteStore:
        return SQLiteStore(str(tmp_path / "store.db"), clock=store_clock)


class TestRedisStore(StoreContract):
    @pytest.fixture
    def store(self, store_clock: FakeClock, redis_server: Any) -> RedisStore:
        return RedisStore(redis_server.url, clock=store_clock, prefix=f"c{next(_prefixes)}")


class TestPostgresStore(StoreContract):
    """A real PostgreSQL server; a schema of its own per test."""

    @pytest.fixture
    def store(self, store_clock: FakeClock, postgres_server: Any) -> PostgresStore:
        url = f"{postgres_server.url()}?schema=contract{next(_prefixes)}"
        return PostgresStore.from_url(url, clock=store_clock)


class TestShardedRedisStore(StoreContract):
    """The sharded key layout (a cluster's) on one node: every operation
    routed to its session's shard, claims, announcements, next deadline and
    inspection gathered across the shards."""

    @pytest.fixture
    def store(self, store_clock: FakeClock, redis_server: Any) -> RedisStore:
        prefix = f"c{next(_prefixes)}"
        return RedisStore(redis_server.url, clock=store_clock, prefix=prefix, shards=4)


class TestThirdPartyStore(StoreContract):
    """A plain class written from the store protocol's docstring alone."""

    @pytest.fixture
    def store(self, store_clock: FakeClock) -> DictStore:
        return DictStore(clock=store_clock)
