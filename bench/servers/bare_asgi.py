"""The ceiling: a raw ASGI callable on uvicorn, no framework, no sessions.

Usage: python bench/servers/bare_asgi.py PORT [--burn-us N]

Every HTTP request gets 200 with an empty body. uvicorn: single process,
httptools, uvloop, no access log, log level warning, no lifespan, 127.0.0.1
only (and, as lapse's reactor does, no ``Server`` header and no proxy headers).

``--burn-us N`` (bench/tail_control.py): each request first spins until its thread has
used N µs more CPU time, with no allocation and no pause: a server as slow as another
but with nothing in it that stalls the loop.
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("port", type=int)
    parser.add_argument("--burn-us", type=float, default=0.0, help="CPU µs spent per request")
    args = parser.parse_args()
    uvicorn.run(
        burning(args.burn_us / 1e6) if args.burn_us > 0 else app,
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
