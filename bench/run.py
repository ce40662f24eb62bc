"""lapse vs. Twisted on the seed program's /logme endpoint: one command, one table.

Run with ``make bench`` (or ``.venv/bin/python bench/run.py --help`` for the options).
See bench/README.md for what each number means.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from http.cookies import SimpleCookie
from importlib import metadata
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO_DIR = BENCH_DIR.parent
LAPSE_EXAMPLE = REPO_DIR / "examples" / "session_endings.py"
TWISTED_SEED = BENCH_DIR / "twisted_seed.py"
MEMORY_PROBE = BENCH_DIR / "memory_probe.py"
RESULTS_FILE = BENCH_DIR / "results" / "latest.md"
LISTEN_LINE = "listenTCP(8080, factory)"
HOST = "127.0.0.1"
PATH = "/logme"
SYSTEMS = ("lapse", "twisted")
LABELS = {"lapse": "lapse", "twisted": "Twisted"}


# ---------------------------------------------------------------------------- options


@dataclass(frozen=True)
class Options:
    duration: int
    repeats: int
    warmup: int
    create_warmup: int
    threads: int
    connections: int
    memory_counts: list[int]
    systems: list[str]


def parse_options() -> Options:
    parser = argparse.ArgumentParser(description="Benchmark lapse against Twisted (see README).")
    parser.add_argument("--duration", type=int, default=4, help="seconds per wrk run (4)")
    parser.add_argument("--repeats", type=int, default=5, help="wrk runs per metric, >= 3 (5)")
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
        help="comma-separated live-session counts for the memory probe (100000,1000000)",
    )
    parser.add_argument(
        "--systems",
        default="lapse,twisted",
        help="comma-separated subset of lapse,twisted (default: both)",
    )
    args = parser.parse_args()
    if args.repeats < 3:
        parser.error("--repeats must be at least 3")
    systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    if not systems or any(s not in SYSTEMS for s in systems):
        parser.error("--systems must be a subset of lapse,twisted")
    counts = [int(c) for c in args.memory_counts.split(",") if c.strip()]
    return Options(
        duration=args.duration,
        repeats=args.repeats,
        warmup=args.warmup,
        create_warmup=args.create_warmup,
        threads=args.threads,
        connections=args.connections,
        memory_counts=counts,
        systems=systems,
    )


# ---------------------------------------------------------------------------- wrk


@dataclass(frozen=True)
class WrkResult:
    rps: float
    requests: int
    non_2xx: int
    socket_errors: int

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


def parse_wrk(output: str) -> WrkResult:
    rps = re.search(r"^Requests/sec:\s+([\d.]+)", output, re.MULTILINE)
    if rps is None:
        raise RuntimeError(f"no 'Requests/sec:' in wrk output:\n{output}")
    total = re.search(r"^\s*(\d+) requests in", output, re.MULTILINE)
    non_2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", output)
    sock = re.search(
        r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output
    )
    return WrkResult(
        rps=float(rps.group(1)),
        requests=int(total.group(1)) if total else 0,
        non_2xx=int(non_2xx.group(1)) if non_2xx else 0,
        socket_errors=sum(int(n) for n in sock.groups()) if sock else 0,
    )


def run_wrk(wrk: str, port: int, opts: Options, seconds: int, cookie: str | None) -> WrkResult:
    cmd = [wrk, f"-t{opts.threads}", f"-c{opts.connections}", f"-d{seconds}s"]
    if cookie is not None:
        cmd += ["-H", f"Cookie: {cookie}"]
    cmd.append(f"http://{HOST}:{port}{PATH}")
    done = subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=seconds + 60)
    return parse_wrk(done.stdout)


# ---------------------------------------------------------------------------- servers


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


def lapse_script(port: int, workdir: Path) -> Path:
    """The repo's example with only its listen line changed to our port and loopback."""
    source = LAPSE_EXAMPLE.read_text()
    if source.count(LISTEN_LINE) != 1:
        raise RuntimeError(f"expected exactly one {LISTEN_LINE!r} in {LAPSE_EXAMPLE}")
    patched = source.replace(LISTEN_LINE, f'listenTCP({port}, factory, interface="{HOST}")')
    script = workdir / "lapse_session_endings.py"
    script.write_text(patched)
    return script


