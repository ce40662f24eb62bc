"""lapse: a web server whose core is the session lifecycle.

Programs written against Twisted Web's session API run on lapse by changing
the import root from ``twisted`` to ``lapse``. The public names live where a
Twisted user looks for them:

- :mod:`lapse.web.server`: ``Site``, ``Session``, ``Request``, ``NOT_DONE_YET``
- :mod:`lapse.web.resource`: ``Resource``, ``NoResource``, ``ErrorPage``
- :mod:`lapse.internet.reactor`: ``listenTCP``, ``listenSSL``, ``run``, ``stop``,
  ``callLater``, ``seconds``
- :mod:`lapse.internet.task`: ``Clock``, deterministic time for tests
- :mod:`lapse.python.components`: ``Componentized``, ``registerAdapter``
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("lapse")
except PackageNotFoundError:  # pragma: no cover - running from a bare checkout
    __version__ = "0+unknown"

__all__ = ["__version__"]
