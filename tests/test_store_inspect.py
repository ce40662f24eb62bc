"""Store inspection (``scan``, ``info``, ``count``, ``deadlines``) of the memory
store beyond the contract every store passes (that is lapse.testing's
InspectionContract, run by test_store_contract.py).

Time is a fake clock handed to each store, so nothing sleeps. None of these
calls touches a session: deadlines stay where they were.
"""

from __future__ import annotations

from conftest import FakeClock

from lapse.sessions.stores.memory import MemoryStore


def test_memory_store_counts_many_sessions_without_ending_them() -> None:
    """The memory store's count and deadlines agree with a full scan over
    sessions in queues, touched ones and ones on the heap."""
    clock = FakeClock()
    store = MemoryStore(clock)
    for i in range(300):
        store.create_now(f"u{i}", 10 + (i % 3) * 10, {}, lifetime=25 if i % 7 == 0 else None)
        clock.advance(0.01)
    for i in range(0, 300, 4):
        clock.advance(0.01)
        store.load_now(f"u{i}")
    for i in range(0, 300, 11):
        store.expire_now(f"u{i}")
    for step in (0.0, 5.0, 6.0, 8.0, 9.0, 12.0):
        clock.advance(step)
        found, cursor = store.scan_now(None, 1000)
        assert cursor is None
        assert store.count_now() == len(found)
        expected = [0] * 6
        for info in found:
            if info.deadline <= clock.now + 30:
                expected[min(5, int((info.deadline - clock.now) / 5))] += 1
        assert store.deadlines_now(clock.now, 30, 6) == expected
    assert len(store) == 300 - 28  # nothing was ended by counting
