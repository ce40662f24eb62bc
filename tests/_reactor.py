"""Helpers for tests of the real reactor (``AsyncioReactor``): pages, and
running a reactor in the test thread while a client runs in another.

A test's reactor runs with ``run(installSignalHandlers=False)``; the client
side runs in a thread started once the reactor runs (:func:`run_with_client`),
and a guard timer stops the reactor if a test goes wrong, so nothing can hang.
The fresh reactor of each test is the conftest fixture ``reactor``.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

from _servers import port_accepts

from lapse.internet._asyncio import AsyncioReactor
from lapse.web.resource import Resource
from lapse.web.server import Request, Site

T = TypeVar("T")

GUARD_SECONDS = 10.0
"""How long a test's reactor may run before its guard stops it (a failure)."""

UID = r"[A-Za-z0-9_-]{24}"


class Hello(Resource):
    isLeaf = True

    def render_GET(self, request: Request) -> bytes:
        return b"hello from lapse"


class Whoami(Resource):
    """Says whether the request is secure, and its session's uid."""

    isLeaf = True

    def render_GET(self, request: Request) -> str:
        return f"secure={request.isSecure()} uid={request.getSession().uid}"


def hello_site(reactor: AsyncioReactor) -> Site:
    root = Resource()
    root.putChild("hello", Hello())
    root.putChild("whoami", Whoami())
    return Site(root, reactor=reactor)


def run_until_stopped(reactor: AsyncioReactor, timeout: float = GUARD_SECONDS) -> None:
    """``reactor.run()``; a guard stops it after ``timeout`` (a test failure)."""
    timed_out: list[bool] = []

    def guard() -> None:
        timed_out.append(True)
        reactor.stop()

    guard_call = reactor.callLater(timeout, guard)
    reactor.run(installSignalHandlers=False)
    if guard_call.active():
        guard_call.cancel()
    assert not timed_out, f"the reactor was still running after {timeout} s"


def run_with_client(
    reactor: AsyncioReactor, client: Callable[[], T], timeout: float = GUARD_SECONDS
) -> T:
    """Run the reactor while ``client()`` runs in a thread; stop it when the
    client returns; the client's result (or its exception, raised here)."""
    outcome: dict[str, Any] = {}

    def stop_if_running() -> None:
        if reactor.running:
            reactor.stop()

    def start() -> None:
        loop = asyncio.get_running_loop()

        def work() -> None:
            try:
                outcome["value"] = client()
            except BaseException as exc:
                outcome["error"] = exc
            finally:
                loop.call_soon_threadsafe(stop_if_running)

        threading.Thread(target=work, daemon=True).start()

    reactor.callWhenRunning(start)
    run_until_stopped(reactor, timeout)
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]  # type: ignore[no-any-return]


def call_in_reactor(reactor: AsyncioReactor, func: Callable[[], Any]) -> None:
    """From a client thread: run ``func`` on the running reactor's loop, and wait."""
    done = threading.Event()
    loop = reactor._loop
    assert loop is not None

    def call() -> None:
        try:
            func()
        finally:
            done.set()

    loop.call_soon_threadsafe(call)
    assert done.wait(5), "the reactor did not run the call"


def wait_until_refused(port: int, timeout: float = 3.0) -> bool:
    """Whether connections to ``port`` are refused within ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not port_accepts(port):
            return True
        time.sleep(0.02)
    return False
