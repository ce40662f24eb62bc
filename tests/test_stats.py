"""Session stats: counters and the per-minute ring, on fake clocks."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest
from conftest import FakeClock

from lapse.internet.task import Clock
from lapse.sessions import Expiry, Session
from lapse.sessions._stats import LATENCY_BUCKETS, MINUTES, SessionStats  # its constants too
from lapse.web.resource import Resource
from lapse.web.server import Site


def test_ring_counts_per_minute_and_forgets_old_minutes() -> None:
    clock = FakeClock(start=600_000.0)  # a minute boundary
    stats = SessionStats(clock)
    stats.session_created(clock())
    stats.session_created(clock() + 30)
    stats.session_ended("timeout", clock() + 59)
    clock.advance(60)
    stats.session_created(clock())
    series = stats.per_minute()
    assert series.start == clock() - (MINUTES - 1) * 60
    assert series.created[-2:] == [2, 1]
    assert series.ended[-2:] == [1, 0]
    assert sum(series.created) == 3
    # Quiet minutes pass: the slots they skipped are cleared, totals stay.
    clock.advance(30 * 60)
    series = stats.per_minute()
    assert series.created[-32:-29] == [2, 1, 0]
    clock.advance(MINUTES * 60)
    series = stats.per_minute()
    assert sum(series.created) == 0 and sum(series.ended) == 0
    assert stats.created == 3 and stats.ended["timeout"] == 1 and stats.ended_total == 1


def test_ring_backfill_and_too_old_events() -> None:
    clock = FakeClock(start=600_000.0)
    stats = SessionStats(clock)
    stats.session_created(clock() - 10 * 60)
    stats.session_created(clock() - 2 * 3600)  # older than the ring: only the total
    series = stats.per_minute()
    assert series.created[-11] == 1
    assert sum(series.created) == 1
    assert stats.created == 2


def test_latency_buckets() -> None:
    stats = SessionStats(FakeClock())
    stats.store_call("load", 0.0005)
    stats.store_call("load", 0.02)
    stats.store_call("load", 100.0)
    latency = stats.store_calls["load"]
    assert latency.count == 3
    assert latency.sum == pytest.approx(100.0205)
    cumulative = dict(latency.cumulative())
    assert cumulative[LATENCY_BUCKETS[0]] == 1
    assert cumulative[0.025] == 2
    assert cumulative[float("inf")] == 3


def test_site_counts_created_and_ended_by_cause(clock: Clock) -> None:
    class Short(Session):
        sessionTimeout = 60

    class Lifetime(Session):
        sessionTimeout = 600
        absolute_timeout = 30

    site = Site(Resource(), reactor=clock, max_sessions=3)
    site.sessionFactory = Short
    first = site.makeSession()
    site.makeSession()
    site.makeSession().expire()
    assert site.stats.created == 3
    assert site.stats.ended["expired"] == 1
    clock.advance(61)
    assert site.stats.ended["timeout"] == 2
    site.sessionFactory = Lifetime
    site.makeSession()
    clock.advance(31)
    assert site.stats.ended["lifetime"] == 1
    site.sessionFactory = Short
    for _ in range(4):
        site.makeSession()
    assert site.stats.ended["evicted"] == 1
    assert first.expired
    series = site.stats.per_minute()
    assert sum(series.created) == 8
    assert sum(series.ended) == 5


def test_callback_errors_and_hook_failures_are_counted(
    clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.CRITICAL, logger="lapse")
    calls: list[Expiry] = []

    def hook(expiry: Expiry) -> None:
        calls.append(expiry)
        if expiry.attempt == 1:
            raise RuntimeError("hook down")

    site = Site(Resource(), reactor=clock, on_expire=hook)
    session = site.makeSession()
    session.notifyOnExpire(lambda: 1 / 0)
    session.notifyOnExpire(lambda: None)
    session.expire()
    assert site.stats.callback_errors == 1
    assert site.stats.hook_failures == 1
    # Redelivered (lease ran out): the end is counted once.
    clock.advance(31)
    session2 = site.makeSession()
    session2.expire()
    assert len(calls) >= 2
    assert site.stats.ended["expired"] == 2


def test_touch_counts_nothing(clock: Clock) -> None:
    site = Site(Resource(), reactor=clock)
    session = site.makeSession()
    before = site.stats.as_dict()
    for _ in range(10):
        clock.advance(1)
        session.touch()
    assert site.stats.as_dict()["created"] == before["created"]
    assert site.stats.ended_total == 0


def test_shared_store_calls_are_timed(tmp_path: Any) -> None:
    async def main() -> None:
        site = Site(Resource(), store=f"sqlite:///{tmp_path / 's.db'}")
        session = site.makeSession()
        await site._keeper.persist([session])
        assert await site._keeper.load(session.uid) is not None
        await site._keeper.aclose()
        calls = site.stats.store_calls
        assert calls["create"].count == 1
        assert calls["load"].count == 1
        assert calls["load"].sum >= 0

    asyncio.run(main())
