"""Redis with Sentinel for tests: a primary, a replica and 3 sentinels, all
real processes on free loopback ports, each in a temp dir, stopped by PID.

:class:`SentinelSetup` starts ``redis-server`` twice (the replica with
``--replicaof``) and ``redis-sentinel`` three times (installing the Debian
package ``redis-sentinel`` if it is missing, as :mod:`_redis_server` does
for ``redis-server``; ``redis-server --sentinel`` if that cannot be done),
with a small ``down-after-milliseconds`` so a killed primary is replaced in
a few seconds.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import hiredis
from _ports import free_port
from _redis_server import RedisServer, Running, apt_install, redis_server_binary, stop_process

__all__ = ["SentinelSetup", "ask", "sentinel_binary"]

SERVICE = "lapse-primary"
DOWN_AFTER_MS = 1000


def sentinel_binary() -> list[str]:
    """The command that starts a sentinel given its config file."""
    try:
        return [apt_install("redis-sentinel", "redis-sentinel")]
    except RuntimeError:
        return [redis_server_binary(), "--sentinel"]  # the same program, another mode


def ask(port: int, *args: str | int, password: str | None = None, timeout: float = 2.0) -> Any:
    """One command to the server (or sentinel) on ``port``; its reply
    (an error reply is returned, not raised)."""
    reader = hiredis.Reader(encoding="utf-8")
    commands: list[tuple[str | int, ...]] = []
    if password is not None:
        commands.append(("AUTH", password))
    commands.append(tuple(args))
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(b"".join(hiredis.pack_command(command) for command in commands))
        replies: list[Any] = []
        while len(replies) < len(commands):
            reply = reader.gets()
            if reply is not False:
                replies.append(reply)
                continue
            data = sock.recv(65536)
            if not data:
                raise ConnectionError(f"port {port} closed the connection")
            reader.feed(data)
    return replies[-1]


class _Sentinel:
    """One sentinel process with its config file in a temp dir."""

    def __init__(
        self,
        command: list[str],
        primary_port: int,
        password: str | None,
        sentinel_password: str | None,
    ) -> None:
        self.command = command
        self.port = free_port()
        self.dir = tempfile.mkdtemp(prefix="lapse-sentinel-")
        lines = [
            f"port {self.port}",
            "bind 127.0.0.1",
            "daemonize no",
            f"dir {self.dir}",
            "logfile sentinel.log",
            "sentinel resolve-hostnames no",
            f"sentinel monitor {SERVICE} 127.0.0.1 {primary_port} 2",
            f"sentinel down-after-milliseconds {SERVICE} {DOWN_AFTER_MS}",
            f"sentinel failover-timeout {SERVICE} 4000",
            f"sentinel parallel-syncs {SERVICE} 1",
        ]
        if password is not None:
            lines.append(f"sentinel auth-pass {SERVICE} {password}")
        if sentinel_password is not None:
            lines.append(f"requirepass {sentinel_password}")
        self.config = Path(self.dir, "sentinel.conf")
        self.config.write_text("\n".join(lines) + "\n")
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def log(self) -> str:
        path = Path(self.dir, "sentinel.log")
        return path.read_text(errors="replace") if path.exists() else ""

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [*self.command, str(self.config)], cwd=self.dir, stdin=subprocess.DEVNULL
        )

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        stop_process(proc)

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


class SentinelSetup(Running):
    """A primary, one replica of it and 3 sentinels monitoring it as
    :data:`SERVICE`. ``password`` protects both Redis servers
    (``requirepass`` and ``masterauth``), ``sentinel_password`` the sentinels
    (their ``requirepass``); ``server_args`` are more options for both servers."""

    service = SERVICE

    def __init__(
        self,
        password: str | None = None,
        server_args: Sequence[str] = (),
        sentinel_password: str | None = None,
    ) -> None:
        self.password = password
        self.sentinel_password = sentinel_password
        auth = [] if password is None else ["--requirepass", password, "--masterauth", password]
        auth += server_args
        self.servers: list[RedisServer] = []
        self._sentinels: list[_Sentinel] = []
        try:
            first = RedisServer(args=auth)
            self.servers.append(first)
            first.start()
            replica = RedisServer(args=[*auth, "--replicaof", "127.0.0.1", str(first.port)])
            self.servers.append(replica)
            replica.start()
            self._wait(lambda: self._linked(replica.port), "the replica to sync")
            command = sentinel_binary()
            for _ in range(3):
                sentinel = _Sentinel(command, first.port, password, sentinel_password)
                self._sentinels.append(sentinel)
                sentinel.start()
            self._wait(self._sentinels_ready, "the sentinels to know each other and the replica")
        except BaseException:
            self.close()
            raise

    # -- what tests use ---------------------------------------------------------------

    @property
    def sentinels(self) -> list[tuple[str, int]]:
        return [("127.0.0.1", sentinel.port) for sentinel in self._sentinels]

    def url(self, db: int = 0) -> str:
        where = ",".join(f"127.0.0.1:{sentinel.port}" for sentinel in self._sentinels)
        auth = "" if self.password is None else f":{self.password}@"
        return f"redis+sentinel://{auth}{where}/{self.service}/{db}"

    def primary_port(self, sentinel: int | None = None) -> int:
        """The primary's port, as sentinel number ``sentinel`` (by default
        the first one running) names it."""
        if sentinel is None:
            sentinel = self._running()[0]
        port = self._sentinels[sentinel].port
        reply = ask(
            port, "SENTINEL", "get-master-addr-by-name", SERVICE, password=self.sentinel_password
        )
        return int(reply[1])

    def server_on(self, port: int) -> RedisServer:
        return next(server for server in self.servers if server.port == port)

    def role(self, port: int) -> str:
        reply = ask(port, "ROLE", password=self.password)
        return str(reply[0])

    def failover(self, sentinel: int = 0, timeout: float = 20.0) -> int:
        """``SENTINEL FAILOVER`` (to sentinel number ``sentinel``); the new
        primary's port, once every running sentinel names it and it says it
        is a master."""
        old = self.primary_port(sentinel)
        port = self._sentinels[sentinel].port
        reply = ask(port, "SENTINEL", "FAILOVER", SERVICE, password=self.sentinel_password)
        assert reply == "OK", reply
        return self.wait_for_new_primary(old, timeout)

    def kill_primary(self) -> int:
        """SIGKILL the primary (and reap it); its port."""
        port = self.primary_port()
        server = self.server_on(port)
        assert server.pid is not None
        os.kill(server.pid, signal.SIGKILL)
        server.stop()  # reaps it
        return port

    def wait_for_new_primary(self, old: int, timeout: float = 20.0) -> int:
        """Wait until every sentinel names a primary other than ``old`` and
        that node is a master; its port."""

        def moved() -> bool:
            try:
                ports = {self.primary_port(index) for index in self._running()}
                return len(ports) == 1 and old not in ports and self.role(ports.pop()) == "master"
            except (OSError, TypeError, IndexError):
                return False

        self._wait(moved, "the sentinels to elect a new primary", timeout)
        return self.primary_port()

    def _running(self) -> list[int]:
        return [i for i, sentinel in enumerate(self._sentinels) if sentinel.proc is not None]

    def stop_sentinel(self, index: int) -> None:
        self._sentinels[index].stop()

    def stop_sentinels(self) -> None:
        for sentinel in self._sentinels:
            sentinel.stop()

    def close(self) -> None:
        for sentinel in self._sentinels:
            sentinel.close()
        for server in self.servers:
            server.close()

    # -- readiness -----------------------------------------------------------------------

    def _linked(self, port: int) -> bool:
        try:
            info = ask(port, "INFO", "replication", password=self.password)
        except OSError:
            return False
        return isinstance(info, str) and "master_link_status:up" in info

    def _sentinels_ready(self) -> bool:
        for sentinel in self._sentinels:
            if sentinel.proc is not None and sentinel.proc.poll() is not None:
                raise RuntimeError(f"sentinel on port {sentinel.port} exited:\n{sentinel.log}")
            try:
                password = self.sentinel_password
                master = ask(sentinel.port, "SENTINEL", "master", SERVICE, password=password)
                replicas = ask(sentinel.port, "SENTINEL", "replicas", SERVICE, password=password)
            except OSError:
                return False
            if not isinstance(master, list) or not isinstance(replicas, list):
                return False
            fields = dict(zip(master[::2], master[1::2], strict=True))
            if fields.get("num-other-sentinels") != "2" or len(replicas) != 1:
                return False
        return True

    def _wait(self, condition: Any, what: str, timeout: float = 20.0) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if condition():
                return
            time.sleep(0.05)
        logs = "\n".join(sentinel.log[-1500:] for sentinel in self._sentinels)
        raise RuntimeError(f"timed out waiting for {what}\n{logs}")
