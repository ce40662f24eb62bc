"""What a report says about where it ran: the machine, the versions, where lapse came from."""

from __future__ import annotations

import contextlib
import os
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path

from bench.systems import REPO_DIR


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


def wrk_version(wrk: str) -> str:
    done = subprocess.run([wrk, "-v"], capture_output=True, text=True, check=False)
    first = (done.stdout or done.stderr).strip().splitlines()
    return first[0].split(" [")[0] if first else "wrk ?"


def lapse_source() -> str:
    """Where the servers import lapse from, and the git state of this repo's src/."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LAPSE_")}
    done = subprocess.run(
        [sys.executable, "-c", "import lapse; print(lapse.__file__)"],
        capture_output=True, text=True, check=False, env=env,
    )  # fmt: skip
    where = Path(done.stdout.strip() or ".").resolve().parent.parent
    git = ["git", "-C", str(REPO_DIR)]
    head = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True,
                          text=True, check=False).stdout.strip()  # fmt: skip
    dirty = subprocess.run([*git, "status", "--porcelain", "src"], capture_output=True,
                           text=True, check=False).stdout.strip()  # fmt: skip
    if where == REPO_DIR / "src":
        state = "with uncommitted changes in src/" if dirty else "src/ clean"
        return f"this repo's src/ (git {head or '?'}, {state})"
    return f"{where} (not this repo's src/; repo at git {head or '?'})"
