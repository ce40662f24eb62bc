"""The bench's store round trips per operation for issue 15's scaling model: per create and
per expired session one at a time (bench/store_calls.py), beside the per-touch and
per-create counts under wrk, for lapse on Redis (one node, the cluster's shards)."""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.options import parse_options  # noqa: E402
from bench.redis_traffic import PerRequest, RedisCounts, RedisHandle, measure_idle  # noqa: E402
from bench.scaling_report import scaling_table  # noqa: E402
from bench.scenarios import Bench, Outcome, Results  # noqa: E402
from bench.store_calls import StoreCalls, Window, bench_store_calls, window  # noqa: E402
from bench.systems import SYSTEMS  # noqa: E402


@pytest.mark.slow
def test_a_window_counts_what_its_action_sent_per_operation_minus_the_idle_rate(
    redis_server: Any,
) -> None:
    """On a real redis-server: an action that sends 30 SETs and 10 GETs for 10 operations,
    while another client keeps sending what the idle rate was measured on (a PING every
    20 ms), gives 4 round trips, 4 commands, set 3 and get 1 per operation: the idle
    client's traffic is subtracted."""
    handle = RedisHandle(redis_server.url)
    stop = threading.Event()

    def background() -> None:
        import redis

        other = redis.Redis.from_url(redis_server.url)
        while not stop.is_set():
            other.ping()
            time.sleep(0.02)
        other.close()

    thread = threading.Thread(target=background)
    thread.start()
    try:
        idle = RedisCounts()
        measure_idle(handle, 1.0, idle)

        def action() -> None:
            for i in range(30):
                handle.client.set(f"bench-window-{i}", i)
            for i in range(10):
                handle.client.get(f"bench-window-{i}")
            time.sleep(0.5)

        seen = window(handle, idle, 10, action)
    finally:
        stop.set()
        thread.join()
        handle.close()
    assert seen.operations == 10
    # the PINGs: ~50/s, the subtraction leaves a few of them either way
    assert seen.reads == pytest.approx(4.0, abs=0.6)
    assert seen.commands == pytest.approx(4.0, abs=0.6)
    assert seen.names["set"] == pytest.approx(3.0) and seen.names["get"] == pytest.approx(1.0)
    assert seen.shards == 0  # untagged keys


def scaling_results() -> Results:
    single = RedisCounts(
        reads_per_request=[0.03, 0.04, 0.05], commands_per_request=[5.0, 5.02, 5.04],
        create=PerRequest([0.05, 0.04], [6.0, 6.02]), monitor_requests=200,
        monitor_reads=1.0, monitor_client_commands=1.0, idle_reads=9.5, idle_commands=105.0,
    )  # fmt: skip
    calls = StoreCalls(
        sessions=1000,
        idle=RedisCounts(idle_reads=9.7, idle_commands=106.3),
        creates=[Window(1000, 1.1, 1.0, 6.01, 1.0, {"evalsha": 1.0})],
        expiries=[
            Window(1000, 7.2, 1.24, 20.42, 3.03, {"evalsha": 2.02, "time": 0.68}),
            Window(1000, 7.0, 0.9, 18.0, 2.5, {"evalsha": 1.8}),
            Window(1000, 7.4, 1.5, 22.0, 3.5, {"evalsha": 2.5, "time": 1.0}),
        ],
        expired=3000,
    )
    cluster_calls = StoreCalls(
        sessions=1000,
        creates=[Window(1000, 1.2, 1.0, 6.06, 1.02, {"evalsha": 1.01}, shards=12)],
        expiries=[Window(1000, 7.5, 0.78, 28.21, 4.64, {"evalsha": 3.78}, shards=12)],
    )
    return Results(
        {
            "lapse-redis": Outcome(redis=single, store_calls=calls),
            "lapse-redis-cluster": Outcome(store_calls=cluster_calls),
            "aiohttp-redis": Outcome(redis=RedisCounts(reads_per_request=[2.0])),
            "lapse-memory": Outcome(),
        },
        expiry=[],
    )


def test_scaling_table_puts_each_operations_round_trips_and_commands_side_by_side() -> None:
    """One row per lapse system on Redis (not aiohttp, not memory): shards, touch and
    create under wrk (medians) and one at a time, per expired session (the median of the
    rounds, each figure's range beside it; by name, a name a round lacks counts 0), idle."""
    lines = scaling_table(scaling_results())
    rows = [line for line in lines if line.startswith("| lapse")]
    assert rows == [
        "| lapse (Redis) | 1 (untagged) | 0.04 / 5.02 | 1.00 / 1.00 | 0.04 / 6.01 "
        "| 1.00 / 6.01 | 1.24 / 20.42 (0.90-1.50 / 18.0-22.0) | 1,000 in 1.1 s "
        "| 1.00: evalsha 1.00 | 3.03: evalsha 2.02, time 0.68 "
        "| 9.7 / 106.3 |",
        "| lapse (Redis Cluster) | 12 | — / — | — | — / — | 1.00 / 6.06 | 0.78 / 28.21 "
        "| 1,000 in 1.2 s "
        "| 1.02: evalsha 1.01 | 4.64: evalsha 3.78 | — |",
    ]
    assert "1,000 cookie-less GETs one after the other" in lines[-1]
    assert scaling_table(Results({"lapse-memory": Outcome()}, expiry=[])) == []


@pytest.mark.slow
def test_store_calls_of_creates_and_expiries_one_at_a_time_on_a_real_lapse_seed(
    redis_server: Any,
) -> None:
    """The lapse seed on a real redis-server, two rounds of 40 sessions made one at a time:
    every one expires (its line seen), each create and each expiry cost the store at least
    one command, and the problems list stays empty."""
    opts = parse_options(["--systems", "lapse-redis", "--expiry-calls-sessions", "40",
                          "--idle-seconds", "1", "--repeats", "2"])  # fmt: skip
    handle = RedisHandle(redis_server.url)
    bench = Bench(opts, "wrk", handle)
    calls = StoreCalls()
    try:
        bench_store_calls(bench, SYSTEMS["lapse-redis"], calls)
    finally:
        handle.close()
    assert bench.problems == []
    assert (calls.sessions, calls.expired) == (40, 80)  # --repeats 2: two rounds
    assert len(calls.creates) == len(calls.expiries) == 2
    assert calls.create is not None and calls.expiry is not None
    assert calls.create.client_commands >= 0.9 and calls.create.reads >= 0.9
    assert calls.expiry.commands > 0
    assert calls.idle is not None and calls.idle.idle_seconds >= 3.0
