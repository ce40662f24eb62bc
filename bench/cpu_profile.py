"""Where a lapse server's CPU goes while wrk touches one session.

First the server's CPU time per request, split into user and kernel time
(from /proc/PID/stat around a wrk run), for lapse and for the bare ASGI app on
the same uvicorn (bench/servers/bare_asgi.py), median of three runs each: the
difference is what lapse's request path costs. Then a py-spy profile of lapse.

For the profile it starts the seed program (examples/session_endings.py, memory store unless
``--store`` says otherwise) on a free 127.0.0.1 port, makes one session, drives
``wrk -t1 -c50`` with its cookie, samples the server with ``py-spy record``
meanwhile, stops the server by its PID, and prints a Markdown summary:

- the share of samples by layer, from the innermost Python frame of each
  sample: the socket write (a line calling ``transport.write``: the send syscall
  below it), lapse's HTTP edge, site and sessions, the app itself, uvicorn,
  asyncio/uvloop and the rest of the standard library;
- the share spent inside the site (``Site.__call__`` or ``Site._serve_now``,
  inclusive), i.e. what lapse's own request path costs next to the HTTP stack
  under it;
- the functions with the most samples of their own.

``--server bare`` profiles the bare ASGI app instead, the same way, for the same
layers side by side: where the two spend their time differently.

Usage: .venv/bin/python bench/cpu_profile.py [--seconds 10] [--rate 1000] [--store URL]
       [--cpu-runs 3] (0: skip the CPU accounting) [--server lapse|bare]
The summary also goes to bench/results/profile.md (git-ignored).
"""

from __future__ import annotations

import argparse
import collections
import http.client
import linecache
import os
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if not __package__:  # run as a script: make the bench package importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import lapse
from bench.systems import free_port, stop  # the same servers' helpers

BENCH_DIR = Path(__file__).resolve().parent
REPO_DIR = BENCH_DIR.parent
EXAMPLE = REPO_DIR / "examples" / "session_endings.py"
RESULTS = BENCH_DIR / "results" / "profile.md"
HOST = "127.0.0.1"
LISTEN_LINE = "listenTCP(8080, factory)"


def first_cookie(port: int) -> str:
    deadline = time.monotonic() + 30
    while True:
        try:
            conn = http.client.HTTPConnection(HOST, port, timeout=5)
            conn.request("GET", "/logme")
            response = conn.getresponse()
            response.read()
            conn.close()
            header = response.getheader("Set-Cookie") or ""
            return header.split(";", 1)[0]
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


BARE = BENCH_DIR / "servers" / "bare_asgi.py"
TICKS = os.sysconf("SC_CLK_TCK")


