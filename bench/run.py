"""lapse and its peers on the seed program's GET /logme: one command, one table, one chart.

Run with ``make bench`` (or ``.venv/bin/python bench/run.py --help`` for the options).
See bench/README.md for what each system is and what each number means.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import http.client
import json
import os
import platform
import re
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from importlib import metadata
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
REPO_DIR = BENCH_DIR.parent
SERVERS_DIR = BENCH_DIR / "servers"
LAPSE_EXAMPLE = REPO_DIR / "examples" / "session_endings.py"
MEMORY_PROBE = BENCH_DIR / "memory_probe.py"
EXPIRY_LATENESS = BENCH_DIR / "expiry_lateness.py"
RESULTS_DIR = BENCH_DIR / "results"
DEFAULT_CHART = BENCH_DIR / "chart.png"
LISTEN_LINE = "listenTCP(8080, factory)"
HOST = "127.0.0.1"
PATH = "/logme"
LONG_TIMEOUT = 3600
"""sessionTimeout of the extra live sessions of the "many live sessions" figure."""
LIVE_COUNT_LINE = re.compile(r"^bench: (\d+) live sessions$", re.MULTILINE)


# ---------------------------------------------------------------------------- systems


def cookie_value_identity(value: str) -> str:
    """A session cookie that names a server-side session: the value is the identity."""
    return value


def starlette_identity(value: str) -> str:
    """Starlette's cookie is base64(JSON).timestamp.signature: the identity is the
    random ``uid`` the handler puts in the session on first sight."""
    try:
        payload = json.loads(base64.b64decode(value.split(".", 1)[0]))
        return str(payload["uid"])
    except (ValueError, KeyError, TypeError):
        return value


@dataclass(frozen=True)
class System:
    key: str
    label: str
    kind: str
    """lapse, twisted, aiohttp, starlette or bare: which server program."""
    store: str = ""
    """lapse: memory, sqlite or redis; aiohttp: memory or redis."""
    cookie: str | None = None
    """The session cookie's name; None: no sessions (bare uvicorn)."""
    identity: Callable[[str], str] = cookie_value_identity
    probe: str | None = None
    """memory_probe.py's --system for the memory figure, if measured."""
    live: bool = False
    """Whether the "touch with many live sessions" figure is measured."""

    @property
    def redis(self) -> bool:
        return self.store == "redis"


SYSTEMS: dict[str, System] = {
    s.key: s
    for s in (
        System("lapse-memory", "lapse (memory)", "lapse", "memory", "lapse_session",
               probe="lapse", live=True),
        System("lapse-sqlite", "lapse (SQLite)", "lapse", "sqlite", "lapse_session"),
        System("lapse-redis", "lapse (Redis)", "lapse", "redis", "lapse_session"),
        System("twisted", "Twisted", "twisted", "memory", "TWISTED_SESSION",
               probe="twisted", live=True),
        System("aiohttp-memory", "aiohttp-session (dict store)", "aiohttp", "memory",
               "AIOHTTP_SESSION", probe="aiohttp"),
        System("aiohttp-redis", "aiohttp-session (Redis)", "aiohttp", "redis",
               "AIOHTTP_SESSION"),
        System("starlette", "Starlette SessionMiddleware (signed cookie)", "starlette",
               cookie="session", identity=starlette_identity),
        System("uvicorn-bare", "bare uvicorn (no sessions)", "bare"),
    )
}  # fmt: skip
REFERENCE = "lapse-memory"
BARE = "uvicorn-bare"


# ---------------------------------------------------------------------------- options


@dataclass(frozen=True)
class Options:
    systems: list[str]
    duration: int
    repeats: int
    warmup: int
    create_warmup: int
    threads: int
    connections: int
    memory_counts: list[int]
    live_sessions: int
    live_repeats: int
    expiry_sessions: int
    expiry_window: float
    expiry_stores: str
    idle_seconds: float
    monitor_requests: int
    redis_url: str | None
    out: Path | None
    strict: bool

    @property
    def results_dir(self) -> Path:
        return self.out if self.out is not None else RESULTS_DIR

    @property
    def table_path(self) -> Path:
        return self.results_dir / "latest.md"

    @property
    def chart_path(self) -> Path:
        return self.out / "chart.png" if self.out is not None else DEFAULT_CHART


def int_list(text: str) -> list[int]:
    return [int(c.replace("_", "")) for c in text.split(",") if c.strip()]


