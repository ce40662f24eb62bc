"""The request path through the HTTP protocol, in process: bytes in, bytes out, no sockets.

bench/micro.py calls the ASGI app; this feeds the raw request to the protocol object
lapse's reactor gives uvicorn (httptools parsing, uvicorn's callbacks, lapse's guard, the
Site, the response written), through a transport that only keeps what is written, on
uvloop. So it counts what a request costs the server's process in user space except the
socket system calls, and it is steady: with ``--instructions`` the figure is CPU
instructions per request from valgrind's callgrind (the difference between two runs of
``--requests`` and 3x that many, so start-up cancels out), which does not move with the
machine's load.

Cases (each one GET /logme; a case's requests all on one connection, keep-alive):

- ``uvicorn bare``: a bare ASGI app (200, empty body) on uvicorn's own protocol: the
  reference, what a bare app costs;
- ``lapse bare``: the same app on lapse's protocol (the guard: limits, timers);
- ``lapse touch`` / ``lapse create``: the seed's page on a ``Site``, memory store, with a
  session's cookie / without one.

lapse's protocol holds a response until the end of the loop's turn (TurnTransport in
src/lapse/internet/_turn.py); the harness releases it after each request, as the
turn's end does for all of a turn's connections, and turns the loop every ``TURN``
requests.

Run: ``.venv/bin/python bench/protocol_micro.py [--requests N] [--rounds R]
[--instructions]`` (``PYTHONPATH=other/src`` measures another checkout).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from typing import Any

if not __package__:  # run as a script: make the bench package importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

CASES = ("uvicorn bare", "lapse bare", "lapse touch", "lapse create")
GET = b"GET /logme HTTP/1.1\r\nHost: bench\r\n\r\n"
TURN = 32
"""Requests per loop turn for lapse's cases (see run_case)."""


class KeepingTransport:
    """What the protocol writes to, kept (the last few writes); never paused."""

    def __init__(self) -> None:
        self.writes = 0
        self.last = b""
        self.closing = False

    def write(self, data: bytes) -> None:
        self.writes += 1
        self.last += data  # (the response so far: a head and a body may come apart)

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"sockname": ("127.0.0.1", 8080), "peername": ("127.0.0.1", 50000)}.get(
            name, default
        )

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def set_write_buffer_limits(self, *args: Any, **kwargs: Any) -> None:
        pass

    def get_write_buffer_size(self) -> int:
        return 0


def make_protocol(case: str) -> Any:
    """The protocol object lapse's reactor (or, for ``uvicorn bare``, uvicorn) would make."""
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
    from uvicorn.server import ServerState

    from bench.micro import Logme
    from lapse.internet._asyncio import _CutQuietly
    from lapse.internet._http import ServingConfig, protocol_for
    from lapse.web.resource import Resource
    from lapse.web.server import Session, Site

    class ShortSession(Session):
        sessionTimeout = 5

    start = {"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"0")]}
    body = {"type": "http.response.body", "body": b""}

    async def bare(scope: Any, receive: Any, send: Any) -> None:
        await send(start)
        await send(body)

    root = Resource()
    root.putChild("logme", Logme())
    site = Site(root)
    site.sessionFactory = ShortSession
    limits = site.http_limits()
    guard = _CutQuietly(site)
    app: Any = bare if case.endswith("bare") else guard
    config = ServingConfig(
        app,
        http=protocol_for(limits),
        interface="asgi3",
        lifespan="off",
        log_config=None,
        access_log=False,
        proxy_headers=False,
        server_header=False,
    )
    config.load()
    config.limits = limits
    config.connection_cap = 1000
    if case == "uvicorn bare":
        config.http_protocol_class = HttpToolsProtocol
    elif not case.endswith("bare") and getattr(site, "_serves_now", lambda: False)():
        config.serve_now = site._serve_now
        config.guard_app = guard.guarded
    return config.http_protocol_class(config, ServerState(), {}, _loop=asyncio.get_running_loop())


async def run_case(case: str, requests: int, rounds: int) -> list[float]:
    """µs of process CPU per request, per round."""
    protocol = make_protocol(case)
    transport = KeepingTransport()
    protocol.connection_made(transport)

    # lapse's protocol holds a response answered in the read's callback until the
    # end of the loop's turn (TurnTransport), and under load a turn ends the reads
    # of dozens of connections (about 35 under wrk -c50): here the release is
    # called as the turn's end would, and the loop turns once every TURN requests
    # (running the releases it was asked for, which then find nothing held).
    release = getattr(protocol.transport, "release", None)
    served = 0

    async def one(data: bytes) -> bytes:
        nonlocal served
        transport.last = b""
        protocol.data_received(data)
        if release is not None:
            release()
            served += 1
            if served % TURN == 0:
                await asyncio.sleep(0)
        while b"\r\n\r\n" not in transport.last:  # (a task answers: let it run)
            await asyncio.sleep(0)
        return transport.last

    answer = await one(GET)
    found = re.search(rb"set-cookie: (lapse_session=[^;]+)", answer)
    request = GET
    if case == "lapse touch":
        assert found is not None, answer
        request = GET.replace(b"\r\n\r\n", b"\r\nCookie: " + found.group(1) + b"\r\n\r\n")
    for _ in range(200):
        await one(request)
    figures = []
    for _ in range(rounds):
        started = time.process_time()
        for _ in range(requests):
            await one(request)
        figures.append((time.process_time() - started) / requests * 1e6)
    protocol.connection_lost(None)
    return figures


def instructions(case: str, requests: int) -> int:
    """Instructions per request (callgrind): two runs, ``requests`` and 3x as many."""
    valgrind = shutil.which("valgrind")
    if valgrind is None:
        raise SystemExit("--instructions needs valgrind (apt-get install valgrind)")
    counts = []
    for n in (requests, 3 * requests):
        command = [
            valgrind,
            "--tool=callgrind",
            "--callgrind-out-file=/dev/null",
            sys.executable,
            __file__,
            "--case",
            case,
            "--requests",
            str(n),
            "--rounds",
            "1",
        ]
        done = subprocess.run(command, capture_output=True, text=True, check=True, env=os.environ)
        found = re.search(r"Collected : (\d+)", done.stderr)
        if found is None:
            raise RuntimeError(f"no instruction count from callgrind:\n{done.stderr[-2000:]}")
        counts.append(int(found.group(1)))
    return (counts[1] - counts[0]) // (2 * requests)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=5000, help="per round (5000)")
    parser.add_argument("--rounds", type=int, default=5, help="rounds per case (5)")
    parser.add_argument("--case", choices=CASES, help="one case only")
    parser.add_argument(
        "--instructions", action="store_true", help="callgrind instructions per request"
    )
    args = parser.parse_args(argv)
    import uvloop

    cases = [args.case] if args.case else list(CASES)
    print("| case | µs/request (median, CPU) | min-max | instructions/request |")
    print("|---|---:|---:|---:|")
    for case in cases:
        figures = uvloop.run(run_case(case, args.requests, args.rounds))
        counted = (
            f"{instructions(case, max(args.requests // 5, 500)):,}" if args.instructions else "-"
        )
        print(
            f"| {case} | {statistics.median(figures):.1f} | {min(figures):.1f}-{max(figures):.1f}"
            f" | {counted} |",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
