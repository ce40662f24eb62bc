"""Redis traffic per touch request: INFO counters and a MONITOR feed around the runs."""

from __future__ import annotations

import contextlib
import http.client
import re
import socket
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from bench.systems import HOST, PATH, REPO_DIR, System, session_cookie


@dataclass(frozen=True)
class RedisSnapshot:
    at: float
    reads: int
    calls: dict[str, int]

    def commands(self) -> int:
        """Calls of every command but the bench's own (INFO, MONITOR, FLUSHALL)."""
        own = {"info", "monitor", "flushall"}
        return sum(n for name, n in self.calls.items() if name not in own)


class RedisHandle:
    """The redis-server the Redis systems use: started here, or given by --redis-url."""

    def __init__(self, url: str | None) -> None:
        import redis

        self._server: Any = None
        if url is None:
            sys.path.insert(0, str(REPO_DIR / "tests"))
            from _redis_server import RedisServer

            self._server = RedisServer()
            self._server.__enter__()
            url = self._server.url
        assert url is not None
        self.url = url
        self.owned = self._server is not None
        self.client = redis.Redis.from_url(url, decode_responses=True)
        self.client.ping()
        kwargs = self.client.connection_pool.connection_kwargs
        self.host, self.port = kwargs.get("host", HOST), int(kwargs.get("port", 6379))
        self.version = str(self.client.info("server").get("redis_version", "?"))

    def flush(self) -> None:
        if self.owned:
            self.client.flushall()

    def snapshot(self) -> RedisSnapshot:
        info = self.client.info("stats", "commandstats")
        calls = {
            name.removeprefix("cmdstat_"): int(value["calls"])
            for name, value in info.items()
            if name.startswith("cmdstat_")
        }
        return RedisSnapshot(time.monotonic(), int(info["total_reads_processed"]), calls)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.client.close()
        if self._server is not None:
            self._server.__exit__(None, None, None)


class Monitor:
    """A raw MONITOR connection read by a thread; ``stop()`` returns the lines."""

    def __init__(self, host: str, port: int) -> None:
        self._sock = socket.create_connection((host, port), timeout=5)
        self._sock.sendall(b"MONITOR\r\n")
        buffer = b""
        while b"\r\n" not in buffer:
            chunk = self._sock.recv(4096)
            if not chunk:
                raise RuntimeError("redis closed the MONITOR connection")
            buffer += chunk
        first, _, rest = buffer.partition(b"\r\n")
        if first != b"+OK":
            raise RuntimeError(f"MONITOR answered {first!r}")
        self._chunks = [rest]
        self._sock.settimeout(None)
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        with contextlib.suppress(OSError):
            while chunk := self._sock.recv(1 << 16):
                self._chunks.append(chunk)

    def stop(self) -> list[str]:
        time.sleep(0.2)  # let the feed catch up with the last command
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        self._thread.join(timeout=5)
        self._sock.close()
        text = b"".join(self._chunks).decode("utf-8", "replace")
        return [line for line in text.split("\r\n") if line.startswith("+")]


_MONITOR_LINE = re.compile(r'^\+[\d.]+ \[\d+ ([^\]]+)\] "([^"]*)"')


def monitor_window(lines: list[str]) -> tuple[int, int, dict[str, int]]:
    """Commands between the bench's two INFO calls: (client commands, commands run
    inside Lua scripts, client commands by name)."""
    marks = 0
    top = lua = 0
    names: dict[str, int] = {}
    for line in lines:
        match = _MONITOR_LINE.match(line)
        if match is None:
            continue
        source, name = match.group(1), match.group(2).lower()
        if source != "lua" and name == "info":
            marks += 1
            if marks == 2:
                break
            continue
        if marks != 1:
            continue
        if source == "lua":
            lua += 1
        else:
            top += 1
            names[name] = names.get(name, 0) + 1
    if marks < 2:
        raise RuntimeError("MONITOR feed lacks the bench's INFO marks")
    return top, lua, names


@dataclass
class RedisCounts:
    """Redis traffic of one system's touch requests."""

    idle_seconds: float = 0.0
    idle_reads: float = 0.0
    """Per second: read events (client requests) with no HTTP traffic."""
    idle_commands: float = 0.0
    """Per second: commands (INFO commandstats, including those run inside Lua)."""
    idle_client_commands: float = 0.0
    """Per second: commands sent by clients (MONITOR, not Lua-internal)."""
    idle_names: dict[str, float] = field(default_factory=dict)
    """Per second, by name: the idle client commands."""
    reads_per_request: list[float] = field(default_factory=list)
    """Per wrk touch run: round trips (read events) per request, idle subtracted."""
    commands_per_request: list[float] = field(default_factory=list)
    breakdown: dict[str, float] = field(default_factory=dict)
    """Per request, by command name, summed over the wrk runs (idle not subtracted)."""
    monitor_requests: int = 0
    monitor_client_commands: float = 0.0
    monitor_lua_commands: float = 0.0
    monitor_reads: float = 0.0
    monitor_names: dict[str, float] = field(default_factory=dict)

    @property
    def claim_holds(self) -> bool:
        """Client commands per request == round trips per request (no pipelining)."""
        return abs(self.monitor_client_commands - self.monitor_reads) < 0.1


def measure_idle(redis: RedisHandle, seconds: float, counts: RedisCounts) -> None:
    monitor = Monitor(redis.host, redis.port)
    try:
        before = redis.snapshot()
        time.sleep(seconds)
        after = redis.snapshot()
    finally:
        lines = monitor.stop()
    elapsed = after.at - before.at
    top, _, names = monitor_window(lines)
    counts.idle_seconds = elapsed
    counts.idle_reads = (after.reads - before.reads - 1) / elapsed  # - our own INFO
    counts.idle_commands = (after.commands() - before.commands()) / elapsed
    counts.idle_client_commands = top / elapsed
    counts.idle_names = {name: n / elapsed for name, n in sorted(names.items())}


def measure_monitored(
    redis: RedisHandle, port: int, system: System, requests: int, counts: RedisCounts
) -> None:
    """``requests`` sequential touches on one keep-alive connection, under MONITOR."""
    cookie = session_cookie(port, system)
    conn = http.client.HTTPConnection(HOST, port, timeout=5)
    monitor = Monitor(redis.host, redis.port)
    try:
        before = redis.snapshot()
        for _ in range(requests):
            conn.request("GET", PATH, headers={"Cookie": cookie})
            response = conn.getresponse()
            response.read()
            if response.status != 200:
                raise RuntimeError(f"monitored touch got status {response.status}")
        after = redis.snapshot()
    finally:
        lines = monitor.stop()
        conn.close()
    elapsed = after.at - before.at
    top, lua, names = monitor_window(lines)
    counts.monitor_requests = requests
    counts.monitor_client_commands = (top - counts.idle_client_commands * elapsed) / requests
    counts.monitor_lua_commands = lua / requests
    counts.monitor_reads = (after.reads - before.reads - 1 - counts.idle_reads * elapsed) / (
        requests
    )
    per_name = {
        name: (n - counts.idle_names.get(name, 0.0) * elapsed) / requests
        for name, n in sorted(names.items())
    }
    counts.monitor_names = {name: v for name, v in per_name.items() if v >= 0.005}
