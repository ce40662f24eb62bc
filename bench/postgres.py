"""The bench's own PostgreSQL: ``initdb`` into a fresh temporary directory and
``postgres`` on a free 127.0.0.1 port (its unix socket in that directory), as
``nobody`` when the bench runs as root (PostgreSQL refuses root), trust
authentication on loopback, fsync off; stopped by its PID (SIGINT, PostgreSQL's
fast shutdown, then SIGKILL) and its directory removed. The binaries are
/usr/lib/postgresql/<version>/bin's (``apt-get install postgresql``). The
tests' full helper, with a password role, restarts and crashes, is
tests/_postgres.py; the bench does not import tests/."""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import re
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from bench.systems import HOST, free_port

USER = "postgres"


@dataclass(frozen=True)
class Postgres:
    port: int
    pid: int
    bin_dir: Path

    def url(self, dbname: str = "postgres") -> str:
        return f"postgresql://{USER}@{HOST}:{self.port}/{dbname}"

    def psql(self, sql: str, dbname: str = "postgres") -> str:
        """Run ``sql`` as the superuser; psql's output (tuples only)."""
        args = [str(self.bin_dir / "psql"), "-X", "-A", "-t", "-v", "ON_ERROR_STOP=1"]
        args += ["-h", HOST, "-p", str(self.port), "-U", USER, "-d", dbname, "-c", sql]
        done = subprocess.run(args, capture_output=True, text=True, timeout=60, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"psql failed: {done.stderr.strip()}")
        return done.stdout.strip()


def bin_dir() -> Path:
    """The newest installed PostgreSQL's binaries."""
    found = glob.glob("/usr/lib/postgresql/*/bin/postgres")
    if not found:
        raise RuntimeError("no PostgreSQL server: run `apt-get install -y postgresql`")
    newest = max(found, key=lambda path: [int(n) for n in re.findall(r"\d+", path)])
    return Path(newest).parent


@contextlib.contextmanager
def running_postgres(settings: Mapping[str, str] | None = None) -> Iterator[Postgres]:
    """A fresh PostgreSQL server, ready, for the ``with`` block."""
    binaries = bin_dir()
    port = free_port()
    root = Path(tempfile.mkdtemp(prefix="lapse-bench-postgres-"))
    data, sockets = root / "data", root / "socket"
    sockets.mkdir()
    owner = None
    if os.geteuid() == 0:
        nobody = pwd.getpwnam("nobody")
        owner = nobody.pw_uid, nobody.pw_gid
        for path in (root, sockets):
            os.chown(path, *owner)
    uid, gid = owner or (None, None)
    groups: list[int] | None = [] if owner else None
    proc: subprocess.Popen[bytes] | None = None
    try:
        subprocess.run(
            [str(binaries / "initdb"), "-D", str(data), "-U", USER, "--auth=trust",
             "--encoding=UTF8", "--locale=C", "--no-sync", "--no-instructions"],
            cwd=root, user=uid, group=gid, extra_groups=groups, capture_output=True, check=True,
        )  # fmt: skip
        conf = {
            "listen_addresses": f"'{HOST}'",
            "port": str(port),
            "unix_socket_directories": f"'{sockets}'",
            "fsync": "off",
            "full_page_writes": "off",
            **(settings or {}),
        }
        with open(data / "postgresql.conf", "a") as text:
            text.writelines(f"{name} = {value}\n" for name, value in conf.items())
        with open(root / "postgres.log", "ab") as log:
            proc = subprocess.Popen(
                [str(binaries / "postgres"), "-D", str(data)],
                cwd=root, user=uid, group=gid, extra_groups=groups,
                stdin=subprocess.DEVNULL, stdout=log, stderr=log,
            )  # fmt: skip
        server = Postgres(port, proc.pid, binaries)
        end = time.monotonic() + 30
        while not _ready(data, proc.pid):
            if proc.poll() is not None or time.monotonic() > end:
                log_text = (root / "postgres.log").read_text(errors="replace")
                raise RuntimeError(f"postgres did not start:\n{log_text}")
            time.sleep(0.05)
        yield server
    finally:
        if proc is not None and proc.poll() is None:
            os.kill(proc.pid, signal.SIGINT)  # fast shutdown: clients are disconnected
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait()
        shutil.rmtree(root, ignore_errors=True)


def _ready(data: Path, pid: int) -> bool:
    """Whether postmaster ``pid`` says "ready" in its postmaster.pid."""
    try:
        lines = (data / "postmaster.pid").read_text().splitlines()
    except OSError:
        return False
    return len(lines) >= 8 and lines[0] == str(pid) and lines[7].strip() == "ready"
