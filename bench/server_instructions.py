"""Instructions per request of a real server under wrk, counted by callgrind.

``protocol_micro.py --instructions`` counts the request path in process, one
request at a time. This counts the whole server process as wrk drives it
(50 connections, the kernel's sockets, uvloop's loop, expiry and the
collector included): the seed program (examples/session_endings.py, memory
store) or the bare ASGI app (bench/servers/bare_asgi.py) started under
``valgrind --tool=callgrind`` on a free 127.0.0.1 port, warmed up with wrk
for ``--warmup`` seconds, its counters zeroed (``callgrind_control -z``),
then ``--seconds`` of wrk, its counters dumped; the dump's total over the
requests wrk completed. User-space instructions only: the kernel's share of
a request is not counted. Under callgrind the server runs ~50x slower, so a
create figure includes the ends of far fewer sessions per request than at
full speed (sessions live 5 s).

Usage: .venv/bin/python bench/server_instructions.py [--figure touch|create]
       [--server seed|bare] [--seconds 10] [--warmup 3]
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

if not __package__:  # run as a script: make the bench package importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.cpu_profile import BARE, EXAMPLE, LISTEN_LINE, first_cookie
from bench.loadgen import ensure_wrk
from bench.systems import HOST, free_port, stop

STARTUP_SECONDS = 120
"""How long the server may take to answer under callgrind."""


def server_command(server: str, port: int, workdir: Path, valgrind: str) -> list[str]:
    """The server's command line under callgrind, its dumps in ``workdir``."""
    if server == "bare":
        program = [str(BARE), str(port)]
    else:
        seed = workdir / "seed.py"
        listen = f'listenTCP({port}, factory, interface="{HOST}")'
        seed.write_text(EXAMPLE.read_text().replace(LISTEN_LINE, listen))
        program = [str(seed)]
    out = workdir / "callgrind.out.%p"
    return [valgrind, "--tool=callgrind", f"--callgrind-out-file={out}", sys.executable, *program]


def wait_for(port: int, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + STARTUP_SECONDS
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited with {process.returncode} under callgrind")
        try:
            urllib.request.urlopen(f"http://{HOST}:{port}/logme", timeout=5).read()
            return
        except OSError:
            time.sleep(0.5)
    raise RuntimeError(f"the server did not answer within {STARTUP_SECONDS} s under callgrind")


def dumped_total(workdir: Path, pid: int) -> int:
    """The instructions in the last dump of ``pid`` (after the zeroing)."""
    dumps = sorted(workdir.glob(f"callgrind.out.{pid}.*"), key=lambda p: p.stat().st_mtime)
    if not dumps:
        raise RuntimeError("callgrind wrote no dump")
    found = re.search(r"^summary: (\d+)", dumps[-1].read_text(), re.MULTILINE)
    if found is None:
        raise RuntimeError(f"no total in {dumps[-1]}")
    return int(found.group(1))


def measure(server: str, figure: str, seconds: int, warmup: int) -> tuple[int, int]:
    """(instructions per request, requests counted) for one server and figure."""
    valgrind, control = shutil.which("valgrind"), shutil.which("callgrind_control")
    if valgrind is None or control is None:
        raise SystemExit("this needs valgrind (apt-get install valgrind)")
    wrk = ensure_wrk()
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        command = server_command(server, port, workdir, valgrind)
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_for(port, process)
            base = [wrk, "-t1", "-c50"]
            if figure == "touch":
                base += ["-H", f"Cookie: {first_cookie(port) or 'x=y'}"]
            url = f"http://{HOST}:{port}/logme"
            subprocess.run([*base, f"-d{warmup}s", url], check=True, capture_output=True)
            subprocess.run([control, "-z", str(process.pid)], check=True, capture_output=True)
            out = subprocess.run(
                [*base, f"-d{seconds}s", url], check=True, capture_output=True, text=True
            ).stdout
            subprocess.run([control, "-d", str(process.pid)], check=True, capture_output=True)
            requests = int(out.split(" requests in")[0].split()[-1])
            total = dumped_total(workdir, process.pid)
        finally:
            stop(process)
    if requests == 0:
        raise RuntimeError("wrk completed no request")
    return total // requests, requests


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--figure", choices=["touch", "create"], default="touch")
    parser.add_argument("--server", choices=["seed", "bare"], action="append")
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    args = parser.parse_args(argv)
    print("| server | figure | instructions/request | requests counted |")
    print("|---|---|---:|---:|")
    for server in args.server or ["seed", "bare"]:
        per, requests = measure(server, args.figure, args.seconds, args.warmup)
        print(f"| {server} | {args.figure} | {per:,} | {requests:,} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