def server_command(system: str, port: int, workdir: Path) -> list[str]:
    if system == "twisted":
        return [sys.executable, str(TWISTED_SEED), str(port)]
    return [sys.executable, str(lapse_script(port, workdir))]


def get_logme(port: int, cookie: str | None = None) -> tuple[int, str | None]:
    """One GET /logme; returns (status, Set-Cookie header or None)."""
    conn = http.client.HTTPConnection(HOST, port, timeout=5)
    try:
        headers = {"Cookie": cookie} if cookie is not None else {}
        conn.request("GET", PATH, headers=headers)
        response = conn.getresponse()
        response.read()
        return response.status, response.getheader("Set-Cookie")
    finally:
        conn.close()


def session_cookie(port: int) -> str:
    """Create a session with a cookie-less GET; return it as ``NAME=VALUE``."""
    status, set_cookie = get_logme(port)
    if status != 200 or not set_cookie:
        raise RuntimeError(f"GET {PATH} gave status {status}, Set-Cookie {set_cookie!r}")
    morsels = list(SimpleCookie(set_cookie).values())
    if not morsels:
        raise RuntimeError(f"unparseable Set-Cookie: {set_cookie!r}")
    return f"{morsels[0].key}={morsels[0].value}"


def wait_until_answering(proc: subprocess.Popen[bytes], port: int, log: Path) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        with contextlib.suppress(OSError, http.client.HTTPException):
            get_logme(port)
            return
        time.sleep(0.1)
    raise RuntimeError(f"server on port {port} did not answer within 30 s")


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


@contextlib.contextmanager
def running_server(system: str) -> Iterator[int]:
    """Start one server on a free loopback port; yield the port; always stop it."""
    with tempfile.TemporaryDirectory(prefix=f"bench-{system}-") as tmp:
        workdir = Path(tmp)
        port = free_port()
        log = workdir / "stderr.log"
        with log.open("wb") as stderr:
            # stdout (one line per expired session) goes to DEVNULL: it can never fill a pipe.
            proc = subprocess.Popen(
                server_command(system, port, workdir),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=stderr,
                cwd=REPO_DIR,
            )
            try:
                wait_until_answering(proc, port, log)
                yield port
            finally:
                stop(proc)


# ---------------------------------------------------------------------------- scenarios


@dataclass
class Outcome:
    """Everything measured for one system."""

    touch: list[WrkResult] = field(default_factory=list)
    create: list[WrkResult] = field(default_factory=list)
    cookie_name: str = ""
    session_kept: list[bool] = field(default_factory=list)
    memory: dict[int, dict[str, float]] = field(default_factory=dict)


def touch_once(wrk: str, port: int, opts: Options, seconds: int) -> tuple[WrkResult, str, bool]:
    """One wrk run on a session made just before it; then check the session is still there.

    A fresh session per run: current Twisted does not refresh a session it finds by cookie,
    so one session reused across runs would expire 5 s after creation (see README).
    """
    cookie = session_cookie(port)
    result = run_wrk(wrk, port, opts, seconds, cookie)
    status, set_cookie = get_logme(port, cookie)  # a live session answers without Set-Cookie
    return result, cookie.split("=", 1)[0], status == 200 and set_cookie is None


def bench_touch(wrk: str, system: str, opts: Options, outcome: Outcome) -> None:
    with running_server(system) as port:
        if opts.warmup > 0:
            touch_once(wrk, port, opts, opts.warmup)
        for _ in range(opts.repeats):
            result, outcome.cookie_name, kept = touch_once(wrk, port, opts, opts.duration)
            outcome.touch.append(result)
            outcome.session_kept.append(kept)


def bench_create(wrk: str, system: str, opts: Options, outcome: Outcome) -> None:
    with running_server(system) as port:
        if opts.create_warmup > 0:
            run_wrk(wrk, port, opts, opts.create_warmup, None)
        outcome.create = [
            run_wrk(wrk, port, opts, opts.duration, None) for _ in range(opts.repeats)
        ]


