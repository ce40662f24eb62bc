"""A done-callback the stores share for work whose failure nobody may await."""

from __future__ import annotations

import asyncio
from typing import Any

__all__ = ["retrieved"]


def retrieved(future: asyncio.Future[Any]) -> None:
    """Mark ``future``'s exception seen: a shared task (or a reply) whose
    waiters may all have given up, or that fails through another, must not
    be logged as "exception was never retrieved"."""
    if not future.cancelled():
        future.exception()
