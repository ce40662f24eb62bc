"""The seed's ``GET /logme`` on Starlette's ``SessionMiddleware``, served by uvicorn.

Usage: python bench/servers/starlette_seed.py PORT

The session is the cookie itself (JSON, base64, signed with itsdangerous's
``TimestampSigner``): no server state, no expiry callback, nothing to expire.
``max_age=5`` is the seed's timeout: a cookie whose signature is older than
that is ignored. The handler marks the session on first sight with a random
``uid`` (so that the bench can tell a kept session from a new one) and writes
``last_visit`` on every request: Starlette re-issues the cookie, with a fresh
timestamp and ``Max-Age``, only when the session was modified, so that is how
a visited session stays alive (idle timeout rather than a fixed lifetime).

uvicorn: single process, httptools, uvloop, no access log, log level warning,
127.0.0.1 only (and, as lapse's reactor does, no ``Server`` header and no
proxy headers).
"""

from __future__ import annotations

import argparse
import secrets
import time

import uvicorn
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.sessions import SessionMiddleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

MAX_AGE = 5


async def logme(request: Request) -> Response:
    session = request.session
    if "uid" not in session:  # first sight: Starlette has no expiry callback
        session["uid"] = secrets.token_hex(16)
    session["last_visit"] = int(time.time())  # re-issue the cookie: idle timeout
    return Response(b"")


def make_app(secret_key: str) -> Starlette:
    return Starlette(
        routes=[Route("/logme", logme)],
        middleware=[Middleware(SessionMiddleware, secret_key=secret_key, max_age=MAX_AGE)],
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("port", type=int)
    args = parser.parse_args()
    uvicorn.run(
        make_app(secrets.token_hex(32)),
        host="127.0.0.1",
        port=args.port,
        log_level="warning",
        access_log=False,
        http="httptools",
        loop="uvloop",
        proxy_headers=False,
        server_header=False,
    )


if __name__ == "__main__":
    main()
