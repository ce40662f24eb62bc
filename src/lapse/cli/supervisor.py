"""The supervisor of ``lapse serve --workers N``.

It binds the listening socket itself, once, and hands it to N worker
processes (inherited: ``pass_fds``, named by the hidden ``--listen-fd``
option), each importing the application and serving that one socket; the
kernel gives each connection to one worker that accepts. It starts one
worker, then, once that one serves, the others (so a broken application is
reported once). A worker that dies later is restarted after a delay that
doubles from :data:`BACKOFF_FIRST` to :data:`BACKOFF_MAX` seconds (back to
the first once a worker has served :data:`BACKOFF_RESET` seconds), one line
each; with ``--fail-fast`` the supervisor stops the others and exits 1
instead. A worker that fails at start-up (its application cannot be
imported, its store can never work), the first time or when restarted, is
not tried again: the supervisor stops with its error. SIGINT and SIGTERM are
passed on to every worker, and the supervisor exits once they have stopped.

The workers share one ``LAPSE_LIVEVIEW_SECRET`` (the environment's, or one
made here), so that a live view's row ids and cursors name the same session
in every worker.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import select
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Any

from lapse import settings
from lapse.cli.common import EXIT_FAILED, CommandError, _say
from lapse.cli.parser import _CONNECTION_OPTIONS
from lapse.cli.serve import _Options, _url

__all__ = ["STOP_MARGIN", "Supervisor", "backoff"]

STOP_MARGIN = 5.0
"""Seconds the supervisor waits for its workers to stop beyond their
``--graceful-timeout``, before SIGKILL."""

BACKOFF_FIRST = 0.5
"""Seconds before a dead worker's first restart."""

BACKOFF_MAX = 30.0
"""The longest wait before a restart."""

BACKOFF_RESET = 60.0
"""A worker that served this long before dying is restarted after :data:`BACKOFF_FIRST`."""

BACKLOG_PER_WORKER = 50
"""The listening socket's backlog, per worker (each worker's own, as before)."""

POLL = 0.1
"""Seconds between the supervisor's looks at its workers."""


def backoff(previous: float | None, served: float) -> float:
    """The wait before restarting a worker that died after serving ``served``
    seconds, the previous wait of its slot having been ``previous`` (None
    for none): :data:`BACKOFF_FIRST`, doubling up to :data:`BACKOFF_MAX`,
    back to the first after :data:`BACKOFF_RESET` seconds of serving."""
    if previous is None or served >= BACKOFF_RESET:
        return BACKOFF_FIRST
    return min(BACKOFF_MAX, previous * 2)


def _status(code: int) -> str:
    """How a process ended, for a message: ``status 3``, ``signal SIGKILL``."""
    if code >= 0:
        return f"status {code}"
    try:
        return f"signal {signal.Signals(-code).name}"
    except ValueError:
        return f"signal {-code}"


@dataclass
class _Worker:
    """One worker slot: its process (None while it waits for a restart)."""

    proc: subprocess.Popen[bytes] | None = None
    ready_fd: int | None = None
    """The pipe it says "ready" on, until it has (then None)."""
    started: float = 0.0
    what: str = ""
    delay: float | None = None
    """The wait before its last restart (None: never restarted)."""
    restart_at: float = 0.0


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


def _liveview_secret() -> str:
    """The secret the workers' live views share: the environment's (checked), or a new one."""
    try:
        given = settings.LIVEVIEW_SECRET.get()
    except settings.SettingError as exc:
        raise CommandError(str(exc)) from None
    return given.hex() if given is not None else secrets.token_hex(32)


def _bind(options: _Options) -> socket.socket:
    """The listening socket every worker serves, bound here once."""
    from lapse.internet._process import bind_socket
    from lapse.internet.error import CannotListenError

    try:
        return bind_socket(options.port, options.host, BACKLOG_PER_WORKER * options.workers)
    except CannotListenError as exc:
        raise CommandError(str(exc), EXIT_FAILED) from None


