"""A real redis-server for tests, on a free loopback port of its own.

:class:`RedisServer` starts ``redis-server`` (no persistence, its own temp
dir), waits until it answers PING and stops it by its PID (SIGTERM, then
SIGKILL). ``stop()`` and ``start()`` again reuse the same port, for tests of
a Redis that goes away and comes back. It never uses a system Redis: if
``redis-server`` is missing it installs the Debian package with services
kept from starting, and always runs its own process.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from _ports import free_port

__all__ = [
    "CountingTransport",
    "RedisServer",
    "Running",
    "apt_install",
    "commands_and_clients",
    "commands_sent",
    "full_commands",
    "redis_server_binary",
    "stop_process",
]

_POLICY_RC_D = Path("/usr/sbin/policy-rc.d")


def redis_server_binary() -> str:
    """The path of ``redis-server``, installing the Debian package if needed."""
    return apt_install("redis-server", "redis-server")


def apt_install(package: str, binary: str, *, recommends: bool = False) -> str:
    """The path of ``binary``, installing the Debian ``package`` that has it
    if it is missing (its service kept from starting; its recommended
    packages too if ``recommends``)."""
    found = shutil.which(binary)
    if found:
        return found
    if os.geteuid() != 0:
        raise RuntimeError(
            f"{binary} is not installed and we are not root to install it: "
            f"run `apt-get install -y {package}` (the tests start their own server)"
        )
    # pytest-xdist workers may all get here at once: one installs, the others
    # wait for it on this lock and then find the binary.
    with open(os.path.join(tempfile.gettempdir(), "lapse-tests-apt.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        found = shutil.which(binary)
        return found if found else _install(package, binary, recommends)


def _install(package: str, binary: str, recommends: bool) -> str:
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    # Keep the package's service from starting (policy-rc.d exit 101 = "not
    # allowed"): the tests use their own process, never one on 6379.
    made_policy = False
    if not _POLICY_RC_D.exists():
        _POLICY_RC_D.write_text("#!/bin/sh\nexit 101\n")
        _POLICY_RC_D.chmod(0o755)
        made_policy = True
    try:
        # Wait for a dpkg lock another program holds rather than fail at once.
        install = ["apt-get", "-o", "DPkg::Lock::Timeout=300", "install", "-y"]
        install += [package] if recommends else ["--no-install-recommends", package]
        done = subprocess.run(install, env=env, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            subprocess.run(["apt-get", "update"], env=env, capture_output=True, check=False)
            done = subprocess.run(install, env=env, capture_output=True, text=True, check=False)
    finally:
        if made_policy:
            _POLICY_RC_D.unlink(missing_ok=True)
    found = shutil.which(binary)
    if done.returncode != 0 or not found:
        raise RuntimeError(
            f"could not install {package} with apt-get "
            f"(exit {done.returncode}):\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}"
        )
    return found


def _pings(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
            sock.sendall(b"PING\r\n")
            # -NOAUTH: up, with a password (--requirepass).
            return sock.recv(64).startswith((b"+PONG", b"-NOAUTH"))
    except OSError:
        return False


def stop_process(proc: subprocess.Popen[bytes] | None) -> None:
    """Stop a process we started, by its PID: SIGTERM, then SIGKILL after 5 s."""
    if proc is None or proc.poll() is not None:
        return
    os.kill(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=5)


class Running:
    """A context manager over :meth:`start` and :meth:`close`: started on
    entry (closed at once if starting fails), closed on exit."""

    def start(self) -> None:
        """Start (nothing, unless a subclass says so)."""

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class RedisServer(Running):
    """One ``redis-server`` process on 127.0.0.1, db 0, no persistence."""

    def __init__(self, port: int | None = None, args: Sequence[str] = ()) -> None:
        self.extra_args = list(args)
        self.binary = redis_server_binary()
        self.port = port or free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self._dir = tempfile.mkdtemp(prefix="lapse-redis-")
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid

    @property
    def log(self) -> str:
        path = Path(self._dir, "redis.log")
        return path.read_text(errors="replace") if path.exists() else ""

    def start(self, timeout: float = 10.0) -> None:
        """Start the server (again, on the same port) and wait for PING."""
        if self._proc is not None:
            raise RuntimeError(f"redis-server already running, pid {self._proc.pid}")
        args = [
            self.binary,
            "--bind", "127.0.0.1",
            "--port", str(self.port),
            "--save", "",
            "--appendonly", "no",
            "--dir", self._dir,
            "--daemonize", "no",
            "--logfile", "redis.log",
            *self.extra_args,
        ]  # fmt: skip
        self._proc = subprocess.Popen(args, cwd=self._dir, stdin=subprocess.DEVNULL)
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self._proc.poll() is not None:
                self._proc = None
                raise RuntimeError(f"redis-server on port {self.port} exited:\n{self.log}")
            if _pings(self.port):
                return
            time.sleep(0.02)
        self.stop()
        raise RuntimeError(f"redis-server on port {self.port} did not answer PING:\n{self.log}")

    def stop(self) -> None:
        """Stop our process by its PID: SIGTERM, then SIGKILL after 5 s."""
        proc, self._proc = self._proc, None
        stop_process(proc)

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self._dir, ignore_errors=True)


# -- what clients sent: MONITOR -------------------------------------------------


class CountingTransport:
    """Wraps a transport and counts its writes (one write = one round trip out)."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.writes: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.writes.append(bytes(data))
        self.inner.write(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


_MONITOR_LINE = re.compile(r'\+[\d.]+ \[\d+ ([^\]]+)\] "([^"]*)"')


async def commands_sent(server: RedisServer, action: Callable[[], Awaitable[Any]]) -> list[str]:
    """The commands clients sent to the server (as MONITOR shows them, not
    counting those a script ran) while ``action`` ran."""
    return [command for _, command in await commands_and_clients(server, action)]


async def commands_and_clients(
    server: RedisServer, action: Callable[[], Awaitable[Any]]
) -> list[tuple[str, str]]:
    """Like :func:`commands_sent`, each with the client address that sent it."""
    lines = await _monitored(server, action)
    return [(client, _QUOTED.findall(line)[0].lower()) for client, line in lines]


async def full_commands(
    server: RedisServer, action: Callable[[], Awaitable[Any]]
) -> list[list[str]]:
    """Every command clients sent while ``action`` ran, each as its list of
    arguments (as MONITOR quotes them; not counting those a script ran)."""
    return [_QUOTED.findall(line) for _, line in await _monitored(server, action)]


_QUOTED = re.compile(r'"((?:[^"\\]|\\.)*)"')


async def _monitored(
    server: RedisServer, action: Callable[[], Awaitable[Any]]
) -> list[tuple[str, str]]:
    """The MONITOR lines of the commands clients sent while ``action`` ran,
    with the address of the client that sent each."""
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(b"MONITOR\r\n")
    assert await reader.readline() == b"+OK\r\n"
    await action()
    mark = f"mark-{uuid.uuid4().hex}"
    marker_reader, marker = await asyncio.open_connection("127.0.0.1", server.port)
    marker.write(f"ECHO {mark}\r\n".encode())
    await marker_reader.readline()
    marker.close()
    await marker.wait_closed()
    sent: list[tuple[str, str]] = []
    while True:
        line = (await asyncio.wait_for(reader.readline(), 5)).decode()
        if mark in line:
            break
        match = _MONITOR_LINE.match(line)
        assert match, line
        if match.group(1) != "lua":
            sent.append((match.group(1), line))
    writer.close()
    await writer.wait_closed()
    return sent
