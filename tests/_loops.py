"""Event loops and sockets, for tests of lapse's Redis clients.

- :func:`event_loop_kind`: an autouse fixture (import it into a test module)
  that runs each test of the module on asyncio's own loop and on uvloop (the
  server's).
- :func:`sockets_to`: how many TCP sockets this process holds to a port.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Iterator

import pytest

__all__ = ["event_loop_kind", "sockets_to"]


@pytest.fixture(autouse=True, params=["asyncio", "uvloop"])
def event_loop_kind(request: pytest.FixtureRequest) -> Iterator[str]:
    """Every test runs on asyncio's own loop and on uvloop (the server's)."""
    if request.param == "asyncio":
        yield "asyncio"
        return
    uvloop = pytest.importorskip("uvloop")
    previous = asyncio.get_event_loop_policy()
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    try:
        yield "uvloop"
    finally:
        asyncio.set_event_loop_policy(previous)


def sockets_to(port: int) -> int:
    """How many TCP sockets this process holds open to 127.0.0.1:``port``."""
    fds = "/proc/self/fd"
    inodes = set()
    for fd in os.listdir(fds):
        with contextlib.suppress(OSError):
            target = os.readlink(f"{fds}/{fd}")
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    with open("/proc/net/tcp") as table:
        rows = [line.split() for line in table.readlines()[1:]]
    return sum(1 for row in rows if int(row[2].split(":")[1], 16) == port and row[9] in inodes)
