"""The chart: requests/s per system, touch and create side by side, and on the lapse
systems login and touch of a logged-in session (matplotlib)."""

from __future__ import annotations

import statistics
from pathlib import Path

from bench.figures import create_rps, logged_touch_rps, login_rps, touch_rps
from bench.options import Options
from bench.scenarios import Results
from bench.systems import BARE, SYSTEMS


def workers_rows(results: Results) -> list[tuple[str, list[float | None]]]:
    """One row per N of ``lapse serve --workers N`` (touch and create, all workers)."""
    rows: list[tuple[str, list[float | None]]] = []
    for o in results.outcomes.values():
        runs = o.workers.runs if o.workers else []
        for n in sorted({r.workers for r in runs}):
            rates = [
                statistics.median(rs) if (rs := [r.result.rps for r in runs
                                                 if r.workers == n and r.figure == f]) else None
                for f in ("touch", "create")
            ]  # fmt: skip
            rows.append((f"lapse serve --workers {n} (Redis)", [rates[0], None, rates[1], None]))
    return rows


def write_chart(results: Results, opts: Options, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    kinds = [
        ("touch existing session", touch_rps, "#1f77b4"),
        ("touch, logged-in session", logged_touch_rps, "#17becf"),
        ("create a session per request (no cookie)", create_rps, "#ff7f0e"),
        ("log in per request (new session, rotate, bind)", login_rps, "#d62728"),
    ]
    rows = [
        (SYSTEMS[k].label, [rate(o) for _, rate, _ in kinds])
        for k, o in results.outcomes.items()
        if touch_rps(o) is not None or create_rps(o) is not None
    ]
    many = workers_rows(results)
    rows += many
    if not rows:
        raise RuntimeError("nothing to chart")
    shown = [i for i in range(len(kinds)) if any(r[1][i] is not None for r in rows)]
    height = 0.76 / len(shown)
    fig, ax = plt.subplots(figsize=(10, 1.6 + 0.31 * len(shown) * len(rows)))
    ys = list(range(len(rows)))
    every: list[float] = []
    for slot, i in enumerate(shown):
        label, _, color = kinds[i]
        values = [r[1][i] or 0.0 for r in rows]
        every += values
        offset = (slot - (len(shown) - 1) / 2) * height
        bars = ax.barh([y + offset for y in ys], values, height, label=label, color=color)
        for bar in bars:
            width = bar.get_width()
            if width:
                ax.text(width, bar.get_y() + bar.get_height() / 2, f" {width:,.0f}",
                        va="center", fontsize=8)  # fmt: skip
    bare = touch_rps(results.outcomes.get(BARE))
    if bare:
        ax.axvline(bare, color="gray", linestyle="--", linewidth=1,
                   label=f"bare uvicorn, no sessions ({bare:,.0f})")  # fmt: skip
    ax.set_yticks(ys, [r[0] for r in rows])
    ax.invert_yaxis()
    ax.set_xlim(0, max(every) * 1.18)
    ax.set_xlabel("requests/s (median; higher is better)")
    pages = "GET /logme, POST /login" if 3 in shown else "GET /logme"
    ax.set_title(
        f"{pages}, wrk -t{opts.threads} -c{opts.connections} -d{opts.duration}s, "
        f"median of {opts.repeats}, one server process on 127.0.0.1"
        + ("\n(lapse serve --workers N: N worker processes, one socket)" if many else ""),
        fontsize=10,
    )
    ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda x, _: f"{x:,.0f}"))
    fig_height = fig.get_figheight()
    fig.legend(loc="lower center", ncol=3, fontsize=8, frameon=False)
    legend_rows = -(-(len(shown) + (1 if bare else 0)) // 3)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout(rect=(0, 0.3 * legend_rows / fig_height, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
