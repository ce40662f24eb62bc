"""What stalls a lapse server's event loop while wrk creates sessions (the create p99).

It starts the seed program (examples/session_endings.py, memory store) on a free
127.0.0.1 port with a probe inserted before its listen line, warms it up with wrk
(no cookie: every request makes a session), then does ``--runs`` wrk runs of
``--seconds`` each on the same server. Inside the server the probe records, for each
run:

- every garbage collection (``gc.callbacks``): generation, duration, objects collected;
- the event loop's lag: a callback asked for every 1 ms, how late each ran, and the
  CPU time the loop's thread used meanwhile (a lag with little of it is the machine's:
  the process was not running; with much, the server's own work held the loop);
- every expiry drain of the keeper (``LocalKeeper.drain``): its duration and the
  sessions it ended;
- the live-session count, every 100 ms;
- per request answered in the protocol's callback (all of the seed's, on the memory
  store): the time from the loop reading it (``data_received``) to its response's write,
  and the time from a response's write to the loop reading the next request on the same
  connection. wrk's latency of a request is at most the latter before it, the former,
  and the latter after it: what is beyond that sum was not spent in the server's loop.
  The probe's own pause (writing its records, on a signal between runs) is timed and
  shown where it overlaps a stall; a span it interrupted is not counted.

Per run it prints wrk's p50/p99/p99.9/max (a Lua ``done`` hook), the server's RSS, and
the stalls seen in the server: the longest by the loop's own CPU time and the longest
by wall time, and what overlapped each (a collection of which generation, a drain of
how many sessions). The machine's load average is printed with
each run: the stall durations measured inside the server are steadier under load than
wrk's tail.

Usage: .venv/bin/python bench/tail_probe.py [--runs 5] [--seconds 4] [--warmup 6]
       [--json PATH] [--env NAME=VALUE ...]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

if not __package__:  # run as a script: make the bench package importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.expiry_lateness import percentile
from bench.systems import (
    HOST,
    LISTEN_LINE,
    PATH,
    cpu_seconds,
    free_port,
    stop,
    wait_until_answering,
)

BENCH_DIR = Path(__file__).resolve().parent
REPO_DIR = BENCH_DIR.parent
EXAMPLE = REPO_DIR / "examples" / "session_endings.py"

PROBE = """
# -- inserted by bench/tail_probe.py --
import gc as _gc, json as _json, os as _os, signal as _signal, time as _time

_probe = {"gc": [], "lag": [], "drain": [], "live": [], "serve": [], "gap": [], "dump": []}
_gc_start = [0.0]
_gc_young = [0]
_gc_cpu = [0.0]


def _on_gc(phase, info):
    now = _time.perf_counter()
    if phase == "start":
        _gc_young[0] = len(_gc.get_objects(0)) if info["generation"] == 0 else -1
        _gc_start[0] = _time.perf_counter()
        _gc_cpu[0] = _time.thread_time()
    else:
        _probe["gc"].append(
            (_gc_start[0], now - _gc_start[0], info["generation"], info["collected"],
             _gc_young[0], _time.thread_time() - _gc_cpu[0])
        )


_gc.callbacks.append(_on_gc)
_keeper = factory._keeper
_plain_ring = _keeper._alarm._ring


def _ring():
    before = len(factory.sessions)
    start = _time.perf_counter()
    cpu = _time.thread_time()
    _plain_ring()
    _probe["drain"].append(
        (
            start,
            _time.perf_counter() - start,
            before - len(factory.sessions),
            _time.thread_time() - cpu,
        )
    )


_keeper._alarm._ring = _ring

from lapse.internet import _http as _probe_http

_Protocol = _probe_http.HTTPProtocol
_dumped = [0.0]  # when the last dump ended: a span begun before it straddled it
_read_at = {}
_written_at = {}
_plain_made, _plain_received, _plain_send = (
    _Protocol.connection_made, _Protocol.data_received, _Protocol._send_now
)


