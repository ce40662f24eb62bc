"""``lapse serve`` in one process: check the command line, import the
application, serve it until SIGINT or SIGTERM.

A worker of the supervisor (``--workers N``) runs this too, with two hidden
options: ``--listen-fd`` names the listening socket the supervisor bound and
passed down (the worker serves it instead of binding one), and
``--worker-ready-fd`` a pipe on which it says when it serves.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import ssl
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lapse import settings
from lapse.cli.app import check_app, load_target
from lapse.cli.common import (
    EXIT_FAILED,
    CommandError,
    _is_memory,
    _say,
    _shown_url,
    store_for,
)
from lapse.cli.parser import _CONNECTION_OPTIONS

MEMORY_WITH_WORKERS = (
    "{workers} workers cannot share the memory session store: each worker process "
    "would keep its own sessions, so a visitor's session would live in the one worker "
    "that made it and the others would not know it (their answers would start new "
    "sessions), and expiry hooks and notifyOnExpire callbacks would be split between "
    "the processes. Use a shared store: --store sqlite:///sessions.db (the workers of "
    "one machine), --store redis://host:6379/0 or --store postgresql://host/dbname (across "
    "machines); or run one worker."
)


def _check_store(url: str, source: str) -> str:
    """The store URL, checked by parsing it; its normalised form."""
    checked: str = store_for(url, source).url
    return checked


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
    listen_fd: int | None
    """A worker's listening socket, bound by the supervisor and inherited."""
    fail_fast: bool
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
        store = checked_store = _check_store(args.store, f"--store {_shown_url(args.store)}")
    else:
        url = settings.SESSION_STORE.get()
        if url is not None:
            store = _check_store(url, f"{settings.SESSION_STORE.name}={_shown_url(url)}")
    # The settings serving reads later, checked now: one line, not a traceback.
    read_later: list[settings.Setting[Any]] = [settings.GC_TUNING, settings.LIVEVIEW_SECRET]
    if args.log_level is None:
        read_later.append(settings.LOG_LEVEL)
    for setting in read_later:
        try:
            setting.get()
        except settings.SettingError as exc:
            raise CommandError(str(exc)) from None
    if args.workers > 1 and store is not None and _is_memory(store):
        raise CommandError(MEMORY_WITH_WORKERS.format(workers=args.workers))
    if args.fail_fast and args.workers == 1:
        raise CommandError("--fail-fast goes with --workers N: it says what to do when one dies")
    if args.listen_fd is not None and args.worker_ready_fd is None:
        raise CommandError("--listen-fd is set by the supervisor for its workers only")
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
        listen_fd=args.listen_fd,
        fail_fast=args.fail_fast,
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

    token = settings.LIVEVIEW_TOKEN.get() or None
    try:
        mount(site, segment, token=token)
    except ValueError as exc:
        raise CommandError(f"--live-view {segment}: {exc}") from None
    who = "with the token in LAPSE_LIVEVIEW_TOKEN" if token else "to loopback clients only"
    _say(f"live view at /{segment.strip('/')}/, {who}")


def _serve(options: _Options) -> int:
    """Import the application and serve it in this process until stopped."""
    if options.store is not None:
        os.environ[settings.SESSION_STORE.name] = options.store
    if options.log_level is not None:
        os.environ[settings.LOG_LEVEL.name] = options.log_level.upper()
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
        if options.listen_fd is not None:
            port = _serve_inherited(reactor.theReactor, options, served, limits)
        elif options.ssl_context is not None:
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


def _serve_inherited(reactor: Any, options: _Options, served: Any, limits: Any) -> Any:
    """A worker: serve the socket the supervisor bound (``--listen-fd``)."""
    from lapse.internet._process import adopt_socket

    assert options.listen_fd is not None
    try:
        sock = adopt_socket(options.listen_fd)
    except ValueError as exc:
        raise CommandError(f"--listen-fd: {exc}", EXIT_FAILED) from None
    return reactor._serve_socket(sock, served, options.ssl_context, limits)
