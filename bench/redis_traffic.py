"""Redis traffic per touch request: INFO counters and a MONITOR feed around the runs."""

from __future__ import annotations

import contextlib
import http.client
import re
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

from bench.loadgen import WrkResult
from bench.systems import HOST, PATH, System, session_cookie, suite_helpers


@dataclass(frozen=True)
class RedisSnapshot:
    at: float
    reads: int
    calls: dict[str, int]
    infos: int = 1
    """INFO calls the snapshot itself made (one per node): its own read events."""

    def commands(self) -> int:
        """Calls of every command but the bench's own (INFO, MONITOR, FLUSHALL, SCRIPT)
        and replication's (REPLCONF ACK: a cluster's replicas, once a second)."""
        own = {"info", "monitor", "flushall", "script|flush", "replconf"}
        return sum(n for name, n in self.calls.items() if name not in own)

    def client_reads(self) -> int:
        """Read events, but a replica's REPLCONF ACKs (one read each)."""
        return self.reads - self.calls.get("replconf", 0)


def node_snapshot(client: Any) -> RedisSnapshot:
    """One node's counters (one INFO, on a redis-py client)."""
    info = client.info("stats", "commandstats")
    calls = {
        name.removeprefix("cmdstat_"): int(value["calls"])
        for name, value in info.items()
        if name.startswith("cmdstat_")
    }
    return RedisSnapshot(time.monotonic(), int(info["total_reads_processed"]), calls)


class RedisHandle:
    """The redis-server the Redis systems use: started here, or given by --redis-url."""

    def __init__(self, url: str | None) -> None:
        import redis

        self._server: Any = None
        if url is None:
            self._server = suite_helpers().RedisServer()
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
        self.addresses = [(self.host, self.port)]
        """The nodes to MONITOR: this one."""
        origin = "started by the bench" if self.owned else "given by --redis-url"
        self.description = f"redis-server {self.version} on 127.0.0.1 ({origin})"

    def flush(self) -> None:
        if self.owned:
            self.client.flushall()

    def node_snapshots(self) -> list[RedisSnapshot]:
        return [node_snapshot(self.client)]

    def snapshot(self) -> RedisSnapshot:
        return node_snapshot(self.client)

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
_HASH_TAG = re.compile(r'"[^"{]*\{([^}"]+)\}')
"""The hash tag of a command's first argument that has one: the store's shard."""


def _window(lines: list[str]) -> Iterator[tuple[str, str, str]]:
    """(source, lower-case name, line) of each command between the bench's two INFO calls."""
    marks = 0
    for line in lines:
        match = _MONITOR_LINE.match(line)
        if match is None:
            continue
        source, name = match.group(1), match.group(2).lower()
        if source != "lua" and name == "info":
            marks += 1
            if marks == 2:
                return
            continue
        if marks == 1:
            yield source, name, line
    raise RuntimeError("MONITOR feed lacks the bench's INFO marks")


def monitor_window(lines: list[str]) -> tuple[int, int, dict[str, int]]:
    """Commands between the bench's two INFO calls: (client commands, commands run
    inside Lua scripts, client commands by name)."""
    top = lua = 0
    names: dict[str, int] = {}
    for source, name, _ in _window(lines):
        if source == "lua":
            lua += 1
        else:
            top += 1
            names[name] = names.get(name, 0) + 1
    return top, lua, names


def monitor_shards(lines: list[str]) -> dict[str, int]:
    """Client commands between the bench's two INFO calls by the hash tag of their keys
    (the store's shard; ``""``: no tag, a single node's untagged layout or a keyless
    command)."""
    shards: dict[str, int] = {}
    for source, _, line in _window(lines):
        if source != "lua":
            match = _HASH_TAG.search(line, line.index("]"))
            tag = match.group(1) if match else ""
            shards[tag] = shards.get(tag, 0) + 1
    return shards


class Monitors:
    """MONITOR on each of ``addresses`` (a context manager); ``stop()`` gives each
    node's lines."""

    def __init__(self, addresses: list[tuple[str, int]]) -> None:
        self._monitors: list[Monitor] = []
        try:
            for host, port in addresses:
                self._monitors.append(Monitor(host, port))
        except BaseException:
            self.stop()
            raise

    def stop(self) -> list[list[str]]:
        monitors, self._monitors = self._monitors, []
        return [monitor.stop() for monitor in monitors]


def combined(snapshots: list[RedisSnapshot]) -> RedisSnapshot:
    """Several nodes' counters as one (taken one after the other: the last one's time)."""
    calls: dict[str, int] = {}
    for each in snapshots:
        for name, n in each.calls.items():
            calls[name] = calls.get(name, 0) + n
    reads = sum(s.reads for s in snapshots)
    return RedisSnapshot(snapshots[-1].at, reads, calls, sum(s.infos for s in snapshots))


