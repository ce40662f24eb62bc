"""Headless Chromium for browser tests: :func:`chromium_binary`."""

from __future__ import annotations

import os
import subprocess

import pytest

CHROMIUM = "/usr/bin/chromium"


def chromium_binary() -> str:
    """Debian's chromium, installed with apt-get if missing; fails clearly."""
    if os.path.exists(CHROMIUM):
        return CHROMIUM
    if os.geteuid() != 0:
        pytest.fail(f"{CHROMIUM} is missing and we are not root: run `apt-get install -y chromium`")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    install = ["apt-get", "install", "-y", "-q", "chromium"]
    done = subprocess.run(install, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        subprocess.run(["apt-get", "update"], env=env, capture_output=True, check=False)
        done = subprocess.run(install, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0 or not os.path.exists(CHROMIUM):
        pytest.fail(
            f"could not install chromium with apt-get (exit {done.returncode}):\n"
            f"{done.stdout[-2000:]}\n{done.stderr[-2000:]}"
        )
    return CHROMIUM
