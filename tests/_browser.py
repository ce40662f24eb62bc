"""Headless Chromium for browser tests: :func:`chromium_binary`."""

from __future__ import annotations

import pytest
from _redis_server import apt_install

CHROMIUM = "/usr/bin/chromium"


def chromium_binary() -> str:
    """Debian's chromium, installed with apt-get if missing (by the installer the
    other system packages share, so parallel workers wait for one another and
    for the dpkg lock instead of failing on it); fails clearly."""
    try:
        return apt_install("chromium", CHROMIUM, recommends=True)
    except RuntimeError as e:
        pytest.fail(str(e))
