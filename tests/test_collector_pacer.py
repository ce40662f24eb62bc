"""The collector pacer: young collections and a freeze every tick, so live sessions
are scanned once (not by every collection), and a full collection when the heap
has grown, so cyclic garbage that was frozen is reclaimed (memory stays bounded)."""

from __future__ import annotations

import asyncio
import gc
import sys
import weakref
from collections.abc import Iterator

import pytest

from lapse.internet._pacer import CollectorPacer
from lapse.internet.task import Clock
from lapse.web.resource import Resource
from lapse.web.server import Session, Site


@pytest.fixture
def collector() -> Iterator[None]:
    """Put the collector back as it was: thresholds, enabled, nothing frozen."""
    saved = gc.get_threshold()
    enabled = gc.isenabled()
    gc.collect()
    try:
        yield
    finally:
        gc.unfreeze()
        gc.set_threshold(*saved)
        if enabled:
            gc.enable()
        gc.collect()


class Node:
    """An object that can be in a reference cycle and be watched by a weakref."""

    def __init__(self) -> None:
        self.other: object = None


def cycle() -> tuple[Node, weakref.ref[Node]]:
    node = Node()
    node.other = [node]
    return node, weakref.ref(node)


def tracked_count() -> int:
    """The objects a collection of every generation would scan now (frozen ones
    excepted): the work a collection does, counted."""
    return len(gc.get_objects())


def test_young_tick_reclaims_new_cycles_and_freezes_survivors(collector: None) -> None:
    """A tick frees the cyclic garbage made since the last one, and what is still
    alive leaves the collector's generations (no later collection scans it)."""
    pacer = CollectorPacer()
    garbage, dead = cycle()
    del garbage
    alive, _ = cycle()
    assert pacer.tick() is False
    assert dead() is None
    assert not any(o is alive for o in gc.get_objects())
    assert gc.get_freeze_count() > 0


class Short(Session):
    sessionTimeout = 5


def seed_session(site: Site, log: list[str]) -> Session:
    """A session with the seed's callback (a lambda holding the session: five
    collected objects per session in all)."""
    session = site.makeSession()
    session.notifyOnExpire(lambda: log.append(session.uid))
    return session


@pytest.mark.slow
def test_collection_work_does_not_grow_with_live_sessions(collector: None) -> None:
    """A client making sessions as fast as it can: 100,000 live sessions with
    callbacks, made 2,000 between ticks. What a collection may scan stays the
    objects made since the last tick (about 5 per session), however many sessions
    are live, where CPython alone would rescan every live one."""
    clock = Clock()
    site = Site(Resource(), reactor=clock)
    site.sessionFactory = Short
    log: list[str] = []
    pacer = CollectorPacer()
    pacer.tick()
    largest = 0
    for _ in range(50):
        for _ in range(2_000):
            seed_session(site, log)
        largest = max(largest, tracked_count())
        pacer.tick()
    assert len(site.sessions) == 100_000
    assert largest < 2_000 * 6 + 5_000
    assert tracked_count() < 5_000
    gc.unfreeze()  # without the pacer: every live session is scanned again
    assert tracked_count() > 100_000 * 5


def test_sessions_ended_while_frozen_are_freed(collector: None) -> None:
    """Sessions frozen while live are freed by reference counting when they end:
    memory comes back without a full collection."""
    clock = Clock()
    site = Site(Resource(), reactor=clock)
    site.sessionFactory = Short
    log: list[str] = []
    pacer = CollectorPacer()
    watched = [weakref.ref(seed_session(site, log)) for _ in range(1_000)]
    pacer.tick()
    clock.advance(5)
    assert len(log) == 1_000
    assert all(ref() is None for ref in watched)
    assert pacer.full_collections == 0


@pytest.mark.slow
def test_cycles_frozen_while_alive_are_reclaimed_when_the_heap_grows(collector: None) -> None:
    """Objects alive at a tick that become cyclic garbage later (frozen: young
    collections never see them) are reclaimed by the full collection the pacer
    makes once the heap has grown ``growth`` times: the heap stays bounded however
    long such garbage is made."""
    pacer = CollectorPacer(growth=1.2)
    base = sys.getallocatedblocks()
    first: list[weakref.ref[Node]] = []
    highest = 0
    for round_ in range(30):
        batch = [cycle() for _ in range(5_000)]
        if round_ == 0:
            first = [ref for _, ref in batch]
        pacer.tick()  # frozen while alive...
        del batch  # ...then garbage
        highest = max(highest, sys.getallocatedblocks())
    assert pacer.full_collections >= 1
    assert all(ref() is None for ref in first)
    # 30 rounds leak 150,000 cycles (~450k blocks) without full collections.
    assert highest < 1.2 * base + 2 * 5_000 * 4 + 50_000


def test_full_collection_after_longest_seconds(collector: None) -> None:
    """However little the heap grew, a full collection comes ``longest`` seconds
    after the last one (garbage outside the allocator's blocks is bounded too)."""
    now = [0.0]
    pacer = CollectorPacer(longest=60, clock=lambda: now[0])
    garbage, dead = cycle()
    pacer.tick()  # frozen while alive
    del garbage
    now[0] = 59.0
    assert pacer.tick() is False
    assert dead() is not None
    now[0] = 60.0
    assert pacer.tick() is True
    assert dead() is None
    assert pacer.last_full == 60.0


def test_started_pacer_ticks_on_the_loop_until_stopped(collector: None) -> None:
    """start() ticks every interval on the event loop; stop() leaves nothing
    scheduled."""
    pacer = CollectorPacer(interval=0.01)

    async def run() -> None:
        pacer.start(asyncio.get_running_loop())
        await asyncio.sleep(0.1)
        pacer.stop()

    asyncio.run(run())
    assert pacer.young_collections >= 2
    assert not pacer.running
    ticks = pacer.young_collections
    asyncio.run(asyncio.sleep(0.03))
    assert pacer.young_collections == ticks


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"interval": 0}, "interval"),
        ({"growth": 1.0}, "growth"),
        ({"longest": -1}, "longest"),
        ({"growth": 4, "max_growth": 2}, "max_growth"),
    ],
)
def test_bad_settings_are_refused(options: dict[str, float], message: str) -> None:
    """Settings that would make the pacer spin or never collect are a ValueError
    naming the setting."""
    with pytest.raises(ValueError, match=message):
        CollectorPacer(**options)


def test_growth_of_live_data_spaces_full_collections_out_up_to_max_growth(
    collector: None,
) -> None:
    """A full collection that finds the heap's growth was live data (more sessions:
    it reclaimed under a quarter of it) doubles the growth that makes the next one,
    up to max_growth; one that reclaims most of it sets it back to growth. (The
    heap is given: the policy's arithmetic, on the real collector.)"""
    heap = [1_000]
    pacer = CollectorPacer(growth=2, max_growth=8, heap=lambda: heap[0])
    heap[0] = 2_001  # doubled, all of it live
    assert pacer.tick() is True
    assert (pacer.baseline, pacer.factor) == (2_001, 4)
    heap[0] = 8_000  # under 4x: no full collection
    assert pacer.tick() is False
    heap[0] = 8_005
    assert pacer.tick() is True
    assert pacer.factor == 8
    heap[0] = 8 * 8_005 + 1
    assert pacer.tick() is True
    assert pacer.factor == 8  # (capped)
    grown_to = 9 * 64_041
    calls = iter([grown_to, 64_041])  # before, and after: all the growth reclaimed
    pacer._heap = lambda: next(calls)
    assert pacer.tick() is True
    assert (pacer.baseline, pacer.factor) == (64_041, 2)
