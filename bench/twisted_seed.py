"""The seed program, ported to Python 3 for real Twisted; the bench's reference server.

Usage: python bench/twisted_seed.py PORT   (listens on 127.0.0.1:PORT)
"""

from __future__ import annotations

import sys
from typing import ClassVar

from twisted.internet import reactor
from twisted.web.resource import Resource
from twisted.web.server import Request, Session, Site


class ShortSession(Session):
    sessionTimeout = 5


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
    port = int(sys.argv[1])
    rootResource = Resource()  # type: ignore[no-untyped-call]
    logger = ExpirationLogger()  # type: ignore[no-untyped-call]
    rootResource.putChild(b"logme", logger)  # type: ignore[arg-type]
    factory = Site(rootResource)  # type: ignore[no-untyped-call]
    factory.sessionFactory = ShortSession
    reactor.listenTCP(port, factory, interface="127.0.0.1")  # type: ignore[arg-type]
    reactor.run()  # type: ignore[misc]


if __name__ == "__main__":
    main()