class RedisTarget(Protocol):
    """What the bench measures Redis traffic on: one node, or a cluster's primaries."""

    url: str
    owned: bool
    description: str
    addresses: list[tuple[str, int]]

    def flush(self) -> None: ...

    def node_snapshots(self) -> list[RedisSnapshot]: ...

    def snapshot(self) -> RedisSnapshot: ...

    def close(self) -> None: ...


@dataclass
class PerRequest:
    """Redis traffic per request of one kind of wrk run (one value per run), the idle rates
    subtracted: round trips (server read events) and commands (Lua-internal included)."""

    reads: list[float] = field(default_factory=list)
    commands: list[float] = field(default_factory=list)


@dataclass
class RedisCounts:
    """Redis traffic of one system's touch requests."""

    idle_seconds: float = 0.0
    idle_settle: float = 0.0
    """Seconds waited for nothing to be due before the idle window."""
    idle_reads: float = 0.0
    """Per second: read events (client requests) with no HTTP traffic."""
    idle_commands: float = 0.0
    """Per second: commands (INFO commandstats, including those run inside Lua)."""
    idle_client_commands: float = 0.0
    """Per second: commands sent by clients (MONITOR, not Lua-internal)."""
    idle_names: dict[str, float] = field(default_factory=dict)
    """Per second, by name: the idle client commands."""
    idle_node_commands: list[float] = field(default_factory=list)
    """Per second, per node (a cluster's primaries): commands, as ``idle_commands``."""
    idle_shards: dict[str, float] = field(default_factory=dict)
    """Per second, by the hash tag of their keys (the store's shard): idle client
    commands (``""``: untagged)."""
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
    logged_touch: PerRequest = field(default_factory=PerRequest)
    """The touch runs on a logged-in session (alternated with the anonymous ones)."""
    login: PerRequest = field(default_factory=PerRequest)
    create: PerRequest = field(default_factory=PerRequest)
    logged_monitor: Monitored | None = None
    """The MONITOR phase again, on a logged-in session."""

    @property
    def claim_holds(self) -> bool:
        """Client commands per request == round trips per request (no pipelining)."""
        return abs(self.monitor_client_commands - self.monitor_reads) < 0.1


AFTER_LAST_END = 0.5
"""Seconds to wait after the last due session was delivered: the keeper's round that its
own acknowledgement (news in the stream) asks for."""


def node_clients(redis: RedisTarget) -> list[Any]:
    """A redis-py client per primary: a cluster's (``clients`` by port), else the one."""
    clients = getattr(redis, "clients", None)
    if clients is not None:
        return [clients[host_port[1]] for host_port in redis.addresses]
    return [getattr(redis, "client")]  # noqa: B009


STALE = 5.0
"""Seconds past due after which an entry is taken for one no process serves (a
deployment whose server the bench stopped): a live keeper claims what is due at once."""


def next_due(redis: RedisTarget) -> float | None:
    """Seconds until the earliest session deadline or lease end of any lapse deployment
    on ``redis`` (<= 0: due now; a session ended by hand is due when it ended); None:
    nothing pending. Read from the keys themselves (``*:deadlines``, ``*:leases``,
    ``*:ended``); entries more than :data:`STALE` seconds past due are left out."""
    found: float | None = None
    for client in node_clients(redis):
        seconds, micros = client.time()
        now = int(seconds) * 1_000_000 + int(micros)
        for pattern in ("*:deadlines", "*:leases", "*:ended"):
            for key in client.scan_iter(match=pattern, count=1000):
                fresh = now - STALE * 1_000_000
                first = client.zrangebyscore(key, fresh, "+inf", start=0, num=1, withscores=True)
                if first:
                    due = (first[0][1] - now) / 1_000_000
                    found = due if found is None else min(found, due)
    return found


def wait_until_idle(redis: RedisTarget, window: float, limit: float) -> float:
    """Wait (at most ``limit`` seconds) until nothing is due on ``redis`` within the
    next ``window`` seconds (and one more); the seconds waited. An idle process is one
    with nothing to do: the seed's sessions a warmup made end a few seconds after it,
    and ending them is expiry work, not the idle cost (a lapse process sleeps until its
    next deadline)."""
    started = time.monotonic()
    while time.monotonic() - started < limit:
        due = next_due(redis)
        if due is None or due > window + 1.0:
            break
        time.sleep(min(max(due, 0.0) + 0.25, 2.0))
    time.sleep(AFTER_LAST_END)
    return time.monotonic() - started


