"""The seed program, ported to Python 3 for real Twisted; the bench's reference server.

Usage: python bench/servers/twisted_seed.py PORT [--extra-sessions N]
(listens on 127.0.0.1:PORT). ``--extra-sessions N`` makes N more live sessions
in-process before listening, each with a 3600 s timeout (the bench's "1M live"
figure); the seed's own sessions keep the 5 s timeout.
"""

from __future__ import annotations

import argparse
import sys
from typing import ClassVar

from twisted.internet import reactor
from twisted.web.resource import Resource
from twisted.web.server import Request, Session, Site


class ShortSession(Session):
    sessionTimeout = 5


class LongSession(Session):
    sessionTimeout = 3600


class ExpirationLogger(Resource):
    sessions: ClassVar[set[bytes]] = set()

    def render_GET(self, request: Request) -> bytes:
        session = request.getSession()  # type: ignore[no-untyped-call]
        if session.uid not in self.sessions:
            self.sessions.add(session.uid)
            session.notifyOnExpire(lambda: self._expired(session.uid))
        return b""

    def _expired(self, uid: bytes) -> None:
        print("Session", uid, "has expired.")
        self.sessions.remove(uid)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("port", type=int)
    parser.add_argument("--extra-sessions", type=int, default=0)
    args = parser.parse_args()
    rootResource = Resource()  # type: ignore[no-untyped-call]
    logger = ExpirationLogger()  # type: ignore[no-untyped-call]
    rootResource.putChild(b"logme", logger)  # type: ignore[arg-type]
    factory = Site(rootResource)  # type: ignore[no-untyped-call]
    if args.extra_sessions:
        factory.sessionFactory = LongSession
        for _ in range(args.extra_sessions):
            factory.makeSession()  # type: ignore[no-untyped-call]
        print(f"bench: {len(factory.sessions)} live sessions", file=sys.stderr, flush=True)
    factory.sessionFactory = ShortSession
    reactor.listenTCP(args.port, factory, interface="127.0.0.1")  # type: ignore[arg-type]
    reactor.run()  # type: ignore[misc]


if __name__ == "__main__":
    main()