def _connection_made(self, transport):
    _read_at.pop(id(self), None)
    _written_at.pop(id(self), None)
    _plain_made(self, transport)


def _data_received(self, data):
    now = _time.perf_counter()
    written = _written_at.pop(id(self), None)
    if written is not None and written >= _dumped[0]:
        _probe["gap"].append(now - written)
    _read_at[id(self)] = now
    _plain_received(self, data)


def _send_now(self, cycle, *response):
    _plain_send(self, cycle, *response)
    now = _time.perf_counter()
    _written_at[id(self)] = now
    read = _read_at.pop(id(self), None)
    if read is not None and read >= _dumped[0]:
        _probe["serve"].append(now - read)


_Protocol.connection_made = _connection_made
_Protocol.data_received = _data_received
_Protocol._send_now = _send_now


def _lag_monitor():
    import asyncio

    loop = asyncio.get_running_loop()
    state = {"due": _time.perf_counter() + 0.001, "beat": 0, "cpu": _time.thread_time()}

    def tick():
        now = _time.perf_counter()
        cpu = _time.thread_time()
        late = now - state["due"]
        if late > 0.002:
            # (the CPU time the loop's thread used meanwhile: a lag with little of
            # it is the machine's doing, the process was not running)
            _probe["lag"].append((state["due"], late, cpu - state["cpu"]))
        state["cpu"] = cpu
        state["beat"] += 1
        if state["beat"] % 100 == 0:
            _probe["live"].append((now, len(factory.sessions)))
        state["due"] = now + 0.001
        loop.call_later(0.001, tick)

    loop.call_later(0.001, tick)


if _os.environ.get("TAIL_PROBE_GARBAGE"):
    _gc.set_debug(_gc.DEBUG_SAVEALL)


def _dump(signum, frame):
    # The records so far are swapped for empty lists, written, and freed before the
    # file appears: bench/tail_probe.py starts the next wrk run when it does, so the
    # probe's own pause (timed, and kept with the next run's records) is over by then.
    started = _time.perf_counter()
    path = _os.environ["TAIL_PROBE_OUT"]
    taken = dict(_probe)
    for name in taken:
        _probe[name] = []
    if _os.environ.get("TAIL_PROBE_GARBAGE"):
        import collections as _collections

        _gc.collect()
        kinds = _collections.Counter(
            getattr(type(o), "__qualname__", "?") + ":" + getattr(o, "__qualname__", "")
            if callable(o) and not isinstance(o, type) else type(o).__qualname__
            for o in _gc.garbage
        )
        taken["garbage"] = kinds.most_common(40)
        _gc.garbage.clear()
    with open(path + ".tmp", "w") as out:
        _json.dump(taken, out)
    del taken
    _dumped[0] = _time.perf_counter()
    _probe["dump"].append((started, _dumped[0] - started))
    _os.replace(path + ".tmp", path)


_signal.signal(_signal.SIGUSR1, _dump)
if _os.environ.get("TAIL_PROBE_EXEC"):  # an experiment: code run in the seed's globals
    with open(_os.environ["TAIL_PROBE_EXEC"]) as _source:
        exec(_source.read())
reactor.callWhenRunning(_lag_monitor)
# -- end of insertion --
"""

LUA = """
done = function(summary, latency, requests)
  io.write(string.format("PCT %d %d %d %d %d\\n", latency:percentile(50),
    latency:percentile(99), latency:percentile(99.9), latency.max, summary.requests))
  for _, p in ipairs({90, 95, 98, 99, 99.5, 99.8, 99.9}) do
    io.write(string.format("P%g=%.1f ", p, latency:percentile(p) / 1000))
  end
  io.write("\\n")
