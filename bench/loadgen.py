"""The load generator: wrk, run against one server, and its output parsed."""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from bench.systems import HOST, LOGIN_PATH, PATH, suite_helpers


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
    p999_ms: float | None = None
    """The 99.9th percentile latency, from the ``done`` hook of ``TAIL_HOOK`` (wrk's
    ``--latency`` prints 50/75/90/99 only)."""
    steal_ms: float | None = None
    """CPU time the hypervisor took from this machine's CPUs during the run (all
    CPUs, /proc/stat's steal): time neither the server nor wrk could run, which
    shows in the latency tail."""

    @property
    def errors(self) -> int:
        return self.non_2xx + self.socket_errors


def ensure_wrk() -> str:
    found = shutil.which("wrk")
    if found:
        return found
    print("wrk not found; installing the Debian package", flush=True)
    try:
        return str(suite_helpers().apt_install("wrk", "wrk"))
    except RuntimeError as exc:
        raise SystemExit(str(exc)) from exc


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
    p99_ms = float(p99.group(1)) * _UNIT_MS[p99.group(2)] if p99 else None
    p999_ms = None
    tail = _TAIL_LINE.search(output)
    if tail is not None:  # the hook's figures: the same histogram, to the microsecond
        p99_ms, p999_ms = int(tail.group(1)) / 1000, int(tail.group(2)) / 1000
    return WrkResult(
        rps=float(rps.group(1)),
        requests=int(total.group(1)) if total else 0,
        non_2xx=int(non_2xx.group(1)) if non_2xx else 0,
        socket_errors=sum(int(n) for n in sock.groups()) if sock else 0,
        p99_ms=p99_ms,
        p999_ms=p999_ms,
    )


TAIL_HOOK = """\
-- written by bench/loadgen.py: the tail percentiles, which --latency does not print
done = function(summary, latency, requests)
  io.write(string.format("bench tail latency us: p99 %d p99.9 %d\\n",
    latency:percentile(99), latency:percentile(99.9)))
end
"""
"""A wrk Lua ``done`` hook that prints p99 and p99.9 (µs) of the run's latency histogram,
the one ``--latency`` prints from. It defines no ``request`` or ``response`` function, so
wrk still sends its one pre-built request and parses no answer in Lua: no cost per
request."""
_TAIL_LINE = re.compile(r"^bench tail latency us: p99 (\d+) p99\.9 (\d+)$", re.MULTILINE)


def with_tail_hook(directory: Path, script: Path | None) -> Path:
    """``script`` (e.g. ``login_script``'s; None: none) with ``TAIL_HOOK`` appended, as a
    new file in ``directory``: wrk takes one script, so the hook joins the run's own.
    A script that defines its own ``done`` is refused (the hook would replace it)."""
    own = script.read_text() if script is not None else ""
    if re.search(r"^\s*(function\s+done\b|done\s*=)", own, re.MULTILINE):
        raise ValueError(f"{script} defines done(): cannot add the tail-latency hook")
    path = directory / "tail.lua"
    path.write_text(own + ("\n" if own and not own.endswith("\n") else "") + TAIL_HOOK)
    return path


def wrk_command(
    wrk: str,
    threads: int,
    connections: int,
    port: int,
    seconds: int,
    cookie: str | None,
    script: Path | None = None,
    page: str | None = None,
) -> list[str]:
    """wrk's command line for one run on GET /logme, with the cookie on every request;
    with ``script`` (``login_script``), the logins that script sends instead (``page``:
    the URL's path, if not the one the script implies)."""
    cmd = [wrk, f"-t{threads}", f"-c{connections}", f"-d{seconds}s", "--latency"]
    if cookie is not None:
        cmd += ["-H", f"Cookie: {cookie}"]
    if script is not None:
        cmd += ["-s", str(script)]
    if page is None:
        page = PATH if script is None else LOGIN_PATH
    cmd.append(f"http://{HOST}:{port}{page}")
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
    """One wrk run (``script``, if any, with the tail-latency hook); its parsed figures."""
    with tempfile.TemporaryDirectory(prefix="bench-wrk-") as tmp:
        hooked = with_tail_hook(Path(tmp), script)
        page = PATH if script is None else LOGIN_PATH
        cmd = wrk_command(wrk, threads, connections, port, seconds, cookie, hooked, page)
        done = subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=seconds + 60)
    return parse_wrk(done.stdout)
