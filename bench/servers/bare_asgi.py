"""The ceiling: a raw ASGI callable on uvicorn, no framework, no sessions.

Usage: python bench/servers/bare_asgi.py PORT [--burn-us N | --spin-us N]

Every HTTP request gets 200 with an empty body. uvicorn: single process,
httptools, uvloop, no access log, log level warning, no lifespan, 127.0.0.1
only (and, as lapse's reactor does, no ``Server`` header and no proxy headers).

``--burn-us N`` (bench/tail_control.py): each request first spins until its thread has
used N µs more CPU time, with no allocation and no pause: a server as slow as another
but with nothing in it that stalls the loop. Its spin reads the thread's CPU
clock, a system call each time, so part of what it spends is kernel time.

``--spin-us N`` (bench/rate_cost.py): each request first runs an empty Python loop
sized at start-up to take about N µs (no system call, no allocation): the app made
that much slower in user space only, to see what its rate alone does to the
kernel's share of a request.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import uvicorn

START = {"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"0")]}
BODY = {"type": "http.response.body", "body": b""}


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] == "http":
        await send(START)
        await send(BODY)


def burning(seconds: float) -> Any:
    """``app``, each request spinning first until its thread used ``seconds`` of CPU."""
    cpu = time.thread_time

    async def paced(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            until = cpu() + seconds
            while cpu() < until:
                pass
            await send(START)
            await send(BODY)

    return paced


def spin_loop(seconds: float) -> tuple[None, ...]:
    """What to iterate over to spend about ``seconds`` of CPU: timed at start-up,
    the best of five rounds of a long loop."""
    block = (None,) * 100_000
    best = float("inf")
    for _ in range(5):
        started = time.perf_counter()
        for _ in block:
            pass
        best = min(best, time.perf_counter() - started)
    return (None,) * max(round(seconds / best * len(block)), 1)


def spinning(seconds: float) -> Any:
    """``app``, each request first running an empty loop of about ``seconds``."""
    loop = spin_loop(seconds)

    async def spun(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            for _ in loop:
                pass
            await send(START)
            await send(BODY)

    return spun


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("port", type=int)
    slower = parser.add_mutually_exclusive_group()
    slower.add_argument("--burn-us", type=float, default=0.0, help="CPU µs spent per request")
    slower.add_argument("--spin-us", type=float, default=0.0, help="µs of empty loop per request")
    args = parser.parse_args()
    served = app
    if args.burn_us > 0:
        served = burning(args.burn_us / 1e6)
    elif args.spin_us > 0:
        served = spinning(args.spin_us / 1e6)
    uvicorn.run(
        served,
        host="127.0.0.1",
        port=args.port,
        log_level="warning",
        access_log=False,
        http="httptools",
        loop="uvloop",
        lifespan="off",
        proxy_headers=False,
        server_header=False,
    )


if __name__ == "__main__":
    main()
