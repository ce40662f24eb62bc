"""What an idle SQLite process costs, and how late an end reaches another process.

Two server processes (``lapse serve`` of bench/servers/logme.py's kind: a Site with the
seed's page) on one SQLite file, on loopback; three sessions made through the first.
Then, with no traffic, the CPU each process uses per second (utime + stime from
/proc/PID/stat over ``--seconds``), and the lateness of ends: a session made with a
short timeout through process A is delivered (its hook run) by whichever keeper claims
it; each delivery's lateness is the hook's time minus the session's deadline, read from
a file the hooks append to.

Run: ``PYTHONPATH=src .venv/bin/python bench/sqlite_idle.py [--seconds 10] [--ends 20]``;
``PYTHONPATH=/other/src`` measures another checkout (the servers inherit it).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
import urllib.request
from pathlib import Path

APP = textwrap.dedent(
    """
    import json, os, time
    from lapse.web.resource import Resource
    from lapse.web.server import Site

    ENDS = os.environ["BENCH_ENDS"]

    class Page(Resource):
        isLeaf = True

        def render_GET(self, request):
            session = request.getSession()
            timeout = request.args.get(b"timeout")
            if timeout:
                session.sessionTimeout = float(timeout[0])
            session.data["made"] = time.time()
            return session.uid

    def hook(expiry):
        with open(ENDS, "a") as out:
            out.write(json.dumps([expiry.uid, time.time(), os.getpid()]) + "\\n")

    site = Site(Page(), on_expire=hook)
    """
)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def get(port: int, query: str = "") -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/{query}", timeout=5) as answer:
        return str(answer.read().decode())


def wait_up(port: int) -> None:
    give_up = time.monotonic() + 20
    while time.monotonic() < give_up:
        try:
            get(port)
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"no server on port {port}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench/sqlite_idle.py", description=__doc__)
    parser.add_argument("--seconds", type=float, default=10.0, help="idle CPU window (10)")
    parser.add_argument("--ends", type=int, default=20, help="sessions to see end (20)")
    parser.add_argument("--store", default=None, help="another store URL (memory: for a floor)")
    options = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        Path(tmp, "idleapp.py").write_text(APP)
        ends = Path(tmp, "ends")
        env = {**os.environ, "BENCH_ENDS": str(ends)}
        ports = [free_port(), free_port()]
        store = options.store or f"sqlite:///{tmp}/s.db"
        serve = [sys.executable, "-m", "lapse", "serve", "--store", store, "--app-dir", tmp]
        servers = [
            subprocess.Popen([*serve, "--port", str(port), "idleapp:site"], env=env)
            for port in ports
        ]
        try:
            for port in ports:
                wait_up(port)
            for _ in range(3):
                get(ports[0], "?timeout=600")
            time.sleep(1.0)
            before = [cpu_seconds(s.pid) for s in servers]
            time.sleep(options.seconds)
            after = [cpu_seconds(s.pid) for s in servers]
            idle = [(b - a) / options.seconds * 1e3 for a, b in zip(before, after, strict=True)]
            deadlines = {}
            for i in range(options.ends):
                timeout = 0.3 + (i % 7) * 0.13
                uid = get(ports[i % 2], f"?timeout={timeout}")
                deadlines[uid] = time.time() + timeout
                time.sleep(0.05)
            give_up = time.monotonic() + 30
            seen: dict[str, float] = {}
            while len(seen) < options.ends and time.monotonic() < give_up:
                time.sleep(0.2)
                if ends.exists():
                    for line in ends.read_text().splitlines():
                        uid, at, _ = json.loads(line)
                        if uid in deadlines:
                            seen[uid] = at - deadlines[uid]
        finally:
            for server in servers:
                server.terminate()
            for server in servers:
                server.wait(15)
    late = sorted(v * 1e3 for v in seen.values())
    print(f"idle CPU per process: {', '.join(f'{ms:.2f}' for ms in idle)} ms/s "
          f"(3 live sessions, {options.seconds:g} s, load {os.getloadavg()[0]:.2f})")  # fmt: skip
    if late:
        p99 = late[min(len(late) - 1, int(len(late) * 0.99))]
        print(f"ends delivered: {len(late)}/{options.ends}; lateness ms: median "
              f"{statistics.median(late):.0f}, p99 {p99:.0f}, max {late[-1]:.0f}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
