"""The Markdown report: the tables, the problems found, the machine and versions."""

from __future__ import annotations

import os
import platform
import statistics
import time

from bench.figures import (
    Target,
    create_rps,
    median_or_none,
    memory_per_session,
    ratio,
    runs_rps,
    side_rps,
    targets,
    touch_rps,
    worst_p99,
)
from bench.loadgen import WrkResult
from bench.machine import cpu_model, lapse_source, version_of, wrk_version
from bench.options import Options
from bench.pg_traffic import postgres_table
from bench.principal_report import TITLE as PRINCIPAL_TITLE
from bench.principal_report import principal_calls_table, principal_cpu_table, principal_table
from bench.scaling_report import TITLE as SCALING_TITLE
from bench.scaling_report import scaling_table
from bench.scenarios import Bench, Results, TouchRun
from bench.systems import CLUSTER, REFERENCE, SINGLE_REDIS, SYSTEMS, System
from bench.tail_report import TITLE as TAIL_TITLE
from bench.tail_report import tail_cells, tail_table
from bench.workers_report import workers_table


def num(value: float | None, fmt: str = ",.0f", unit: str = "") -> str:
    return "—" if value is None else f"{value:{fmt}}{unit}"


def times(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}x"


def errors_note(results: list[WrkResult]) -> str:
    errors = sum(r.errors for r in results)
    return f" ⚠ {errors} errors" if errors else ""


def kept_cell(system: System, runs: list[TouchRun]) -> str:
    if not runs:
        return "—"
    if system.cookie is None:
        return "n/a"
    kept = sum(r.kept for r in runs)
    return f"{kept}/{len(runs)}" + ("" if kept == len(runs) else " ⚠")


