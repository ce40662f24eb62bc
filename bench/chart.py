"""The chart: requests/s per system, touch and create side by side (matplotlib)."""

from __future__ import annotations

from pathlib import Path

from bench.figures import create_rps, touch_rps
from bench.options import Options
from bench.scenarios import Results
from bench.systems import BARE, SYSTEMS


def write_chart(results: Results, opts: Options, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    rows = [
        (SYSTEMS[k].label, touch_rps(o), create_rps(o))
        for k, o in results.outcomes.items()
        if touch_rps(o) is not None or create_rps(o) is not None
    ]
    if not rows:
        raise RuntimeError("nothing to chart")
    height = 0.38
    fig, ax = plt.subplots(figsize=(10, 1.6 + 0.62 * len(rows)))
    ys = list(range(len(rows)))
    touch = [r[1] or 0.0 for r in rows]
    create = [r[2] or 0.0 for r in rows]
    bars_t = ax.barh([y - height / 2 for y in ys], touch, height, label="touch existing session",
                     color="#1f77b4")  # fmt: skip
    bars_c = ax.barh([y + height / 2 for y in ys], create, height,
                     label="create a session per request (no cookie)", color="#ff7f0e")  # fmt: skip
    for bars in (bars_t, bars_c):
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
    ax.set_xlim(0, max(touch + create) * 1.18)
    ax.set_xlabel("requests/s (median; higher is better)")
    ax.set_title(
        f"GET /logme, wrk -t{opts.threads} -c{opts.connections} -d{opts.duration}s, "
        f"median of {opts.repeats}, one server process on 127.0.0.1",
        fontsize=10,
    )
    ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda x, _: f"{x:,.0f}"))
    fig_height = fig.get_figheight()
    fig.legend(loc="lower center", ncol=3, fontsize=8, frameon=False)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout(rect=(0, 0.3 / fig_height, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
