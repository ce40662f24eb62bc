"""bench/rate_cost.py: the bare app made slower in user space only, and its table."""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.rate_cost import parse_spins, table
from bench.servers.bare_asgi import BODY, START, spin_loop, spinning


def test_spins_are_comma_separated_non_negative_microseconds() -> None:
    """--spins reads "0,10, 20.5"; an empty list, a negative or a word is refused."""
    assert parse_spins("0,10, 20.5") == [0.0, 10.0, 20.5]
    for bad in ("", "10,-1", "ten"):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_spins(bad)


def test_the_table_has_a_row_per_server_with_its_total() -> None:
    """Each row gives requests/s, user, kernel and their sum, in the order measured."""
    lines = table([("bare app, spin 0 µs", 17.7, 9.6, 36712.4), ("lapse", 40.2, 24.0, 15534)], 3)
    assert lines[0].startswith("Server CPU per request under wrk -t1 -c50 (median of 3 runs")
    assert lines[4] == "| bare app, spin 0 µs | 36,712 | 17.7 | 9.6 | 27.3 |"
    assert lines[5] == "| lapse | 15,534 | 40.2 | 24.0 | 64.2 |"


def test_the_spin_is_longer_for_more_microseconds_and_answers_as_the_bare_app() -> None:
    """--spin-us sizes an empty loop at start-up (more µs, a longer loop); a
    request spins through it, then gets the bare app's answer."""
    short, long = spin_loop(10e-6), spin_loop(40e-6)
    assert 1 <= len(short) < len(long)
    sent: list[object] = []

    async def send(message: object) -> None:
        sent.append(message)

    app = spinning(2e-3)
    before = time.perf_counter()
    asyncio.run(app({"type": "http"}, None, send))
    assert time.perf_counter() - before >= 1e-3  # (sized for 2 ms; a slower machine spins longer)
    assert sent == [START, BODY]
