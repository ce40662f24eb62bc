"""Pacing CPython's garbage collector so that live sessions are not rescanned.

A server holds its live sessions for minutes (the bench's seed: 5 s, at
~8k new sessions/s, 30-60k live), each with the objects its expiry
callbacks hold (the seed's lambda, its closure and cells: five collected
objects per session in all). To the generational collector they are
neither young nor permanent, and every collection that reaches them
rescans all of them: measured inside the server during wrk's create runs
(bench/tail_probe.py), a collection every few seconds took 30-170 ms, which
made create p99 bimodal (a run with one such pause, a run without). Even a
generation-0 collection does: CPython counts allocations minus
deallocations, and each old session freed by its end cancels a new one's
allocation, so the young generation grows to every session made since the
last collection (190,000 objects, 111 ms).

So the pacer, every :attr:`~CollectorPacer.interval` seconds on the event
loop:

- collects generation 0 (the cyclic garbage made since its last turn; the
  cost is the objects made since then and still alive, a tenth of a
  second's sessions, not all of them), then
- ``gc.freeze()``: what survived leaves the collector's generations, so each
  session is scanned once, young. Frozen or not, a session is freed by
  reference counting when it ends (its callbacks are dropped as they run).

Frozen objects that later become cyclic garbage are not reclaimed by young
collections. So when the heap (``sys.getallocatedblocks()``, the live
blocks of Python's allocator) has grown to a factor of its size after the
last full collection, or :attr:`~CollectorPacer.longest` seconds have
passed since it, the pacer unfreezes everything and collects it all. The
factor is :attr:`~CollectorPacer.growth` (2); when a full collection finds
that most of the growth was live data (more sessions, not garbage: it
reclaimed under a quarter of it), the next factor doubles, up to
:attr:`~CollectorPacer.max_growth` (8); one that reclaims more sets it back
to ``growth``. So the heap stays within ``max_growth`` times the live heap
(``growth`` times while garbage is being made), plus what one ``longest``
period of such garbage holds outside the allocator's blocks (large
buffers). A full collection pauses the loop as long as CPython's own
(O(live objects)); it comes when the heap has grown that much, not every
few seconds.

The reactor starts one pacer per process when it tunes the collector
(``reactor.run()``, ``lapse serve``; not with ``LAPSE_GC_TUNING=0``).
"""

from __future__ import annotations

import asyncio
import gc
import sys
import time
from collections.abc import Callable

__all__ = ["CollectorPacer"]


class CollectorPacer:
    """Young collections and ``gc.freeze()`` every ``interval`` seconds; a
    full collection when the heap grew ``growth`` times (up to
    ``max_growth`` times while what grows is live data), or after
    ``longest`` seconds (see the module docstring)."""

    def __init__(
        self,
        interval: float = 0.1,
        growth: float = 2.0,
        longest: float = 600.0,
        max_growth: float = 8.0,
        *,
        heap: Callable[[], int] = sys.getallocatedblocks,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not interval > 0:
            raise ValueError(f"interval is seconds > 0, not {interval!r}")
        if not growth > 1:
            raise ValueError(f"growth is a factor > 1, not {growth!r}")
        if not longest > 0:
            raise ValueError(f"longest is seconds > 0, not {longest!r}")
        if not max_growth >= growth:
            raise ValueError(f"max_growth is a factor >= growth, not {max_growth!r}")
        self.interval = interval
        self.growth = growth
        self.longest = longest
        self.max_growth = max_growth
        self.factor = growth
        """The heap's growth over :attr:`baseline` that makes the next full
        collection."""
        self._heap = heap
        self._clock = clock
        self.baseline = heap()
        """The heap (allocator blocks) after the last full collection."""
        self.last_full = clock()
        self.young_collections = 0
        self.full_collections = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._handle: asyncio.TimerHandle | None = None

    def tick(self) -> bool:
        """One turn: a young collection and a freeze, or a full collection
        when one is due. Whether it was a full one."""
        now = self._clock()
        heap = self._heap()
        if heap > self.factor * self.baseline or now - self.last_full >= self.longest:
            gc.unfreeze()
            gc.collect()
            gc.freeze()
            after = self._heap()
            grown = heap - self.baseline
            if grown > 0 and (heap - after) * 4 < grown:  # mostly live data
                self.factor = min(self.factor * 2, self.max_growth)
            else:
                self.factor = self.growth
            self.baseline = after
            self.last_full = now
            self.full_collections += 1
            return True
        gc.collect(0)
        gc.freeze()
        self.young_collections += 1
        return False

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """Tick every ``interval`` on ``loop`` until :meth:`stop`."""
        self.stop()
        self._loop = loop
        self.baseline = self._heap()
        self.last_full = self._clock()
        self._handle = loop.call_later(self.interval, self._run)

    def stop(self) -> None:
        """Stop ticking (what is frozen stays frozen)."""
        handle, self._handle = self._handle, None
        if handle is not None:
            handle.cancel()
        self._loop = None

    def _run(self) -> None:
        loop = self._loop
        if loop is None:
            return
        self.tick()
        self._handle = loop.call_later(self.interval, self._run)

    @property
    def running(self) -> bool:
        return self._handle is not None

    def __repr__(self) -> str:
        return (
            f"<CollectorPacer every {self.interval}s: {self.young_collections} young, "
            f"{self.full_collections} full collections>"
        )
