"""``python -m lapse.web.liveview --demo``: a demo site with sessions and its
live view, on 127.0.0.1. It prints ``LIVEVIEW <url>`` when it listens,
``CALLBACK <uid>`` when a session's ``notifyOnExpire`` callback runs and
``HOOK <uid> <cause>`` when the durable hook does (the browser and CLI
tests read them). With ``--principal NAME`` (repeatable), the sessions are
bound to those principals in turn (by ``session.set_principal``) before
the ``LIVEVIEW`` line."""

from __future__ import annotations

import argparse
import functools
from typing import Any

from lapse.sessions import Session, short_uid
from lapse.web.liveview._view import LiveView
from lapse.web.resource import Resource

__all__ = ["main"]


def _demo(
    port: int, sessions: int, token: str | None, principals: list[str]
) -> None:  # pragma: no cover - manual
    import asyncio
    import random
    import sys

    from lapse.internet import reactor
    from lapse.sessions import Expiry

    rng = random.Random(7)

    class DemoSession(Session):
        def __init__(self, site: Any, uid: str) -> None:
            super().__init__(site, uid)
            self.sessionTimeout = rng.choice([300, 900, 1800, 3600])

    class Home(Resource):
        isLeaf = True

        def render_GET(self, request: Any) -> bytes:
            return f"your session: {short_uid(request.getSession().uid)}\n".encode()

    def hook(expiry: Expiry) -> None:
        print(f"HOOK {short_uid(expiry.uid)} {expiry.cause}", flush=True)

    from lapse.web.server import Site

    root = Resource()
    root.putChild(b"", Home())
    site = Site(root, on_expire=hook)
    site.sessionFactory = DemoSession
    root.putChild(b"_lapse", LiveView(site, token=token))
    now = reactor.seconds()
    # An hour of history for the chart (the counters of a demo, not real).
    for minutes_ago in range(59, 0, -1):
        at = now - minutes_ago * 60
        for _ in range(rng.randint(2, 14)):
            site.stats.session_created(at)
        for _ in range(rng.randint(1, 10)):
            site.stats.session_ended(rng.choice(["timeout", "timeout", "expired"]), at)
    made = []
    for _ in range(sessions):
        session = site.makeSession()
        short = short_uid(session.uid)
        session.notifyOnExpire(functools.partial(print, f"CALLBACK {short}", flush=True))
        made.append(session)
    reactor.listenTCP(port, site, interface="127.0.0.1")

    def listening() -> None:
        query = f"?token={token}" if token else ""
        print(f"LIVEVIEW http://127.0.0.1:{port}/_lapse/{query}", flush=True)
        sys.stdout.flush()

    async def bind_then_say() -> None:
        for i, session in enumerate(made):
            await session.set_principal(principals[i % len(principals)])
        listening()

    if principals:  # bound once the reactor runs, then announced
        started = []
        reactor.callWhenRunning(lambda: started.append(asyncio.ensure_future(bind_then_say())))
    else:
        listening()
    reactor.run()


def main(argv: list[str] | None = None) -> None:  # pragma: no cover - manual
    parser = argparse.ArgumentParser(prog="python -m lapse.web.liveview")
    parser.add_argument("--demo", action="store_true", help="serve a demo site with sessions")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--sessions", type=int, default=40)
    parser.add_argument("--token", default=None)
    parser.add_argument(
        "--principal",
        action="append",
        default=[],
        metavar="NAME",
        help="bind the sessions to this principal (repeat it: in turn)",
    )
    args = parser.parse_args(argv)
    if not args.demo:
        parser.error("only --demo is offered: mount LiveView(site) in your own resource tree")
    _demo(args.port, args.sessions, args.token, args.principal)
