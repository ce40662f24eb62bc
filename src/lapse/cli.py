"""The ``lapse`` command: ``lapse serve MODULE:ATTR`` serves a Site or an ASGI app.

``lapse serve myapp:site`` imports ``myapp`` (from ``--app-dir``, the current
directory by default), takes its ``site`` and serves it with lapse's reactor
(uvicorn, httptools, uvloop) until SIGINT or SIGTERM, as a program ending in
``reactor.listenTCP(8080, site); reactor.run()`` would. ``python -m lapse``
is the same command.

The session store (``--store``) is put in ``LAPSE_SESSION_STORE`` before the
module is imported, so it reaches the Sites the module makes at import.

``--workers N`` runs N worker processes that share the port (each binds it
with ``SO_REUSEPORT`` and imports the application itself) under a
supervisor, this process: it starts one worker, then, once that one serves,
the others (so a broken application is reported once); it passes SIGINT and
SIGTERM on to them and exits when they have all stopped. If a worker dies on
its own, the supervisor stops the others and exits with status 1.

``lapse sessions list|show|expire|stats --store URL`` inspects and ends the
sessions of a shared store (SQLite, Redis; ``LAPSE_SESSION_STORE`` by
default) without touching them: exit 2 for a bad command line or store URL
(and for ``memory:``, which lives inside the server process), 1 when the
store cannot be reached or a named session is not live. With ``--server URL``
instead (a live view's base URL, e.g. ``http://127.0.0.1:8080/_lapse/``,
and ``--token`` or ``LAPSE_LIVEVIEW_TOKEN``) it goes through that server's
live view JSON API, so it reaches every store, the memory store included:
exit 1 as well when the server cannot be reached or answers 403 or 404.

Exit status: 0 after a clean stop; 2 for a command line that cannot be served
(options, MODULE:ATTR, store URL, TLS files, the memory store with several
workers); 1 when serving failed (the port is in use, a session store that can
never work as configured, a worker died).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import inspect
import os
import re
import select
import signal
import socket
import ssl
import subprocess
import sys
import time
import traceback
import types
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

from lapse import __version__

__all__ = ["main"]

EXIT_FAILED = 1
"""Serving failed: the port could not be bound, or a worker died."""

EXIT_USAGE = 2
"""The command line cannot be served as given."""

EXIT_BROKEN_PIPE = 141
"""The reader of the output went away (``lapse sessions list | head``): the
status a shell reports for a command ended by SIGPIPE (128 + 13), as ``git``
and the coreutils end there, so ``set -o pipefail`` still sees a cut output."""

GRACEFUL_TIMEOUT = 10.0
"""``--graceful-timeout``'s default: seconds requests in flight may take to
finish once a stop is asked (the reactor's ``graceful_timeout``)."""

STOP_MARGIN = 5.0
"""Seconds the supervisor waits for its workers to stop beyond their
``--graceful-timeout``, before SIGKILL."""

_LOG_LEVELS = ("critical", "error", "warning", "info", "debug")

MEMORY_WITH_WORKERS = (
    "{workers} workers cannot share the memory session store: each worker process "
    "would keep its own sessions, so a visitor's session would live in the one worker "
    "that made it and the others would not know it (their answers would start new "
    "sessions), and expiry hooks and notifyOnExpire callbacks would be split between "
    "the processes. Use a shared store: --store sqlite:///sessions.db (the workers of "
    "one machine) or --store redis://host:6379/0 (across machines); or run one worker."
)


class CommandError(Exception):
    """What to tell the user on one line, and the exit status."""

    def __init__(self, message: str, status: int = EXIT_USAGE) -> None:
        super().__init__(message)
        self.status = status


class _ServesItself(BaseException):
    """Raised by the reactor hook: the imported module listens or runs by itself.

    A BaseException, so that an ``except Exception`` in the module lets it by.
    """

    def __init__(self, call: str) -> None:
        super().__init__(call)
        self.call = call


# -- the command line ---------------------------------------------------------


def _trust_spec(text: str) -> int | str:
    """``--trusted-proxies N|ADDRESSES``, checked as ``trust_proxy_headers`` checks it."""
    from lapse.web._proxy import proxy_trust

    digits = text.strip()
    spec: int | str = int(digits) if digits.isascii() and digits.isdigit() else text
    try:
        proxy_trust(spec)
    except (TypeError, ValueError) as exc:
        raise argparse.ArgumentTypeError(
            f"{exc} (give a number of proxies, e.g. 2, or their addresses and networks, "
            "e.g. 10.0.0.0/8,192.0.2.7)"
        ) from None
    return spec


def _finite(text: str, unit: str, bound: str, zero: bool) -> float:
    """A finite number of ``unit``, above 0 (or 0 or more with ``zero``)."""
    try:
        number = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of {unit}") from None
    if not ((number >= 0 if zero else number > 0) and number < float("inf")):
        raise argparse.ArgumentTypeError(f"{text}: a number of {unit}{bound}")
    return number


def _seconds(text: str) -> float:
    """A positive, finite number of seconds (the connection timeouts)."""
    return _finite(text, "seconds", " above 0", zero=False)


def _rate(text: str) -> float:
    """A finite number of bytes per second, 0 or more (--body-min-rate)."""
    return _finite(text, "bytes per second", ", 0 or more", zero=True)


# The connection options of ``lapse serve``: (option, HTTPLimits/Site field, type).
_CONNECTION_OPTIONS: tuple[tuple[str, str, Callable[[str], Any]], ...] = (
    ("--max-connections", "max_connections", lambda text: _positive(text)),
    ("--header-timeout", "header_timeout", _seconds),
    ("--body-timeout", "body_timeout", _seconds),
    ("--body-min-rate", "body_min_rate", _rate),
    ("--keep-alive-timeout", "keep_alive_timeout", _seconds),
)


def _port_number(text: str) -> int:
    try:
        number = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number") from None
    if not 0 <= number <= 65535:
        raise argparse.ArgumentTypeError(f"{number} is not a port number (0-65535)")
    return number


def build_parser() -> argparse.ArgumentParser:
    """The ``lapse`` argument parser."""
    parser = argparse.ArgumentParser(
        prog="lapse",
        description="lapse: a web server whose core is the session lifecycle.",
        epilog="Run 'lapse serve --help' or 'lapse sessions --help' for their options.",
    )
    parser.add_argument("--version", action="version", version=f"lapse {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    serve = commands.add_parser(
        "serve",
        help="serve a lapse Site or an ASGI application",
        description=(
            "Import MODULE and serve its ATTR, a lapse Site or any ASGI 3 application, "
            "until SIGINT (Ctrl-C) or SIGTERM; requests in flight then finish (up to "
            "--graceful-timeout seconds, 10 by default)."
        ),
        epilog=(
            "Examples: 'lapse serve myapp:site', "
            "'lapse serve myapp:site --port 8000 --store sqlite:///sessions.db --workers 4'. "
            "The module must not listen or run the reactor when imported: keep "
            "reactor.listenTCP(...) and reactor.run() under 'if __name__ == \"__main__\":'. "
            "Exit status: 0 after a clean stop, 2 for a bad command line (options, "
            "MODULE:ATTR, store URL, TLS files), 1 if serving failed."
        ),
    )
    serve.add_argument(
        "target",
        metavar="MODULE:ATTR",
        help="the module to import and the Site or ASGI app in it, e.g. myapp:site",
    )
    serve.add_argument(
        "--host",
        "--interface",
        dest="host",
        default="127.0.0.1",
        help="the address to listen on (default: 127.0.0.1; 0.0.0.0 for every IPv4 one)",
    )
    serve.add_argument(
        "--port",
        type=_port_number,
        default=8080,
        help="the TCP port (default: 8080; 0 picks a free one, with one worker)",
    )
    serve.add_argument("--certfile", help="serve HTTPS with this PEM certificate (chain)")
    serve.add_argument("--keyfile", help="the PEM private key of --certfile (not encrypted)")
    serve.add_argument(
        "--store",
        metavar="URL",
        help=(
            "the session store: memory: (the default), sqlite:///path.db or "
            "redis://host:port/db; set as LAPSE_SESSION_STORE before the module is "
            "imported, so it applies to every Site made without store= in its code"
        ),
    )
    serve.add_argument(
        "--workers",
        type=_positive,
        default=1,
        metavar="N",
        help=(
            "N worker processes sharing the port (SO_REUSEPORT), each importing the app; "
            "sessions then need a shared store (sqlite:// or redis://). Default: 1"
        ),
    )
    serve.add_argument(
        "--trust-proxy",
        action="store_const",
        const=True,
        default=False,
        help=(
            "believe X-Forwarded-For and X-Forwarded-Proto as set by one proxy in front "
            "(the right-most entry). A Site gets it as trust_proxy_headers; any other ASGI "
            "app gets its scope's client and scheme from them"
        ),
    )
    serve.add_argument(
        "--trusted-proxies",
        dest="trust_proxy",
        type=_trust_spec,
        metavar="N|ADDRESSES",
        help=(
            "as --trust-proxy, for a chain of N proxies (the N-th entry from the right), "
            "or for the proxies at these addresses or networks (e.g. 10.0.0.0/8,192.0.2.7: "
            "believed only from them)"
        ),
    )
    serve.add_argument(
        "--live-view",
        metavar="SEGMENT",
        help=(
            "serve the live view of the Site's sessions at /SEGMENT/ (e.g. _lapse); "
            "with LAPSE_LIVEVIEW_TOKEN set, only with that token (never put it on the "
            "command line), otherwise only to loopback clients. Off by default"
        ),
    )
    serve.add_argument(
        "--log-level",
        type=str.lower,
        choices=_LOG_LEVELS,
        help=(
            "log to stderr at this level (info: the access log too; debug: session "
            "events too), as LAPSE_LOG_LEVEL does; unless the app configures logging"
        ),
    )
    connection_help = {
        "--max-connections": (
            "N",
            "open connections at most; beyond, a new one gets 503 with Retry-After "
            "(default: the file limit, ulimit -n, less an eighth: 896 for 1024)",
        ),
        "--header-timeout": (
            "SECONDS",
            "for a request's line and headers to arrive, else 408 (default: 20)",
        ),
        "--body-timeout": (
            "SECONDS",
            "for a request body to arrive, plus a second per --body-min-rate bytes "
            "received, else 408 (default: 20)",
        ),
        "--body-min-rate": (
            "BYTES",
            "the body rate kept up indefinitely: bytes per second of --body-timeout (default: 500)",
        ),
        "--keep-alive-timeout": (
            "SECONDS",
            "an idle connection is closed after it, before its first request too (default: 5)",
        ),
    }
    for option, field_name, convert in _CONNECTION_OPTIONS:
        metavar, text = connection_help[option]
        serve.add_argument(option, dest=field_name, type=convert, metavar=metavar, help=text)
    serve.add_argument(
        "--graceful-timeout",
        type=_seconds,
        default=GRACEFUL_TIMEOUT,
        metavar="SECONDS",
        help=(
            "once a stop is asked, requests in flight may take this long to finish; "
            "those still running then are ended (503 if nothing was sent), and one "
            "line says how many (default: 10)"
        ),
    )
    serve.add_argument(
        "--app-dir",
        default=".",
        help="the directory to import MODULE from, put first on sys.path (default: .)",
    )
    # Internal: set by the supervisor on the command lines of its workers.
    serve.add_argument("--worker-ready-fd", type=int, help=argparse.SUPPRESS)
    _add_sessions_parser(commands)
    return parser


# -- checks that need nothing imported ------------------------------------------


_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]")