def probe_memory(system: str, count: int) -> dict[str, float]:
    cmd = [sys.executable, str(MEMORY_PROBE), "--system", system, "--count", str(count)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=1800)
    if done.returncode != 0:
        raise RuntimeError(f"memory probe failed for {system} {count}:\n{done.stderr}")
    result: dict[str, float] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def bench_memory(system: str, count: int, outcome: Outcome) -> None:
    outcome.memory[count] = probe_memory(system, count)


def run_step(label: str, step: Callable[[], None]) -> None:
    print(f"  {label} ...", end="", flush=True)
    started = time.monotonic()
    step()
    print(f" {time.monotonic() - started:.0f} s", flush=True)


def run_all(opts: Options) -> dict[str, Outcome]:
    wrk = ensure_wrk()
    outcomes = {system: Outcome() for system in opts.systems}
    for system in opts.systems:
        outcome = outcomes[system]
        print(f"{LABELS[system]}:", flush=True)
        run_step("touch existing session", partial(bench_touch, wrk, system, opts, outcome))
        run_step("create sessions", partial(bench_create, wrk, system, opts, outcome))
        for count in opts.memory_counts:
            run_step(f"memory, {count:,} sessions", partial(bench_memory, system, count, outcome))
    return outcomes


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


def median_rps(results: list[WrkResult]) -> float:
    return statistics.median(r.rps for r in results)


def fmt_rps(results: list[WrkResult]) -> str:
    if not results:
        return "—"
    errors = sum(r.errors for r in results)
    flag = f" ⚠ {errors} errors" if errors else ""
    return f"{median_rps(results):,.0f}{flag}"


def fmt_ratio(numerator: float | None, denominator: float | None, suffix: str) -> str:
    if not numerator or not denominator:
        return "—"
    return f"{numerator / denominator:.2f}x {suffix}"


def memory_of(outcome: Outcome | None, count: int) -> float | None:
    if outcome is None or count not in outcome.memory:
        return None
    return outcome.memory[count]["bytes_per_session"]


def fmt_memory(outcome: Outcome | None, count: int) -> str:
    value = memory_of(outcome, count)
    if outcome is None or value is None:
        return "—"
    flag = "" if outcome.memory[count]["count_ok"] else " ⚠ wrong session count"
    return f"{value:,.0f} B{flag}"


def rps_row(
    name: str,
    lapse: list[WrkResult] | None,
    twisted: list[WrkResult] | None,
    notes: tuple[str, str] = ("", ""),
) -> str:
    """One throughput row; ``notes`` (lapse, Twisted) are appended to the two cells."""
    lapse_note, twisted_note = notes
    ratio = fmt_ratio(
        median_rps(lapse) if lapse else None,
        median_rps(twisted) if twisted else None,
        "(lapse/Twisted)",
    )
    cells = f"{fmt_rps(lapse or [])}{lapse_note} | {fmt_rps(twisted or [])}{twisted_note}"
    return f"| {name} | {cells} | {ratio} |"


def lost_note(outcome: Outcome | None) -> str:
    if outcome is None or all(outcome.session_kept):
        return ""
    return " ⚠ session lost"


def summary_table(outcomes: dict[str, Outcome], opts: Options) -> list[str]:
    lapse, twisted = outcomes.get("lapse"), outcomes.get("twisted")
    lines = [
        "| Metric (median) | lapse | Twisted | Ratio |",
        "|---|---:|---:|---:|",
        rps_row(
            "requests/s, touching one existing session",
            lapse.touch if lapse else None,
            twisted.touch if twisted else None,
            (lost_note(lapse), lost_note(twisted)),
        ),
        rps_row(
            "requests/s, creating a session per request",
            lapse.create if lapse else None,
            twisted.create if twisted else None,
        ),
    ]
    for count in opts.memory_counts:
        ratio = fmt_ratio(memory_of(twisted, count), memory_of(lapse, count), "less memory")
        lines.append(
            f"| memory per live session, {count:,} sessions (in-process) "
            f"| {fmt_memory(lapse, count)} | {fmt_memory(twisted, count)} | {ratio} |"
        )
    return lines


