"""Memory per live session, measured in-process (not over HTTP).

Builds ``Site(Resource())`` of the chosen system, calls ``site.makeSession()`` N times (the
sessions stay alive in ``site.sessions``; the reactor/expiry engine is never run), and prints
one JSON object: the RSS growth divided by N.

Usage: python bench/memory_probe.py --system twisted|lapse --count N
"""

from __future__ import annotations

import argparse
import gc
import importlib
import json
import os
import time
from typing import Any


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
        return server.Site(resource.Resource())
    raise ValueError(f"unknown system: {system}")


def measure(system: str, count: int) -> dict[str, Any]:
    site = build_site(system)
    gc.collect()
    before = rss_bytes()
    started = time.perf_counter()
    for _ in range(count):
        site.makeSession()
    elapsed = time.perf_counter() - started
    gc.collect()
    after = rss_bytes()
    live = len(site.sessions)
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
    parser.add_argument("--system", choices=["twisted", "lapse"], required=True)
    parser.add_argument("--count", type=int, required=True)
    args = parser.parse_args()
    print(json.dumps(measure(args.system, args.count)))


if __name__ == "__main__":
    main()