def _shown(text: str, limit: int = 120) -> str:
    """``text`` for a one-line message: control characters escaped, cut
    after ``limit`` characters."""
    if len(text) > limit:
        text = text[:limit] + f"... ({len(text)} characters)"
    return _CONTROL.sub(lambda found: repr(found.group())[1:-1], text)


def _check_store(url: str, source: str) -> str:
    """The store URL, checked by parsing it; its normalised form."""
    from lapse.sessions.store import StoreConfigError
    from lapse.sessions.stores import store_from_url

    try:
        store = store_from_url(url)
    except StoreConfigError as exc:
        raise CommandError(f"{source}: {exc}") from None
    return store.url


def _is_memory(url: str) -> bool:
    return url.split(":", 1)[0].strip().lower() == "memory"


def _ssl_context(certfile: str | None, keyfile: str | None) -> ssl.SSLContext | None:
    """The server's TLS context, or None for plain HTTP."""
    if certfile is None and keyfile is None:
        return None
    if certfile is None or keyfile is None:
        given, missing = (
            ("--certfile", "--keyfile") if keyfile is None else ("--keyfile", "--certfile")
        )
        raise CommandError(
            f"{given} without {missing}: TLS needs both the certificate and its key "
            "(or neither, for plain HTTP)"
        )
    for option, path in (("--certfile", certfile), ("--keyfile", keyfile)):
        if not Path(path).is_file():
            raise CommandError(f"{option} {path}: no such file")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(certfile, keyfile, password=lambda: b"")
    except (ssl.SSLError, OSError) as exc:
        raise CommandError(
            f"cannot load the TLS certificate {certfile} with the key {keyfile} "
            f"(PEM files, the key not encrypted, matching the certificate): {exc}"
        ) from None
    return context


def _url(scheme: str, host: str, port: int) -> str:
    shown = host or "0.0.0.0"
    if ":" in shown:
        shown = f"[{shown}]"
    return f"{scheme}://{shown}:{port}"


def _say(message: str) -> None:
    print(f"lapse: {message}", file=sys.stderr, flush=True)


# -- importing the application ---------------------------------------------------


def _refuse_serving(call: str) -> NoReturn:
    raise _ServesItself(call)


def _caller_outside_lapse(tb: types.TracebackType | None) -> str:
    """``file:line`` of the innermost frame of ``tb`` outside lapse and importlib."""
    package = str(Path(__file__).resolve().parent)
    where = "?"
    for frame in traceback.extract_tb(tb):
        name = frame.filename
        if name.startswith("<frozen") or str(Path(name).resolve()).startswith(package):
            continue
        where = f"{name}:{frame.lineno}"
    return where


def _import_module(module_name: str, app_dir: str) -> types.ModuleType:
    from lapse.internet.reactor import theReactor

    theReactor._on_serve = _refuse_serving
    try:
        return importlib.import_module(module_name)
    except _ServesItself as exc:
        where = _caller_outside_lapse(exc.__traceback__)
        raise CommandError(
            f"module {module_name!r} serves itself when imported: it calls "
            f"reactor.{exc.call}() at {where}. It is a program: run it with python. "
            f"To serve it with 'lapse serve', put its reactor.listenTCP/listenSSL and "
            f"reactor.run() calls under 'if __name__ == \"__main__\":'."
        ) from None
    except ModuleNotFoundError as exc:
        missing = exc.name or ""
        if missing and (module_name == missing or module_name.startswith(missing + ".")):
            raise CommandError(
                f"no module named {missing!r} (looked in --app-dir {app_dir} and the "
                "installed packages)"
            ) from None
        raise CommandError(
            f"importing {module_name!r} failed at {_caller_outside_lapse(exc.__traceback__)}: {exc}"
        ) from None
    except SyntaxError as exc:
        raise CommandError(
            f"importing {module_name!r} failed: {exc.filename}:{exc.lineno}: SyntaxError: {exc.msg}"
        ) from None
    except SystemExit as exc:
        raise CommandError(f"importing {module_name!r} exited (sys.exit({exc.code!r}))") from None
    except Exception as exc:
        where = _caller_outside_lapse(exc.__traceback__)
        detail = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        raise CommandError(f"importing {module_name!r} failed at {where}: {detail}") from None
    finally:
        theReactor._on_serve = None


