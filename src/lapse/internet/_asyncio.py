"""The real reactor: Twisted's reactor API over one asyncio event loop.

``listenTCP`` binds its socket at once, so a port in use is an error at the
call, not at ``run()``. ``run()`` serves every listened site with uvicorn
(httptools for HTTP, uvloop for the loop where installed) on one event loop,
until ``stop()`` or SIGINT/SIGTERM, then shuts down gracefully: listening
sockets close, requests in flight finish (up to ``graceful_timeout``; those
still running then end quietly, one log line saying how many). Before
serving, ``run()`` checks each site's session store: one that can never work
raises :class:`~lapse.internet.error.StartupError` (one line, exit status 1).

Timers: ``callLater`` schedules on the running loop, or, before ``run()``, on
the loop that ``run()`` will use. ``seconds()`` is wall-clock time, as in
Twisted.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
import ssl
import time
from collections.abc import Callable, Generator
from typing import Any

import uvicorn

from lapse.internet._http import ServingConfig, limits_for, protocol_for, text_response
from lapse.internet._pacer import CollectorPacer
from lapse.internet._process import bind_socket, configure_logging, tune_gc
from lapse.internet.address import IPv4Address, IPv6Address, address_for
from lapse.internet.error import (
    ReactorAlreadyRunning,
    ReactorNotRunning,
    StartupError,
)
from lapse.internet.interfaces import BaseDelayedCall
from lapse.internet.limits import HTTPLimits

__all__ = ["AsyncioReactor", "Port"]

log = logging.getLogger("lapse.reactor")


def _new_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on POSIX
        return asyncio.new_event_loop()
    loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
    return loop


class DelayedCall(BaseDelayedCall):
    """A call scheduled on the real reactor's event loop."""

    def __init__(
        self,
        reactor: AsyncioReactor,
        delay: float,
        func: Callable[..., Any],
        args: tuple[Any, ...],
        kw: dict[str, Any],
    ) -> None:
        super().__init__(0.0, func, args, kw)
        self._reactor = reactor
        self._handle: asyncio.TimerHandle | None = None
        self._schedule(delay)

    def _schedule(self, delay: float) -> None:
        delay = max(0.0, delay)
        self.time = self._reactor.seconds() + delay
        loop = self._reactor._current_loop()
        self._handle = loop.call_at(loop.time() + delay, self._run)

    def _run(self) -> None:
        # The handle ran: drop it, or it and this call (its callback is our
        # bound method) are a reference cycle, garbage only the collector frees.
        self._handle = None
        self.called = True
        try:
            self.func(*self.args, **self.kw)
        except Exception:
            log.exception("Unhandled error in delayed call %r", self.func)

    def cancel(self) -> None:
        """Unschedule the call; an error if it already ran or was cancelled."""
        self._check_active()
        self.cancelled = True
        if self._handle is not None:
            self._handle.cancel()

    def reset(self, secondsFromNow: float) -> None:
        """Reschedule the call to run ``secondsFromNow`` from now."""
        self._check_active()
        if self._handle is not None:
            self._handle.cancel()
        self._schedule(secondsFromNow)

    def delay(self, secondsLater: float) -> None:
        """Push the call ``secondsLater`` further into the future."""
        self._check_active()
        self.reset(self.time + secondsLater - self._reactor.seconds())


_CUT_BODY = b"The server is shutting down; try again.\n"
_CUT_START = text_response(503, _CUT_BODY, (b"connection", b"close"), (b"retry-after", b"1"))


