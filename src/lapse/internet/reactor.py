"""The global reactor, as ``from lapse.internet import reactor`` gives it.

Module-level names are the bound methods of one
:class:`~lapse.internet._asyncio.AsyncioReactor`, so ``reactor.listenTCP``,
``reactor.run``, ``reactor.stop``, ``reactor.callLater`` and
``reactor.seconds`` read as they do in Twisted programs.
"""

from __future__ import annotations

from lapse.internet._asyncio import AsyncioReactor

__all__ = [
    "callLater",
    "callWhenRunning",
    "listenSSL",
    "listenTCP",
    "run",
    "seconds",
    "stop",
    "theReactor",
]

theReactor = AsyncioReactor()

seconds = theReactor.seconds
callLater = theReactor.callLater
callWhenRunning = theReactor.callWhenRunning
listenTCP = theReactor.listenTCP
listenSSL = theReactor.listenSSL
run = theReactor.run
stop = theReactor.stop