def load_target(target: str, app_dir: str) -> Any:
    """The object ``MODULE:ATTR`` names; :class:`CommandError` if none.

    Importing is guarded: a module that calls ``reactor.listenTCP``,
    ``listenSSL`` or ``run`` while it is imported is refused.
    """
    module_name, colon, attr = target.partition(":")
    if not colon or not module_name.strip() or not attr.strip():
        raise CommandError(
            f"{target!r} is not MODULE:ATTR: name a module and the Site or ASGI app in it, "
            "e.g. myapp:site"
        )
    module = _import_module(module_name, app_dir)
    found: Any = module
    for part in attr.split("."):
        try:
            found = getattr(found, part)
        except AttributeError:
            hint = _sites_in(module)
            raise CommandError(
                f"module {module_name!r} ({getattr(module, '__file__', '?')}) has no "
                f"attribute {attr!r}" + (f"; its Sites: {', '.join(hint)}" if hint else "")
            ) from None
    return found


def _sites_in(module: types.ModuleType) -> list[str]:
    from lapse.web.server import Site

    return sorted(name for name, value in vars(module).items() if isinstance(value, Site))


def check_app(app: Any, target: str) -> str:
    """What ``app`` is (``"a Site"``, ``"an ASGI app"``); an error if neither."""
    from lapse.web.resource import Resource
    from lapse.web.server import Site

    if isinstance(app, Site):
        return "a Site"
    what = f"{target} is not a lapse Site nor an ASGI application"
    if isinstance(app, Resource):
        raise CommandError(f"{target} is a Resource, not a Site: serve Site(resource) instead")
    if isinstance(app, types.ModuleType):
        raise CommandError(f"{what}: it is a module; name the Site or app in it")
    if inspect.isclass(app):
        raise CommandError(
            f"{what}: it is a class; name an instance (an ASGI 3 application is an "
            "async callable taking scope, receive and send)"
        )
    if not callable(app):
        raise CommandError(f"{what}: it is a {type(app).__name__}")
    try:
        signature = inspect.signature(app)
    except (TypeError, ValueError):
        return "an ASGI app"
    try:
        signature.bind(None, None, None)
    except TypeError:
        raise CommandError(
            f"{what}: it cannot be called with (scope, receive, send); its signature is {signature}"
        ) from None
    return "an ASGI app"


# -- serving ----------------------------------------------------------------------


@dataclass
class _Options:
    """The checked command line."""

    target: str
    host: str
    port: int
    workers: int
    store: str | None
    checked_store: str | None
    ssl_context: ssl.SSLContext | None
    trust_proxy: bool | int | str
    live_view: str | None
    app_dir: str
    ready_fd: int | None
    certfile: str | None
    keyfile: str | None
    log_level: str | None
    graceful_timeout: float
    connection: dict[str, Any]
    """The connection options given, by HTTPLimits/Site field."""


def _check(args: argparse.Namespace) -> _Options:
    """Everything that can be checked without importing the application."""
    ssl_context = _ssl_context(args.certfile, args.keyfile)
    store: str | None = None
    checked_store: str | None = None
    if args.store is not None:
        store = checked_store = _check_store(args.store, f"--store {_shown(args.store)}")
    elif os.environ.get("LAPSE_SESSION_STORE"):
        url = os.environ["LAPSE_SESSION_STORE"]
        store = _check_store(url, f"LAPSE_SESSION_STORE={_shown(url)}")
    if args.log_level is None and os.environ.get("LAPSE_LOG_LEVEL"):
        level = os.environ["LAPSE_LOG_LEVEL"]
        if level.lower() not in _LOG_LEVELS:
            raise CommandError(f"LAPSE_LOG_LEVEL={level!r} is not a logging level")
    if args.workers > 1:
        if store is not None and _is_memory(store):
            raise CommandError(MEMORY_WITH_WORKERS.format(workers=args.workers))
        if args.port == 0:
            raise CommandError("--workers needs a fixed --port: each worker binds the port itself")
    app_dir = str(Path(args.app_dir).resolve())
    if not Path(app_dir).is_dir():
        raise CommandError(f"--app-dir {args.app_dir}: no such directory")
    return _Options(
        target=args.target,
        host=args.host,
        port=args.port,
        workers=args.workers,
        store=args.store,
        checked_store=checked_store,
        ssl_context=ssl_context,
        trust_proxy=args.trust_proxy,
        live_view=args.live_view,
        app_dir=app_dir,
        ready_fd=args.worker_ready_fd,
        certfile=args.certfile,
        keyfile=args.keyfile,
        log_level=args.log_level,
        graceful_timeout=args.graceful_timeout,
        connection={
            name: getattr(args, name)
            for _option, name, _type in _CONNECTION_OPTIONS
            if getattr(args, name) is not None
        },
    )


def _prepare_app(app: Any, options: _Options) -> Any:
    """Apply ``--trust-proxy`` and a Site's connection options; refuse the
    memory store with several workers."""
    from lapse.web.server import Site

    if isinstance(app, Site):
        store = app.store
        if options.checked_store is not None and store.url != options.checked_store:
            _say(
                f"warning: {options.target} was made with its own store ({store.url}) in its "
                f"code; --store {options.store} does not apply to it"
            )
        if options.workers > 1 and not store.shared:
            raise CommandError(MEMORY_WITH_WORKERS.format(workers=options.workers))
        if options.trust_proxy is not False:
            app.trust_proxy_headers = options.trust_proxy
        for name, value in options.connection.items():
            setattr(app, name, value)
        if options.live_view is not None:
            _mount_live_view(app, options.live_view)
        return app
    if options.live_view is not None:
        raise CommandError(
            f"--live-view needs a lapse Site, and {options.target} is another ASGI app: "
            "mount lapse.web.liveview.LiveView in the app yourself"
        )
    if options.trust_proxy is not False and options.trust_proxy != 0:
        from lapse.web._proxy import ProxyHeaders

        return ProxyHeaders(app, options.trust_proxy)
    return app


def _mount_live_view(site: Any, segment: str) -> None:
    from lapse.web.liveview import mount

    token = os.environ.get("LAPSE_LIVEVIEW_TOKEN") or None
    try:
        mount(site, segment, token=token)
    except ValueError as exc:
        raise CommandError(f"--live-view {segment}: {exc}") from None
    who = "with the token in LAPSE_LIVEVIEW_TOKEN" if token else "to loopback clients only"
    _say(f"live view at /{segment.strip('/')}/, {who}")


def _serve(options: _Options) -> int:
    """Import the application and serve it in this process until stopped."""
    if options.store is not None:
        os.environ["LAPSE_SESSION_STORE"] = options.store
    if options.log_level is not None:
        os.environ["LAPSE_LOG_LEVEL"] = options.log_level.upper()
    if options.app_dir not in sys.path:
        sys.path.insert(0, options.app_dir)

    app = load_target(options.target, options.app_dir)
    kind = check_app(app, options.target)
    served = _prepare_app(app, options)

    from lapse.internet import reactor
    from lapse.internet.error import CannotListenError, StartupError
    from lapse.internet.limits import HTTPLimits

    reactor.theReactor.graceful_timeout = options.graceful_timeout
    # A Site carries its own (with the options applied); another app gets them here.
    limits = None if kind == "a Site" else HTTPLimits(**options.connection)
    try:
        if options.ssl_context is not None:
            port = reactor.listenSSL(
                options.port, served, options.ssl_context, interface=options.host, limits=limits
            )
        else:
            port = reactor.listenTCP(options.port, served, interface=options.host, limits=limits)
    except CannotListenError as exc:
        raise CommandError(str(exc), EXIT_FAILED) from None
    scheme = "https" if options.ssl_context is not None else "http"
    where = _url(scheme, options.host, port.getHost().port)
    what = f"{options.target} ({kind}"
    if kind == "a Site":
        what += f", store {app.store.url}"
    what += ")"
    ready_fd = options.ready_fd
    if ready_fd is not None:
        # A worker: tell the supervisor once serving starts (its store
        # checked), and stop if the supervisor is gone.
        def ready() -> None:
            with contextlib.suppress(OSError):
                os.write(ready_fd, f"ready {what}\n".encode())
                os.close(ready_fd)

        reactor.theReactor._on_started = ready
        _watch_supervisor(reactor, os.getppid())
    else:
        reactor.theReactor._on_started = lambda: _say(
            f"serving {what} on {where} (pid {os.getpid()}); Ctrl-C to stop"
        )
    try:
        reactor.run()
    except StartupError as exc:
        raise CommandError(str(exc), EXIT_FAILED) from None
    if options.ready_fd is None:
        _say("stopped")
    return 0


