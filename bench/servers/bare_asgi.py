"""The ceiling: a raw ASGI callable on uvicorn, no framework, no sessions.

Usage: python bench/servers/bare_asgi.py PORT

Every HTTP request gets 200 with an empty body. uvicorn: single process,
httptools, uvloop, no access log, log level warning, no lifespan, 127.0.0.1
only (and, as lapse's reactor does, no ``Server`` header and no proxy headers).
"""

from __future__ import annotations

import argparse
from typing import Any

import uvicorn

START = {"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"0")]}
BODY = {"type": "http.response.body", "body": b""}


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] == "http":
        await send(START)
        await send(BODY)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("port", type=int)
    args = parser.parse_args()
    uvicorn.run(
        app,
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