class _Server(uvicorn.Server):
    """uvicorn's server, with signals left to the reactor, and its own
    graceful-shutdown limit: requests still running then are ended quietly
    (see :class:`_CutQuietly`), with one log line saying how many."""

    def __init__(self, config: uvicorn.Config, graceful_timeout: float) -> None:
        super().__init__(config)
        self.graceful_timeout = graceful_timeout
        self.cutting = False

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        # uvicorn's own limit is off (None): its shutdown waits for every
        # request, and this one ends those still running at the limit.
        closing = asyncio.ensure_future(super().shutdown(sockets))
        done, _ = await asyncio.wait((closing,), timeout=self.graceful_timeout)
        if not done:
            running = [task for task in self.server_state.tasks if not task.done()]
            if running:
                self.cutting = True
                log.warning(
                    "graceful shutdown limit of %gs reached: ending %d request(s) still running",
                    self.graceful_timeout,
                    len(running),
                )
                for task in running:
                    task.cancel()
        await closing


class _CutQuietly:
    """The ASGI app a port serves: ``app``, whose requests cancelled at the
    graceful-shutdown limit end without a traceback: a 503 (``Connection:
    close``) if their response had not started, else the connection closes."""

    __slots__ = ("app", "server")

    def __init__(self, app: Any, server: _Server | None = None) -> None:
        self.app = app
        self.server = server

    def guarded(self, app: Any) -> _CutQuietly:
        """``app`` under the same guard (the rest of a request the app began
        without a task: see :mod:`lapse.internet._http_now`)."""
        return _CutQuietly(app, self.server)

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await self.app(scope, receive, send)
        except asyncio.CancelledError:
            server = self.server
            if server is None or not server.cutting or scope["type"] != "http":
                raise
            with contextlib.suppress(Exception):
                await send(_CUT_START)  # refused if the response had started
                await send({"type": "http.response.body", "body": _CUT_BODY})


class Port:
    """A listening socket, returned by ``listenTCP`` and ``listenSSL``."""

    def __init__(
        self,
        reactor: AsyncioReactor,
        sock: socket.socket,
        factory: Any,
        ssl_context: ssl.SSLContext | None,
        limits: HTTPLimits | None = None,
    ) -> None:
        self._reactor = reactor
        self.socket = sock
        self.factory = factory
        self.ssl_context = ssl_context
        self.limits = limits
        self._server: _Server | None = None
        self._guard = _CutQuietly(factory)
        self._task: asyncio.Task[None] | None = None
        self.listening = True

    def getHost(self) -> IPv4Address | IPv6Address:
        """The address the socket is bound to (``port`` is the real one for 0)."""
        host, port = self.socket.getsockname()[:2]
        return address_for(host, port)

    def _config(self) -> uvicorn.Config:
        # The limits are read when serving starts, so that a Site's settings
        # changed after listenTCP still apply.
        limits = self.limits if self.limits is not None else limits_for(self.factory)
        config = ServingConfig(
            self._guard,
            http=protocol_for(limits),
            interface="asgi3",
            lifespan="auto",
            log_config=None,
            access_log=False,
            proxy_headers=False,
            server_header=False,
            timeout_graceful_shutdown=None,  # _Server applies it
        )
        config.load()
        config.ssl = self.ssl_context
        config.limits = limits
        config.connection_cap = limits.connection_cap()
        serves_now = getattr(self.factory, "_serves_now", None)
        if callable(serves_now) and serves_now():
            config.serve_now = self.factory._serve_now
            config.guard_app = self._guard.guarded
        return config

    def _start(self) -> None:
        server = self._server = _Server(self._config(), self._reactor.graceful_timeout)
        self._guard.server = server
        self._task = asyncio.get_running_loop().create_task(self._serve(server))
        address = self.getHost()
        where = f"{address.host}:{address.port}"
        self._task.add_done_callback(lambda task: self._served(server, where))

    async def _serve(self, server: _Server) -> None:
        try:
            await server.serve(sockets=[self.socket])
        except SystemExit:
            # uvicorn's answer to a failed lifespan startup (it logged why):
            # the reactor stops, and run() says so (see _served).
            if server.started:
                raise

    def _served(self, server: _Server, where: str) -> None:
        """Serving ended: if it never started (the application's lifespan
        startup failed, and the server said why), the reactor stops."""
        if not server.started and self.listening:
            self.listening = False
            self._reactor._startup_failed(f"the application's startup failed (on {where})")

    def _signal_exit(self) -> None:
        if self._server is not None:
            self._server.should_exit = True

    async def _wait(self) -> None:
        if self._task is not None:
            await self._task

    def stopListening(self) -> None:
        """Stop accepting connections on this port; requests in flight finish."""
        if not self.listening:
            return
        self.listening = False
        if self._server is not None:
            self._signal_exit()
        else:
            self.socket.close()
        if self in self._reactor._ports:
            self._reactor._ports.remove(self)

    loseConnection = stopListening

    def __repr__(self) -> str:
        state = "listening" if self.listening else "closed"
        return f"<Port {self.getHost() if self.listening else '-'} {state}>"


