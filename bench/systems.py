"""The systems measured: what each is, how its server is started on a free 127.0.0.1
port and stopped by its PID, and the few HTTP requests the bench makes itself."""

from __future__ import annotations

import base64
import contextlib
import http.client
import importlib
import json
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

BENCH_DIR = Path(__file__).resolve().parent
REPO_DIR = BENCH_DIR.parent


def suite_helpers() -> Any:
    """The test suite's tests/_redis_server.py: a redis-server of its own on a free
    loopback port (``RedisServer``), and the installer of missing Debian packages
    (``apt_install``, ``redis_server_binary``: one at a time, waiting for the dpkg lock).
    The bench gets its Redis and its packages the same way."""
    tests = str(REPO_DIR / "tests")
    if tests not in sys.path:
        sys.path.insert(0, tests)
    return importlib.import_module("_redis_server")


SERVERS_DIR = BENCH_DIR / "servers"
LAPSE_EXAMPLE = REPO_DIR / "examples" / "session_endings.py"
MEMORY_PROBE = BENCH_DIR / "memory_probe.py"
EXPIRY_LATENESS = BENCH_DIR / "expiry_lateness.py"
RESULTS_DIR = BENCH_DIR / "results"
DEFAULT_CHART = BENCH_DIR / "chart.png"
LISTEN_LINE = "listenTCP(8080, factory)"
HOST = "127.0.0.1"
PATH = "/logme"
LOGIN_PATH = "/login"
"""The login route the bench adds to a lapse seed (``login=True``): POST rotates the
visitor's session and binds it to ``?user=NAME``; GET answers the session's principal."""
LONG_TIMEOUT = 3600
"""sessionTimeout of the extra live sessions of the "many live sessions" figure."""
LIVE_COUNT_LINE = re.compile(r"^bench: (\d+) live sessions$", re.MULTILINE)


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
    """lapse, lapse-workers (``lapse serve --workers N`` of the seed's site: bench/workers.py
    measures it, a section of its own), twisted, aiohttp, django, starlette or bare: which
    server program."""
    store: str = ""
    """lapse: memory, sqlite, redis, redis-cluster or postgres; aiohttp: memory or redis;
    django: postgres."""
    cookie: str | None = None
    """The session cookie's name; None: no sessions (bare uvicorn)."""
    identity: Callable[[str], str] = cookie_value_identity
    probe: str | None = None
    """memory_probe.py's --system for the memory figure, if measured."""
    live: bool = False
    """Whether the "touch with many live sessions" figure is measured."""

    @property
    def redis(self) -> bool:
        """On Redis: the bench's redis-server, or its Redis Cluster."""
        return self.store in ("redis", "redis-cluster")

    @property
    def cluster(self) -> bool:
        """On the bench's Redis Cluster (3 primaries, 3 replicas)."""
        return self.store == "redis-cluster"

    @property
    def postgres(self) -> bool:
        """On the bench's PostgreSQL (each system its own database)."""
        return self.store == "postgres"