def cpu_ticks(pid: int) -> tuple[int, int]:
    """(user, system) clock ticks the process has used."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]), int(fields[12])


def cpu_per_request(
    command: list[str], port: int, env: dict[str, str], runs: int, wrk: str
) -> tuple[float, float, float]:
    """Median (user us, system us, requests/s) per request over ``runs`` wrk runs."""
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, env=env, cwd=REPO_DIR)
    try:
        cookie = first_cookie(port) or "x=y"
        url = f"http://{HOST}:{port}/logme"
        base = [wrk, "-t1", "-c50", "-H", f"Cookie: {cookie}"]
        subprocess.run([*base, "-d1s", url], check=True, capture_output=True)
        samples = []
        for _ in range(runs):
            user0, sys0 = cpu_ticks(server.pid)
            out = subprocess.run([*base, "-d4s", url], check=True, capture_output=True, text=True)
            user1, sys1 = cpu_ticks(server.pid)
            count = int(out.stdout.split(" requests in")[0].split()[-1])
            rps = float(out.stdout.split("Requests/sec:")[1].split()[0])
            per = 1e6 / TICKS / count
            samples.append(((user1 - user0) * per, (sys1 - sys0) * per, rps))
    finally:
        stop(server)
    return tuple(statistics.median(column) for column in zip(*samples, strict=True))  # type: ignore[return-value]


def cpu_table(seed: Path, store: str, runs: int, wrk: str) -> list[str]:
    rows = []
    env = dict(os.environ, LAPSE_SESSION_STORE=store)
    bare_port = free_port()
    bare = cpu_per_request([sys.executable, str(BARE), str(bare_port)], bare_port, env, runs, wrk)
    lapse_port = free_port()
    lapse_seed = seed.with_name("seed_cpu.py")
    lapse_seed.write_text(
        EXAMPLE.read_text().replace(
            LISTEN_LINE, f'listenTCP({lapse_port}, factory, interface="{HOST}")'
        )
    )
    lapse = cpu_per_request([sys.executable, str(lapse_seed)], lapse_port, env, runs, wrk)
    for name, (user, system, rps) in (("bare ASGI app", bare), ("lapse seed", lapse)):
        rows.append(f"| {name} | {user:.1f} | {system:.1f} | {user + system:.1f} | {rps:,.0f} |")
    extra_user, extra_sys = lapse[0] - bare[0], lapse[1] - bare[1]
    budget = (bare[0] + bare[1]) / 0.8
    return [
        f"Server CPU per request (median of {runs} wrk runs of 4 s, touching one session):",
        "",
        "| server | user µs | kernel µs | total µs | requests/s |",
        "|---|---:|---:|---:|---:|",
        *rows,
        "",
        f"lapse's request path costs {extra_user:.1f} µs of user time and {extra_sys:.1f} µs of"
        f" kernel time per request more than the bare app. At 0.8x the bare app's throughput a"
        f" request may cost at most {budget:.1f} µs, i.e. lapse's whole path"
        f" {budget - bare[0] - bare[1]:.1f} µs.",
        "",
    ]


LAPSE_DIR = str(Path(lapse.__file__).resolve().parent)
"""Where the lapse package the servers import is (py-spy gives full paths)."""
WRITE = "the socket write (a transport.write: the send syscall)"


def source_line(path: str, number: int) -> str:
    """Line ``number`` of ``path``, or "" (py-spy sometimes names a frame with a path
    that is no file's: garbled, with a NUL byte)."""
    try:
        return linecache.getline(path, number)
    except (ValueError, OSError):
        return ""


def layer(frame: str) -> str:
    """The layer of one py-spy frame, ``function (path:line)`` with the full path: a line
    that calls ``transport.write`` is the send syscall under it (py-spy sees no frame below
    a C call), whoever's line it is."""
    where = frame.rsplit("(", 1)[-1].rstrip(")")
    path, _, number = where.rpartition(":")
    if number.isdigit() and "transport.write(" in source_line(path, int(number)):
        return WRITE
    # lapse by where its package is, not by a "/lapse/" in the path: a checkout in a
    # directory named lapse has its virtualenv's uvicorn under such a path too.
    inside = path[len(LAPSE_DIR) :] if path.startswith(LAPSE_DIR) else None
    if "/asyncio/" in path or "/uvloop/" in path or inside == "/internet/_asyncio.py":
        # lapse's reactor.run() is only the frame that called into the loop.
        return "event loop (uvloop, epoll and socket reads, no Python frame of its own)"
    if inside is not None:
        for part, name in (
            ("/internet/", "lapse's HTTP edge (lapse/internet: protocol, parser callbacks)"),
            ("/web/", "lapse's site (lapse/web: request, cookies, resources, response)"),
            ("/sessions/", "lapse's sessions (lapse/sessions)"),
        ):
            if inside.startswith(part):
                return name
        return "lapse, other"
    if "/uvicorn/" in path:
        return "uvicorn (its HTTP protocol, in Python)"
    if "/httptools/" in path:
        return "httptools"
    if path.endswith(("/seed.py", "/bare_asgi.py")):
        return "the app itself (the seed's render_GET; the bare app's sends)"
    return "other (standard library)"


IN_SITE = ("Site.__call__ ", "Site._serve_now ")
"""Frames that mean a sample is inside lapse's site: the ASGI call, or the answer given in
the parser's callback (the no-task path) that a plain request takes."""


def summarise(raw: Path, top: int) -> list[str]:
    by_layer: collections.Counter[str] = collections.Counter()
    own: collections.Counter[str] = collections.Counter()
    in_app = 0
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = stack.split(";")
        total += count
        by_layer[layer(frames[-1])] += count
        own[frames[-1].split(" (")[0] + " (" + frames[-1].rsplit("/", 1)[-1]] += count
        if any(frame.startswith(IN_SITE) for frame in frames):
            in_app += count
    if not total:
        return ["No samples were taken."]
    lines = [
        f"Samples: {total:,}",
        "",
        "| Layer (innermost Python frame) | Share of samples |",
        "|---|---:|",
    ]
    for name, count in by_layer.most_common():
        lines.append(f"| {name} | {100 * count / total:.1f} % |")
    lines += [
        "",
        f"Inside the site (`Site.__call__` or `Site._serve_now` on the stack):"
        f" {100 * in_app / total:.1f} % of samples;",
        "the rest is the HTTP stack and event loop around it.",
        "",
        f"| Top {top} functions by own samples (file:line of the sampled line) | Share |",
        "|---|---:|",
    ]
    for name, count in own.most_common(top):
        lines.append(f"| `{name}` | {100 * count / total:.1f} % |")
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--seconds", type=int, default=10, help="profiled seconds (10)")
    parser.add_argument("--rate", type=int, default=1000, help="py-spy samples/s (1000)")
    parser.add_argument("--store", default="memory:", help="LAPSE_SESSION_STORE (memory:)")
    parser.add_argument("--top", type=int, default=15, help="functions listed (15)")
    parser.add_argument("--cpu-runs", type=int, default=3, help="CPU accounting runs (3; 0=skip)")
    parser.add_argument(
        "--server",
        choices=("lapse", "bare"),
        default="lapse",
        help="the server profiled: the lapse seed (default) or the bare ASGI app",
    )
    args = parser.parse_args()
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    wrk = shutil.which("wrk")
    if not Path(py_spy).exists() or wrk is None:
        raise SystemExit("needs py-spy (the bench extra) and wrk (make bench installs both)")
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="lapse-profile-") as tmp:
        script = Path(tmp) / "seed.py"
        cpu = cpu_table(script, args.store, args.cpu_runs, wrk) if args.cpu_runs > 0 else []
        source = EXAMPLE.read_text()
        listen = f'listenTCP({port}, factory, interface="{HOST}")'
        script.write_text(source.replace(LISTEN_LINE, listen))
        raw = Path(tmp) / "profile.txt"
        env = dict(os.environ, LAPSE_SESSION_STORE=args.store)
        program = [str(script)] if args.server == "lapse" else [str(BARE), str(port)]
        server = subprocess.Popen(
            [sys.executable, *program], stdout=subprocess.DEVNULL, env=env, cwd=REPO_DIR
        )
        try:
            # (the bare app sets no cookie: a made-up one keeps its requests as large)
            cookie = first_cookie(port) or f"bench={secrets.token_hex(32)}"
            url = f"http://{HOST}:{port}/logme"
            load = subprocess.Popen(
                [wrk, "-t1", "-c50", f"-d{args.seconds + 3}s", "-H", f"Cookie: {cookie}", url],
                stdout=subprocess.PIPE,
                text=True,
            )
            time.sleep(1.5)
            subprocess.run(
                [
                    *(py_spy, "record", "-p", str(server.pid), "-d", str(args.seconds)),
                    *("-r", str(args.rate), "-f", "raw", "-o", str(raw), "--nonblocking"),
                    "--full-filenames",
                ],
                check=True,
                capture_output=True,
            )
            wrk_out, _ = load.communicate(timeout=60)
        finally:
            stop(server)
        rps = next((line for line in wrk_out.splitlines() if "Requests/sec" in line), "?")
        lines = [
            f"# Profile: lapse seed, store `{args.store}`, wrk -t1 -c50 touching one session"
            if args.server == "lapse"
            else "# Profile: the bare ASGI app, wrk -t1 -c50 with a cookie it ignores",
            "",
            f"- wrk: {rps.strip()} (while sampled with py-spy at {args.rate}/s, which slows it)",
            "",
            *cpu,
            *summarise(raw, args.top),
        ]
    text = "\n".join(lines) + "\n"
    print(text)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