end
"""


PERCENTILES = (50, 99, 99.9)


def probed_script(port: int, workdir: Path) -> Path:
    source = EXAMPLE.read_text()
    if source.count(LISTEN_LINE) != 1:
        raise RuntimeError(f"expected exactly one {LISTEN_LINE!r} in {EXAMPLE}")
    listen = f'listenTCP({port}, factory, interface="{HOST}")'
    patched = source.replace(LISTEN_LINE, listen)
    lines = patched.splitlines(keepends=True)
    at = next(i for i, line in enumerate(lines) if "listenTCP(" in line)
    script = workdir / "probed_session_endings.py"
    script.write_text("".join([*lines[:at], PROBE, "\n", *lines[at:]]))
    return script


def wrk(port: int, seconds: float, lua: Path) -> dict[str, float]:
    cmd = [
        shutil.which("wrk") or "wrk",
        "-t1",
        "-c50",
        f"-d{seconds}s",
        "-s",
        str(lua),
        f"http://{HOST}:{port}{PATH}",
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    line = next(line for line in out.splitlines() if line.startswith("PCT "))
    print("  wrk:", next(x for x in out.splitlines() if x.startswith("P90")), flush=True)
    p50, p99, p999, worst, requests = (int(x) for x in line.split()[1:])
    return {
        "p50_ms": p50 / 1000,
        "p99_ms": p99 / 1000,
        "p999_ms": p999 / 1000,
        "max_ms": worst / 1000,
        "rps": requests / seconds,
    }


def collect(pid: int, path: Path) -> dict[str, list[list[float]]]:
    path.unlink(missing_ok=True)
    os.kill(pid, signal.SIGUSR1)
    deadline = time.monotonic() + 10
    while not path.exists():
        if time.monotonic() > deadline:
            raise RuntimeError("the server did not dump its probe")
        time.sleep(0.01)
    data: dict[str, list[list[float]]] = json.loads(path.read_text())
    return data


def overlaps(start: float, length: float, events: list[list[float]]) -> list[list[float]]:
    return [e for e in events if e[0] < start + length and e[0] + e[1] > start]


def summarise(run: int, figures: dict[str, float], probe: dict[str, Any], load: str) -> str:
    gcs = probe["gc"]
    lags = sorted(probe["lag"], key=lambda e: -e[1])
    drains = probe["drain"]
    dumps = probe.get("dump", [])
    lines = [
        f"run {run}: load {load}; wrk p50 {figures['p50_ms']:.2f} p99 {figures['p99_ms']:.2f} "
        f"p99.9 {figures['p999_ms']:.2f} max {figures['max_ms']:.2f} ms, "
        f"{figures['rps']:.0f} req/s, server CPU {figures['cpu_us']:.0f} µs/request, "
        f"RSS {figures['rss_mb']:.0f} MB"
    ]
    for gen in (0, 1, 2):
        times = [e[1] * 1000 for e in gcs if e[2] == gen]
        cpus = [e[5] * 1000 for e in gcs if e[2] == gen]
        if times:
            lines.append(
                f"  gc gen{gen}: {len(times)} collections, max {max(times):.1f} ms "
                f"(CPU {max(cpus):.1f} ms), total {sum(times):.0f} ms"
            )
    if drains:
        times = [e[1] * 1000 for e in drains]
        cpus = [e[3] * 1000 for e in drains]
        ends = [e[2] for e in drains]
        lines.append(
            f"  drains: {len(drains)}, max {max(times):.1f} ms (CPU {max(cpus):.1f} ms), "
            f"total {sum(times):.0f} ms, max {max(ends)} ended in one, {sum(ends)} ended"
        )
    for name, what in (("serve", "read -> write"), ("gap", "write -> next read")):
        spans = sorted(probe.get(name, []))
        if spans:
            at = [percentile(spans, q) * 1000 for q in PERCENTILES]
            lines.append(
                f"  server, {what} ({len(spans)}): "
                + " ".join(f"p{q:g} {v:.2f}" for q, v in zip(PERCENTILES, at, strict=True))
                + f" max {spans[-1] * 1000:.2f} ms"
            )
    live = [e[1] for e in probe["live"]]
    if live:
        lines.append(f"  live sessions: {min(live)}-{max(live)}")
    busy = sorted(probe["lag"], key=lambda e: -e[2])
    if busy:
        lines.append(
            "  longest stalls by the loop's own CPU time: "
            + ", ".join(
                f"{cpu * 1000:.1f} ms cpu of {lag * 1000:.1f} ms ["
                + " ".join(
                    [f"gc{g[2]} {g[1] * 1000:.0f}ms" for g in overlaps(t, lag, gcs)]
                    + [f"drain {d[2]} {d[1] * 1000:.0f}ms" for d in overlaps(t, lag, drains)]
                    + [f"probe dump {d[1] * 1000:.0f}ms" for d in overlaps(t, lag, dumps)]
                )
                + "]"
                for t, lag, cpu in busy[:5]
            )
        )
    if "garbage" in probe:
        lines.append(f"  garbage: {probe['garbage']}")
    total_lag = sum(e[1] for e in lags) * 1000
    lines.append(
        f"  loop lags > 2 ms: {len(lags)}, total {total_lag:.0f} ms; longest: "
        + ", ".join(
            f"{lag * 1000:.1f} ms ["
            + " ".join(
                [f"gc{g[2]} {g[1] * 1000:.0f}ms {g[3]} of {g[4]}" for g in overlaps(t, lag, gcs)]
                + [f"drain {d[2]} {d[1] * 1000:.0f}ms" for d in overlaps(t, lag, drains)]
                + [f"probe dump {d[1] * 1000:.0f}ms" for d in overlaps(t, lag, dumps)]
            )
            + "]"
            for t, lag, _ in lags[:6]
        )
    )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--seconds", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=6)
    parser.add_argument("--json", type=Path, help="write every run's figures and probe here")
    parser.add_argument("--env", action="append", default=[], help="NAME=VALUE for the server")
    args = parser.parse_args()
    env = {k: v for k, v in os.environ.items() if not k.startswith("LAPSE_")}
    env["LAPSE_SESSION_STORE"] = "memory:"
    for item in args.env:
        name, _, value = item.partition("=")
        env[name] = value
    results = []
    with tempfile.TemporaryDirectory(prefix="tail-probe-") as tmp:
        workdir = Path(tmp)
        port = free_port()
        out = workdir / "probe.json"
        env["TAIL_PROBE_OUT"] = str(out)
        lua = workdir / "pct.lua"
        lua.write_text(LUA)
        log = workdir / "stderr.log"
        script = probed_script(port, workdir)
        with log.open("wb") as stderr:
            proc = subprocess.Popen(
                [sys.executable, str(script)],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=stderr,
                cwd=REPO_DIR,
                env=env,
            )
            try:
                wait_until_answering(proc, port, log, 30)
                if args.warmup:
                    wrk(port, args.warmup, lua)
                for run in range(1, args.runs + 1):
                    collect(proc.pid, out)
                    cpu = cpu_seconds(proc.pid)
                    figures = wrk(port, args.seconds, lua)
                    requests = figures["rps"] * args.seconds
                    figures["cpu_us"] = (cpu_seconds(proc.pid) - cpu) / max(requests, 1) * 1e6
                    probe = collect(proc.pid, out)
                    load = " ".join(Path("/proc/loadavg").read_text().split()[:3])
                    pages = int(Path(f"/proc/{proc.pid}/statm").read_text().split()[1])
                    figures["rss_mb"] = pages * os.sysconf("SC_PAGE_SIZE") / 2**20
                    print(summarise(run, figures, probe, load), flush=True)
                    results.append({"figures": figures, "probe": probe, "load": load})
            finally:
                stop(proc)
    p99s = [r["figures"]["p99_ms"] for r in results]
    if p99s:
        print(
            f"p99 over {len(p99s)} runs: median {statistics.median(p99s):.2f} ms, "
            f"max {max(p99s):.2f} ms"
        )
    if args.json:
        args.json.write_text(json.dumps(results))


if __name__ == "__main__":
    main()
