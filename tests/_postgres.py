"""A real PostgreSQL server for tests, on a free loopback port of its own.

:class:`PostgresServer` runs ``initdb`` into a fresh temporary directory and
``postgres`` on a free 127.0.0.1 port (its unix socket in that directory too,
never /var/run), as an unprivileged user (``nobody`` when the tests run as
root: PostgreSQL refuses root), with trust authentication on loopback for the
superuser ``postgres`` and a password (SCRAM) for the role
:attr:`PostgresServer.password_user`, and fsync off (a killed server still
keeps every committed row: the OS has it; only a crash of the machine would
lose it). It waits until the server accepts connections, and stops it by its
PID: SIGINT first (PostgreSQL's fast shutdown: SIGTERM is its "smart" one,
which waits for every client to leave), then :func:`stop_process` (SIGTERM,
then SIGKILL). ``stop()`` and ``start()`` again reuse the same port and data,
for outage tests; ``kill()`` SIGKILLs the server and all its processes (the
postmaster and its backends, like a crash). It never uses a system
PostgreSQL: if the binaries are missing it installs the Debian package
``postgresql`` (services kept from starting) and runs its own process.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import re
import secrets
import shutil
import signal
import socket
import struct
import subprocess
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path

from _ports import free_port
from _redis_server import Running, apt_install, stop_process

__all__ = ["PostgresServer", "postgres_bin_dir"]

_NAME = re.compile(r"[a-z_][a-z0-9_]{0,62}")
"""The database and role names the helper creates: plain identifiers only."""


def postgres_bin_dir() -> Path:
    """The directory of the newest installed PostgreSQL's binaries
    (/usr/lib/postgresql/<version>/bin), installing the Debian package
    ``postgresql`` if there is none. PATH is not used: Debian keeps
    ``initdb`` and ``postgres`` off it."""
    found = _bin_dirs()
    if not found:
        # pg_createcluster comes with the server (postgresql-common).
        apt_install("postgresql", "pg_createcluster")
        found = _bin_dirs()
    if not found:
        raise RuntimeError(
            "no PostgreSQL server under /usr/lib/postgresql/<version>/bin: "
            "run `apt-get install -y postgresql` (the tests start their own server)"
        )
    return found[-1]


def _bin_dirs() -> list[Path]:
    dirs = [Path(path).parent for path in glob.glob("/usr/lib/postgresql/*/bin/postgres")]
    return sorted(dirs, key=lambda path: _version_key(path.parent.name))


def _version_key(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", version))


def _run_as() -> tuple[int, int] | None:
    """The (uid, gid) to run the server as: ``nobody`` when we are root,
    else None (ourselves)."""
    if os.geteuid() != 0:
        return None
    nobody = pwd.getpwnam("nobody")
    return nobody.pw_uid, nobody.pw_gid


def _accepts(port: int, user: str) -> bool:
    """Whether the server on ``port`` accepts connections now: a startup
    packet is answered by an authentication request ('R'), not an error
    ('E': starting up, shutting down, recovering)."""
    params = b"user\0" + user.encode() + b"\0database\0postgres\0\0"
    packet = struct.pack("!ii", 8 + len(params), 196608) + params
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
            sock.sendall(packet)
            answer = sock.recv(1)
            if answer == b"R":
                sock.sendall(b"X\0\0\0\4")  # Terminate
            return answer == b"R"
    except OSError:
        return False


def _server_processes(data_dir: Path, binary: Path) -> list[int]:
    """The live (not zombie) processes running ``binary`` in ``data_dir``:
    the postmaster we started and every process it forked (they keep its
    working directory, the data directory; each makes a session of its own,
    so its process group does not tell)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            if os.readlink(f"/proc/{entry}/cwd") != str(data_dir):
                continue
            if os.readlink(f"/proc/{entry}/exe") != str(binary):
                continue
            state = Path("/proc", entry, "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:  # ended meanwhile
            continue
        if state != "Z":
            found.append(int(entry))
    return found


def _sigkill(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):  # ended meanwhile
        os.kill(pid, signal.SIGKILL)


class PostgresServer(Running):
    """One ``postgres`` on 127.0.0.1:port, its data in a temporary directory.

    The superuser ``postgres`` needs no password (trust, loopback only);
    :attr:`password_user` needs :attr:`password` (scram-sha-256)."""

    user = "postgres"
    password_user = "lapse_password"

    def __init__(self, port: int | None = None, settings: Mapping[str, str] | None = None) -> None:
        self.bin_dir = postgres_bin_dir()
        self.binary = self.bin_dir / "postgres"
        self.port = port or free_port()
        self.password = secrets.token_hex(16)
        self.settings = dict(settings or {})
        self._dir = Path(tempfile.mkdtemp(prefix="lapse-postgres-"))
        self.data_dir = self._dir / "data"
        self.socket_dir = self._dir / "socket"
        self._proc: subprocess.Popen[bytes] | None = None
        self._initialized = False

    @property
    def pid(self) -> int | None:
        """The postmaster's PID while it runs."""
        return None if self._proc is None else self._proc.pid

    @property
    def log(self) -> str:
        path = self._dir / "postgres.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def url(self, dbname: str = "postgres", *, user: str | None = None) -> str:
        """``postgresql://user@127.0.0.1:port/dbname`` (the password role's
        URL carries its password)."""
        user = user or self.user
        secret = f":{self.password}" if user == self.password_user else ""
        return f"postgresql://{user}{secret}@127.0.0.1:{self.port}/{dbname}"

    def create_database(self, name: str, *, owner: str | None = None) -> str:
        """Create database ``name`` (owned by ``owner``, default the
        superuser) and return its URL."""
        for identifier in (name, owner or self.user):
            if not _NAME.fullmatch(identifier):
                raise ValueError(f"not a plain lowercase identifier: {identifier!r}")
        self.psql(f'CREATE DATABASE "{name}" OWNER "{owner or self.user}"')
        return self.url(name, user=owner)

    def psql(self, sql: str, dbname: str = "postgres") -> str:
        """Run ``sql`` with psql as the superuser over TCP; its output
        (unaligned, tuples only), or RuntimeError with psql's error."""
        done = self.run_psql(sql, dbname)
        if done.returncode != 0:
            raise RuntimeError(f"psql failed ({done.returncode}): {done.stderr.strip()}")
        return done.stdout.strip()

    def run_psql(
        self, sql: str, dbname: str = "postgres", *, user: str | None = None, password: str = ""
    ) -> subprocess.CompletedProcess[str]:
        """Run ``sql`` with psql as ``user`` (default the superuser) over TCP,
        with ``password`` if given; psql's exit status and output."""
        env = dict(os.environ, PGCONNECT_TIMEOUT="5", PGPASSWORD=password)
        if not password:
            del env["PGPASSWORD"]
        args = [
            str(self.bin_dir / "psql"), "-X", "-A", "-t", "-w", "-v", "ON_ERROR_STOP=1",
            "-h", "127.0.0.1", "-p", str(self.port), "-U", user or self.user, "-d", dbname,
            "-c", sql,
        ]  # fmt: skip
        return subprocess.run(
            args, env=env, capture_output=True, text=True, timeout=30, check=False
        )

    def _initdb(self) -> None:
        owner = _run_as()
        if owner is not None:
            os.chown(self._dir, *owner)
        self.socket_dir.mkdir()
        if owner is not None:
            os.chown(self.socket_dir, *owner)
        args = [
            str(self.bin_dir / "initdb"), "-D", str(self.data_dir), "-U", self.user,
            "--auth=trust", "--encoding=UTF8", "--locale=C", "--no-sync", "--no-instructions",
        ]  # fmt: skip
        uid, gid = owner or (None, None)
        done = subprocess.run(
            args, cwd=self._dir, user=uid, group=gid, extra_groups=[] if owner else None,
            capture_output=True, text=True, check=False,
        )  # fmt: skip
        if done.returncode != 0:
            raise RuntimeError(f"initdb failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
        settings = {
            "listen_addresses": "'127.0.0.1'",
            "port": str(self.port),
            "unix_socket_directories": f"'{self.socket_dir}'",
            "fsync": "off",
            "full_page_writes": "off",
            "shared_buffers": "32MB",
            "max_connections": "200",
            **self.settings,
        }
        with open(self.data_dir / "postgresql.conf", "a") as conf:
            conf.write("\n# lapse tests\n")
            conf.writelines(f"{name} = {value}\n" for name, value in settings.items())
        (self.data_dir / "pg_hba.conf").write_text(
            "local all all trust\n"
            f"host all {self.password_user} 127.0.0.1/32 scram-sha-256\n"
            "host all all 127.0.0.1/32 trust\n"
        )

    def start(self, timeout: float = 30.0) -> None:
        """Start the server (the first time: initdb and the password role;
        again: on the same port and data) and wait until it accepts
        connections."""
        if self._proc is not None:
            raise RuntimeError(f"postgres already running, pid {self._proc.pid}")
        if not self._initialized:
            self._initdb()
        owner = _run_as()
        uid, gid = owner or (None, None)
        with open(self._dir / "postgres.log", "ab") as log:
            self._proc = subprocess.Popen(
                [str(self.binary), "-D", str(self.data_dir)],
                cwd=self._dir, user=uid, group=gid, extra_groups=[] if owner else None,
                stdin=subprocess.DEVNULL, stdout=log, stderr=log,
            )  # fmt: skip
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self._proc.poll() is not None:
                self._proc = None
                raise RuntimeError(f"postgres on port {self.port} exited:\n{self.log}")
            if self._ready(self._proc.pid) and _accepts(self.port, self.user):
                break
            time.sleep(0.02)
        else:
            self.stop()
            raise RuntimeError(f"postgres on port {self.port} did not start:\n{self.log}")
        if not self._initialized:
            self.psql(f"CREATE ROLE {self.password_user} LOGIN CREATEDB PASSWORD '{self.password}'")
            self._initialized = True

    def _ready(self, pid: int) -> bool:
        """Whether postmaster ``pid`` (ours, not another server that answers
        on the port, nor a killed one whose file is left) says it is ready in
        its postmaster.pid: it has bound the port and recovered."""
        try:
            lines = (self.data_dir / "postmaster.pid").read_text().splitlines()
        except OSError:
            return False
        return len(lines) >= 8 and lines[0] == str(pid) and lines[7].strip() == "ready"

    def stop(self) -> None:
        """Stop our server by its PID: fast shutdown (SIGINT: clients are
        disconnected, data is checkpointed), then SIGTERM, then SIGKILL."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGINT)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                stop_process(proc)
        self._reap_backends()

    def kill(self) -> None:
        """SIGKILL the server and its backends at once (a crash): the next
        ``start()`` recovers from the WAL."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        for pid in self.processes():
            _sigkill(pid)
        proc.wait(timeout=10)
        self._reap_backends()

    def processes(self) -> list[int]:
        """The PIDs of our server's processes now: the postmaster and its
        backends and helpers (none once stopped)."""
        return _server_processes(self.data_dir, self.binary)

    def _reap_backends(self) -> None:
        """Wait (up to 5 s) for the backends of our server to end, then
        SIGKILL those left: a restart on the same data needs them gone."""
        end = time.monotonic() + 5
        while (members := self.processes()) and time.monotonic() < end:
            time.sleep(0.02)
        for pid in members:
            _sigkill(pid)

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self._dir, ignore_errors=True)