def throughput_table(results: Results) -> list[str]:
    outcomes = results.outcomes
    ref_touch = touch_rps(outcomes.get(REFERENCE))
    ref_create = create_rps(outcomes.get(REFERENCE))
    lines = [
        "| System | touch req/s | vs lapse | touch p99 | touch p99.9 | touch p99, worst run "
        "| create req/s | vs lapse | create p99 | create p99.9 | create p99, worst run "
        "| session kept |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for key, outcome in outcomes.items():
        system = SYSTEMS[key]
        touch_results = [r.result for r in outcome.touch]
        if not touch_results and not outcome.create:
            continue  # not measured so (lapse serve --workers: a section of its own)
        t, c = touch_rps(outcome), create_rps(outcome)
        t_p99, t_p999, t_worst, _ = tail_cells(touch_results)
        c_p99, c_p999, c_worst, _ = tail_cells(outcome.create)
        lines.append(
            f"| {system.label} | {num(t)}{errors_note(touch_results)} "
            f"| {times(ratio(t, ref_touch))} | {t_p99} | {t_p999} | {t_worst} "
            f"| {num(c)}{errors_note(outcome.create)} "
            f"| {times(ratio(c, ref_create))} | {c_p99} | {c_p999} | {c_worst} "
            f"| {kept_cell(system, outcome.touch)} |"
        )
    return lines


def memory_table(results: Results, opts: Options) -> list[str]:
    probed = [k for k, o in results.outcomes.items() if o.memory]
    if not probed:
        return []
    head = "| System |" + "".join(f" {c:,} sessions | vs lapse |" for c in opts.memory_counts)
    lines = [head, "|---|" + "---:|---:|" * len(opts.memory_counts)]
    ref = results.outcomes.get(REFERENCE)
    for key in probed:
        outcome = results.outcomes[key]
        cells = []
        for count in opts.memory_counts:
            value = memory_per_session(outcome, count)
            flag = ""
            if count in outcome.memory and not outcome.memory[count]["count_ok"]:
                flag = " ⚠ wrong count"
            cells.append(
                f" {num(value, ',.0f', ' B')}{flag} | "
                f"{times(ratio(value, memory_per_session(ref, count)))} |"
            )
        lines.append(f"| {SYSTEMS[key].label} |" + "".join(cells))
    return lines


def side_table(results: Results) -> list[str]:
    """The side-by-side runs (bench/side_by_side.py): medians, ratios to lapse, p99."""
    side = results.side
    keys = [k for k in SYSTEMS if k in side.touch or k in side.create]
    if not keys:
        return []
    lines = [
        "| System | touch req/s | vs lapse | touch p99 | create req/s | vs lapse | create p99 "
        "| create p99, worst run | runs | touch CPU µs/request | vs lapse, by CPU "
        "| create CPU µs/request | vs lapse, by CPU | steal per run, ms (touch; create) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    ref_touch = side_rps(results, "touch", REFERENCE)
    ref_create = side_rps(results, "create", REFERENCE)
    ref_touch_cpu = side_cpu(side.touch.get(REFERENCE, []))
    ref_create_cpu = side_cpu(side.create.get(REFERENCE, []))
    for key in keys:
        touch, create = side.touch.get(key, []), side.create.get(key, [])
        touched, created = side_rps(results, "touch", key), side_rps(results, "create", key)
        touch_cpu, create_cpu = side_cpu(touch), side_cpu(create)
        stolen = [median_or_none([r.steal_ms for r in runs]) for runs in (touch, create)]
        lines.append(
            f"| {SYSTEMS[key].label} | {num(touched)}{errors_note(touch)} "
            f"| {times(ratio(touched, ref_touch))} "
            f"| {num(median_or_none([r.p99_ms for r in touch]), '.2f', ' ms')} "
            f"| {num(created)}{errors_note(create)} | {times(ratio(created, ref_create))} "
            f"| {num(median_or_none([r.p99_ms for r in create]), '.2f', ' ms')} "
            f"| {num(worst_p99(create), '.2f', ' ms')} | {len(touch)} + {len(create)} "
            f"| {num(touch_cpu, '.1f')} | {times(ratio(ref_touch_cpu, touch_cpu))} "
            f"| {num(create_cpu, '.1f')} | {times(ratio(ref_create_cpu, create_cpu))} "
            f"| {num(stolen[0])}; {num(stolen[1])} (medians) |"
        )
    lines += [
        "",
        "By CPU: lapse's server CPU time per request over the system's (user + system, "
        "medians of the runs), the requests/s ratio those costs imply. The hypervisor's "
        "steal is not counted in a process's CPU time, so where the systems' runs lost "
        "unequal steal this column is the steadier of the two.",
    ]
    return lines


def side_cpu(runs: list[WrkResult]) -> float | None:
    """The median server CPU µs per request of ``runs`` (None: not measured)."""
    return median_or_none([r.server_cpu_us for r in runs])


def live_table(results: Results, opts: Options) -> list[str]:
    rows = [(k, o) for k, o in results.outcomes.items() if o.live_base or o.live_many]
    if not rows:
        return []
    n = f"{opts.live_sessions:,}"
    lines = [
        f"| System | touch req/s, 1 live | touch req/s, {n} live | {n} / 1 | p99, 1 live "
        f"| p99, {n} live | session kept |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for key, o in rows:
        base, many = runs_rps(o.live_base), runs_rps(o.live_many)
        base_p99 = median_or_none([r.result.p99_ms for r in o.live_base])
        many_p99 = median_or_none([r.result.p99_ms for r in o.live_many])
        lines.append(
            f"| {SYSTEMS[key].label} | {num(base)}{errors_note([r.result for r in o.live_base])} "
            f"| {num(many)}{errors_note([r.result for r in o.live_many])} "
            f"| {times(ratio(many, base))} | {num(base_p99, '.2f', ' ms')} "
            f"| {num(many_p99, '.2f', ' ms')} "
            f"| {kept_cell(SYSTEMS[key], o.live_base + o.live_many)} |"
        )
    return lines


def expiry_table(results: Results) -> list[str]:
    if not results.expiry:
        return []
    lines = [
        "| Store | sessions | window | delivered | missing | duplicates | p50 | p99 | max |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for e in results.expiry:
        lines.append(
            f"| {e['store']} | {e['sessions']:,} | {e['window']:g} s | {e['deliveries']:,} "
            f"| {e['missing']} | {e['duplicates']} | {num(e['p50_ms'], '.1f', ' ms')} "
            f"| {num(e['p99_ms'], '.1f', ' ms')} | {num(e['max_ms'], '.1f', ' ms')} |"
        )
    return lines


def redis_table(results: Results) -> list[str]:
    rows = [(k, o.redis) for k, o in results.outcomes.items() if o.redis is not None]
    if not rows:
        return []
    lines = [
        "| System | round trips / touch under wrk (server read events) "
        "| Redis commands / touch (incl. inside Lua) "
        "| client commands / touch (MONITOR) | idle round trips/s | idle commands/s "
        "| one request at a time: commands == round trips |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for key, c in rows:
        assert c is not None
        monitored = c.monitor_requests > 0
        names = ", ".join(f"{n} {v:.2f}" for n, v in c.monitor_names.items())
        claim = ("yes" if c.claim_holds else "**no**") if monitored else "—"
        client = f"{c.monitor_client_commands:.2f} ({names})" if monitored else "—"
        lines.append(
            f"| {SYSTEMS[key].label} | {num(median_or_none(list(c.reads_per_request)), '.2f')} "
            f"| {num(median_or_none(list(c.commands_per_request)), '.2f')} | {client} "
            f"| {c.idle_reads:.1f} | {c.idle_commands:.1f} | {claim} |"
        )
    return lines


def cluster_table(results: Results) -> list[str]:
    """lapse on the Redis Cluster beside lapse on one Redis node, and their ratio."""
    single, cluster = results.outcomes.get(SINGLE_REDIS), results.outcomes.get(CLUSTER)
    if cluster is None:
        return []
    lines = [
        f"| Figure | {SYSTEMS[SINGLE_REDIS].label} | {SYSTEMS[CLUSTER].label} "
        "| cluster / single node |",
        "|---|---:|---:|---:|",
    ]
    for figure, rate in (("touch req/s", touch_rps), ("create req/s", create_rps)):
        a, b = rate(single), rate(cluster)
        lines.append(f"| {figure} | {num(a)} | {num(b)} | {times(ratio(b, a))} |")
    for figure, runs in (
        ("touch p99", lambda o: [r.result for r in o.touch]),
        ("create p99", lambda o: o.create),
    ):
        a_p99 = median_or_none([r.p99_ms for r in runs(single)]) if single else None
        b_p99 = median_or_none([r.p99_ms for r in runs(cluster)])
        lines.append(
            f"| {figure} | {num(a_p99, '.2f', ' ms')} | {num(b_p99, '.2f', ' ms')} "
            f"| {times(ratio(b_p99, a_p99))} |"
        )
    return lines


def idle_table(results: Results) -> list[str]:
    """What one lapse process sends to Redis while no request comes."""
    rows = [(k, o.redis) for k, o in results.outcomes.items() if o.redis is not None]
    if not rows:
        return []
    lines = [
        "| System | client commands/s | commands/s incl. inside Lua | per node (primary), "
        "commands/s incl. Lua | shards | per shard, client commands/s | by name, client "
        "commands/s |",
        "|---|---:|---:|---|---:|---|---|",
    ]
    for key, c in rows:
        assert c is not None
        per_node = ", ".join(f"{v:.1f}" for v in c.idle_node_commands) or "—"
        tagged = [v for tag, v in c.idle_shards.items() if tag]
        if tagged:
            shards = str(len(tagged))
            low, mid, high = min(tagged), statistics.median(tagged), max(tagged)
            per_shard = f"{mid:.1f} (min {low:.1f}, max {high:.1f})"
            untagged = c.idle_shards.get("", 0.0)
            if untagged:
                per_shard += f"; + {untagged:.1f} without a tag"
        else:
            shards, per_shard = "1 (untagged)", f"{c.idle_client_commands:.1f}"
        names = ", ".join(f"{n} {v:.1f}" for n, v in c.idle_names.items()) or "—"
        lines.append(
            f"| {SYSTEMS[key].label} | {c.idle_client_commands:.1f} | {c.idle_commands:.1f} "
            f"| {per_node} | {shards} | {per_shard} | {names} |"
        )
    return lines


def targets_lines(found: list[Target]) -> list[str]:
    lines = ["| Target | measured | value | verdict |", "|---|---|---:|---|"]
    for t in found:
        value = "—" if t.value is None else f"{t.value:.2f}"
        lines.append(f"| {t.name} | {t.measured} | {value} | {t.verdict} |")
    return lines


def raw_lines(results: Results) -> list[str]:
    lines = [
        "| System | Figure | Repeats (requests/s) | p99 (ms) | p99.9 (ms) | Requests "
        "| Non-2xx | Socket errors | server CPU µs/request | CPU stolen by the hypervisor, ms |",
        "|---|---|---|---|---|---:|---:|---:|---|---|",
    ]
    for key, o in results.outcomes.items():
        series = (
            ("touch", [r.result for r in o.touch]),
            ("create", o.create),
            ("touch, logged in", [r.result for r in o.touch_logged]),
            ("login", o.login),
            ("touch, 1 live", [r.result for r in o.live_base]),
            ("touch, many live", [r.result for r in o.live_many]),
            ("touch, side by side", results.side.touch.get(key, [])),
            ("create, side by side", results.side.create.get(key, [])),
        )
        for figure, runs in series:
            if not runs:
                continue
            repeats = ", ".join(f"{r.rps:,.0f}" for r in runs)
            p99s = ", ".join(num(r.p99_ms, ".2f") for r in runs)
            p999s = ", ".join(num(r.p999_ms, ".2f") for r in runs)
            lines.append(
                f"| {SYSTEMS[key].label} | {figure} | {repeats} | {p99s} | {p999s} "
                f"| {sum(r.requests for r in runs):,} | {sum(r.non_2xx for r in runs)} "
                f"| {sum(r.socket_errors for r in runs)} "
                f"| {', '.join(num(r.server_cpu_us, '.1f') for r in runs)} "
                f"| {', '.join(num(r.steal_ms, '.0f') for r in runs)} |"
            )
    memory = [(k, o) for k, o in results.outcomes.items() if o.memory]
    if memory:
        lines += [
            "",
            "| System | Sessions | live | RSS before | RSS after | Bytes/session | make time |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        for key, o in memory:
            for count, m in o.memory.items():
                lines.append(
                    f"| {SYSTEMS[key].label} | {count:,} | {m['live_sessions']:,} "
                    f"| {m['rss_before'] / 2**20:,.1f} MiB | {m['rss_after'] / 2**20:,.1f} MiB "
                    f"| {m['bytes_per_session']:,.1f} | {m['make_seconds']:.2f} s |"
                )
    redis_rows = [(k, o.redis) for k, o in results.outcomes.items() if o.redis is not None]
    if redis_rows:
        lines += [
            "",
            "| System | round trips / touch, per run | commands / touch, per run "
            "| commands by name / touch (wrk runs, idle not subtracted) "
            "| MONITOR: requests, Lua-internal / touch, round trips / touch "
            "| idle: s, client commands/s |",
            "|---|---|---|---|---|---|",
        ]
        for key, c in redis_rows:
            assert c is not None
            by_name = ", ".join(
                f"{n} {v:.2f}" for n, v in sorted(c.breakdown.items()) if v >= 0.005
            )
            idle_names = ", ".join(f"{n} {v:.1f}" for n, v in c.idle_names.items())
            lines.append(
                f"| {SYSTEMS[key].label} "
                f"| {', '.join(f'{v:.2f}' for v in c.reads_per_request)} "
                f"| {', '.join(f'{v:.2f}' for v in c.commands_per_request)} | {by_name} "
                f"| {c.monitor_requests}, {c.monitor_lua_commands:.2f}, {c.monitor_reads:.2f} "
                f"| {c.idle_seconds:.1f}, {c.idle_client_commands:.1f} ({idle_names}) |"
            )
    return lines


def find_problems(b: Bench, results: Results) -> list[str]:
    found = list(b.problems)
    for key, o in results.outcomes.items():
        label = SYSTEMS[key].label
        touches = o.touch + o.touch_logged + o.live_base + o.live_many
        runs = [r.result for r in touches] + o.create + o.login
        errors = sum(r.errors for r in runs)
        if errors:
            found.append(f"{label}: {errors} non-2xx responses or socket errors during wrk runs")
        lost = sum(not r.kept for r in touches)
        if lost:
            found.append(
                f"{label}: in {lost} of {len(touches)} touch runs the session was gone right "
                "after wrk (a GET with its cookie got a new session, or a logged-in one was "
                "no longer bound to its user)"
            )
        for count, m in o.memory.items():
            if not m["count_ok"]:
                found.append(f"{label}: {m['live_sessions']:,} live sessions, expected {count:,}")
    for e in results.expiry:
        for what in ("missing", "duplicates", "unknown"):
            if e[what]:
                found.append(f"expiry lateness, {e['store']}: {e[what]} {what}")
    return found


def report(b: Bench, results: Results, command: str) -> tuple[str, list[str], list[Target]]:
    opts = b.opts
    problems = find_problems(b, results)
    found = targets(results, opts)
    notes = list(b.notes)
    if b.retaken:
        notes.append(
            f"{len(b.retaken)} measured runs were set aside for the hypervisor's steal and "
            "taken again (section 'Runs set aside for steal')"
        )
    if opts.repeats < 3 or (opts.live_sessions > 0 and opts.live_repeats < 3):
        notes.append(
            f"--repeats {opts.repeats}, --live-repeats {opts.live_repeats}: fewer than 3 runs "
            "per figure, so a figure is one noisy run, not a median; a quick check only"
        )
    for key, o in results.outcomes.items():
        if o.redis is not None and o.redis.monitor_requests and not o.redis.claim_holds:
            notes.append(
                f"{SYSTEMS[key].label}: client commands per touch "
                f"({o.redis.monitor_client_commands:.2f}) != round trips per touch "
                f"({o.redis.monitor_reads:.2f}): some client pipelines"
            )
    versions = ", ".join(
        f"{name} {version_of(name)}"
        for name in (
            "lapse",
            "uvicorn",
            "httptools",
            "uvloop",
            "twisted",
            "aiohttp",
            "aiohttp-session",
            "starlette",
            "itsdangerous",
            "redis",
            "hiredis",
            "asyncpg",
            "django",
            "psycopg",
        )
    )
    used = [f"- {redis.description}" for redis in (b.redis, b.cluster) if redis is not None]
    redis_lines = used or ["- redis-server: not used"]
    if b.postgres is not None:
        redis_lines.append(f"- {b.postgres.description}")
    lines = [
        "# lapse and its peers: the seed program's GET /logme",
        "",
        f"- {time.strftime('%Y-%m-%d %H:%M %Z')}; command: `{command}`; took "
        f"{results.seconds / 60:.1f} min",
        f"- Machine: {os.cpu_count()} CPUs ({cpu_model()}), {platform.platform()}; "
        f"load average at the start {b.load_at_start}",
        f"- lapse imported from {lapse_source()}",
        f"- Python {platform.python_version()}; {versions}",
        f"- {wrk_version(b.wrk)}: `-t{opts.threads} -c{opts.connections} -d{opts.duration}s "
        f"--latency`, median of {opts.repeats} runs per figure, one fresh server per figure, "
        f"127.0.0.1; discarded warm-up: {opts.warmup} s (touch), {opts.create_warmup} s "
        "(create)",
        *redis_lines,
        "- touch: one cookie-less GET makes a session before each wrk run, every request "
        "carries its cookie, and a GET right after the run must find the same session "
        "(session kept); create: no cookie, so every request makes a session",
        "- vs lapse: this system's median / lapse (memory)'s median (memory: bytes / lapse's "
        "bytes); p99 and p99.9 from wrk's latency histogram (a Lua done() hook), median of "
        "the runs; worst run: the highest p99 of the runs",
        "",
        "## Requests/s",
        "",
        *throughput_table(results),
    ]
    for title, table in (
        (
            "## Side by side: lapse (memory), Twisted and the bare app alive at once, their "
            "runs taken in turn (the order rotating; touch on one server each, create on a "
            "fresh warmed-up server per run); the ratio targets are read from here",
            side_table(results),
        ),
        (TAIL_TITLE, tail_table(results)),
        ("## Memory per live session (in-process, RSS delta / N)", memory_table(results, opts)),
        (
            f"## Touch with {opts.live_sessions:,} other live sessions (two servers side by "
            "side, runs alternated)",
            live_table(results, opts),
        ),
        (
            f"## Expiry lateness ({opts.expiry_sessions:,} sessions expiring within "
            f"{opts.expiry_window:g} s, bench/expiry_lateness.py)",
            expiry_table(results),
        ),
        (
            "## Redis traffic per touch request (idle rate subtracted)",
            redis_table(results),
        ),
        (
            "## Redis Cluster (3 primaries, 3 replicas) vs one Redis node, one lapse process",
            cluster_table(results),
        ),
        (
            "## Idle: what one lapse process sends to Redis with no request "
            "(INFO commandstats and MONITOR deltas)",
            idle_table(results),
        ),
        (
            "## PostgreSQL: statements per request (pg_stat_statements, top level, idle rate "
            "subtracted) and what one idle lapse process sends",
            postgres_table(
                [(SYSTEMS[k].label, o.postgres) for k, o in results.outcomes.items() if o.postgres]
            ),
        ),
        workers_table(results),
        (SCALING_TITLE, scaling_table(results)),
        (PRINCIPAL_TITLE, principal_table(results)),
        (
            "## Principal index: the lapse server's CPU time per request (user + system, "
            "/proc/PID/stat around each wrk run; the store's own process not included)",
            principal_cpu_table(results),
        ),
        (
            "## Principal index: store calls per request (idle rate subtracted; one at a "
            "time: sequential touches on one connection)",
            principal_calls_table(results),
        ),
    ):
        if table:
            lines += ["", title, "", *table]
    lines += ["", "## Targets", "", *targets_lines(found), ""]
    lines.append("Problems: " + ("none" if not problems else ""))
    lines += [f"- {p}" for p in problems]
    if notes:
        lines += ["", "Notes:", *[f"- {n}" for n in notes]]
    lines += ["", "## Raw repeats", "", *raw_lines(results), ""]
    lines += retaken_lines(b)
    return "\n".join(lines), problems, found


def retaken_lines(b: Bench) -> list[str]:
    """The measured runs taken again for steal, and set aside (Bench.measured)."""
    opts = b.opts
    if opts.max_steal <= 0:
        return ["Runs were not taken again for steal (--max-steal 0).", ""]
    limit = opts.steal_limit_ms
    rule = (
        f"A measured run (touch, logged-in touch, create, side by side; not on Redis or "
        f"PostgreSQL) that lost "
        f"more than {opts.max_steal:.0%} of the machine's CPU time to the hypervisor "
        f"({limit:,.0f} ms in a {opts.duration} s run) was taken again, up to "
        f"{opts.steal_retakes} times; the try with the least steal was kept."
    )
    if not b.retaken:
        return ["## Runs set aside for steal", "", rule, "", "None.", ""]
    lines = [
        "## Runs set aside for steal",
        "",
        rule,
        "",
        "| System | Figure | requests/s | p99 (ms) | CPU stolen, ms |",
        "|---|---|---:|---:|---:|",
    ]
    for label, figure, r in b.retaken:
        lines.append(
            f"| {label} | {figure} | {r.rps:,.0f} | {num(r.p99_ms, '.2f')} "
            f"| {num(r.steal_ms, '.0f')} |"
        )
    return [*lines, ""]