def measure_idle(
    redis: RedisTarget, seconds: float, counts: RedisCounts, settle: float = 15.0
) -> None:
    """The commands Redis gets while no request comes, once nothing is due within the
    window (:func:`wait_until_idle`, at most ``settle`` s): in all, per node, per shard."""
    counts.idle_settle = wait_until_idle(redis, seconds, settle) if settle > 0 else 0.0
    monitors = Monitors(redis.addresses)
    try:
        before = redis.node_snapshots()
        time.sleep(seconds)
        after = redis.node_snapshots()
    finally:
        feeds = monitors.stop()
    elapsed = after[-1].at - before[-1].at
    tops, names, shards = 0, {}, {}
    for lines in feeds:
        top, _, node_names = monitor_window(lines)
        tops += top
        for name, n in node_names.items():
            names[name] = names.get(name, 0) + n
        for tag, n in monitor_shards(lines).items():
            shards[tag] = shards.get(tag, 0) + n
    total_before, total_after = combined(before), combined(after)
    counts.idle_seconds = elapsed
    counts.idle_reads = (
        total_after.client_reads() - total_before.client_reads() - total_after.infos
    ) / elapsed
    counts.idle_commands = (total_after.commands() - total_before.commands()) / elapsed
    counts.idle_node_commands = [
        (a.commands() - b.commands()) / elapsed for b, a in zip(before, after, strict=True)
    ]
    counts.idle_client_commands = tops / elapsed
    counts.idle_names = {name: n / elapsed for name, n in sorted(names.items())}
    counts.idle_shards = {tag: n / elapsed for tag, n in sorted(shards.items())}


@dataclass(frozen=True)
class Monitored:
    """Sequential requests on one keep-alive connection under MONITOR, per request,
    the idle rate subtracted."""

    requests: int
    client_commands: float
    lua_commands: float
    reads: float
    names: dict[str, float]

    @property
    def claim_holds(self) -> bool:
        """Client commands per request == round trips per request (no pipelining)."""
        return abs(self.client_commands - self.reads) < 0.1


def monitor_touches(
    redis: RedisTarget, port: int, cookie: str, requests: int, counts: RedisCounts
) -> Monitored:
    """``requests`` sequential touches of ``cookie``'s session on one keep-alive
    connection, under MONITOR (``counts``: the idle rates to subtract)."""
    conn = http.client.HTTPConnection(HOST, port, timeout=5)
    monitors = Monitors(redis.addresses)
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
        feeds = monitors.stop()
        conn.close()
    elapsed = after.at - before.at
    top = lua = 0
    names: dict[str, int] = {}
    for lines in feeds:
        node_top, node_lua, node_names = monitor_window(lines)
        top, lua = top + node_top, lua + node_lua
        for name, n in node_names.items():
            names[name] = names.get(name, 0) + n
    per_name = {
        name: (n - counts.idle_names.get(name, 0.0) * elapsed) / requests
        for name, n in sorted(names.items())
    }
    return Monitored(
        requests=requests,
        client_commands=(top - counts.idle_client_commands * elapsed) / requests,
        lua_commands=lua / requests,
        reads=(
            after.client_reads() - before.client_reads() - after.infos - counts.idle_reads * elapsed
        )
        / requests,
        names={name: v for name, v in per_name.items() if v >= 0.005},
    )


def measure_monitored(
    redis: RedisTarget, port: int, system: System, requests: int, counts: RedisCounts
) -> None:
    """``requests`` sequential touches of a new anonymous session, under MONITOR."""
    seen = monitor_touches(redis, port, session_cookie(port, system), requests, counts)
    counts.monitor_requests = seen.requests
    counts.monitor_client_commands = seen.client_commands
    counts.monitor_lua_commands = seen.lua_commands
    counts.monitor_reads = seen.reads
    counts.monitor_names = seen.names


def counted(
    redis: RedisTarget, counts: RedisCounts, into: PerRequest, run: Callable[[], WrkResult]
) -> tuple[WrkResult, RedisSnapshot, RedisSnapshot]:
    """``run`` (one wrk run) between two snapshots; its round trips and commands per
    request, the idle rates subtracted, appended to ``into``; the result and snapshots."""
    before = redis.snapshot()
    result = run()
    after = redis.snapshot()
    elapsed = after.at - before.at
    requests = max(result.requests, 1)
    reads = after.client_reads() - before.client_reads() - after.infos - counts.idle_reads * elapsed
    commands = after.commands() - before.commands() - counts.idle_commands * elapsed
    into.reads.append(reads / requests)
    into.commands.append(commands / requests)
    return result, before, after
