"""Counters of one site's session lifecycle, kept by its keeper (``site.stats``).

What is counted, in this process:

- ``created``: sessions made by ``makeSession``;
- ``ended[cause]``: ended sessions by cause (``"timeout"``, ``"expired"``,
  ``"lifetime"``, ``"evicted"``), counted when this process first delivers
  the expiry to the durable hook (so, on a shared store, the sessions this
  process claimed: add up the processes for the cluster);
- ``callback_errors``: ``notifyOnExpire`` callbacks that raised;
- ``hook_failures``: deliveries of the durable ``on_expire`` hook that raised;
- ``store_calls[operation]``: latency of calls to a shared store (count,
  sum, cumulative buckets of :data:`LATENCY_BUCKETS` seconds);
- a per-minute ring of the last hour: sessions created and ended per minute
  (:meth:`SessionStats.per_minute`).

Every event costs O(1) and allocates nothing per session: a few integer
increments, and on the first event of a new minute, clearing the slots of
the minutes skipped. Touching a session counts nothing.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["CAUSES", "LATENCY_BUCKETS", "Latency", "MinuteSeries", "SessionStats"]

CAUSES = ("timeout", "expired", "lifetime", "evicted")
"""Why sessions end (``Expiry.cause``)."""

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
"""Upper bounds (seconds) of the store latency buckets; +Inf is implied."""

MINUTES = 60
"""Minutes kept by the per-minute ring."""


class Latency:
    """Count, sum and bucket counts (not cumulative) of one operation's calls."""

    __slots__ = ("buckets", "count", "sum")

    def __init__(self) -> None:
        self.count = 0
        self.sum = 0.0
        self.buckets = [0] * (len(LATENCY_BUCKETS) + 1)

    def observe(self, seconds: float) -> None:
        self.count += 1
        self.sum += seconds
        index = 0
        for bound in LATENCY_BUCKETS:
            if seconds <= bound:
                break
            index += 1
        self.buckets[index] += 1

    def cumulative(self) -> list[tuple[float, int]]:
        """``(upper bound, calls at most that long)``, ending with +Inf."""
        total = 0
        out = []
        for bound, count in zip((*LATENCY_BUCKETS, float("inf")), self.buckets, strict=True):
            total += count
            out.append((bound, total))
        return out


@dataclass(frozen=True, slots=True)
class MinuteSeries:
    """Sessions created and ended in each of the last :data:`MINUTES`
    minutes, oldest first; ``start`` is when the first minute began (the
    last one is the current, partial, minute)."""

    start: float
    created: list[int]
    ended: list[int]


class SessionStats:
    """The counters (see the module); ``clock`` gives the time for the ring."""

    __slots__ = (
        "_clock",
        "_created_ring",
        "_ended_ring",
        "_minute",
        "callback_errors",
        "created",
        "ended",
        "hook_failures",
        "store_calls",
    )

    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        self.created = 0
        self.ended: dict[str, int] = dict.fromkeys(CAUSES, 0)
        self.callback_errors = 0
        self.hook_failures = 0
        self.store_calls: dict[str, Latency] = {}
        self._created_ring = [0] * MINUTES
        self._ended_ring = [0] * MINUTES
        self._minute = int(clock() // 60)

    # -- events ---------------------------------------------------------------

    def _slot(self, at: float) -> int:
        """The ring index of the minute of ``at``, rolling the ring forward to
        it; -1 for a minute older than the ring keeps."""
        minute = int(at // 60)
        current = self._minute
        if minute > current:
            created, ended = self._created_ring, self._ended_ring
            for skipped in range(current + 1, min(minute, current + MINUTES) + 1):
                created[skipped % MINUTES] = 0
                ended[skipped % MINUTES] = 0
            self._minute = minute
        elif minute <= current - MINUTES:
            return -1
        return minute % MINUTES

    def session_created(self, at: float) -> None:
        """A session was made at ``at`` (the site's time)."""
        self.created += 1
        minute = int(at // 60)
        if minute == self._minute:  # the common case, without a call
            self._created_ring[minute % MINUTES] += 1
            return
        slot = self._slot(at)
        if slot >= 0:
            self._created_ring[slot] += 1

    def session_ended(self, cause: str, at: float | None = None, count: int = 1) -> None:
        """``count`` sessions ended for ``cause`` (at ``at``; now if None)."""
        ended = self.ended
        ended[cause] = ended.get(cause, 0) + count
        slot = self._slot(self._clock() if at is None else at)
        if slot >= 0:
            self._ended_ring[slot] += count

    def callback_error(self) -> None:
        self.callback_errors += 1

    def hook_failure(self) -> None:
        self.hook_failures += 1

    def store_call(self, operation: str, seconds: float) -> None:
        latency = self.store_calls.get(operation)
        if latency is None:
            latency = self.store_calls[operation] = Latency()
        latency.observe(seconds)

    # -- reading --------------------------------------------------------------

    @property
    def ended_total(self) -> int:
        return sum(self.ended.values())

    def per_minute(self, now: float | None = None) -> MinuteSeries:
        """The ring as of ``now`` (default: the clock), oldest minute first."""
        if now is None:
            now = self._clock()
        self._slot(now)  # forget the minutes that passed quietly
        last = max(self._minute, int(now // 60))
        first = last - MINUTES + 1
        indices = [minute % MINUTES for minute in range(first, last + 1)]
        return MinuteSeries(
            start=first * 60.0,
            created=[self._created_ring[i] for i in indices],
            ended=[self._ended_ring[i] for i in indices],
        )

    def as_dict(self, now: float | None = None) -> dict[str, object]:
        """Everything, JSON-ready."""
        series = self.per_minute(now)
        return {
            "created": self.created,
            "ended": dict(self.ended),
            "callback_errors": self.callback_errors,
            "hook_failures": self.hook_failures,
            "store_calls": {
                op: {"count": lat.count, "sum": lat.sum} for op, lat in self.store_calls.items()
            },
            "minutes": {
                "start": series.start,
                "created": series.created,
                "ended": series.ended,
            },
        }

    def __repr__(self) -> str:
        return f"<SessionStats created={self.created} ended={self.ended_total}>"