def parse_options(argv: list[str] | None = None) -> Options:
    parser = argparse.ArgumentParser(
        description="Benchmark lapse against its peers on GET /logme (see bench/README.md)."
    )
    parser.add_argument(
        "--systems",
        default=",".join(SYSTEMS),
        help=f"comma-separated subset of {','.join(SYSTEMS)} (default: all)",
    )
    parser.add_argument("--duration", type=int, default=4, help="seconds per wrk run (4)")
    parser.add_argument("--repeats", type=int, default=5, help="wrk runs per figure, >= 3 (5)")
    parser.add_argument("--warmup", type=int, default=1, help="discarded wrk seconds (1; 0=off)")
    parser.add_argument(
        "--create-warmup",
        type=int,
        default=6,
        help="discarded wrk seconds before the create runs, > the 5 s session timeout so that "
        "sessions expire as fast as they are made while measuring (6; 0=off)",
    )
    parser.add_argument("--threads", type=int, default=1, help="wrk -t (1)")
    parser.add_argument("--connections", type=int, default=50, help="wrk -c (50)")
    parser.add_argument(
        "--memory-counts",
        default="100000,1000000",
        help="comma-separated live-session counts for the in-process memory probe "
        "(100000,1000000; empty: skip)",
    )
    parser.add_argument(
        "--live-sessions",
        type=int,
        default=1_000_000,
        help="extra live sessions for the 'touch with many live sessions' figure "
        "(1000000; 0: skip)",
    )
    parser.add_argument(
        "--live-repeats",
        type=int,
        default=9,
        help="alternating wrk runs per server for the many-live-sessions figure (9; its two "
        "medians are compared, and run-to-run noise on this machine is about 10 %%)",
    )
    parser.add_argument(
        "--expiry-sessions",
        type=int,
        default=100_000,
        help="sessions for the expiry-lateness figure (100000; 0: skip)",
    )
    parser.add_argument(
        "--expiry-window", type=float, default=60, help="their deadlines spread over s (60)"
    )
    parser.add_argument(
        "--expiry-stores",
        default="memory",
        help="stores for expiry lateness: memory (default) or e.g. memory,sqlite,redis",
    )
    parser.add_argument(
        "--idle-seconds",
        type=float,
        default=2,
        help="Redis systems: seconds without traffic to measure the idle command rate (2)",
    )
    parser.add_argument(
        "--monitor-requests",
        type=int,
        default=200,
        help="Redis systems: sequential requests watched with MONITOR (200)",
    )
    parser.add_argument(
        "--redis-url",
        default=None,
        help="use this (otherwise idle) redis-server instead of starting one; it is not "
        "flushed (default: start our own on a free loopback port)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="write latest.md and chart.png here (default: bench/results/latest.md and "
        "bench/chart.png)",
    )
    parser.add_argument("--strict", action="store_true", help="exit 1 if a target is missed")
    args = parser.parse_args(argv)
    if args.repeats < 3:
        parser.error("--repeats must be at least 3")
    if args.live_repeats < 3:
        parser.error("--live-repeats must be at least 3")
    systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    unknown = [s for s in systems if s not in SYSTEMS]
    if not systems or unknown:
        parser.error(f"--systems: unknown {unknown}; choose from {','.join(SYSTEMS)}")
    systems = [s for s in SYSTEMS if s in systems]  # the table's order
    if args.duration < 1 or args.threads < 1 or args.connections < args.threads:
        parser.error("need --duration >= 1 and --connections >= --threads >= 1")
    return Options(
        systems=systems,
        duration=args.duration,
        repeats=args.repeats,
        warmup=args.warmup,
        create_warmup=args.create_warmup,
        threads=args.threads,
        connections=args.connections,
        memory_counts=int_list(args.memory_counts),
        live_sessions=args.live_sessions,
        live_repeats=args.live_repeats,
        expiry_sessions=args.expiry_sessions,
        expiry_window=args.expiry_window,
        expiry_stores=args.expiry_stores,
        idle_seconds=args.idle_seconds,
        monitor_requests=args.monitor_requests,
        redis_url=args.redis_url,
        out=args.out,
        strict=args.strict,
    )


# ---------------------------------------------------------------------------- wrk


@dataclass(frozen=True)
class WrkResult:
    rps: float
    requests: int
    non_2xx: int
    socket_errors: int
    p99_ms: float | None

    @property
    def errors(self) -> int:
        return self.non_2xx + self.socket_errors


def ensure_wrk() -> str:
    found = shutil.which("wrk")
    if found:
        return found
    print("wrk not found; installing the Debian package", flush=True)
    install = ["apt-get", "install", "-y", "wrk"]
    if subprocess.run(install, check=False).returncode != 0:
        subprocess.run(["apt-get", "update"], check=True)
        subprocess.run(install, check=True)
    found = shutil.which("wrk")
    if not found:
        raise SystemExit("wrk is still not on PATH after apt-get install")
    return found


_UNIT_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0}


def parse_wrk(output: str) -> WrkResult:
    rps = re.search(r"^Requests/sec:\s+([\d.]+)", output, re.MULTILINE)
    if rps is None:
        raise RuntimeError(f"no 'Requests/sec:' in wrk output:\n{output}")
    total = re.search(r"^\s*(\d+) requests in", output, re.MULTILINE)
    non_2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", output)
    sock = re.search(
        r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output
    )
    p99 = re.search(r"^\s*99%\s+([\d.]+)(us|ms|s|m)\s*$", output, re.MULTILINE)
    return WrkResult(
        rps=float(rps.group(1)),
        requests=int(total.group(1)) if total else 0,
        non_2xx=int(non_2xx.group(1)) if non_2xx else 0,
        socket_errors=sum(int(n) for n in sock.groups()) if sock else 0,
        p99_ms=float(p99.group(1)) * _UNIT_MS[p99.group(2)] if p99 else None,
    )


# ---------------------------------------------------------------------------- HTTP


def get_logme(port: int, cookie: str | None = None) -> tuple[int, list[str]]:
    """One GET /logme; returns (status, the Set-Cookie headers)."""
    conn = http.client.HTTPConnection(HOST, port, timeout=5)
    try:
        headers = {"Cookie": cookie} if cookie is not None else {}
        conn.request("GET", PATH, headers=headers)
        response = conn.getresponse()
        response.read()
        return response.status, response.msg.get_all("Set-Cookie") or []
    finally:
        conn.close()


def parse_set_cookies(headers: list[str]) -> dict[str, str]:
    """Cookie name -> value, from Set-Cookie headers (one cookie each)."""
    found: dict[str, str] = {}
    for header in headers:
        name, sep, value = header.split(";", 1)[0].partition("=")
        if sep:
            found[name.strip()] = value.strip().strip('"')
    return found


def session_cookie(port: int, system: System) -> str:
    """Create a session with a cookie-less GET; return it as ``NAME=VALUE``.

    Bare uvicorn has no sessions: it gets a made-up cookie (64 hex digits), so
    that its requests are about as large as the session systems'.
    """
    if system.cookie is None:
        return f"bench={secrets.token_hex(32)}"
    status, set_cookies = get_logme(port)
    cookies = parse_set_cookies(set_cookies)
    if status != 200 or system.cookie not in cookies:
        raise RuntimeError(
            f"GET {PATH} gave status {status}, Set-Cookie {set_cookies!r}; "
            f"expected a {system.cookie} cookie"
        )
    return f"{system.cookie}={cookies[system.cookie]}"


