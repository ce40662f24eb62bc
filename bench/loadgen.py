"""The load generator: wrk, run against one server, and its output parsed."""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from bench.systems import HOST, LOGIN_PATH, PATH


@dataclass(frozen=True)
class WrkResult:
    rps: float
    requests: int
    non_2xx: int
    socket_errors: int
    p99_ms: float | None
    server_cpu_us: float | None = None
    """The server process's CPU time (user + system) per request during the run, in µs:
    steadier than requests/s when other work shares the machine."""

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


def wrk_command(
    wrk: str,
    threads: int,
    connections: int,
    port: int,
    seconds: int,
    cookie: str | None,
    script: Path | None = None,
) -> list[str]:
    """wrk's command line for one run on GET /logme, with the cookie on every request;
    with ``script`` (``login_script``), the logins that script sends instead."""
    cmd = [wrk, f"-t{threads}", f"-c{connections}", f"-d{seconds}s", "--latency"]
    if cookie is not None:
        cmd += ["-H", f"Cookie: {cookie}"]
    if script is not None:
        cmd += ["-s", str(script)]
    cmd.append(f"http://{HOST}:{port}{PATH if script is None else LOGIN_PATH}")
    return cmd


LOGIN_USERS = 10_000
"""The users the login runs log in as, in turn: at 10k logins/s and the seed's 5 s
timeout, about 5 live sessions per user."""


def login_script(directory: Path, users: int = LOGIN_USERS) -> Path:
    """A wrk Lua script that sends ``POST /login?user=bench-user-N``, N cycling over
    ``users``: the requests are made once, in ``init``, and ``request`` only picks the next
    one (wrk's advice for a fast server: formatting a request per call is costly)."""
    path = directory / "login.lua"
    path.write_text(
        "-- written by bench/loadgen.py: POST /login?user=bench-user-N, N cycling\n"
        "local requests = {}\n"
        "local i = 0\n"
        "init = function(args)\n"
        f"  for n = 1, {users} do\n"
        f'    requests[n] = wrk.format("POST", "{LOGIN_PATH}?user=bench-user-" .. n)\n'
        "  end\n"
        "end\n"
        "request = function()\n"
        f"  i = i % {users} + 1\n"
        "  return requests[i]\n"
        "end\n"
    )
    return path


def run_wrk(
    wrk: str,
    threads: int,
    connections: int,
    port: int,
    seconds: int,
    cookie: str | None,
    script: Path | None = None,
) -> WrkResult:
    """One wrk run; its parsed figures."""
    cmd = wrk_command(wrk, threads, connections, port, seconds, cookie, script)
    done = subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=seconds + 60)
    return parse_wrk(done.stdout)