class Supervisor:
    """Runs ``--workers N`` worker processes on one socket (see the module)."""

    def __init__(self, options: _Options) -> None:
        self.options = options
        self.stop_timeout = options.graceful_timeout + STOP_MARGIN
        self.workers: list[_Worker] = []
        self.signals: list[int] = []
        self.sock: socket.socket | None = None
        self.env: dict[str, str] = {}
        self.serving = False
        """Whether every worker has served once (then a worker killed while
        it starts again is restarted, not taken for a start-up failure)."""

    def _on_signal(self, signum: int, frame: Any) -> None:
        self.signals.append(signum)

    def run(self) -> int:
        """Serve until a signal (0) or a failure (its status)."""
        self.env = {**os.environ, settings.LIVEVIEW_SECRET.name: _liveview_secret()}
        self.sock = _bind(self.options)
        self.options.port = self.sock.getsockname()[1]  # the real one, for --port 0
        handled = (signal.SIGINT, signal.SIGTERM)
        previous = {sig: signal.signal(sig, self._on_signal) for sig in handled}
        code = EXIT_FAILED
        try:
            code = self._run()
        finally:
            stopped = self._stop_all()
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            for worker in self.workers:
                if worker.ready_fd is not None:
                    os.close(worker.ready_fd)
            self.sock.close()
        if stopped is not None:
            _say("stopped")
            if code == 0:
                code = stopped
        return code

    def _spawn(self, worker: _Worker) -> None:
        """Start ``worker``'s process on the shared socket."""
        assert self.sock is not None
        listen_fd = self.sock.fileno()
        read_end, write_end = os.pipe()
        command = [*_worker_command(self.options), "--listen-fd", str(listen_fd)]
        command += ["--worker-ready-fd", str(write_end)]
        try:
            worker.proc = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                pass_fds=(write_end, listen_fd),
                env=self.env,
                # Its own process group: a Ctrl-C at the terminal reaches the
                # supervisor only, which passes it on once.
                process_group=0,
            )
        except BaseException:
            os.close(read_end)
            raise
        finally:
            os.close(write_end)
        worker.ready_fd = read_end
        worker.started = time.monotonic()

    def _run(self) -> int:
        options = self.options
        # One worker first: an application that cannot start says so once.
        first = _Worker()
        self.workers.append(first)
        self._spawn(first)
        failed = self._await_ready()
        if failed is not None:
            return failed
        for _ in range(options.workers - 1):
            self.workers.append(_Worker())
            self._spawn(self.workers[-1])
        failed = self._await_ready()
        if failed is not None:
            return failed
        scheme = "https" if options.ssl_context is not None else "http"
        pids = ", ".join(str(worker.proc.pid) for worker in self.workers if worker.proc)
        _say(
            f"serving {first.what} on {_url(scheme, options.host, options.port)} with "
            f"{len(self.workers)} workers (pids {pids}); supervisor pid {os.getpid()}; "
            "Ctrl-C to stop"
        )
        self.serving = True
        while not self.signals:
            failed = self._look()
            if failed is not None:
                return failed
        return 0

    def _look(self) -> int | None:
        """One look at the workers: restart the dead (or stop, with
        --fail-fast); None, or the exit status to stop with."""
        now = time.monotonic()
        for worker in self.workers:
            if worker.proc is None:
                if now >= worker.restart_at:
                    self._spawn(worker)
                continue
            code = worker.proc.poll()
            if code is None or worker.ready_fd is not None:
                continue  # serving, or starting (its pipe says how that ends)
            pid = worker.proc.pid
            if self.options.fail_fast:
                _say(f"worker {pid} exited with {_status(code)}; stopping the other workers")
                return EXIT_FAILED
            worker.delay = backoff(worker.delay, now - worker.started)
            worker.restart_at = now + worker.delay
            worker.proc = None
            _say(f"worker {pid} exited with {_status(code)}; restarting it in {worker.delay:g} s")
        return self._read_ready(POLL)

    def _await_ready(self) -> int | None:
        """Wait until every started worker serves: None; or an exit status."""
        while any(worker.ready_fd is not None for worker in self.workers):
            if self.signals:
                return 0
            failed = self._read_ready(POLL)
            if failed is not None:
                return failed
        return None

    def _read_ready(self, timeout: float) -> int | None:
        """Read what starting workers say, waiting up to ``timeout``: None, or,
        if one failed to start (it said why on stderr), the status to stop with."""
        waiting = {w.ready_fd: w for w in self.workers if w.ready_fd is not None}
        if not waiting:
            time.sleep(timeout)
            return None
        readable, _, _ = select.select(list(waiting), [], [], timeout)
        for fd in readable:
            worker = waiting[fd]
            message = os.read(fd, 4096).decode("utf-8", "replace")
            os.close(fd)
            worker.ready_fd = None
            if message.startswith("ready "):
                worker.what = message[len("ready ") :].strip()
                continue
            # It closed the pipe without being ready: it failed at start-up
            # (and said why), unless a signal killed it (then _look restarts it).
            assert worker.proc is not None
            try:
                code = worker.proc.wait(self.stop_timeout)
            except subprocess.TimeoutExpired:
                code = EXIT_FAILED
            if code < 0 and self.serving:
                continue
            return code if code > 0 else EXIT_FAILED
        return None

    def _stop_all(self) -> int | None:
        """Stop every live worker (the signal received, else SIGTERM); wait for them.

        None if there was nothing to stop, else whether all stopped cleanly (0) or not (1).
        """
        live = [w.proc for w in self.workers if w.proc is not None and w.proc.poll() is None]
        if not live:
            return None
        sig = self.signals[0] if self.signals else signal.SIGTERM
        for proc in live:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(sig)
        deadline = time.monotonic() + self.stop_timeout
        status = 0
        for proc in live:
            try:
                code = proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                _say(f"worker {proc.pid} did not stop in {self.stop_timeout:g} s; killing it")
                proc.kill()
                code = proc.wait()
            if code != 0:
                status = EXIT_FAILED
        return status