def session_kept(port: int, system: System, cookie: str) -> bool:
    """Whether a GET with ``cookie`` still finds the same session: no new Set-Cookie,
    or one naming the same session (aiohttp-session and Starlette re-send theirs)."""
    status, set_cookies = get_logme(port, cookie)
    if status != 200:
        return False
    if system.cookie is None:
        return True
    fresh = parse_set_cookies(set_cookies).get(system.cookie)
    if fresh is None:
        return True
    return system.identity(fresh) == system.identity(cookie.split("=", 1)[1])


# ---------------------------------------------------------------------------- redis


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

    def store_url(self, prefix: str) -> str:
        return f"{self.url}{'&' if '?' in self.url else '?'}prefix={prefix}"

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


# ---------------------------------------------------------------------------- servers


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


def lapse_script(port: int, workdir: Path, extra_sessions: int) -> Path:
    """The repo's example with only its listen line changed to our port and loopback;
    with ``extra_sessions``, code that makes that many long-lived sessions is
    inserted just before that line."""
    source = LAPSE_EXAMPLE.read_text()
    if source.count(LISTEN_LINE) != 1:
        raise RuntimeError(f"expected exactly one {LISTEN_LINE!r} in {LAPSE_EXAMPLE}")
    patched = source.replace(LISTEN_LINE, f'listenTCP({port}, factory, interface="{HOST}")')
    if extra_sessions:
        for name in ("class ShortSession(Session)", "factory = Site(", "import Site, Session"):
            if name not in source:
                raise RuntimeError(f"{LAPSE_EXAMPLE} has no {name!r}: cannot add sessions")
        lines = patched.splitlines(keepends=True)
        at = next(i for i, line in enumerate(lines) if "listenTCP(" in line)
        inserted = [
            "# -- inserted by bench/run.py: extra live sessions, then the seed as it was --\n",
            "import sys as _bench_sys\n",
            "\n\n",
            "class _BenchLongSession(Session):\n",
            f"    sessionTimeout = {LONG_TIMEOUT}\n",
            "\n\n",
            "factory.sessionFactory = _BenchLongSession\n",
            f"for _ in range({extra_sessions}):\n",
            "    factory.makeSession()\n",
            'print(f"bench: {len(factory.sessions)} live sessions", '
            "file=_bench_sys.stderr, flush=True)\n",
            "factory.sessionFactory = ShortSession\n",
            "# -- end of insertion --\n",
        ]
        patched = "".join(lines[:at] + inserted + lines[at:])
    script = workdir / "lapse_session_endings.py"
    script.write_text(patched)
    return script


def server_command(
    system: System, port: int, workdir: Path, extra: int, redis: RedisHandle | None
) -> tuple[list[str], dict[str, str]]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LAPSE_")}
    py = sys.executable
    if system.redis and redis is None:
        raise RuntimeError("no redis-server for a Redis system")
    if system.kind == "lapse":
        if system.store == "memory":
            env["LAPSE_SESSION_STORE"] = "memory:"
        elif system.store == "sqlite":
            env["LAPSE_SESSION_STORE"] = f"sqlite:///{workdir}/sessions.db"
        else:
            assert redis is not None
            env["LAPSE_SESSION_STORE"] = redis.store_url(f"bench-{secrets.token_hex(4)}")
        return [py, str(lapse_script(port, workdir, extra))], env
    if system.kind == "twisted":
        cmd = [py, str(SERVERS_DIR / "twisted_seed.py"), str(port)]
        return cmd + (["--extra-sessions", str(extra)] if extra else []), env
    if extra:
        raise RuntimeError(f"{system.key} cannot start with extra sessions")
    if system.kind == "aiohttp":
        cmd = [py, str(SERVERS_DIR / "aiohttp_seed.py"), str(port)]
        if system.redis:
            assert redis is not None
            cmd += ["--redis", redis.url]
        return cmd, env
    script = {"starlette": "starlette_seed.py", "bare": "bare_asgi.py"}[system.kind]
    return [py, str(SERVERS_DIR / script), str(port)], env


