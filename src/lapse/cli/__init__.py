"""The ``lapse`` command: ``lapse serve MODULE:ATTR`` serves a Site or an ASGI app.

``lapse serve myapp:site`` imports ``myapp`` (from ``--app-dir``, the current
directory by default), takes its ``site`` and serves it with lapse's reactor
(uvicorn, httptools, uvloop) until SIGINT or SIGTERM, as a program ending in
``reactor.listenTCP(8080, site); reactor.run()`` would. ``python -m lapse``
is the same command.

The session store (``--store``) is put in ``LAPSE_SESSION_STORE`` before the
module is imported, so it reaches the Sites the module makes at import.

``--workers N`` runs N worker processes under a supervisor, this process,
which binds the socket once and hands it to them; a worker that dies is
restarted (``--fail-fast``: everything stops instead). See
:mod:`lapse.cli.supervisor`.

``lapse sessions list|show|expire|stats`` inspects and ends sessions, of a
shared store (``--store``) or through a running server's live view
(``--server``): see :mod:`lapse.cli.sessions`.

Exit status: 0 after a clean stop; 2 for a command line that cannot be served
(options, MODULE:ATTR, store URL, TLS files, the memory store with several
workers); 1 when serving failed (the port is in use, a session store that can
never work as configured, a worker died with ``--fail-fast``, or failed to
start).

The package, one job a module: :mod:`~lapse.cli.parser` (the command line),
:mod:`~lapse.cli.app` (importing and checking the application),
:mod:`~lapse.cli.serve` (one process), :mod:`~lapse.cli.supervisor`
(``--workers``), :mod:`~lapse.cli.sessions` over :mod:`~lapse.cli.sources`
(``lapse sessions``), :mod:`~lapse.cli.liveview_client` (``--server``).
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Sequence

from lapse.cli.app import check_app, load_target
from lapse.cli.common import EXIT_BROKEN_PIPE, EXIT_FAILED, EXIT_USAGE, CommandError, _say
from lapse.cli.parser import build_parser

__all__ = [
    "EXIT_BROKEN_PIPE",
    "EXIT_FAILED",
    "EXIT_USAGE",
    "CommandError",
    "build_parser",
    "check_app",
    "load_target",
    "main",
]


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``lapse`` command; its exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    try:
        if args.command == "sessions":
            from lapse.cli.sessions import run_sessions

            return run_sessions(args)
        from lapse.cli.serve import _check, _serve

        options = _check(args)
        if options.workers > 1 and options.ready_fd is None:
            from lapse.cli.supervisor import Supervisor

            return Supervisor(options).run()
        return _serve(options)
    except CommandError as exc:
        _say(f"error: {exc}")
        return exc.status
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        _silence_stdout()
        return EXIT_BROKEN_PIPE


def _silence_stdout() -> None:
    """Point stdout at /dev/null: what is still buffered for a reader that
    went away must not raise again (and print a traceback) at exit."""
    with contextlib.suppress(OSError, ValueError, AttributeError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