async def _start_problem(factory: Any) -> str | None:
    """Why ``factory`` can never serve (a Site's or a session middleware's
    ``check_start()``: its store cannot work), or None."""
    check = getattr(factory, "check_start", None)
    if check is None or not callable(check):
        return None
    problem: str | None = await check()
    return problem


class AsyncioReactor:
    """Twisted's reactor API (time, TCP, TLS, run/stop) over asyncio and uvicorn."""

    graceful_timeout: float = 10
    """Seconds requests in flight may take to finish once serving stops;
    those still running then are ended (a 503 if nothing was sent yet)."""

    def __init__(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ports: list[Port] = []
        self._stopping: asyncio.Event | None = None
        self.running = False
        self._failure: str | None = None
        # Set by ``lapse serve`` for its workers: called once serving starts.
        self._on_started: Callable[[], None] | None = None
        # Set by ``lapse serve`` while it imports an application: called with
        # "listenTCP", "listenSSL" or "run" before each, it may raise to
        # refuse a module that serves itself when imported.
        self._on_serve: Callable[[str], None] | None = None

    # -- time -----------------------------------------------------------

    def seconds(self) -> float:
        """Wall-clock seconds since the epoch, as Twisted's reactor gives."""
        return time.time()

    def _own_loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None or self._loop.is_closed():
            self._loop = _new_loop()
        return self._loop

    def _current_loop(self) -> asyncio.AbstractEventLoop:
        try:
            return asyncio.get_running_loop()
        except RuntimeError:
            return self._own_loop()

    def callLater(
        self, delay: float, callable: Callable[..., Any], *args: Any, **kw: Any
    ) -> DelayedCall:
        """Run ``callable(*args, **kw)`` ``delay`` seconds from now."""
        return DelayedCall(self, delay, callable, args, kw)

    def callWhenRunning(self, callable: Callable[..., Any], *args: Any, **kw: Any) -> None:
        """Run ``callable`` as soon as the reactor runs (at once if it does)."""
        self.callLater(0, callable, *args, **kw)

    # -- listening ------------------------------------------------------

    def _listen(
        self,
        port: int,
        factory: Any,
        backlog: int,
        interface: str,
        ssl_context: ssl.SSLContext | None,
        limits: HTTPLimits | None,
    ) -> Port:
        if self._on_serve is not None:
            self._on_serve("listenTCP" if ssl_context is None else "listenSSL")
        if not callable(factory):
            raise TypeError(f"{factory!r} is not an ASGI application (a lapse Site is)")
        if limits is not None and not isinstance(limits, HTTPLimits):
            raise TypeError(f"limits must be an HTTPLimits, not {type(limits).__name__}")
        sock = bind_socket(port, interface, backlog)
        return self._serve_socket(sock, factory, ssl_context, limits)

    def _serve_socket(
        self,
        sock: socket.socket,
        factory: Any,
        ssl_context: ssl.SSLContext | None,
        limits: HTTPLimits | None,
    ) -> Port:
        """Serve ``factory`` on ``sock``, a listening socket (bound here, or
        by ``lapse serve``'s supervisor and inherited by its worker)."""
        listening = Port(self, sock, factory, ssl_context, limits)
        self._ports.append(listening)
        if self.running:
            listening._start()
        return listening

    def listenTCP(
        self,
        port: int,
        factory: Any,
        backlog: int = 50,
        interface: str = "",
        *,
        limits: HTTPLimits | None = None,
    ) -> Port:
        """Bind ``port`` now (0 picks a free one) and serve ``factory`` on ``run()``.

        ``factory`` is a :class:`lapse.web.server.Site` or any ASGI application.
        A port that cannot be bound raises :class:`CannotListenError` here.
        ``limits`` (a :class:`~lapse.internet.limits.HTTPLimits`) replaces the
        connection limits and timeouts the factory asks for (a ``Site``'s, or
        the defaults).
        """
        return self._listen(port, factory, backlog, interface, None, limits)

    def listenSSL(
        self,
        port: int,
        factory: Any,
        contextFactory: ssl.SSLContext,
        backlog: int = 50,
        interface: str = "",
        *,
        limits: HTTPLimits | None = None,
    ) -> Port:
        """As :meth:`listenTCP`, over TLS with ``contextFactory`` (an ``ssl.SSLContext``).

        Requests served here are secure: ``request.isSecure()`` is true.
        """
        if not isinstance(contextFactory, ssl.SSLContext):
            raise TypeError("listenSSL takes an ssl.SSLContext as its contextFactory")
        return self._listen(port, factory, backlog, interface, contextFactory, limits)

    # -- running --------------------------------------------------------

    def run(self, installSignalHandlers: bool = True) -> None:
        """Serve every listened site until :meth:`stop`, SIGINT or SIGTERM.

        :class:`~lapse.internet.error.StartupError` if a site can never serve
        (its session store cannot work as configured), or its application's
        lifespan startup failed."""
        if self._on_serve is not None:
            self._on_serve("run")
        if self.running:
            raise ReactorAlreadyRunning("the reactor is already running")
        configure_logging()
        pacer = CollectorPacer() if tune_gc() else None
        loop = self._own_loop()
        asyncio.set_event_loop(loop)
        if pacer is not None:
            pacer.start(loop)
        handled: list[signal.Signals] = []
        if installSignalHandlers:
            for sig in (signal.SIGINT, signal.SIGTERM):
                with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                    loop.add_signal_handler(sig, self._on_signal, sig)
                    handled.append(sig)
        try:
            loop.run_until_complete(self._serve())
        finally:
            if pacer is not None:
                pacer.stop()
            for sig in handled:
                loop.remove_signal_handler(sig)
            self.running = False

    def _on_signal(self, sig: signal.Signals) -> None:
        log.info("Received %s, shutting down", sig.name)
        self.stop()

    async def _serve(self) -> None:
        self.running = True
        self._stopping = asyncio.Event()
        self._failure = None
        for listening in self._ports:
            problem = await _start_problem(listening.factory)
            if problem is not None:
                for port in list(self._ports):
                    port.stopListening()
                raise StartupError(f"cannot start: {problem}")
        for listening in self._ports:
            listening._start()
        if self._on_started is not None:
            self._on_started()
        await self._stopping.wait()
        ports = list(self._ports)
        for listening in ports:
            listening._signal_exit()
        for listening in ports:
            await listening._wait()
        self._ports.clear()
        if self._failure is not None:
            raise StartupError(f"cannot start: {self._failure}")

    def _startup_failed(self, problem: str) -> None:
        """A port's application could not start: stop serving, and make
        ``run()`` raise :class:`StartupError`."""
        if self._failure is None:
            self._failure = problem
        if self._stopping is not None:
            self._stopping.set()

    def stop(self) -> None:
        """Stop serving: close the listening sockets and let requests finish."""
        if not self.running or self._stopping is None:
            raise ReactorNotRunning("can't stop a reactor that isn't running")
        self._stopping.set()

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"<AsyncioReactor {state}, {len(self._ports)} ports>"