def raw_lines(outcomes: dict[str, Outcome]) -> list[str]:
    lines = ["| System | Metric | Repeats (requests/s) | Requests | Non-2xx | Socket errors |"]
    lines.append("|---|---|---|---:|---:|---:|")
    for system, outcome in outcomes.items():
        for metric, results in (("touch", outcome.touch), ("create", outcome.create)):
            repeats = ", ".join(f"{r.rps:,.0f}" for r in results)
            total = sum(r.requests for r in results)
            non_2xx = sum(r.non_2xx for r in results)
            sock = sum(r.socket_errors for r in results)
            lines.append(
                f"| {LABELS[system]} | {metric} | {repeats} | {total:,} | {non_2xx} | {sock} |"
            )
    if not any(outcome.memory for outcome in outcomes.values()):
        return lines
    lines += [
        "",
        "| System | Sessions | RSS before | RSS after | Bytes/session | makeSession time |",
    ]
    lines.append("|---|---:|---:|---:|---:|---:|")
    for system, outcome in outcomes.items():
        for count, m in outcome.memory.items():
            lines.append(
                f"| {LABELS[system]} | {count:,} | {m['rss_before'] / 2**20:,.1f} MiB "
                f"| {m['rss_after'] / 2**20:,.1f} MiB | {m['bytes_per_session']:,.1f} "
                f"| {m['make_seconds']:.2f} s |"
            )
    return lines


def flags(outcomes: dict[str, Outcome]) -> list[str]:
    found: list[str] = []
    for system, outcome in outcomes.items():
        label = LABELS[system]
        errors = sum(r.errors for r in outcome.touch + outcome.create)
        if errors:
            found.append(f"{label}: {errors} non-2xx responses or socket errors during wrk runs")
        lost = outcome.session_kept.count(False)
        if lost:
            found.append(
                f"{label}: in {lost} of {len(outcome.session_kept)} touch runs the session was "
                "gone right after wrk (a GET with its cookie got a new Set-Cookie)"
            )
        for count, m in outcome.memory.items():
            if not m["count_ok"]:
                found.append(f"{label}: {m['live_sessions']:,} live sessions, expected {count:,}")
    return found


def report(outcomes: dict[str, Outcome], opts: Options) -> tuple[str, list[str]]:
    cookies = ", ".join(f"{LABELS[s]} `{o.cookie_name}`" for s, o in outcomes.items())
    problems = flags(outcomes)
    lines = [
        "# lapse vs. Twisted: seed program, GET /logme",
        "",
        f"- Machine: {os.cpu_count()} CPUs ({cpu_model()}), {platform.platform()}",
        f"- Python {platform.python_version()}; twisted {version_of('twisted')}; "
        f"lapse {version_of('lapse')}; uvicorn {version_of('uvicorn')}",
        f"- wrk: `-t{opts.threads} -c{opts.connections} -d{opts.duration}s`, "
        f"{opts.repeats} repeats per metric, one fresh server per metric, 127.0.0.1; "
        f"discarded warm-up: {opts.warmup} s (touch), {opts.create_warmup} s (create)",
        "- Touch runs: a fresh session (one cookie-less GET) before each wrk run, checked right "
        "after it; create runs: no cookie, so each request makes a session",
        f"- Session cookies seen: {cookies}",
        "- Memory: measured in-process via `site.makeSession()` in a fresh interpreter "
        "(RSS delta / N), not over HTTP",
        "",
        *summary_table(outcomes, opts),
        "",
        "Problems: " + ("; ".join(problems) if problems else "none (no errors, session kept)"),
        "",
        "## Raw repeats",
        "",
        *raw_lines(outcomes),
        "",
    ]
    return "\n".join(lines), problems


def main() -> int:
    opts = parse_options()
    outcomes = run_all(opts)
    text, problems = report(outcomes, opts)
    print()
    print(text)
    RESULTS_FILE.parent.mkdir(parents=True, exist_ok=True)
    RESULTS_FILE.write_text(text)
    print(f"(written to {RESULTS_FILE.relative_to(REPO_DIR)})")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