SYSTEMS: dict[str, System] = {
    s.key: s
    for s in (
        System("lapse-memory", "lapse (memory)", "lapse", "memory", "lapse_session",
               probe="lapse", live=True),
        System("lapse-sqlite", "lapse (SQLite)", "lapse", "sqlite", "lapse_session"),
        System("lapse-redis", "lapse (Redis)", "lapse", "redis", "lapse_session"),
        System("lapse-redis-cluster", "lapse (Redis Cluster)", "lapse", "redis-cluster",
               "lapse_session"),
        System("lapse-redis-workers", "lapse serve --workers N (Redis)", "lapse-workers",
               "redis", "lapse_session"),
        System("lapse-postgres", "lapse (PostgreSQL)", "lapse", "postgres", "lapse_session"),
        System("django-postgres", "Django db sessions (PostgreSQL)", "django", "postgres",
               "sessionid"),
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
SINGLE_REDIS = "lapse-redis"
CLUSTER = "lapse-redis-cluster"
"""lapse on the Redis Cluster, compared with lapse on one Redis node (SINGLE_REDIS)."""
LAPSE_POSTGRES = "lapse-postgres"
LAPSE_SQLITE = "lapse-sqlite"
DJANGO_POSTGRES = "django-postgres"
"""Django's database session backend, on the same PostgreSQL server as LAPSE_POSTGRES."""
SEED_TIMEOUT_LINE = "sessionTimeout = 5"


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


def login_cookie(port: int, system: System, user: str) -> str:
    """Log in as ``user`` with a cookie-less POST to the bench's login route (a new
    session, rotated and bound); return its cookie as ``NAME=VALUE``."""
    conn = http.client.HTTPConnection(HOST, port, timeout=5)
    try:
        conn.request("POST", f"{LOGIN_PATH}?user={user}")
        response = conn.getresponse()
        response.read()
        status, set_cookies = response.status, response.msg.get_all("Set-Cookie") or []
    finally:
        conn.close()
    cookies = parse_set_cookies(set_cookies)
    if status != 200 or system.cookie is None or system.cookie not in cookies:
        raise RuntimeError(
            f"POST {LOGIN_PATH}?user={user} gave status {status}, Set-Cookie {set_cookies!r}; "
            f"expected 200 and a {system.cookie} cookie (500: e.g. a store without "
            "principals)"
        )
    return f"{system.cookie}={cookies[system.cookie]}"


def principal_of(port: int, cookie: str) -> str:
    """The principal of the session ``cookie`` names, as the login route answers it
    ("" for an anonymous or unknown session)."""
    conn = http.client.HTTPConnection(HOST, port, timeout=5)
    try:
        conn.request("GET", LOGIN_PATH, headers={"Cookie": cookie})
        response = conn.getresponse()
        body = response.read().decode("utf-8", "replace")
        return body if response.status == 200 else ""
    finally:
        conn.close()


CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time the process ``pid`` has used so far (/proc/PID/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def steal_seconds() -> float | None:
    """The CPU time stolen from this (virtual) machine so far, all CPUs
    (/proc/stat's eighth field); None where there is no such figure."""
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()
        return int(fields[8]) / CLOCK_TICKS
    except (OSError, IndexError, ValueError):
        return None


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


LOGIN_ROUTE = f"""\
# -- inserted by bench/run.py: a login route, then the seed as it was --
class _BenchLogin(Resource):
    isLeaf = True

    def __init__(self, logme):
        super().__init__()
        self._logme = logme

    async def render_POST(self, request):
        session = request.getSession()
        session.rotate()
        self._logme.render_GET(request)
        await session.set_principal(request.args[b"user"][0].decode())
        return ""

    def render_GET(self, request):
        return request.getSession().principal or ""


rootResource.putChild("{LOGIN_PATH[1:]}", _BenchLogin(rootResource.children[b"logme"]))
# -- end of insertion --
"""
"""The login route (``LOGIN_PATH``): POST makes the visitor's session (a cookie-less
request: a new one), rotates it, registers the seed's expiry callback on it as
``/logme`` does on first sight (the seed's own code), and binds it to ``?user=``; GET
answers the session's principal (the bench's check that a touched session is still
logged in)."""


def lapse_script(
    port: int,
    workdir: Path,
    extra_sessions: int,
    session_timeout: int | None = None,
    login: bool = False,
) -> Path:
    """The repo's example with only its listen line changed to our port and loopback;
    with ``extra_sessions``, code that makes that many long-lived sessions is
    inserted just before that line; with ``session_timeout``, its sessions' 5 s
    ``sessionTimeout`` is that many seconds instead (the idle figure's long sessions);
    with ``login``, ``LOGIN_ROUTE`` is inserted just before that line."""
    source = LAPSE_EXAMPLE.read_text()
    if source.count(LISTEN_LINE) != 1:
        raise RuntimeError(f"expected exactly one {LISTEN_LINE!r} in {LAPSE_EXAMPLE}")
    patched = source.replace(LISTEN_LINE, f'listenTCP({port}, factory, interface="{HOST}")')
    if session_timeout is not None:
        if source.count(SEED_TIMEOUT_LINE) != 1:
            raise RuntimeError(f"expected exactly one {SEED_TIMEOUT_LINE!r} in {LAPSE_EXAMPLE}")
        patched = patched.replace(SEED_TIMEOUT_LINE, f"sessionTimeout = {session_timeout}")
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
    if login:
        for name in ('rootResource.putChild("logme"', "import Resource"):
            if name not in source:
                raise RuntimeError(f"{LAPSE_EXAMPLE} has no {name!r}: cannot add a login route")
        lines = patched.splitlines(keepends=True)
        at = next(i for i, line in enumerate(lines) if "listenTCP(" in line)
        patched = "".join([*lines[:at], LOGIN_ROUTE, "\n", *lines[at:]])
    script = workdir / "lapse_session_endings.py"
    script.write_text(patched)
    return script


def redis_store_url(redis_url: str, prefix: str) -> str:
    """A lapse store URL on the bench's redis-server, its keys under ``prefix``."""
    return f"{redis_url}{'&' if '?' in redis_url else '?'}prefix={prefix}"


def server_command(
    system: System,
    port: int,
    workdir: Path,
    extra: int,
    redis_url: str | None,
    postgres_url: str | None = None,
    session_timeout: int | None = None,
    login: bool = False,
) -> tuple[list[str], dict[str, str]]:
    """The command line and environment of one system's server (no ``LAPSE_*`` but the store);
    ``postgres_url``: the system's database on the bench's PostgreSQL; ``login``: a lapse
    seed with the bench's login route."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LAPSE_")}
    py = sys.executable
    if system.redis and redis_url is None:
        raise RuntimeError(
            f"no {'Redis Cluster' if system.cluster else 'redis-server'} for {system.key}"
        )
    if system.postgres and postgres_url is None:
        raise RuntimeError(f"no PostgreSQL database for {system.key}")
    if system.kind == "lapse-workers":
        raise RuntimeError(f"{system.key} is started by bench/workers.py, N workers at a time")
    if system.kind == "lapse":
        if system.store == "memory":
            env["LAPSE_SESSION_STORE"] = "memory:"
        elif system.store == "sqlite":
            env["LAPSE_SESSION_STORE"] = f"sqlite:///{workdir}/sessions.db"
        elif system.postgres:
            assert postgres_url is not None
            env["LAPSE_SESSION_STORE"] = postgres_url
        else:
            assert redis_url is not None
            env["LAPSE_SESSION_STORE"] = redis_store_url(redis_url, f"bench-{secrets.token_hex(4)}")
        seed = lapse_script(port, workdir, extra, session_timeout, login)
        return [py, str(seed)], env
    if login:
        raise RuntimeError(f"{system.key} has no login route")
    if system.kind == "twisted":
        cmd = [py, str(SERVERS_DIR / "twisted_seed.py"), str(port)]
        return cmd + (["--extra-sessions", str(extra)] if extra else []), env
    if extra or session_timeout is not None:
        raise RuntimeError(f"{system.key} cannot start with extra or long sessions")
    if system.kind == "django":
        assert postgres_url is not None
        cmd = [py, str(SERVERS_DIR / "django_seed.py"), str(port), "--database", postgres_url]
        return cmd, env
    if system.kind == "aiohttp":
        cmd = [py, str(SERVERS_DIR / "aiohttp_seed.py"), str(port)]
        if system.redis:
            assert redis_url is not None
            cmd += ["--redis", redis_url]
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


@dataclass(frozen=True)
class RunningServer:
    port: int
    log: Path
    """The server's stderr."""
    pid: int = 0

    def live_counts(self) -> list[int]:
        """The live-session counts the server printed (lapse and Twisted with extra sessions)."""
        return [int(n) for n in LIVE_COUNT_LINE.findall(self.log.read_text())]


@contextlib.contextmanager
def running_server(
    system: System,
    extra: int = 0,
    redis_url: str | None = None,
    postgres_url: str | None = None,
    session_timeout: int | None = None,
    login: bool = False,
    stdout_path: Path | None = None,
    args: tuple[str, ...] = (),
) -> Iterator[RunningServer]:
    """Start one server on a free loopback port, wait until it answers, yield it; always
    stop it by its PID. ``stdout_path``: its stdout (the seed's line per expired session)
    to that file, unbuffered (``PYTHONUNBUFFERED``), instead of /dev/null. ``args``: more
    arguments for the server program (the bare app's ``--burn-us``)."""
    with tempfile.TemporaryDirectory(prefix=f"bench-{system.key}-") as tmp:
        workdir = Path(tmp)
        port = free_port()
        log = workdir / "stderr.log"
        cmd, env = server_command(
            system, port, workdir, extra, redis_url, postgres_url, session_timeout, login
        )
        cmd += args
        if stdout_path is not None:
            env["PYTHONUNBUFFERED"] = "1"
        with log.open("wb") as stderr, contextlib.ExitStack() as closing:
            out: IO[bytes] | int = subprocess.DEVNULL
            if stdout_path is not None:
                out = closing.enter_context(stdout_path.open("wb"))
            # stdout (a line per expired session) goes to DEVNULL or a file: never a pipe
            # that could fill.
            proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=stderr,
                cwd=REPO_DIR,
                env=env,
            )
            try:
                wait_until_answering(proc, port, log, 30 + 90 * extra / 1e6)
                yield RunningServer(port, log, proc.pid)
            finally:
                stop(proc)
