"""Memory per live session, measured in-process (not over HTTP).

lapse and Twisted: builds ``Site(Resource())`` of the chosen system, calls
``site.makeSession()`` N times (the sessions stay alive in ``site.sessions``;
the reactor/expiry engine is never run). aiohttp: saves N new sessions, each
holding what the bench's aiohttp server keeps for a session (``seen`` and
``last_visit``), through ``DictStorage.save_session`` (bench/servers/
aiohttp_seed.py) with a long ``max_age``, so that all N stay in its dict.

Prints one JSON object: the RSS growth divided by N.

Usage: python bench/memory_probe.py --system twisted|lapse|aiohttp --count N
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import importlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

SERVERS_DIR = Path(__file__).resolve().parent / "servers"


def rss_bytes() -> int:
    """Resident set size of this process, from /proc/self/statm."""
    with open("/proc/self/statm") as statm:
        resident_pages = int(statm.read().split()[1])
    return resident_pages * os.sysconf("SC_PAGE_SIZE")


def build_site(system: str) -> Any:
    if system == "twisted":
        from twisted.web.resource import Resource as TwistedResource
        from twisted.web.server import Site as TwistedSite

        return TwistedSite(TwistedResource())  # type: ignore[no-untyped-call]
    if system == "lapse":
        # Imported by name so this file type-checks whatever state lapse is in.
        server = importlib.import_module("lapse.web.server")
        resource = importlib.import_module("lapse.web.resource")
        return server.Site(resource.Resource(), store="memory:")
    raise ValueError(f"unknown system: {system}")


def measure_site(system: str, count: int) -> tuple[int, int, float, int]:
    site = build_site(system)
    gc.collect()
    before = rss_bytes()
    started = time.perf_counter()
    for _ in range(count):
        site.makeSession()
    elapsed = time.perf_counter() - started
    gc.collect()
    return before, rss_bytes(), elapsed, len(site.sessions)


def measure_aiohttp(count: int) -> tuple[int, int, float, int]:
    sys.path.insert(0, str(SERVERS_DIR))
    from aiohttp import web
    from aiohttp_seed import DictStorage
    from aiohttp_session import Session

    storage = DictStorage(max_age=3600)
    response = web.Response()

    async def fill() -> None:
        for _ in range(count):
            session = Session(None, data=None, new=True, max_age=storage.max_age)
            session["seen"] = True
            session["last_visit"] = int(time.time())
            await storage.save_session(None, response, session)  # type: ignore[arg-type]

    gc.collect()
    before = rss_bytes()
    started = time.perf_counter()
    asyncio.run(fill())
    elapsed = time.perf_counter() - started
    gc.collect()
    return before, rss_bytes(), elapsed, len(storage.entries)


def measure(system: str, count: int) -> dict[str, Any]:
    if system == "aiohttp":
        before, after, elapsed, live = measure_aiohttp(count)
    else:
        before, after, elapsed, live = measure_site(system, count)
    return {
        "system": system,
        "count": count,
        "live_sessions": live,
        "count_ok": live == count,
        "rss_before": before,
        "rss_after": after,
        "bytes_per_session": (after - before) / count,
        "make_seconds": elapsed,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--system", choices=["twisted", "lapse", "aiohttp"], required=True)
    parser.add_argument("--count", type=int, required=True)
    args = parser.parse_args()
    print(json.dumps(measure(args.system, args.count)))


if __name__ == "__main__":
    main()
