"""The issue's ratio targets measured side by side: lapse (memory), Twisted and
the bare uvicorn app alive at once, their wrk runs taken in turn.

The main table measures one system after another, each with its five runs
back to back; on this machine the same server's CPU per request drifts by
10-20 % (sometimes 2x) between minutes, so a ratio of two systems measured
minutes apart carries that drift. Here each repeat runs every system once,
the order rotating, so drift falls on all of them alike; the targets that
compare lapse with Twisted and with the bare app are read from these runs.

- touch: one server per system, warmed up; each run on a session made just
  before it (as the main table's touch runs).
- create: a fresh server for each run, warmed up as the main table's
  (the create warm-up reaches the steady state, sessions ending as fast as
  they are made), and stopped after its run, so that no ending of its
  sessions takes CPU from another system's run.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Any

from bench.loadgen import WrkResult
from bench.systems import BARE, REFERENCE, SYSTEMS, System

if TYPE_CHECKING:
    from bench.scenarios import Bench

SIDE_BY_SIDE = (REFERENCE, "twisted", BARE)
"""The systems the ratio targets compare, in the order of the first repeat."""


@dataclass
class SideBySide:
    """The runs of each system, by key."""

    touch: dict[str, list[WrkResult]] = field(default_factory=dict)
    create: dict[str, list[WrkResult]] = field(default_factory=dict)


def side_by_side_keys(systems: list[str]) -> list[str]:
    """The side-by-side systems among ``systems`` (none unless lapse and another)."""
    keys = [key for key in SIDE_BY_SIDE if key in systems]
    return keys if REFERENCE in keys and len(keys) > 1 else []


def rotation(keys: list[str], repeat: int) -> list[str]:
    """The order of ``keys`` in repeat number ``repeat``: each first in turn."""
    shift = repeat % len(keys)
    return keys[shift:] + keys[:shift]


def bench_side_by_side(
    b: Bench,
    keys: list[str],
    into: SideBySide,
    touch_once: Callable[[Bench, System, int, int], Any],
) -> None:
    """Touch, then create, runs of ``keys``' systems in turn (module doc);
    ``touch_once``: the main table's touch run."""
    opts = b.opts
    systems = {key: SYSTEMS[key] for key in keys}
    with contextlib.ExitStack() as stack:
        ports = {key: stack.enter_context(b.server(system)) for key, system in systems.items()}
        if opts.warmup > 0:
            for key in keys:
                touch_once(b, systems[key], ports[key], opts.warmup)
        for repeat in range(opts.repeats):
            for key in rotation(keys, repeat):
                system = systems[key]
                once = partial(touch_once, b, system, ports[key], opts.duration)
                run = b.measured(system, "touch, side by side", once, lambda t: t.result)
                into.touch.setdefault(key, []).append(run.result)
    for repeat in range(opts.repeats):
        for key in rotation(keys, repeat):
            with b.server(systems[key]) as port:
                if opts.create_warmup > 0:
                    b.run_wrk(port, opts.create_warmup, None)
                once = partial(b.run_wrk, port, opts.duration, None)
                run = b.measured(systems[key], "create, side by side", once, lambda r: r)
                into.create.setdefault(key, []).append(run)