def wait_until_answering(
    proc: subprocess.Popen[bytes], port: int, log: Path, timeout: float
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        with contextlib.suppress(OSError, http.client.HTTPException):
            get_logme(port)
            return
        time.sleep(0.1)
    raise RuntimeError(f"server on port {port} did not answer within {timeout:.0f} s")


def stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM the server we started (by its PID), SIGKILL it if it lingers."""
    if proc.poll() is not None:
        return
    os.kill(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()


@dataclass
class Bench:
    """What every scenario needs."""

    opts: Options
    wrk: str
    redis: RedisHandle | None
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    load_at_start: str = field(
        default_factory=lambda: " ".join(f"{x:.2f}" for x in os.getloadavg())
    )

    def run_wrk(self, port: int, seconds: int, cookie: str | None) -> WrkResult:
        opts = self.opts
        cmd = [self.wrk, f"-t{opts.threads}", f"-c{opts.connections}", f"-d{seconds}s"]
        cmd.append("--latency")
        if cookie is not None:
            cmd += ["-H", f"Cookie: {cookie}"]
        cmd.append(f"http://{HOST}:{port}{PATH}")
        done = subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=seconds + 60)
        return parse_wrk(done.stdout)

    @contextlib.contextmanager
    def server(self, system: System, extra: int = 0) -> Iterator[int]:
        """Start one server on a free loopback port; yield the port; always stop it."""
        if system.redis and self.redis is not None:
            self.redis.flush()
        with tempfile.TemporaryDirectory(prefix=f"bench-{system.key}-") as tmp:
            workdir = Path(tmp)
            port = free_port()
            log = workdir / "stderr.log"
            cmd, env = server_command(system, port, workdir, extra, self.redis)
            with log.open("wb") as stderr:
                # stdout (a line per expired session) goes to DEVNULL: it can never fill a pipe.
                proc = subprocess.Popen(
                    cmd,
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                    stderr=stderr,
                    cwd=REPO_DIR,
                    env=env,
                )
                try:
                    wait_until_answering(proc, port, log, 30 + 90 * extra / 1e6)
                    if extra:
                        seen = LIVE_COUNT_LINE.findall(log.read_text())
                        if not seen or int(seen[-1]) != extra:
                            self.problems.append(
                                f"{system.label}: started with {seen[-1] if seen else '?'} "
                                f"extra live sessions, expected {extra:,}"
                            )
                    yield port
                finally:
                    stop(proc)


# ---------------------------------------------------------------------------- scenarios


@dataclass(frozen=True)
class TouchRun:
    result: WrkResult
    kept: bool


@dataclass
class Outcome:
    """Everything measured for one system."""

    touch: list[TouchRun] = field(default_factory=list)
    create: list[WrkResult] = field(default_factory=list)
    memory: dict[int, dict[str, Any]] = field(default_factory=dict)
    live_base: list[TouchRun] = field(default_factory=list)
    live_many: list[TouchRun] = field(default_factory=list)
    redis: RedisCounts | None = None
    failed: list[str] = field(default_factory=list)


def touch_once(b: Bench, system: System, port: int, seconds: int) -> TouchRun:
    """One wrk run on a session made just before it; then check the session is still there.

    A fresh session per run: current Twisted does not refresh a session it finds by cookie,
    and Starlette's cookie is not re-read by wrk, so one session reused across runs would
    expire 5 s after creation (see README).
    """
    cookie = session_cookie(port, system)
    result = b.run_wrk(port, seconds, cookie)
    return TouchRun(result, session_kept(port, system, cookie))


def bench_touch(b: Bench, system: System, outcome: Outcome) -> None:
    opts = b.opts
    with b.server(system) as port:
        if opts.warmup > 0:
            touch_once(b, system, port, opts.warmup)
        counts = None
        if system.redis and b.redis is not None:
            counts = outcome.redis = RedisCounts()
            measure_idle(b.redis, opts.idle_seconds, counts)
        for _ in range(opts.repeats):
            if counts is None or b.redis is None:
                outcome.touch.append(touch_once(b, system, port, opts.duration))
                continue
            cookie = session_cookie(port, system)
            before = b.redis.snapshot()
            result = b.run_wrk(port, opts.duration, cookie)
            after = b.redis.snapshot()
            outcome.touch.append(TouchRun(result, session_kept(port, system, cookie)))
            elapsed = after.at - before.at
            requests = max(result.requests, 1)
            reads = after.reads - before.reads - 1 - counts.idle_reads * elapsed
            commands = after.commands() - before.commands() - counts.idle_commands * elapsed
            counts.reads_per_request.append(reads / requests)
            counts.commands_per_request.append(commands / requests)
            for name, n in after.calls.items():
                delta = n - before.calls.get(name, 0)
                if delta and name != "info":
                    share = delta / requests / opts.repeats
                    counts.breakdown[name] = counts.breakdown.get(name, 0.0) + share
        if counts is not None and b.redis is not None and opts.monitor_requests > 0:
            measure_monitored(b.redis, port, system, opts.monitor_requests, counts)


def bench_create(b: Bench, system: System, outcome: Outcome) -> None:
    opts = b.opts
    with b.server(system) as port:
        if opts.create_warmup > 0:
            b.run_wrk(port, opts.create_warmup, None)
        outcome.create = [b.run_wrk(port, opts.duration, None) for _ in range(opts.repeats)]


def bench_live(b: Bench, system: System, outcome: Outcome) -> None:
    """Touch runs on two servers alive side by side, one with ``--live-sessions``
    extra sessions: measured alternately, so that drift hits both alike."""
    opts = b.opts
    with b.server(system) as base_port, b.server(system, opts.live_sessions) as many_port:
        if opts.warmup > 0:
            touch_once(b, system, base_port, opts.warmup)
            touch_once(b, system, many_port, opts.warmup)
        for _ in range(opts.live_repeats):
            outcome.live_base.append(touch_once(b, system, base_port, opts.duration))
            outcome.live_many.append(touch_once(b, system, many_port, opts.duration))


def bench_memory(system: System, count: int, outcome: Outcome) -> None:
    assert system.probe is not None
    cmd = [sys.executable, str(MEMORY_PROBE), "--system", system.probe, "--count", str(count)]
    env = {k: v for k, v in os.environ.items() if not k.startswith("LAPSE_")}
    done = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=1800, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"memory probe failed for {system.key} {count}:\n{done.stderr}")
    outcome.memory[count] = json.loads(done.stdout.strip().splitlines()[-1])


def bench_expiry(b: Bench, into: list[dict[str, Any]]) -> None:
    opts = b.opts
    with tempfile.TemporaryDirectory(prefix="bench-expiry-") as tmp:
        json_path = Path(tmp) / "expiry.json"
        cmd = [
            sys.executable,
            str(EXPIRY_LATENESS),
            "--stores",
            opts.expiry_stores,
            "--sessions",
            str(opts.expiry_sessions),
            "--window",
            str(opts.expiry_window),
            "--results",
            str(opts.results_dir / "latest_expiry_lateness.md"),
            "--json",
            str(json_path),
        ]
        env = {k: v for k, v in os.environ.items() if not k.startswith("LAPSE_")}
        budget = opts.expiry_window + 120 + opts.expiry_sessions / 500
        done = subprocess.run(
            cmd, capture_output=True, text=True, check=False, timeout=budget * 3, env=env
        )
        if not json_path.exists():
            raise RuntimeError(
                f"expiry_lateness.py exited {done.returncode}:\n{done.stderr[-3000:]}"
            )
        into.extend(json.loads(json_path.read_text()))


def run_step(b: Bench, outcome: Outcome | None, label: str, step: Callable[[], None]) -> None:
    print(f"  {label} ...", end="", flush=True)
    started = time.monotonic()
    try:
        step()
    except Exception as exc:
        print(f" FAILED after {time.monotonic() - started:.0f} s: {exc}", flush=True)
        b.problems.append(f"{label} failed: {type(exc).__name__}: {exc}")
        if outcome is not None:
            outcome.failed.append(label)
        return
    print(f" {time.monotonic() - started:.0f} s", flush=True)


@dataclass
class Results:
    outcomes: dict[str, Outcome]
    expiry: list[dict[str, Any]]
    seconds: float = 0.0


def run_all(b: Bench) -> Results:
    opts = b.opts
    outcomes = {key: Outcome() for key in opts.systems}
    results = Results(outcomes, [])
    for key in opts.systems:
        system, outcome = SYSTEMS[key], outcomes[key]
        print(f"{system.label}:", flush=True)
        touch = partial(bench_touch, b, system, outcome)
        run_step(b, outcome, f"{system.label}: touch existing session", touch)
        create = partial(bench_create, b, system, outcome)
        run_step(b, outcome, f"{system.label}: create sessions", create)
    for key in opts.systems:
        system, outcome = SYSTEMS[key], outcomes[key]
        if system.probe is None or not opts.memory_counts:
            continue
        print(f"{system.label}:", flush=True)
        for count in opts.memory_counts:
            probe = partial(bench_memory, system, count, outcome)
            run_step(b, outcome, f"{system.label}: memory, {count:,} sessions", probe)
    if opts.live_sessions > 0:
        for key in opts.systems:
            system, outcome = SYSTEMS[key], outcomes[key]
            if system.live:
                print(f"{system.label}:", flush=True)
                live = partial(bench_live, b, system, outcome)
                label = f"{system.label}: touch, 1 vs {opts.live_sessions:,} live"
                run_step(b, outcome, label, live)
    if opts.expiry_sessions > 0 and REFERENCE in opts.systems:
        print("lapse expiry lateness:", flush=True)
        label = f"expiry lateness, {opts.expiry_sessions:,} sessions in {opts.expiry_window:g} s"
        run_step(b, None, label, partial(bench_expiry, b, results.expiry))
    return results


# ---------------------------------------------------------------------------- figures


def median_or_none(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def touch_rps(outcome: Outcome | None) -> float | None:
    if outcome is None or not outcome.touch:
        return None
    return statistics.median(r.result.rps for r in outcome.touch)


def create_rps(outcome: Outcome | None) -> float | None:
    if outcome is None or not outcome.create:
        return None
    return statistics.median(r.rps for r in outcome.create)


def runs_rps(runs: list[TouchRun]) -> float | None:
    return statistics.median(r.result.rps for r in runs) if runs else None


def memory_per_session(outcome: Outcome | None, count: int) -> float | None:
    if outcome is None or count not in outcome.memory:
        return None
    return float(outcome.memory[count]["bytes_per_session"])


@dataclass(frozen=True)
class Target:
    name: str
    measured: str
    value: float | None
    threshold: float
    higher_is_better: bool = True

    @property
    def verdict(self) -> str:
        if self.value is None:
            return "n/a"
        ok = self.value >= self.threshold if self.higher_is_better else self.value <= self.threshold
        return "PASS" if ok else "MISS"


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or not denominator:
        return None
    return numerator / denominator


def targets(results: Results, opts: Options) -> list[Target]:
    o = results.outcomes.get
    lapse, twisted = o(REFERENCE), o("twisted")
    bare, lapse_redis, aio_redis = o(BARE), o("lapse-redis"), o("aiohttp-redis")
    top = max(opts.memory_counts) if opts.memory_counts else 0
    memory_ratio = ratio(memory_per_session(lapse, top), memory_per_session(twisted, top))
    live_ratio = ratio(
        runs_rps(lapse.live_many) if lapse else None, runs_rps(lapse.live_base) if lapse else None
    )
    memory_expiry = next((e for e in results.expiry if e["store"] == "memory"), None)
    p99 = memory_expiry["p99_ms"] if memory_expiry else None
    return [
        Target(
            "touch req/s: lapse (memory) >= 0.8 x bare uvicorn",
            "lapse / bare uvicorn",
            ratio(touch_rps(lapse), touch_rps(bare)),
            0.8,
        ),
        Target(
            "touch req/s: lapse (memory) >= 2.5 x Twisted",
            "lapse / Twisted",
            ratio(touch_rps(lapse), touch_rps(twisted)),
            2.5,
        ),
        Target(
            "create req/s: lapse (memory) >= 2.5 x Twisted",
            "lapse / Twisted",
            ratio(create_rps(lapse), create_rps(twisted)),
            2.5,
        ),
        Target(
            f"memory per live session at {top:,}: lapse <= 1/3 of Twisted",
            "lapse / Twisted",
            memory_ratio,
            1 / 3,
            higher_is_better=False,
        ),
        Target(
            f"touch req/s with {opts.live_sessions:,} live sessions within 10 % of 1 live "
            "(lapse, memory)",
            f"{opts.live_sessions:,} live / 1 live",
            live_ratio,
            0.9,
        ),
        Target(
            "expiry lateness p99 <= 10 ms (memory store)",
            "p99 ms",
            p99,
            10.0,
            higher_is_better=False,
        ),
        Target(
            "touch req/s: lapse (Redis) >= 4 x aiohttp-session (Redis)",
            "lapse Redis / aiohttp Redis",
            ratio(touch_rps(lapse_redis), touch_rps(aio_redis)),
            4.0,
        ),
        Target(
            "touch req/s: lapse (Redis) >= 0.5 x lapse (memory)",
            "lapse Redis / lapse memory",
            ratio(touch_rps(lapse_redis), touch_rps(lapse)),
            0.5,
        ),
    ]


# ---------------------------------------------------------------------------- report


def version_of(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def wrk_version(wrk: str) -> str:
    done = subprocess.run([wrk, "-v"], capture_output=True, text=True, check=False)
    first = (done.stdout or done.stderr).strip().splitlines()
    return first[0].split(" [")[0] if first else "wrk ?"


def lapse_source() -> str:
    """Where the servers import lapse from, and the git state of this repo's src/."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LAPSE_")}
    done = subprocess.run(
        [sys.executable, "-c", "import lapse; print(lapse.__file__)"],
        capture_output=True, text=True, check=False, env=env,
    )  # fmt: skip
    where = Path(done.stdout.strip() or ".").resolve().parent.parent
    git = ["git", "-C", str(REPO_DIR)]
    head = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True,
                          text=True, check=False).stdout.strip()  # fmt: skip
    dirty = subprocess.run([*git, "status", "--porcelain", "src"], capture_output=True,
                           text=True, check=False).stdout.strip()  # fmt: skip
    if where == REPO_DIR / "src":
        state = "with uncommitted changes in src/" if dirty else "src/ clean"
        return f"this repo's src/ (git {head or '?'}, {state})"
    return f"{where} (not this repo's src/; repo at git {head or '?'})"