def _watch_supervisor(reactor: Any, supervisor: int) -> None:
    def check() -> None:
        if os.getppid() != supervisor:
            _say(f"worker {os.getpid()}: the supervisor (pid {supervisor}) is gone; stopping")
            reactor.stop()
        else:
            reactor.callLater(1.0, check)

    reactor.callLater(1.0, check)


# -- supervising workers ---------------------------------------------------------


@dataclass
class _Worker:
    proc: subprocess.Popen[bytes]
    ready_fd: int
    what: str = ""


def _probe_port(host: str, port: int) -> None:
    """Fail now if ``host:port`` cannot be bound (in use, by anyone)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host or ("::" if family == socket.AF_INET6 else "0.0.0.0"), port))
        except (OSError, OverflowError) as exc:
            raise CommandError(
                f"Couldn't listen on {host or 'any'}:{port}: {exc}.", EXIT_FAILED
            ) from None


def _worker_command(options: _Options) -> list[str]:
    command = [
        sys.executable,
        "-m",
        "lapse",
        "serve",
        options.target,
        "--host",
        options.host,
        "--port",
        str(options.port),
        "--workers",
        str(options.workers),
        "--app-dir",
        options.app_dir,
        "--graceful-timeout",
        repr(options.graceful_timeout),
    ]
    if options.store is not None:
        command += ["--store", options.store]
    for option, value in (
        ("--certfile", options.certfile),
        ("--keyfile", options.keyfile),
        ("--log-level", options.log_level),
    ):
        if value is not None:
            command += [option, value]
    for option, name, _type in _CONNECTION_OPTIONS:
        if name in options.connection:
            command += [option, str(options.connection[name])]
    if options.trust_proxy is True:
        command.append("--trust-proxy")
    elif options.trust_proxy is not False:
        command += ["--trusted-proxies", str(options.trust_proxy)]
    if options.live_view is not None:
        command += ["--live-view", options.live_view]
    return command


def _spawn(options: _Options) -> _Worker:
    read_end, write_end = os.pipe()
    try:
        proc = subprocess.Popen(
            [*_worker_command(options), "--worker-ready-fd", str(write_end)],
            stdin=subprocess.DEVNULL,
            pass_fds=(write_end,),
            env={**os.environ, "LAPSE_REUSE_PORT": "1"},
            # Its own process group: a Ctrl-C at the terminal reaches the
            # supervisor only, which passes it on once.
            process_group=0,
        )
    except BaseException:
        os.close(read_end)
        raise
    finally:
        os.close(write_end)
    return _Worker(proc, read_end)


class _Supervisor:
    def __init__(self, options: _Options) -> None:
        self.options = options
        self.stop_timeout = options.graceful_timeout + STOP_MARGIN
        self.workers: list[_Worker] = []
        self.signals: list[int] = []

    def _on_signal(self, signum: int, frame: Any) -> None:
        self.signals.append(signum)

    def run(self) -> int:
        options = self.options
        _probe_port(options.host, options.port)
        handled = (signal.SIGINT, signal.SIGTERM)
        previous = {sig: signal.signal(sig, self._on_signal) for sig in handled}
        code = EXIT_FAILED
        try:
            code = self._run()
        finally:
            stopped = self._stop_all()
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        if stopped is not None:
            _say("stopped")
            if code == 0:
                code = stopped
        return code

    def _run(self) -> int:
        options = self.options
        # One worker first: an application that cannot start says so once.
        first = _spawn(options)
        self.workers.append(first)
        failed = self._await_ready([first])
        if failed is not None:
            return failed
        rest = [_spawn(options) for _ in range(options.workers - 1)]
        self.workers.extend(rest)
        failed = self._await_ready(rest)
        if failed is not None:
            return failed
        scheme = "https" if options.ssl_context is not None else "http"
        pids = ", ".join(str(worker.proc.pid) for worker in self.workers)
        _say(
            f"serving {first.what} on {_url(scheme, options.host, options.port)} with "
            f"{len(self.workers)} workers (pids {pids}); supervisor pid {os.getpid()}; "
            "Ctrl-C to stop"
        )
        while not self.signals:
            for worker in self.workers:
                code = worker.proc.poll()
                if code is not None:
                    _say(
                        f"worker {worker.proc.pid} exited with status {code}; "
                        "stopping the other workers"
                    )
                    return EXIT_FAILED
            time.sleep(0.1)
        return 0

    def _await_ready(self, pending: list[_Worker]) -> int | None:
        """Wait until every worker of ``pending`` serves: None; or an exit status."""
        waiting = {worker.ready_fd: worker for worker in pending}
        try:
            while waiting:
                if self.signals:
                    return 0
                readable, _, _ = select.select(list(waiting), [], [], 0.1)
                for fd in readable:
                    worker = waiting.pop(fd)
                    message = os.read(fd, 4096).decode("utf-8", "replace")
                    os.close(fd)
                    if message.startswith("ready "):
                        worker.what = message[len("ready ") :].strip()
                        continue
                    # It closed the pipe without being ready: it has failed
                    # (and said why on stderr).
                    try:
                        code = worker.proc.wait(self.stop_timeout)
                    except subprocess.TimeoutExpired:
                        code = EXIT_FAILED
                    return code if code > 0 else EXIT_FAILED
            return None
        finally:
            for fd in waiting:
                os.close(fd)

    def _stop_all(self) -> int | None:
        """Stop every live worker (the signal received, else SIGTERM); wait for them.

        None if there was nothing to stop, else whether all stopped cleanly (0) or not (1).
        """
        live = [worker for worker in self.workers if worker.proc.poll() is None]
        if not live:
            return None
        sig = self.signals[0] if self.signals else signal.SIGTERM
        for worker in live:
            with contextlib.suppress(ProcessLookupError):
                worker.proc.send_signal(sig)
        deadline = time.monotonic() + self.stop_timeout
        status = 0
        for worker in live:
            try:
                code = worker.proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                _say(
                    f"worker {worker.proc.pid} did not stop in {self.stop_timeout:g} s; killing it"
                )
                worker.proc.kill()
                code = worker.proc.wait()
            if code != 0:
                status = EXIT_FAILED
        return status


# -- lapse sessions ---------------------------------------------------------------

MEMORY_SESSIONS = (
    "the memory: store keeps its sessions inside the server process, so --store cannot "
    "reach them: go through the server's live view instead, with --server URL (e.g. "
    "--server http://127.0.0.1:8080/_lapse/ --token T, or LAPSE_LIVEVIEW_TOKEN), or run "
    "the server with a shared store (--store sqlite:///sessions.db or "
    "--store redis://host:6379/0) and point --store at it"
)

TOKEN_ENV = "LAPSE_LIVEVIEW_TOKEN"

HTTP_TIMEOUT = 10.0
"""Seconds ``--server`` waits for each answer of the live view."""

SERVER_PAGE = 500
"""Rows per ``api/sessions`` request at most (the live view's own cap)."""

SERVER_THREADS = 8
"""``expire --server``: POST requests in flight at once."""

NO_STORE = (
    "no session store: give --store URL or set LAPSE_SESSION_STORE "
    "(sqlite:///path.db or redis://host:port/db)"
)

SCAN_BATCH = 1000
"""Sessions per scan page (and per batch of concurrent expires)."""

MAX_BUCKETS = 1000
"""``stats --buckets``: at most this many slices (each is a line of output)."""

MAX_HORIZON = 10 * 365 * 86400
"""``stats --horizon``: at most ten years, in seconds."""

MAX_BATCH = 100_000
"""``expire --all --batch``: at most this many sessions per page."""

EXPIRE_PASSES = 5
"""``expire --all`` passes at most: sessions touched or created during one pass
may be left out of it (see the stores' ``scan``), so it scans again while the
previous pass found any."""


def _add_sessions_parser(commands: Any) -> None:
    store_option = argparse.ArgumentParser(add_help=False)
    store_option.add_argument(
        "--store",
        metavar="URL",
        help=(
            "the shared session store: sqlite:///path.db or redis://host:port/db "
            "(default: $LAPSE_SESSION_STORE)"
        ),
    )
    store_option.add_argument(
        "--server",
        metavar="URL",
        help=(
            "instead of --store: a running server's live view, by its base URL (e.g. "
            "http://127.0.0.1:8080/_lapse/), for any store, memory: included; the "
            "server expires sessions itself, so their callbacks and hooks run"
        ),
    )
    store_option.add_argument(
        "--token",
        metavar="TOKEN",
        help=(
            f"with --server: the live view's token, sent as 'Authorization: Bearer' "
            f"(default: ${TOKEN_ENV}; none for a view open to loopback clients)"
        ),
    )
    sessions = commands.add_parser(
        "sessions",
        help="list, show, expire sessions of a store or a server; their statistics",
        description=(
            "Inspect and end the sessions of a shared store (SQLite or Redis, with "
            "--store), from any machine that reaches it, or of any store through a running "
            "server's live view (with --server, the memory: store included). Reading never "
            "touches a session."
        ),
        epilog=(
            "Exit status: 0 on success, 2 for a bad command line or store URL (or the "
            "memory: store with --store: use --server), 1 if the store or the server cannot "
            "be reached, the server refuses (403) or has no live view there (404), or a "
            "session is not live."
        ),
    )
    actions = sessions.add_subparsers(dest="action", metavar="ACTION", required=True)
    listing = actions.add_parser(
        "list",
        parents=[store_option],
        help="live sessions, latest deadline (most recent activity) first",
        description=(
            "Live sessions, the one ending last (for one timeout: the most recently "
            "active) first: uid, age, idle time, time left. With --server: the rows of "
            "the live view, in its order, each with the ID that 'show' and 'expire' take "
            "(an HMAC of the uid: the live view never gives out uids, only their start)."
        ),
    )
    listing.add_argument(
        "--limit", type=_positive, default=50, metavar="N", help="at most N (default: 50)"
    )
    listing.add_argument(
        "--full", action="store_true", help="whole uids, not shortened (not with --server)"
    )
    listing.add_argument(
        "--json",
        action="store_true",
        help=(
            'one JSON object: {"sessions": [one object per session, as shown], "live": '
            'the live count, "store" or "server": where}'
        ),
    )
    show = actions.add_parser(
        "show",
        parents=[store_option],
        help="one session, data included (not with --server)",
        description=(
            "One live session: its times and its data. With --server: what the live view "
            "has for the row ID ('list' shows IDs): its times; the data is not exposed by "
            "the live view."
        ),
    )
    show.add_argument(
        "uid",
        metavar="UID|ID",
        help=(
            "the uid, whole (see 'list --full') or its start as 'list' shows it "
            "(at least 6 characters, one live session's); with --server, the row ID "
            "'list' shows"
        ),
    )
    show.add_argument("--json", action="store_true", help="one JSON object")
    expire = actions.add_parser(
        "expire",
        parents=[store_option],
        help="end sessions now, as a logout does",
        description=(
            "End sessions now through the store, as a logout does: the servers' durable "
            "expiry hook and notifyOnExpire callbacks still run for each. With --server: "
            "through the server (POST api/expire per session), which runs them itself."
        ),
    )
    expire.add_argument(
        "uids",
        metavar="UID|ID",
        nargs="*",
        help=(
            "the sessions to end: uids, whole or their start as 'list' shows them (as "
            "show takes them); with --server, row IDs as 'list' shows them"
        ),
    )
    expire.add_argument("--all", action="store_true", help="end every live session")
    expire.add_argument("--yes", action="store_true", help="with --all: do not ask first")
    expire.add_argument(
        "--batch",
        type=_at_most(MAX_BATCH),
        default=SCAN_BATCH,
        metavar="N",
        help=f"with --all: sessions per batch (default: {SCAN_BATCH})",
    )
    stats = actions.add_parser(
        "stats",
        parents=[store_option],
        help="how many sessions are live, and when they end",
        description=(
            "The live count and a histogram of the upcoming expiries. With --server: the "
            "live view's summary, also sessions created and ended per minute; its "
            "histogram is fixed (one hour in 5-minute slices)."
        ),
    )
    stats.add_argument(
        "--horizon",
        type=_at_most(MAX_HORIZON),
        metavar="SECONDS",
        help=(
            f"how far ahead the histogram looks (default: 3600, at most {MAX_HORIZON}: "
            "ten years; not with --server)"
        ),
    )
    stats.add_argument(
        "--buckets",
        type=_at_most(MAX_BUCKETS),
        metavar="N",
        help=f"slices of the histogram (default: 12, at most {MAX_BUCKETS}; not with --server)",
    )
    stats.add_argument("--json", action="store_true", help="one JSON object")


def _positive(text: str) -> int:
    """A whole number, at least 1 (workers, limits, batch sizes, buckets)."""
    try:
        number = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{_shown(text, 40)!r} is not a whole number") from None
    if number < 1:
        raise argparse.ArgumentTypeError(f"{_shown(text, 40)}: at least 1")
    return number


def _at_most(limit: int) -> Callable[[str], int]:
    """A whole number from 1 to ``limit``, as an argparse type."""

    def convert(text: str) -> int:
        number = _positive(text)
        if number > limit:
            raise argparse.ArgumentTypeError(f"{_shown(text, 40)}: at most {limit}")
        return number

    convert.__name__ = "number"  # what argparse names in its messages
    return convert


def _open_session_store(option: str | None) -> Any:
    """The store ``--store`` (or ``LAPSE_SESSION_STORE``) names, checked."""
    from lapse.sessions.store import StoreConfigError
    from lapse.sessions.stores import store_from_url

    if option is not None:
        url, source = option, f"--store {_shown(option)}"
    elif os.environ.get("LAPSE_SESSION_STORE"):
        url = os.environ["LAPSE_SESSION_STORE"]
        source = f"LAPSE_SESSION_STORE={_shown(url)}"
    else:
        raise CommandError(NO_STORE)
    if _is_memory(url):
        raise CommandError(MEMORY_SESSIONS)
    try:
        store = store_from_url(url)
    except StoreConfigError as exc:
        raise CommandError(f"{source}: {exc}") from None
    path = getattr(store, "path", None)
    if isinstance(path, str):
        try:
            found = Path(path).is_file()
        except OSError as exc:
            raise CommandError(
                f"cannot use the session store {_shown(store.url)}: {exc.strerror or exc}",
                EXIT_FAILED,
            ) from None
        if not found:
            # Opening would create an empty database: a typo, most likely.
            raise CommandError(
                f"cannot use the session store {_shown(store.url)}: no such file", EXIT_FAILED
            )
    return store


def _duration(seconds: float) -> str:
    """``seconds`` as ``2d03h``, ``1h05m``, ``3m07s`` or ``12s``."""
    whole = max(0, int(seconds))
    days, rest = divmod(whole, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d{hours:02d}h"
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"


def _when(stamp: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(stamp))


def _info_json(info: Any, now: float) -> dict[str, Any]:
    return {
        "uid": info.uid,
        "created": info.created,
        "last_access": info.last_access,
        "deadline": info.deadline,
        "age": None if info.created is None else now - info.created,
        "idle": now - info.last_access,
        "left": info.deadline - now,
        "data": dict(info.data),
    }


async def _list(store: Any, args: argparse.Namespace) -> int:
    import json

    from lapse.sessions import short_uid

    now = await store.now()
    total = await store.count()
    shown: list[Any] = []
    cursor: str | None = None
    while len(shown) < args.limit:
        page, cursor = await store.scan(cursor, min(SCAN_BATCH, args.limit - len(shown)))
        shown += page
        if cursor is None:
            break
    if args.json:
        # One document (json.load reads it), not JSON Lines: the live count
        # belongs to the listing, and a reader cannot tell a cut stream.
        rows = [_info_json(info, now) for info in shown]
        listing = {"store": store.url, "live": total, "sessions": rows}
        print(json.dumps(listing, ensure_ascii=False))
        return 0
    width = max([len(info.uid) for info in shown] + [3]) if args.full else 9
    print(f"{'UID':<{width}}  {'AGE':>7}  {'IDLE':>7}  {'LEFT':>7}")
    for info in shown:
        uid = info.uid if args.full else short_uid(info.uid)
        age = "?" if info.created is None else _duration(now - info.created)
        idle = _duration(now - info.last_access)
        left = _duration(info.deadline - now)
        print(f"{uid:<{width}}  {age:>7}  {idle:>7}  {left:>7}")
    more = "; --limit N for more" if total > len(shown) else ""
    print(f"{len(shown)} of {total} live sessions in {store.url}{more}")
    return 0


MIN_PREFIX = 6
"""The shortest start of a uid that show and expire take for the whole uid."""


async def _resolve(store: Any, given: str) -> str | None:
    """The live uid ``given`` names: itself, or the one live uid it is the
    start of ('list' shows ``abcdefgh…``; the ellipsis may be kept). None if
    none; a start shared by several uids, or too short, is a CommandError."""
    if await store.info(given) is not None:
        return given
    prefix = given.removesuffix("\u2026").removesuffix("...")
    if len(prefix) < MIN_PREFIX:
        return None
    found: list[str] = []
    cursor: str | None = None
    while True:
        page, cursor = await store.scan(cursor, SCAN_BATCH)
        found += [info.uid for info in page if info.uid.startswith(prefix)]
        if cursor is None:
            break
    unique = sorted(set(found))
    if len(unique) > 1:
        raise CommandError(
            f"{_shown(given)!r} is the start of {len(unique)} live sessions' uids in "
            f"{store.url}: give more of it, or the whole uid ('list --full')",
            EXIT_FAILED,
        )
    return unique[0] if unique else None


def _not_live(given: str, url: str) -> str:
    return (
        f"no live session {_shown(given)!r} in {url} (give the whole uid, as "
        f"'list --full' shows it, or at least its first {MIN_PREFIX} characters)"
    )


async def _show(store: Any, args: argparse.Namespace) -> int:
    import json

    now = await store.now()
    uid = await _resolve(store, args.uid)
    info = None if uid is None else await store.info(uid)
    if info is None:
        raise CommandError(_not_live(args.uid, store.url), EXIT_FAILED)
    if args.json:
        print(json.dumps(_info_json(info, now), ensure_ascii=False))
        return 0
    created = (
        "unknown"
        if info.created is None
        else (f"{_when(info.created)} ({_duration(now - info.created)} ago)")
    )
    print(f"uid:         {info.uid}")
    print(f"created:     {created}")
    print(f"last access: {_when(info.last_access)} ({_duration(now - info.last_access)} ago)")
    print(f"ends:        {_when(info.deadline)} (in {_duration(info.deadline - now)} if untouched)")
    print("data:" + ("" if info.data else "        {}"))
    for key, value in sorted(info.data.items()):
        print(f"  {key}: {json.dumps(value, ensure_ascii=False)}")
    return 0


class _Progress:
    """``count/total (percent), rate`` on stderr, redrawn in place with ``\\r``."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.done = 0
        self.started = time.monotonic()

    def rate(self) -> float:
        return self.done / max(time.monotonic() - self.started, 1e-9)

    def show(self, final: bool = False) -> None:
        total = max(self.total, self.done)
        percent = 100 * self.done // total if total else 100
        line = f"\rexpired {self.done}/{total} ({percent}%), {self.rate():.0f}/s"
        print(line + ("\n" if final else ""), end="", file=sys.stderr, flush=True)


def _confirm(total: int, url: str) -> bool:
    print(
        f"End all {total} live sessions in {url}? Their users are logged out. [y/N] ",
        end="",
        file=sys.stderr,
        flush=True,
    )
    answer = sys.stdin.readline()
    if not answer.endswith("\n"):
        print(file=sys.stderr)  # (end of input: finish the prompt's line)
    return answer.strip().lower() in ("y", "yes")


async def _end_everything(
    url: str,
    where: str,
    count: Callable[[], Awaitable[int]],
    page: Callable[[str | None], Awaitable[tuple[list[str], str | None]]],
    end: Callable[[list[str]], Awaitable[list[bool]]],
    args: argparse.Namespace,
) -> int:
    """``expire --all``, in the store or through the server at ``url`` (``where``
    says which, for messages: "in URL" or "at URL"):
    confirm, then page through and end each page together, with a progress
    line; passes again while a pass found sessions (users active meanwhile)."""
    total = await count()
    if total == 0:
        print(f"no live sessions {where}")
        return 0
    if not args.yes and not _confirm(total, url):
        _say("nothing expired")
        return EXIT_FAILED
    progress = _Progress(total)
    progress.show()
    for _ in range(EXPIRE_PASSES):
        found = 0
        cursor: str | None = None
        while True:
            names, cursor = await page(cursor)
            found += len(names)
            progress.done += sum(await end(names))
            if names:
                progress.show()
            if cursor is None:
                break
        if not found:
            break
        progress.total = progress.done + await count()
    progress.show(final=True)
    print(f"expired {progress.done} sessions {where}")
    return 0


async def _expire_all(store: Any, args: argparse.Namespace) -> int:
    async def page(cursor: str | None) -> tuple[list[str], str | None]:
        infos, cursor = await store.scan(cursor, args.batch)
        return [info.uid for info in infos], cursor

    async def end(uids: list[str]) -> list[bool]:
        return list(await asyncio.gather(*(store.expire(uid) for uid in uids)))

    url = store.url
    return await _end_everything(url, f"in {url}", store.count, page, end, args)


async def _expire(store: Any, args: argparse.Namespace) -> int:
    if args.all:
        return await _expire_all(store, args)
    status = 0
    for given in args.uids:
        try:
            uid = await _resolve(store, given)
        except CommandError as exc:  # ambiguous: say so, go on with the others
            _say(f"error: {exc}")
            status = EXIT_FAILED
            continue
        if uid is not None and await store.expire(uid):
            print(f"expired {given}")
        else:
            _say(_not_live(given, store.url))
            status = EXIT_FAILED
    return status


async def _stats(store: Any, args: argparse.Namespace) -> int:
    import json

    if args.horizon is None:
        args.horizon = 3600
    if args.buckets is None:
        args.buckets = 12
    now = await store.now()
    live = await store.count()
    counts = await store.deadlines(now, float(args.horizon), args.buckets)
    width = args.horizon / args.buckets
    if args.json:
        report = {
            "store": store.url,
            "now": now,
            "live": live,
            "horizon": args.horizon,
            "bucket_seconds": width,
            "ending": counts,
        }
        print(json.dumps(report))
        return 0
    print(f"store:         {store.url}")
    print(f"live sessions: {live}")
    print(f"ending in the next {_duration(args.horizon)} ({_duration(width)} slices):")
    top = max(counts) if counts else 0
    label = max(len(_duration((i + 1) * width)) for i in range(args.buckets))
    for i, n in enumerate(counts):
        bar = "#" * (0 if top == 0 else max(1 if n else 0, round(40 * n / top)))
        start, end = _duration(i * width), _duration((i + 1) * width)
        print(f"  {start:>{label}} - {end:>{label}}  {n:>8}  {bar}")
    later = live - sum(counts)
    print(f"  later: {later}")
    return 0


def _sessions(args: argparse.Namespace) -> int:
    """Run ``lapse sessions ACTION``; its exit status."""
    from lapse.sessions.store import StoreUnavailable

    if args.action == "expire" and bool(args.all) == bool(args.uids):
        raise CommandError("expire takes session uids, or --all (not both)")
    if args.action == "expire" and args.yes and not args.all:
        raise CommandError("--yes goes with --all")
    if args.server is not None:
        if args.store is not None:
            raise CommandError(
                "--store and --server are mutually exclusive: read a shared store directly "
                "(--store) or go through a server's live view (--server)"
            )
        return _server_sessions(args)
    if args.token is not None:
        raise CommandError("--token goes with --server (a store URL carries its own access)")
    store = _open_session_store(args.store)
    run = {"list": _list, "show": _show, "expire": _expire, "stats": _stats}[args.action]

    async def main() -> int:
        try:
            return await run(store, args)
        finally:
            with contextlib.suppress(Exception):
                await store.aclose()

    try:
        return asyncio.run(main())
    except StoreUnavailable as exc:
        raise CommandError(f"cannot reach the session store: {exc}", EXIT_FAILED) from None


# -- lapse sessions --server: through a live view ------------------------------


class _LiveViewClient:
    """The JSON API of a live view at ``base`` (a URL ending in ``/``).

    Standard library only (urllib); redirects are not followed (the token
    would follow them); every failure is a one-line :class:`CommandError`.

    Without a token (a view open to loopback clients), a POST needs the CSRF
    pair a browser gets with the page: the view's CSRF cookie and the HMAC of
    it the page embeds. The client GETs the page once, as a browser does, and
    sends both; a cross-site browser form still cannot.
    """

    def __init__(self, base: str, token: str | None) -> None:
        import threading
        import urllib.request

        class NoRedirect(urllib.request.HTTPRedirectHandler):
            def redirect_request(self, *args: Any, **kw: Any) -> None:
                return None

        self.base = base
        self._token = token
        self._opener = urllib.request.build_opener(NoRedirect)
        self._csrf_lock = threading.Lock()
        self._csrf_pair: tuple[str, str] | None = None

    def _send(self, request: Any) -> tuple[int, Any, bytes]:
        """(status, headers, body) of ``request``; unreachable: CommandError."""
        import urllib.error

        if self._token is not None:
            request.add_header("Authorization", f"Bearer {self._token}")
        try:
            with self._opener.open(request, timeout=HTTP_TIMEOUT) as response:
                return response.status, response.headers, response.read()
        except urllib.error.HTTPError as exc:
            raw = b""
            with contextlib.suppress(Exception):
                raw = exc.read()
            exc.close()
            return exc.code, exc.headers, raw
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise CommandError(
                f"cannot reach the server at {self.base}: {reason}", EXIT_FAILED
            ) from None

    def _csrf(self) -> tuple[str, str]:
        """(CSRF cookie nonce, X-Lapse-CSRF value), from the view's page, once."""
        with self._csrf_lock:
            if self._csrf_pair is None:
                self._csrf_pair = self._fetch_csrf()
            return self._csrf_pair

    def _fetch_csrf(self) -> tuple[str, str]:
        import urllib.request
        from http.cookies import CookieError, SimpleCookie

        from lapse.web.liveview import CSRF_COOKIE

        request = urllib.request.Request(self.base, method="GET")
        request.add_header("Accept", "text/html")
        status, headers, raw = self._send(request)
        self._check(status, "", None, None)
        nonce = None
        for header in headers.get_all("set-cookie") or []:
            jar: SimpleCookie = SimpleCookie()
            with contextlib.suppress(CookieError):
                jar.load(header)
            if CSRF_COOKIE in jar:
                nonce = jar[CSRF_COOKIE].value
        found = re.search(rb'<meta name="lapse-csrf" content="([0-9a-f]{64})">', raw)
        if nonce is None or found is None:
            raise CommandError(
                f"the page at {self.base} has no CSRF token to send with a change "
                "(is it a lapse live view?)",
                EXIT_FAILED,
            )
        return nonce, found.group(1).decode("ascii")

    def request(
        self,
        path: str,
        body: Any = None,
        not_found: str | None = None,
    ) -> Any:
        """The JSON answer to GET ``path`` (POST ``body`` as JSON if given).

        A 404 whose JSON error is ``not_found`` returns None (the API's own
        "no such session"); any other failure is a :class:`CommandError`.
        """
        import json
        import urllib.request

        url = self.base + path
        data = None if body is None else json.dumps(body).encode("utf-8")
        request = urllib.request.Request(url, data=data, method="GET" if body is None else "POST")
        request.add_header("Accept", "application/json")
        if data is not None:
            request.add_header("Content-Type", "application/json")
            if self._token is None:
                nonce, csrf = self._csrf()
                request.add_header("Cookie", f"{_csrf_cookie_name()}={nonce}")
                request.add_header("X-Lapse-CSRF", csrf)
        status, headers, raw = self._send(request)
        kind = headers.get("content-type", "")
        answer: Any = None
        if kind.split(";")[0].strip() == "application/json":
            with contextlib.suppress(ValueError):
                answer = json.loads(raw)
        return self._check(status, path, answer, not_found)

    def _check(self, status: int, path: str, answer: Any, not_found: str | None) -> Any:
        """``answer`` if ``status`` is a 200 with a JSON object (None for the
        404 ``not_found``); any other answer is a CommandError saying why."""
        error = answer.get("error") if isinstance(answer, dict) else None
        where = path.split("?")[0] or "the page"
        if status == 403:
            if isinstance(error, str) and "CSRF" in error:
                raise CommandError(
                    f"the live view at {self.base} refused the change (403 Forbidden: "
                    f"{error}): give its token with --token or ${TOKEN_ENV}",
                    EXIT_FAILED,
                )
            if self._token is not None:
                raise CommandError(
                    f"the live view at {self.base} refused the token given (403 Forbidden): "
                    f"check --token or ${TOKEN_ENV}",
                    EXIT_FAILED,
                )
            raise CommandError(
                f"the live view at {self.base} wants a token (403 Forbidden): give the "
                f"server's {TOKEN_ENV} with --token or in ${TOKEN_ENV}",
                EXIT_FAILED,
            )
        if status == 404:
            if not_found is not None and error == not_found:
                return None
            raise CommandError(
                f"no live view at {self.base} (404 Not Found for {where}): give "
                "the URL where the app mounts LiveView (e.g. http://HOST:PORT/_lapse/); "
                "a view without a token answers only loopback clients",
                EXIT_FAILED,
            )
        if 300 <= status < 400:
            raise CommandError(
                f"the server at {self.base} redirects (HTTP {status}) instead of answering: "
                "give the live view's own base URL",
                EXIT_FAILED,
            )
        if status == 200 and not path:
            return None  # the page (HTML)
        if status != 200 or not isinstance(answer, dict):
            detail = f": {error}" if isinstance(error, str) else ""
            what = f"HTTP {status}{detail}" if status != 200 else "something other than JSON"
            raise CommandError(
                f"the server at {self.base} answered {where} with {what} "
                "(is it a lapse live view?)",
                EXIT_FAILED,
            )
        return answer

    def summary(self) -> dict[str, Any]:
        answer: dict[str, Any] = self.request("api/summary")
        return answer

    def page(self, cursor: str | None, limit: int) -> tuple[list[dict[str, Any]], str | None]:
        from urllib.parse import urlencode

        query = {"limit": str(min(limit, SERVER_PAGE))}
        if cursor is not None:
            query["cursor"] = cursor
        answer = self.request("api/sessions?" + urlencode(query))
        rows = answer.get("sessions")
        following = answer.get("next")
        if not isinstance(rows, list) or not (following is None or isinstance(following, str)):
            raise CommandError(
                f"the server at {self.base} answered api/sessions with an unknown shape",
                EXIT_FAILED,
            )
        return rows, following

    def session(self, handle: str) -> dict[str, Any] | None:
        from urllib.parse import urlencode

        answer = self.request(
            "api/session?" + urlencode({"id": handle}), not_found="no such session"
        )
        if answer is None:
            return None
        row: dict[str, Any] = answer["session"]
        row["now"] = answer.get("now")
        return row

    def expire(self, handle: str) -> bool:
        answer = self.request("api/expire", body={"id": handle}, not_found="no such session")
        return answer is not None and bool(answer.get("expired"))


def _csrf_cookie_name() -> str:
    from lapse.web.liveview import CSRF_COOKIE

    return CSRF_COOKIE


def _server_base(url: str) -> str:
    """The ``--server`` URL, checked: http(s), a host, no query; ends in ``/``."""
    from urllib.parse import urlsplit

    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a bad port
    except ValueError as exc:
        raise CommandError(f"--server {url}: {exc}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise CommandError(
            f"--server {url}: give the live view's http(s) URL, e.g. http://127.0.0.1:8080/_lapse/"
        )
    if parts.query or parts.fragment:
        raise CommandError(
            f"--server: give the live view's base URL without a query "
            f"(the token goes in --token or ${TOKEN_ENV})"
        )
    path = parts.path if parts.path.endswith("/") else parts.path + "/"
    return f"{parts.scheme}://{parts.netloc}{path}"


def _age(value: Any) -> str:
    return "?" if value is None else _duration(float(value))


def _server_list(view: _LiveViewClient, args: argparse.Namespace) -> int:
    import json

    if args.full:
        raise CommandError("--full goes with --store: with --server, rows have whole IDs, no uids")
    live = view.summary().get("live")
    shown: list[dict[str, Any]] = []
    cursor: str | None = None
    while len(shown) < args.limit:
        page, cursor = view.page(cursor, args.limit - len(shown))
        shown += page[: args.limit - len(shown)]
        if cursor is None or not page:
            break
    if args.json:
        total = live if isinstance(live, int) else len(shown)
        listing = {"server": view.base, "live": total, "sessions": shown}
        print(json.dumps(listing, ensure_ascii=False))
        return 0
    width = max([len(str(row.get("id"))) for row in shown] + [2])
    print(f"{'ID':<{width}}  {'UID':<9}  {'AGE':>7}  {'IDLE':>7}  {'LEFT':>7}")
    for row in shown:
        age, idle, left = _age(row.get("age")), _age(row.get("idle")), _age(row.get("left"))
        print(f"{row.get('id')!s:<{width}}  {row.get('uid')!s:<9}  {age:>7}  {idle:>7}  {left:>7}")
    total = live if isinstance(live, int) else len(shown)
    more = "; --limit N for more" if total > len(shown) else ""
    print(f"{len(shown)} of {total} live sessions at {view.base}{more}")
    return 0


def _server_show(view: _LiveViewClient, args: argparse.Namespace) -> int:
    import json

    row = view.session(args.uid)
    if row is None:
        raise CommandError(
            f"no live session with ID {args.uid!r} at {view.base} (IDs are those 'list "
            "--server' shows)",
            EXIT_FAILED,
        )
    if args.json:
        print(json.dumps(row, ensure_ascii=False))
        return 0
    now = row.get("now")
    now = float(now) if isinstance(now, (int, float)) else time.time()

    def at(offset: Any, ago: bool) -> str:
        if offset is None:
            return "unknown"
        value = float(offset)
        stamp = _when(now - value if ago else now + value)
        return f"{stamp} ({_duration(value)} ago)" if ago else f"{stamp} (in {_duration(value)})"

    print(f"id:          {row.get('id')}")
    print(f"uid:         {row.get('uid')} (the live view gives only its start)")
    print(f"created:     {at(row.get('age'), True)}")
    print(f"last access: {at(row.get('idle'), True)}")
    print(f"ends:        {at(row.get('left'), False)} if untouched")
    print("data:        (not exposed by the live view)")
    return 0


def _server_expire_all(view: _LiveViewClient, args: argparse.Namespace) -> int:
    from concurrent.futures import ThreadPoolExecutor

    async def count() -> int:
        return int((await asyncio.to_thread(view.summary)).get("live") or 0)

    async def page(cursor: str | None) -> tuple[list[str], str | None]:
        rows, cursor = await asyncio.to_thread(view.page, cursor, args.batch)
        return [str(row.get("id")) for row in rows], cursor

    with ThreadPoolExecutor(SERVER_THREADS) as pool:

        async def end(ids: list[str]) -> list[bool]:
            return await asyncio.to_thread(lambda: list(pool.map(view.expire, ids)))

        where = f"at {view.base}"
        return asyncio.run(_end_everything(view.base, where, count, page, end, args))


def _server_expire(view: _LiveViewClient, args: argparse.Namespace) -> int:
    if args.all:
        return _server_expire_all(view, args)
    status = 0
    for handle in args.uids:
        if view.expire(handle):
            print(f"expired {handle}")
        else:
            _say(f"no live session with ID {handle!r} at {view.base}")
            status = EXIT_FAILED
    return status


def _server_stats(view: _LiveViewClient, args: argparse.Namespace) -> int:
    import json

    if args.horizon is not None or args.buckets is not None:
        raise CommandError(
            "--horizon and --buckets go with --store: the live view's histogram is fixed "
            "(one hour in 5-minute slices)"
        )
    summary = view.summary()
    expiries = summary.get("expiries") or {}
    counts = [int(n) for n in expiries.get("buckets") or []]
    horizon = float(expiries.get("horizon") or 3600)
    width = horizon / max(1, len(counts))
    stats = summary.get("stats") or {}
    minutes = stats.get("minutes") or {}
    live = int(summary.get("live") or 0)
    if args.json:
        report = {
            "server": view.base,
            "store": summary.get("store"),
            "now": summary.get("now"),
            "live": live,
            "horizon": horizon,
            "bucket_seconds": width,
            "ending": counts,
            "created": stats.get("created"),
            "ended": stats.get("ended"),
            "per_minute": minutes,
        }
        print(json.dumps(report))
        return 0
    print(f"server:        {view.base}")
    print(f"store:         {summary.get('store')}")
    print(f"live sessions: {live}")
    created, ended = list(minutes.get("created") or []), list(minutes.get("ended") or [])
    causes = ", ".join(f"{k} {v}" for k, v in sorted((stats.get("ended") or {}).items()))
    print(
        f"since start:   {stats.get('created', 0)} created, "
        f"{sum((stats.get('ended') or {}).values())} ended" + (f" ({causes})" if causes else "")
    )
    print(f"last hour:     {sum(created)} created, {sum(ended)} ended; per minute, latest last:")
    recent = list(zip(created, ended, strict=False))[-10:]
    for back, (c, e) in zip(range(len(recent) - 1, -1, -1), recent, strict=True):
        label = "this minute" if back == 0 else f"{back} min ago"
        print(f"  {label:>11}  created {c:>6}  ended {e:>6}")
    print(f"ending in the next {_duration(horizon)} ({_duration(width)} slices):")
    top = max(counts) if counts else 0
    label_width = max([len(_duration((i + 1) * width)) for i in range(len(counts))] + [1])
    for i, n in enumerate(counts):
        bar = "#" * (0 if top == 0 else max(1 if n else 0, round(40 * n / top)))
        start, end = _duration(i * width), _duration((i + 1) * width)
        print(f"  {start:>{label_width}} - {end:>{label_width}}  {n:>8}  {bar}")
    print(f"  later: {live - sum(counts)}")
    return 0


def _server_sessions(args: argparse.Namespace) -> int:
    """Run ``lapse sessions ACTION --server URL``; its exit status."""
    base = _server_base(args.server)
    token = args.token if args.token is not None else os.environ.get(TOKEN_ENV) or None
    view = _LiveViewClient(base, token)
    run = {
        "list": _server_list,
        "show": _server_show,
        "expire": _server_expire,
        "stats": _server_stats,
    }[args.action]
    return run(view, args)


# -- entry point ------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``lapse`` command; its exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    try:
        if args.command == "sessions":
            return _sessions(args)
        options = _check(args)
        if options.workers > 1 and options.ready_fd is None:
            return _Supervisor(options).run()
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