def num(value: float | None, fmt: str = ",.0f", unit: str = "") -> str:
    return "—" if value is None else f"{value:{fmt}}{unit}"


def times(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}x"


def errors_note(results: list[WrkResult]) -> str:
    errors = sum(r.errors for r in results)
    return f" ⚠ {errors} errors" if errors else ""


def kept_cell(system: System, runs: list[TouchRun]) -> str:
    if not runs:
        return "—"
    if system.cookie is None:
        return "n/a"
    kept = sum(r.kept for r in runs)
    return f"{kept}/{len(runs)}" + ("" if kept == len(runs) else " ⚠")


def throughput_table(results: Results) -> list[str]:
    outcomes = results.outcomes
    ref_touch = touch_rps(outcomes.get(REFERENCE))
    ref_create = create_rps(outcomes.get(REFERENCE))
    lines = [
        "| System | touch req/s | vs lapse | touch p99 | create req/s | vs lapse | create p99 "
        "| session kept |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for key, outcome in outcomes.items():
        system = SYSTEMS[key]
        touch_results = [r.result for r in outcome.touch]
        t, c = touch_rps(outcome), create_rps(outcome)
        t_p99 = median_or_none([r.p99_ms for r in touch_results])
        c_p99 = median_or_none([r.p99_ms for r in outcome.create])
        lines.append(
            f"| {system.label} | {num(t)}{errors_note(touch_results)} "
            f"| {times(ratio(t, ref_touch))} "
            f"| {num(t_p99, '.2f', ' ms')} | {num(c)}{errors_note(outcome.create)} "
            f"| {times(ratio(c, ref_create))} | {num(c_p99, '.2f', ' ms')} "
            f"| {kept_cell(system, outcome.touch)} |"
        )
    return lines


def memory_table(results: Results, opts: Options) -> list[str]:
    probed = [k for k, o in results.outcomes.items() if o.memory]
    if not probed:
        return []
    head = "| System |" + "".join(f" {c:,} sessions | vs lapse |" for c in opts.memory_counts)
    lines = [head, "|---|" + "---:|---:|" * len(opts.memory_counts)]
    ref = results.outcomes.get(REFERENCE)
    for key in probed:
        outcome = results.outcomes[key]
        cells = []
        for count in opts.memory_counts:
            value = memory_per_session(outcome, count)
            flag = ""
            if count in outcome.memory and not outcome.memory[count]["count_ok"]:
                flag = " ⚠ wrong count"
            cells.append(
                f" {num(value, ',.0f', ' B')}{flag} | "
                f"{times(ratio(value, memory_per_session(ref, count)))} |"
            )
        lines.append(f"| {SYSTEMS[key].label} |" + "".join(cells))
    return lines


def live_table(results: Results, opts: Options) -> list[str]:
    rows = [(k, o) for k, o in results.outcomes.items() if o.live_base or o.live_many]
    if not rows:
        return []
    n = f"{opts.live_sessions:,}"
    lines = [
        f"| System | touch req/s, 1 live | touch req/s, {n} live | {n} / 1 | p99, 1 live "
        f"| p99, {n} live | session kept |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for key, o in rows:
        base, many = runs_rps(o.live_base), runs_rps(o.live_many)
        base_p99 = median_or_none([r.result.p99_ms for r in o.live_base])
        many_p99 = median_or_none([r.result.p99_ms for r in o.live_many])
        lines.append(
            f"| {SYSTEMS[key].label} | {num(base)}{errors_note([r.result for r in o.live_base])} "
            f"| {num(many)}{errors_note([r.result for r in o.live_many])} "
            f"| {times(ratio(many, base))} | {num(base_p99, '.2f', ' ms')} "
            f"| {num(many_p99, '.2f', ' ms')} "
            f"| {kept_cell(SYSTEMS[key], o.live_base + o.live_many)} |"
        )
    return lines


def expiry_table(results: Results) -> list[str]:
    if not results.expiry:
        return []
    lines = [
        "| Store | sessions | window | delivered | missing | duplicates | p50 | p99 | max |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for e in results.expiry:
        lines.append(
            f"| {e['store']} | {e['sessions']:,} | {e['window']:g} s | {e['deliveries']:,} "
            f"| {e['missing']} | {e['duplicates']} | {num(e['p50_ms'], '.1f', ' ms')} "
            f"| {num(e['p99_ms'], '.1f', ' ms')} | {num(e['max_ms'], '.1f', ' ms')} |"
        )
    return lines


def redis_table(results: Results) -> list[str]:
    rows = [(k, o.redis) for k, o in results.outcomes.items() if o.redis is not None]
    if not rows:
        return []
    lines = [
        "| System | round trips / touch under wrk (server read events) "
        "| Redis commands / touch (incl. inside Lua) "
        "| client commands / touch (MONITOR) | idle round trips/s | idle commands/s "
        "| one request at a time: commands == round trips |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for key, c in rows:
        assert c is not None
        monitored = c.monitor_requests > 0
        names = ", ".join(f"{n} {v:.2f}" for n, v in c.monitor_names.items())
        claim = ("yes" if c.claim_holds else "**no**") if monitored else "—"
        client = f"{c.monitor_client_commands:.2f} ({names})" if monitored else "—"
        lines.append(
            f"| {SYSTEMS[key].label} | {num(median_or_none(list(c.reads_per_request)), '.2f')} "
            f"| {num(median_or_none(list(c.commands_per_request)), '.2f')} | {client} "
            f"| {c.idle_reads:.1f} | {c.idle_commands:.1f} | {claim} |"
        )
    return lines


def targets_lines(found: list[Target]) -> list[str]:
    lines = ["| Target | measured | value | verdict |", "|---|---|---:|---|"]
    for t in found:
        value = "—" if t.value is None else f"{t.value:.2f}"
        lines.append(f"| {t.name} | {t.measured} | {value} | {t.verdict} |")
    return lines


def raw_lines(results: Results) -> list[str]:
    lines = [
        "| System | Figure | Repeats (requests/s) | p99 (ms) | Requests | Non-2xx "
        "| Socket errors |",
        "|---|---|---|---|---:|---:|---:|",
    ]
    for key, o in results.outcomes.items():
        series = (
            ("touch", [r.result for r in o.touch]),
            ("create", o.create),
            ("touch, 1 live", [r.result for r in o.live_base]),
            ("touch, many live", [r.result for r in o.live_many]),
        )
        for figure, runs in series:
            if not runs:
                continue
            repeats = ", ".join(f"{r.rps:,.0f}" for r in runs)
            p99s = ", ".join(num(r.p99_ms, ".2f") for r in runs)
            lines.append(
                f"| {SYSTEMS[key].label} | {figure} | {repeats} | {p99s} "
                f"| {sum(r.requests for r in runs):,} | {sum(r.non_2xx for r in runs)} "
                f"| {sum(r.socket_errors for r in runs)} |"
            )
    memory = [(k, o) for k, o in results.outcomes.items() if o.memory]
    if memory:
        lines += [
            "",
            "| System | Sessions | live | RSS before | RSS after | Bytes/session | make time |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        for key, o in memory:
            for count, m in o.memory.items():
                lines.append(
                    f"| {SYSTEMS[key].label} | {count:,} | {m['live_sessions']:,} "
                    f"| {m['rss_before'] / 2**20:,.1f} MiB | {m['rss_after'] / 2**20:,.1f} MiB "
                    f"| {m['bytes_per_session']:,.1f} | {m['make_seconds']:.2f} s |"
                )
    redis_rows = [(k, o.redis) for k, o in results.outcomes.items() if o.redis is not None]
    if redis_rows:
        lines += [
            "",
            "| System | round trips / touch, per run | commands / touch, per run "
            "| commands by name / touch (wrk runs, idle not subtracted) "
            "| MONITOR: requests, Lua-internal / touch, round trips / touch "
            "| idle: s, client commands/s |",
            "|---|---|---|---|---|---|",
        ]
        for key, c in redis_rows:
            assert c is not None
            by_name = ", ".join(
                f"{n} {v:.2f}" for n, v in sorted(c.breakdown.items()) if v >= 0.005
            )
            idle_names = ", ".join(f"{n} {v:.1f}" for n, v in c.idle_names.items())
            lines.append(
                f"| {SYSTEMS[key].label} "
                f"| {', '.join(f'{v:.2f}' for v in c.reads_per_request)} "
                f"| {', '.join(f'{v:.2f}' for v in c.commands_per_request)} | {by_name} "
                f"| {c.monitor_requests}, {c.monitor_lua_commands:.2f}, {c.monitor_reads:.2f} "
                f"| {c.idle_seconds:.1f}, {c.idle_client_commands:.1f} ({idle_names}) |"
            )
    return lines


def find_problems(b: Bench, results: Results) -> list[str]:
    found = list(b.problems)
    for key, o in results.outcomes.items():
        label = SYSTEMS[key].label
        runs = [r.result for r in o.touch + o.live_base + o.live_many] + o.create
        errors = sum(r.errors for r in runs)
        if errors:
            found.append(f"{label}: {errors} non-2xx responses or socket errors during wrk runs")
        touches = o.touch + o.live_base + o.live_many
        lost = sum(not r.kept for r in touches)
        if lost:
            found.append(
                f"{label}: in {lost} of {len(touches)} touch runs the session was gone right "
                "after wrk (a GET with its cookie got a new session)"
            )
        for count, m in o.memory.items():
            if not m["count_ok"]:
                found.append(f"{label}: {m['live_sessions']:,} live sessions, expected {count:,}")
    for e in results.expiry:
        for what in ("missing", "duplicates", "unknown"):
            if e[what]:
                found.append(f"expiry lateness, {e['store']}: {e[what]} {what}")
    return found


def report(b: Bench, results: Results, command: str) -> tuple[str, list[str], list[Target]]:
    opts = b.opts
    problems = find_problems(b, results)
    found = targets(results, opts)
    notes = list(b.notes)
    for key, o in results.outcomes.items():
        if o.redis is not None and o.redis.monitor_requests and not o.redis.claim_holds:
            notes.append(
                f"{SYSTEMS[key].label}: client commands per touch "
                f"({o.redis.monitor_client_commands:.2f}) != round trips per touch "
                f"({o.redis.monitor_reads:.2f}): some client pipelines"
            )
    versions = ", ".join(
        f"{name} {version_of(name)}"
        for name in (
            "lapse",
            "uvicorn",
            "httptools",
            "uvloop",
            "twisted",
            "aiohttp",
            "aiohttp-session",
            "starlette",
            "itsdangerous",
            "redis",
            "hiredis",
        )
    )
    redis_line = "- redis-server: not used"
    if b.redis is not None:
        origin = "started by the bench" if b.redis.owned else "given by --redis-url"
        redis_line = f"- redis-server {b.redis.version} on 127.0.0.1 ({origin})"
    lines = [
        "# lapse and its peers: the seed program's GET /logme",
        "",
        f"- {time.strftime('%Y-%m-%d %H:%M %Z')}; command: `{command}`; took "
        f"{results.seconds / 60:.1f} min",
        f"- Machine: {os.cpu_count()} CPUs ({cpu_model()}), {platform.platform()}; "
        f"load average at the start {b.load_at_start}",
        f"- lapse imported from {lapse_source()}",
        f"- Python {platform.python_version()}; {versions}",
        f"- {wrk_version(b.wrk)}: `-t{opts.threads} -c{opts.connections} -d{opts.duration}s "
        f"--latency`, median of {opts.repeats} runs per figure, one fresh server per figure, "
        f"127.0.0.1; discarded warm-up: {opts.warmup} s (touch), {opts.create_warmup} s "
        "(create)",
        redis_line,
        "- touch: one cookie-less GET makes a session before each wrk run, every request "
        "carries its cookie, and a GET right after the run must find the same session "
        "(session kept); create: no cookie, so every request makes a session",
        "- vs lapse: this system's median / lapse (memory)'s median (memory: bytes / lapse's "
        "bytes); p99 from wrk --latency, median of the runs",
        "",
        "## Requests/s",
        "",
        *throughput_table(results),
    ]
    for title, table in (
        ("## Memory per live session (in-process, RSS delta / N)", memory_table(results, opts)),
        (
            f"## Touch with {opts.live_sessions:,} other live sessions (two servers side by "
            "side, runs alternated)",
            live_table(results, opts),
        ),
        (
            f"## Expiry lateness ({opts.expiry_sessions:,} sessions expiring within "
            f"{opts.expiry_window:g} s, bench/expiry_lateness.py)",
            expiry_table(results),
        ),
        (
            "## Redis traffic per touch request (idle rate subtracted)",
            redis_table(results),
        ),
    ):
        if table:
            lines += ["", title, "", *table]
    lines += ["", "## Targets", "", *targets_lines(found), ""]
    lines.append("Problems: " + ("none" if not problems else ""))
    lines += [f"- {p}" for p in problems]
    if notes:
        lines += ["", "Notes:", *[f"- {n}" for n in notes]]
    lines += ["", "## Raw repeats", "", *raw_lines(results), ""]
    return "\n".join(lines), problems, found


# ---------------------------------------------------------------------------- chart


def write_chart(results: Results, opts: Options, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    rows = [
        (SYSTEMS[k].label, touch_rps(o), create_rps(o))
        for k, o in results.outcomes.items()
        if touch_rps(o) is not None or create_rps(o) is not None
    ]
    if not rows:
        raise RuntimeError("nothing to chart")
    height = 0.38
    fig, ax = plt.subplots(figsize=(10, 1.6 + 0.62 * len(rows)))
    ys = list(range(len(rows)))
    touch = [r[1] or 0.0 for r in rows]
    create = [r[2] or 0.0 for r in rows]
    bars_t = ax.barh([y - height / 2 for y in ys], touch, height, label="touch existing session",
                     color="#1f77b4")  # fmt: skip
    bars_c = ax.barh([y + height / 2 for y in ys], create, height,
                     label="create a session per request (no cookie)", color="#ff7f0e")  # fmt: skip
    for bars in (bars_t, bars_c):
        for bar in bars:
            width = bar.get_width()
            if width:
                ax.text(width, bar.get_y() + bar.get_height() / 2, f" {width:,.0f}",
                        va="center", fontsize=8)  # fmt: skip
    bare = touch_rps(results.outcomes.get(BARE))
    if bare:
        ax.axvline(bare, color="gray", linestyle="--", linewidth=1,
                   label=f"bare uvicorn, no sessions ({bare:,.0f})")  # fmt: skip
    ax.set_yticks(ys, [r[0] for r in rows])
    ax.invert_yaxis()
    ax.set_xlim(0, max(touch + create) * 1.18)
    ax.set_xlabel("requests/s (median; higher is better)")
    ax.set_title(
        f"GET /logme, wrk -t{opts.threads} -c{opts.connections} -d{opts.duration}s, "
        f"median of {opts.repeats}, one server process on 127.0.0.1",
        fontsize=10,
    )
    ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda x, _: f"{x:,.0f}"))
    fig_height = fig.get_figheight()
    fig.legend(loc="lower center", ncol=3, fontsize=8, frameon=False)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout(rect=(0, 0.3 / fig_height, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    opts = parse_options(argv)
    started = time.monotonic()
    command = " ".join([".venv/bin/python", "bench/run.py", *(argv or sys.argv[1:])])
    wrk = ensure_wrk()
    need_redis = any(SYSTEMS[k].redis for k in opts.systems)
    redis = RedisHandle(opts.redis_url) if need_redis else None
    try:
        b = Bench(opts, wrk, redis)
        results = run_all(b)
        try:
            write_chart(results, opts, opts.chart_path)
        except Exception as exc:
            b.problems.append(f"chart failed: {type(exc).__name__}: {exc}")
        results.seconds = time.monotonic() - started
        text, problems, found = report(b, results, command)
    finally:
        if redis is not None:
            redis.close()
    print()
    print(text)
    opts.table_path.parent.mkdir(parents=True, exist_ok=True)
    opts.table_path.write_text(text)
    print(f"(table written to {opts.table_path}; chart: {opts.chart_path})")
    missed = [t for t in found if t.verdict == "MISS"]
    if problems:
        return 1
    return 1 if opts.strict and missed else 0


if __name__ == "__main__":
    sys.exit(main())
